"""Specs derived from the jaxpr: sound (outputs unchanged), and equal to the hand specs."""

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import Primitive

from fusionjax import zoo
from fusionjax.alignment import PermutationSpec
from fusionjax.alignment import apply_permutations
from fusionjax.alignment import derive_spec
from fusionjax.alignment import group_activations
from fusionjax.alignment import transformer_spec
from tests._testing import assert_trees_close
from tests.alignment.hand_specs_test import CASES
from tests.alignment.hand_specs_test import TOKENS
from tests.alignment.hand_specs_test import assert_invariant
from tests.alignment.hand_specs_test import case
from tests.alignment.hand_specs_test import numpy_permutations
from tests.alignment.hand_specs_test import permute
from tests.alignment.hand_specs_test import randomize


def derive(name):
    """The derived spec of a zoo case, with its jitted apply, variables and input."""
    apply_fn, variables, x, hand = case(name)
    return derive_spec(CASES[name][0].apply, variables, x), apply_fn, variables, x, hand


def relu_layer(w, b, h):
    """``relu(h @ w + b)``."""
    return jax.nn.relu(h @ w + b[None])


def mlp_params(widths=(3, 6, 6, 2), seed=0):
    """``{"w0", "b0", "w1", ...}`` for :func:`relu_layer` stacks."""
    rng = np.random.default_rng(seed)
    p = {}
    for i, (m, n) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        p[f"w{i}"] = jax.device_put(rng.standard_normal((m, n), np.float32))
        p[f"b{i}"] = jax.device_put(rng.standard_normal(n, np.float32))
    return p


X = jax.device_put(np.random.default_rng(1).standard_normal((4, 3), np.float32))


def groups_of(spec):
    """The groups as a list of sets of ``(path, axis)``, in spec order."""
    return [set(axes) for axes in spec.groups.values()]


@pytest.mark.parametrize("name", CASES)
def test_derived_spec_equals_hand_spec_in_order(name):
    derived, _, variables, _, hand = derive(name)
    assert derived.same_groups(hand, variables)
    assert groups_of(derived) == groups_of(hand)  # same forward order too


def test_deeper_transformer_derived_spec_equals_hand_spec():
    model = zoo.Transformer(dim=8, depth=3, heads=4, mlp_width=12)
    abstract = jax.eval_shape(model.init, jax.random.key(0), TOKENS)
    derived = derive_spec(model.apply, abstract, TOKENS)
    assert groups_of(derived) == groups_of(transformer_spec(3))


@pytest.mark.parametrize("name", ["mlp", "resnet_batch", "transformer"])
def test_derived_spec_leaves_outputs_unchanged(name):
    derived, apply_fn, variables, x, _ = derive(name)
    assert_invariant(apply_fn, variables, x, derived)


