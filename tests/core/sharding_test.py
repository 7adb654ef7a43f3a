"""Merges of arrays sharded over 4 (forced CPU) devices keep their sharding.

The device count is fixed when JAX starts, so the check runs in one fresh
interpreter with ``--xla_force_host_platform_device_count=4``.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import fusionjax as fj
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 4

    def model(seed):
        k = jax.random.key(seed)
        return {"w": np.asarray(jax.random.normal(k, (64, 8))), "b": np.ones(8, np.float32) * seed}

    # The references: the same merges of the same values as host arrays on one device, outside
    # any mesh (computed once; they do not depend on the mesh's axis type).
    host = model(0), [model(i) for i in (1, 2, 3)]
    methods = {"task_arithmetic": fj.merging.task_arithmetic(scaling=0.3),
               "ties": fj.merging.ties(density=0.3),
               "ties_model": fj.merging.ties(density=0.3, scope="model"),
               "dare": fj.merging.dare(drop_rate=0.5)}
    refs = {name: fj.merge(*host, m, key=jax.random.key(0)) for name, m in methods.items()}
    for kind in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((4,), ("x",), axis_types=(kind,))
        rows = NamedSharding(mesh, P("x", None))
        repl = NamedSharding(mesh, P())
        place = lambda p: {"w": jax.device_put(p["w"], rows), "b": jax.device_put(p["b"], repl)}
        base, fts = place(host[0]), [place(p) for p in host[1]]
        with jax.set_mesh(mesh):
            for name, m in methods.items():
                out = fj.merge(base, fts, m, key=jax.random.key(0))
                ref = refs[name]
                assert out["w"].sharding.is_equivalent_to(rows, 2), (kind, name, out["w"].sharding)
                assert out["b"].sharding.is_equivalent_to(repl, 1), (kind, name, out["b"].sharding)
                np.testing.assert_allclose(out["w"], ref["w"], rtol=1e-6, atol=1e-6)
                print(kind, name, "ok")
    """
)


def test_sharded_merges_keep_their_sharding():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 8, proc.stdout
