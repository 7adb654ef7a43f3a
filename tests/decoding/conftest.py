"""Tiny decoders shared by the decoding tests (built once per session)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import decoding
from fusionjax import zoo

VOCAB = 32


def random_variables(module, seed, scale=8.0):
    """Random variables of a ``zoo.Decoder``, with a sharpened head so greedy choices are far
    from ties.

    Drawn with NumPy (seeded by ``seed``) at the scales of the module's own initialisers
    (embeddings ``normal(0.02)``, kernels LeCun-normal, biases 0, layer-norm scales 1), the
    shapes from ``jax.eval_shape``: compiling ``module.init`` costs ~1.3 s per architecture.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        parent, name = (getattr(k, "key", None) for k in ((None, *path))[-2:])
        if name == "scale":
            x = np.ones(leaf.shape)
        elif name == "bias":
            x = np.zeros(leaf.shape)
        elif name in ("embedding", "pos_embedding"):
            x = 0.02 * rng.standard_normal(leaf.shape)
        else:  # a kernel: the "out" projection's inputs are its first two axes (heads, dim)
            fan_in = np.prod(leaf.shape[:2]) if parent == "out" else leaf.shape[0]
            x = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
            if parent == "head":
                x = scale * x
        return jax.device_put(np.asarray(x, leaf.dtype))

    return {"params": jax.tree_util.tree_map_with_path(draw, shapes["params"])}


@pytest.fixture(scope="session")
def lms():
    """``{name: (DecoderModel, module, variables)}``: a strong model, an expert and a base."""
    strong = zoo.Decoder(vocab_size=VOCAB, dim=32, depth=1, heads=4, mlp_width=64, max_length=32)
    small = zoo.Decoder(vocab_size=VOCAB, dim=16, depth=1, heads=2, mlp_width=32, max_length=32)
    # One DecoderModel per architecture: members built from it share the compiled loop.
    models = {strong: decoding.from_linen(strong), small: decoding.from_linen(small)}
    out = {"strong": (strong, random_variables(strong, 0))}
    for i, name in enumerate(["expert", "base", "expert2", "expert3"]):
        out[name] = (small, random_variables(small, i + 1))
    return {k: (models[m], m, v) for k, (m, v) in out.items()}


def hand_greedy(module, variables, prompt, steps):
    """Greedy decoding of one model by full forwards over the growing sequence (no cache).

    The sequence lives in a buffer of its final width; causal attention makes the logits at
    column ``t`` depend on columns ``<= t`` only, so one compiled forward serves every step.
    """
    prompt = np.asarray(prompt)
    width = prompt.shape[1]
    seq = np.zeros((prompt.shape[0], width + steps), np.int32)
    seq[:, :width] = prompt
    forward = jax.jit(module.apply)
    for i in range(steps):
        logits = np.asarray(forward(variables, jnp.asarray(seq)))
        seq[:, width + i] = np.argmax(logits[:, width + i - 1], axis=-1)
    return seq[:, width:]


def first(logits):
    """The first member's log-probabilities."""
    return jax.nn.log_softmax(logits[0])


def proxy(logits, alpha):
    """Proxy-tuning: strong + alpha (expert - base), members ``[strong, expert, base]``."""
    s, e, b = logits
    shift = jax.nn.log_softmax(e) - jax.nn.log_softmax(b)
    return jax.nn.log_softmax(s + alpha * shift)
