"""Experts sharded over 4 (forced CPU) devices decode the same tokens as on one device.

The device count is fixed when JAX starts, so the check runs in one fresh interpreter with
``--xla_force_host_platform_device_count=4`` (as tests/core/sharding_test.py does).
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from fusionjax import decoding, zoo

    assert jax.device_count() == 4
    strong = zoo.Decoder(vocab_size=32, dim=32, depth=1, heads=4, mlp_width=64, max_length=32)
    small = zoo.Decoder(vocab_size=32, dim=16, depth=1, heads=2, mlp_width=32, max_length=32)
    x = np.zeros((1, 4), np.int32)
    init = jax.jit(small.init)
    # The experts' weights x4, stacked on the host (no eager program per leaf shape).
    experts = jax.tree.map(lambda *a: np.stack(a) * np.float32(4.0),
                           *[jax.device_get(init(jax.random.key(i), x)) for i in range(4)])
    members = [
        decoding.Member(decoding.from_linen(strong), jax.jit(strong.init)(jax.random.key(9), x),
                        np.array([[1, 2, 3, 4], [0, 0, 5, 6]]), np.array([4, 2])),
        decoding.Member(decoding.from_linen(small), experts,
                        np.array([[7, 8, 9, 10, 11, 12], [0, 0, 0, 13, 14, 15]]),
                        np.array([6, 3]), stacked=True),
    ]

    def fuse(logits):
        s, e = logits  # e: [E, B, V]
        weights = jnp.arange(1.0, 5.0)[:, None, None] / 10.0
        return jax.nn.log_softmax(s + jnp.sum(weights * jax.nn.log_softmax(e), axis=0))

    kwargs = dict(max_new_tokens=6, stop_tokens=(31,))
    ref = decoding.generate(members, fuse, **kwargs)
    # jax.make_mesh's default axis type (Explicit); Auto axes take with_sharding_constraint
    # instead of reshard for the caches, and nothing else differs.
    for kind in (jax.sharding.AxisType.Explicit,):
        mesh = jax.make_mesh((4,), ("experts",), axis_types=(kind,))
        out = decoding.generate_sharded(members, fuse, mesh=mesh, **kwargs)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
        np.testing.assert_allclose(out.token_log_probs, ref.token_log_probs, atol=1e-5)
        # The group really is split: each device holds one expert, and logits are gathered.
        run = jax.jit(lambda: decoding.generate_sharded(members, fuse, mesh=mesh, **kwargs))
        assert "all_gather" in run.lower().as_text()
        print("ok", kind, np.asarray(out.tokens).tolist())
    """
)


def test_sharded_experts_decode_the_same_tokens():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 1, proc.stdout
