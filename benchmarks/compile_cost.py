"""Compile cost of fusionjax.merge: first call, new step objects and values, warm call, NumPy.

Two models: a 5,000-leaf model with 100 distinct shapes (small leaves, as in a
model with many norms, biases and heads) and a GPT-2-small-shaped flax-style
parameter dict (148 leaves, 124 M parameters). For task arithmetic, TIES and
DARE it times, in one process:

* the first call (every compile included),
* a call with a new step object and new hyperparameter values (must compile
  nothing: the step is a pytree whose hyperparameters are traced),
* a warm call, and
* a NumPy implementation of the same method.

Run: ``python benchmarks/compile_cost.py`` (about 2 minutes on 2 CPU cores).
The last two lines are ``recompiles on new hyperparameters: N`` and
``first call vs numpy, 5000 leaves: N.Nx`` (TIES, the costliest to compile).
"""

from __future__ import annotations

import time

import jax
import numpy as np

import fusionjax as fj
from fusionjax._src import merge as merge_lib


def many_leaves(seed: int, n_leaves: int = 5000, n_shapes: int = 100):
    rng = np.random.default_rng(seed)
    return {
        f"leaf_{i:04d}": rng.standard_normal((4 + i % n_shapes, 8)).astype(np.float32)
        for i in range(n_leaves)
    }


def gpt2_small(seed: int, d: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024):
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    def block():
        return {
            "ln_1": {"scale": w(d), "bias": w(d)},
            "attn": {"c_attn": {"kernel": w(d, 3 * d), "bias": w(3 * d)},
                     "c_proj": {"kernel": w(d, d), "bias": w(d)}},
            "ln_2": {"scale": w(d), "bias": w(d)},
            "mlp": {"c_fc": {"kernel": w(d, 4 * d), "bias": w(4 * d)},
                    "c_proj": {"kernel": w(4 * d, d), "bias": w(d)}},
        }

    params = {"wte": {"embedding": w(vocab, d)}, "wpe": {"embedding": w(ctx, d)},
              "ln_f": {"scale": w(d), "bias": w(d)}}
    params.update({f"h_{i}": block() for i in range(layers)})
    return {"params": params}


def finetuned(base, seed, n=3):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(x.dtype), base)
            for _ in range(n)]


def numpy_merge(method, base, fts, value, rng):
    out = {}
    flat_b, treedef = jax.tree.flatten(base)
    flat_f = [jax.tree.leaves(f) for f in fts]
    res = []
    for i, b in enumerate(flat_b):
        tv = np.stack([f[i] - b for f in flat_f])
        if method == "task_arithmetic":
            m = value * tv.sum(0)
        elif method == "ties":
            flat = np.abs(tv.reshape(len(fts), -1))
            k = int(np.ceil(value * flat.shape[1]))
            thr = -np.partition(-flat, k - 1, axis=1)[:, k - 1]
            tv = np.where(np.abs(tv) >= thr.reshape((-1,) + (1,) * b.ndim), tv, 0)
            sign = np.sign(tv.sum(0))
            tv = np.where(np.sign(tv) == sign, tv, 0)
            m = tv.sum(0) / np.maximum((tv != 0).sum(0), 1)
        else:  # dare + task arithmetic
            keep = rng.random(tv.shape) >= value
            m = 0.3 * (np.where(keep, tv / (1 - value), 0)).sum(0)
        res.append(b + m)
    out = treedef.unflatten(res)
    return out


METHODS = {
    "task_arithmetic": lambda v: fj.merging.task_arithmetic(scaling=v),
    "ties": lambda v: fj.merging.ties(density=v),
    "dare": lambda v: fj.merging.dare(drop_rate=v),
}
VALUES = {"task_arithmetic": (0.3, 0.5), "ties": (0.2, 0.4), "dare": (0.5, 0.7)}


def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def compiles():
    return merge_lib._merge_leaf._cache_size() + merge_lib._merge_group._cache_size()


def main():
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    recompiles = 0
    ratio_5000 = None
    for model_name, make in (("5000 leaves, 100 shapes", many_leaves), ("GPT-2 small", gpt2_small)):
        base = make(0)
        fts = finetuned(base, 1)
        n = sum(x.size for x in jax.tree.leaves(base))
        n_leaves = len(jax.tree.leaves(base))
        print(f"\n{model_name}: {n_leaves} leaves, {n / 1e6:.1f} M parameters, 3 models")
        print(
            f"{'method':16s} {'first':>8s} {'new step':>9s} {'warm':>8s} {'numpy':>8s} "
            f"{'first/np':>9s} {'recompiles':>10s}"
        )
        for name, factory in METHODS.items():
            v0, v1 = VALUES[name]
            key = jax.random.key(0)
            def run(value, factory=factory, base=base, fts=fts, key=key):
                return fj.merge(base, fts, factory(value), key=key)

            first = timed(lambda v=v0: run(v))
            before = compiles()
            new = timed(lambda v=v1: run(v))
            added = compiles() - before
            recompiles += added
            warm = timed(lambda v=v1: run(v))
            rng = np.random.default_rng(0)
            npt = timed(lambda n=name, v=v0, b=base, f=fts, r=rng: numpy_merge(n, b, f, v, r))
            print(
                f"{name:16s} {first:8.2f} {new:9.2f} {warm:8.2f} {npt:8.2f} "
                f"{first / npt:8.1f}x {added:10d}"
            )
            if model_name.startswith("5000") and name == "ties":
                ratio_5000 = first / npt
    print(f"\nrecompiles on new hyperparameters: {recompiles}")
    print(f"first call vs numpy, 5000 leaves: {ratio_5000:.1f}x")


if __name__ == "__main__":
    main()