def test_abstract_params_suffice():
    model, x, hand = CASES["mlp"]
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    spec = derive_spec(model.apply, abstract, jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert spec.same_groups(hand, abstract)


def test_one_cached_function_called_twice_gives_two_groups():
    layer = jax.jit(relu_layer)  # same shapes twice: JAX reuses one inner jaxpr

    def model(p, x):
        h = layer(p["w0"], p["b0"], x)
        h = layer(p["w1"], p["b1"], h)
        return h @ p["w2"]

    p, x = mlp_params((6, 6, 6, 2)), jnp.concatenate([X, X], axis=1)
    first, second = jax.make_jaxpr(model)(p, x).eqns[:2]
    assert first.params["jaxpr"] is second.params["jaxpr"]
    spec = derive_spec(model, p, x)
    assert groups_of(spec) == [
        {("w0", 1), ("b0", 0), ("w1", 0)},
        {("w1", 1), ("b1", 0), ("w2", 0)},
    ]
    assert_invariant(jax.jit(model), p, x, spec)


mystery_p = Primitive("mystery")
mystery_p.def_impl(lambda h: h[..., ::-1])  # order-dependent, and unknown to derive_spec
mystery_p.def_abstract_eval(lambda h: h)

HIDDEN_OPS = {
    "unknown primitive": mystery_p.bind,
    "cumsum": lambda h: jnp.cumsum(h, axis=-1),
    "sort": lambda h: jnp.sort(h, axis=-1),
    "slice": lambda h: jnp.pad(h[:, 1:], ((0, 0), (0, 1))),
    "roll": lambda h: jnp.roll(h, 1, axis=-1),
    "reverse": lambda h: h[:, ::-1],
    "scatter": lambda h: h.at[:, 0].set(0.0),
    "argmax": lambda h: h + jnp.argmax(h, axis=-1, keepdims=True).astype(h.dtype),
    "constant": lambda h: h * jnp.arange(6.0)[None],
    # Harmless here, but a split axis is frozen: conservative, never wrong.
    "split reshape": lambda h: (h.reshape(-1, 2, 3) * jnp.ones(3)[None, None]).reshape(-1, 6),
}


@pytest.mark.parametrize("op", HIDDEN_OPS)
def test_ops_it_cannot_see_through_freeze_their_units(op):
    def model(p, x):
        h = HIDDEN_OPS[op](relu_layer(p["w0"], p["b0"], x))
        return relu_layer(p["w1"], p["b1"], h) @ p["w2"]

    p = mlp_params()
    spec = derive_spec(model, p, X)
    assert groups_of(spec) == [{("w1", 1), ("b1", 0), ("w2", 0)}]  # the first layer's units froze
    if op == "unknown primitive":  # the freezing was needed, and what is left is sound
        assert_invariant(model, p, X, spec)
        hidden = PermutationSpec({"h": [("w0", 1), ("b0", 0), ("w1", 0)]})
        moved = permute(hidden, numpy_permutations(hidden, p), p)
        assert not np.allclose(model(moved, X), model(p, X), rtol=1e-3)


def test_reductions_keep_units_and_inputs_outputs_freeze():
    def model(p, x):
        h = relu_layer(p["w0"], p["b0"], x)
        h = h * jax.nn.softmax(h, axis=-1) + jnp.max(h, axis=-1, keepdims=True)  # invariant mixing
        r = relu_layer(p["w1"], p["b1"], h)
        return jnp.concatenate([r @ p["w2"], x @ p["wx"]], axis=-1)

    p = mlp_params() | {"wx": jnp.ones((3, 3))}
    spec = derive_spec(model, p, X)
    assert groups_of(spec) == [{("w0", 1), ("b0", 0), ("w1", 0)}, {("w1", 1), ("b1", 0), ("w2", 0)}]
    assert_invariant(model, p, X, spec)
    # Input axes (w0 axis 0, wx) and output axes (w2 axis 1) are never permuted.
    assert not {("w0", 0), ("w2", 1), ("wx", 0), ("wx", 1)} & set().union(*groups_of(spec))

    def residual_on_input(p, x):  # x + f(x) ties the hidden units to the input's features
        return (x + relu_layer(p["w0"], p["b0"], x)) @ p["w1"]

    q = mlp_params((3, 3, 2))
    assert len(derive_spec(residual_on_input, q, X)) == 0


def test_scan_and_cond_are_followed_soundly():
    def model(p, x):
        h = relu_layer(p["w0"], p["b0"], x)
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["ws"])
        h = jax.lax.cond(x[0, 0] > 0, jax.nn.relu, lambda h: 2.0 * h, h)
        return h @ p["w1"]

    p = mlp_params((3, 6, 2)) | {
        "ws": jax.device_put(np.random.default_rng(2).standard_normal((3, 6, 6), np.float32))
    }
    spec = derive_spec(model, p, X)
    # One permutation for every layer of the stack (the carry is one value).
    assert groups_of(spec) == [{("w0", 1), ("b0", 0), ("ws", 1), ("ws", 2), ("w1", 0)}]
    assert_invariant(model, p, X, spec)


