"""Tolerances and small helpers shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np

SEEDS = (0, 1, 2)
"""Testbed seeds every evidence test runs on."""

F32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=1e-2, atol=1e-2)


def np_log_softmax(x) -> np.ndarray:
    """Float64 NumPy log-softmax over the last axis: a reference with no JAX program per shape."""
    x = np.asarray(x, np.float64)
    z = x - np.max(x, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_logsumexp(x) -> np.ndarray:
    """Float64 NumPy logsumexp over the last axis (``-inf`` rows give ``-inf``)."""
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(np.exp(x - m), axis=-1)) + m[..., 0]


def assert_trees_close(a, b, **tol):
    """Asserts two pytrees have the same structure and close leaves."""
    tol = tol or F32
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"structures differ: {ta} != {tb}"
    for (path, x), (_, y) in zip(la, lb, strict=False):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), err_msg=jax.tree_util.keystr(path), **tol
        )


def _numpy_rng(key):
    """A NumPy generator seeded from a JAX PRNG key (typed or raw ``uint32``), no XLA compile."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng([int(v) for v in np.asarray(key).ravel()])


def random_model(key, *, dtype=jnp.float32, scale=1.0):
    """A small nested-dict model with a kernel, a bias, a conv-like kernel and an int leaf.

    Drawn with NumPy from a generator seeded by ``key`` and placed with ``jax.device_put``:
    a ``jax.random`` draw compiles a threefry program per new shape (and ``jnp.asarray`` of a
    NumPy array a copy program per shape); this compiles nothing.
    """
    r = _numpy_rng(key)

    def draw(shape):
        return jax.device_put(np.asarray(scale * r.normal(size=shape), np.float32).astype(dtype))

    return {
        "dense": {"kernel": draw((8, 4)), "bias": draw((4,))},
        "conv": {"kernel": draw((3, 3, 2, 5))},
        "scale": draw(()),
        "step": jax.device_put(np.asarray(7, np.int32)),
    }


def finetune_like(base, key, n, *, scale=0.1):
    """``n`` models near ``base`` (float leaves perturbed, int leaves equal); NumPy draws."""
    r = _numpy_rng(key)
    leaves, treedef = jax.tree.flatten(base)
    out = []
    for _ in range(n):
        new = [
            jax.device_put(
                np.asarray(x)
                + np.asarray(scale * r.normal(size=x.shape), np.float32).astype(x.dtype)
            )
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
            for x in leaves
        ]
        out.append(treedef.unflatten(new))
    return out


def assert_streamed_merge_equals_in_memory(tmp_path, base, finetuned, merger):
    """Merges flat dict models in memory and streamed from safetensors files; equal bytes.

    Args:
      tmp_path: A folder for the checkpoints and the merged file.
      base: ``{name: array}`` base model.
      finetuned: A list of models like ``base``.
      merger: A leafwise merger (a :class:`fusionjax.Step`).
    """
    import fusionjax as fj  # noqa: PLC0415
    from fusionjax import io  # noqa: PLC0415

    base = {k: jnp.asarray(v) for k, v in base.items()}
    finetuned = [{k: jnp.asarray(v) for k, v in f.items()} for f in finetuned]
    expected = fj.merge(base, finetuned, merger)
    paths = [
        io.save_safetensors(t, tmp_path / f"{i}.safetensors")
        for i, t in enumerate([base, *finetuned])
    ]
    out = io.merge_checkpoints(
        paths[0], paths[1:], merger, tmp_path / "out.safetensors", progress=False
    )
    got = io.load_safetensors(out.path)
    for k in expected:
        assert np.asarray(got[k]).tobytes() == np.asarray(expected[k]).tobytes(), k


def dense_forward(layers, x):
    """Float64 NumPy forward of a list of ``{"kernel", "bias"}`` layers, ReLU between them."""
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(layers):
        h = h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def random_dense_chain(seed, widths, d_in=4, d_out=3):
    """A list of float32 ``{"kernel": [in, out], "bias": [out]}`` layers (NumPy normal draws)."""
    r = np.random.default_rng(seed)
    dims = (d_in, *widths, d_out)
    return [
        {
            "kernel": r.normal(size=(i, o)).astype(np.float32),
            "bias": (0.1 * r.normal(size=o)).astype(np.float32),
        }
        for i, o in zip(dims[:-1], dims[1:], strict=True)
    ]
