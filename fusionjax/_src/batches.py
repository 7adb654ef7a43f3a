"""Examples in fixed-size batches, so one compiled step serves every batch."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def padded_batches(inputs: Any, n: int, batch_size: int):
    """Yields ``(batch, mask)`` over ``n`` examples, every batch ``batch_size`` long.

    The last batch is padded by repeating its first example and ``mask`` (float32,
    ``[batch_size]``) is 0 on the padding, so one compiled step serves every batch.

    Args:
      inputs: A pytree of arrays ``[n, ...]``.
      n: Number of examples.
      batch_size: Examples per batch.

    Yields:
      ``(batch, mask)`` pairs.
    """
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        pad = batch_size - (stop - start)

        def take(a, start=start, stop=stop, pad=pad):
            xb = jnp.asarray(a[start:stop])
            if pad:
                xb = jnp.concatenate([xb, jnp.repeat(xb[:1], pad, axis=0)])
            return xb

        mask = (jnp.arange(batch_size) < (stop - start)).astype(jnp.float32)
        yield jax.tree.map(take, inputs), mask