def test_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 5, rngs=rngs)
            self.l2 = nnx.Linear(5, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.gelu(self.l1(x)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
    state = randomize(state)  # from shapes: eager initialisers compile op by op
    apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
    spec = derive_spec(apply_fn, state, X)
    assert groups_of(spec) == [
        {("l1/kernel/value", 1), ("l1/bias/value", 0), ("l2/kernel/value", 0)}
    ]
    perms = numpy_permutations(spec, state)
    permuted = apply_permutations(spec, perms, state)
    assert_trees_close(apply_fn(permuted, X), apply_fn(state, X))


def apply_permutations_eqx(spec, module):
    """Permutes the array leaves of an equinox module (its functions stay as they are)."""
    arrays, static = eqx.partition(module, eqx.is_array)
    perms = numpy_permutations(spec, arrays)
    return eqx.combine(apply_permutations(spec, perms, arrays), static)


def test_equinox_model():
    abstract = eqx.filter_eval_shape(eqx.nn.MLP, 3, 2, 5, 2, key=jax.random.key(0))
    arrays, static = eqx.partition(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    mlp = eqx.combine(randomize(arrays), static)  # its activation leaves stay static
    apply_fn = lambda m, x: jax.vmap(m)(x)  # noqa: E731
    spec = derive_spec(apply_fn, mlp, X)
    assert groups_of(spec) == [
        {("layers/0/weight", 0), ("layers/0/bias", 0), ("layers/1/weight", 1)},
        {("layers/1/weight", 0), ("layers/1/bias", 0), ("layers/2/weight", 1)},
    ]
    permuted = apply_permutations_eqx(spec, mlp)
    assert_trees_close(apply_fn(permuted, X), apply_fn(mlp, X))


def test_group_activations_are_the_next_layers_inputs():
    _, variables, x, _ = case("mlp")
    acts = group_activations(CASES["mlp"][0].apply, variables, x)
    assert {k: a.shape for k, a in acts.items()} == {"P_0": (2, 6), "P_1": (2, 6)}
    p = variables["params"]
    h0 = jax.nn.relu(x.reshape(2, -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None])
    np.testing.assert_allclose(acts["P_0"], h0, rtol=1e-5, atol=1e-6)
    assert (acts["P_1"] >= 0).all()


def test_group_activations_permute_with_the_model():
    model, _, hand = CASES["transformer"]
    _, variables, x, _ = case("transformer")
    perms = numpy_permutations(hand, variables)
    acts = group_activations(model.apply, variables, x, spec=hand)
    moved = group_activations(model.apply, permute(hand, perms, variables), x, spec=hand)
    assert set(acts) == set(hand.names)
    n = hand.sizes(variables)
    for g, a in acts.items():
        assert a.ndim == 2 and a.shape[1] == n[g] and a.shape[0] > 0, g
        np.testing.assert_allclose(moved[g], a[:, perms[g]], rtol=1e-5, atol=1e-5, err_msg=g)
    assert acts["residual"].shape == (2 * 2 * 4 + 2, 8)  # ln1, ln2 outputs [B, T]; head input [B]
    # Queries and keys [B, T, heads, d_head] (averaged over heads): B * T rows each.
    assert acts["block_0/qk"].shape == (2 * 2 * 4, 4)
    # The attention output [B, T, heads, d_head] read by `out`: heads averaged over d_head.
    assert acts["block_0/heads"].shape == (2 * 4, 2)


def test_group_activations_with_a_spec_naming_frozen_axes_fails():
    model, _, _ = CASES["mlp"]
    _, variables, x, _ = case("mlp")
    bad = PermutationSpec({"input": [("params/Dense_0/kernel", 0)]})
    with pytest.raises(ValueError, match="'input'.*'params/Dense_0/kernel' axis 0 is in no group"):
        group_activations(model.apply, variables, x, spec=bad)
    missing = PermutationSpec({"h": [("params/Dense_9/kernel", 1)]})
    with pytest.raises(ValueError, match="'params/Dense_9/kernel', not an array leaf"):
        group_activations(model.apply, variables, x, spec=missing)


class TrainNet(linen.Module):
    """Dense -> BatchNorm -> ReLU -> Dropout -> Dense -> ReLU -> Dense, with a train flag."""

    @linen.compact
    def __call__(self, x, train=False):
        """Logits; batch statistics and dropout in train mode."""
        h = linen.Dense(6)(x)
        h = linen.BatchNorm(use_running_average=not train)(h)
        h = linen.Dropout(0.5, deterministic=not train)(linen.relu(h))
        return linen.Dense(2)(linen.relu(linen.Dense(6)(h)))


def test_train_mode_dropout_and_mutable_give_the_eval_spec():
    """Train mode, active dropout and mutable collections derive the eval-mode groups."""
    model = TrainNet()
    variables = randomize(jax.eval_shape(model.init, jax.random.key(0), X))
    key = jax.random.key(1)
    eval_spec = derive_spec(model.apply, variables, X)
    assert len(eval_spec) == 2
    assert ("batch_stats/BatchNorm_0/mean", 0) in groups_of(eval_spec)[0]
    modes = {  # each used to derive no group at all
        "train": dict(train=True, mutable=["batch_stats"], rngs={"dropout": key}),
        "mutable": dict(mutable=["batch_stats"]),
        "mutable=True": dict(train=True, mutable=True, rngs={"dropout": key}),
    }
    for mode, kwargs in modes.items():
        spec = derive_spec(model.apply, variables, X, **kwargs)
        assert groups_of(spec) == groups_of(eval_spec), mode
    dropout_only = lambda v, x, k: model.apply(  # noqa: E731
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k}
    )[0]
    # Outputs returned by hand are still frozen: the batch statistics' update is dead
    # code here, and the dropout mask alone does not freeze the units.
    assert groups_of(derive_spec(dropout_only, variables, X, key)) == groups_of(eval_spec)


def test_resnet_in_train_mode_gives_the_hand_spec():
    """BatchNorm in train mode (statistics returned as updates) keeps every group."""
    model, x, hand = CASES["resnet_batch"]
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    spec = derive_spec(model.apply, abstract, x, train=True, mutable=["batch_stats"])
    assert groups_of(spec) == groups_of(hand)
