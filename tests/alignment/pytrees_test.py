"""Every entry point on any pytree: equinox modules, outputs returned from jit, empty specs."""

import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import alignment
from fusionjax.alignment import AlignmentOutput
from fusionjax.alignment import OTFusionOutput
from fusionjax.alignment import PermutationSpec
from tests._testing import assert_trees_close
from tests.alignment.hand_specs_test import numpy_permutations
from tests.alignment.hand_specs_test import randomize

EXACT = dict(rtol=0, atol=0)
X = jax.device_put(np.random.default_rng(1).standard_normal((16, 3), np.float32))


def eqx_mlp(seed):
    """A real ``eqx.nn.MLP`` (3 -> 8 -> 8 -> 2), its arrays drawn with NumPy."""
    abstract = eqx.filter_eval_shape(eqx.nn.MLP, 3, 2, 8, 2, key=jax.random.key(0))
    arrays, static = eqx.partition(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return eqx.combine(randomize(arrays, seed), static)


def forward(model, x):
    """The module on a batch."""
    return jax.vmap(model)(x)


# The forward pass the assertions compare, compiled once per module structure (not op by op).
jit_forward = eqx.filter_jit(forward)


def arrays(model):
    """The array leaves of ``model`` (its functions dropped)."""
    return eqx.filter(model, eqx.is_array)


@pytest.fixture(scope="module")
def eqx_pair():
    """``(derived spec, model, independent model, permuted copy of the model)``."""
    a, b = eqx_mlp(0), eqx_mlp(1)
    spec = alignment.derive_spec(forward, a, X)
    assert len(spec) == 2
    copy = alignment.apply_permutations(spec, numpy_permutations(spec, a), a)
    assert isinstance(copy, eqx.nn.MLP) and copy.activation is a.activation
    return spec, a, b, copy


@pytest.mark.parametrize("solver", ["scipy", "hungarian"])
def test_weight_matching_on_equinox_modules(eqx_pair, solver):
    """A planted permutation of an eqx.nn.MLP is undone exactly; its functions stay static."""
    spec, a, b, copy = eqx_pair
    out = alignment.weight_matching(spec, a, copy, solver=solver)  # was a custom_jvp error
    moved = out.apply(copy)
    assert isinstance(moved, eqx.nn.MLP) and moved.activation is a.activation
    assert_trees_close(arrays(moved), arrays(a), **EXACT)
    aligned = alignment.weight_matching(spec, a, b, solver=solver).apply(b)
    assert_trees_close(jit_forward(aligned, X), jit_forward(b, X), rtol=1e-5, atol=1e-5)


def test_other_entry_points_on_equinox_modules(eqx_pair):
    """Activation matching, MergeMany, OT fusion, STE and interpolation take modules too."""
    spec, a, b, copy = eqx_pair
    acts = alignment.group_activations(forward, a, X, spec=spec)
    am = alignment.activation_matching(
        spec, (acts, alignment.group_activations(forward, copy, X, spec=spec))
    )
    assert_trees_close(arrays(am.apply(copy)), arrays(a), **EXACT)

    mm = alignment.merge_many(spec, [a, copy])
    assert isinstance(mm.merged, eqx.nn.MLP) and mm.merged.activation is a.activation
    assert_trees_close(arrays(mm.merged), arrays(mm.aligned([a, copy])[0]), **EXACT)

    ot = alignment.ot_fusion(spec, a, copy, roles="first")
    assert isinstance(ot.fused, eqx.nn.MLP)
    assert_trees_close(arrays(ot.fused), arrays(a), **EXACT)
    assert_trees_close(arrays(ot.apply(copy)), arrays(a), **EXACT)

    def loss_fn(model, x):
        assert isinstance(model, eqx.nn.MLP)  # the whole module, static leaves back
        return jnp.mean((forward(model, x) - forward(a, x)) ** 2)

    ste = alignment.ste_matching(spec, a, copy, loss_fn, [X])
    assert float(ste.objective) < 1e-10
    assert_trees_close(arrays(ste.apply(copy)), arrays(a), **EXACT)

    mid = alignment.interpolate(a, b, 0.5)
    assert isinstance(mid, eqx.nn.MLP)
    half = 0.5 * (np.asarray(a.layers[0].weight) + np.asarray(b.layers[0].weight))
    assert_trees_close(mid.layers[0].weight, half)
    curve = alignment.interpolation_curve(lambda m: jnp.sum(forward(m, X)), a, b, num=3)
    np.testing.assert_allclose(curve.values[0], np.sum(jit_forward(a, X)), rtol=1e-5)
    np.testing.assert_allclose(curve.values[2], np.sum(jit_forward(b, X)), rtol=1e-5)


def mlp_dict(seed, dims=(3, 8, 8, 2)):
    """A dict MLP ``Dense_i/{kernel, bias}`` (NumPy-drawn)."""
    r = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": jax.device_put(r.standard_normal((m, n), np.float32)),
            "bias": jax.device_put(r.standard_normal((n,), np.float32)),
        }
        for i, (m, n) in enumerate(zip(dims[:-1], dims[1:], strict=True))
    }


SPEC = alignment.mlp_spec(2, prefix=None)


def test_outputs_are_returned_from_jit_whole():
    """AlignmentOutput and OTFusionOutput leave jit with their spec and roles, and apply."""
    ref, other = mlp_dict(0), mlp_dict(1)
    out = jax.jit(lambda r, o: alignment.weight_matching(SPEC, r, o))(ref, other)
    eager = alignment.weight_matching(SPEC, ref, other)  # host solver: nothing to compile
    assert isinstance(out, AlignmentOutput) and out.spec == SPEC
    assert_trees_close(out.permutations, eager.permutations, **EXACT)
    assert_trees_close(out.apply(other), eager.apply(other), **EXACT)
    assert not any(isinstance(x, PermutationSpec) for x in jax.tree.leaves(out))

    ot = jax.jit(lambda r, o: alignment.ot_fusion(SPEC, r, o))(ref, other)
    eager_ot = alignment.ot_fusion(SPEC, ref, other)
    assert isinstance(ot, OTFusionOutput) and ot.spec == SPEC
    assert ot.roles == eager_ot.roles
    assert_trees_close(ot.fused, eager_ot.fused, rtol=1e-6, atol=1e-6)
    assert_trees_close(ot.apply(other), eager_ot.aligned, rtol=1e-6, atol=1e-6)
    # The output also goes back into jit as an argument (the flag is an array there).
    again = jax.jit(lambda o, p: o.apply(p))(ot, other)
    assert_trees_close(again, eager_ot.aligned, rtol=1e-6, atol=1e-6)


EMPTY = PermutationSpec({})
ENTRY_POINTS = {
    "weight_matching": lambda p: alignment.weight_matching(EMPTY, p, p),
    "activation_matching": lambda p: alignment.activation_matching(EMPTY, ({}, {})),
    "ste_matching": lambda p: alignment.ste_matching(EMPTY, p, p, lambda q, b: 0.0, [0]),
    "merge_many": lambda p: alignment.merge_many(EMPTY, [p, p]),
    "ot_fusion": lambda p: alignment.ot_fusion(EMPTY, p, p),
    "apply_permutations": lambda p: alignment.apply_permutations(EMPTY, {}, p),
    "apply_transports": lambda p: alignment.apply_transports(EMPTY, {}, p),
    "axis_roles": lambda p: alignment.axis_roles(EMPTY, p),
    "identity_permutations": lambda p: alignment.identity_permutations(EMPTY, p),
    "random_permutations": lambda p: alignment.random_permutations(EMPTY, p, jax.random.key(0)),
    "group_activations": lambda p: alignment.group_activations(
        lambda q, x: x @ q["Dense_0"]["kernel"], p, X, spec=EMPTY
    ),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_empty_spec_is_an_error(entry):
    """A spec without groups is a ValueError, not a silent success."""
    with pytest.raises(ValueError, match="spec has no groups"):
        ENTRY_POINTS[entry](mlp_dict(0))


def test_wrong_spec_type_is_a_type_error():
    """Anything but a PermutationSpec is a TypeError naming the type."""
    with pytest.raises(TypeError, match="spec must be a PermutationSpec, got dict"):
        alignment.weight_matching({"h": []}, mlp_dict(0), mlp_dict(1))


def test_importing_alignment_loads_no_flax():
    """Only the linen-specific functions (BatchNorm reset, REPAIR) import flax, when called.

    ``fusionjax/__init__`` is bypassed: what it imports is another module's business.
    """
    root = pathlib.Path(__file__).resolve().parents[2]
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('fusionjax'); pkg.__path__ = [{str(root / 'fusionjax')!r}]\n"
        "sys.modules['fusionjax'] = pkg\n"
        "import fusionjax.alignment\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'equinox', 'ott')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
