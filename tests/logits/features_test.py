"""The feature ensembles moved from learned to logits and are the same objects in both."""

import jax.numpy as jnp
import numpy as np

import fusionjax as fj


def test_learned_reexports_the_logits_functions():
    assert fj.learned.expert_features is fj.logits.expert_features
    assert fj.learned.ensemble_logits is fj.logits.ensemble_logits


def test_ensemble_logits_levels_agree_for_an_affine_head():
    models = [{"w": jnp.eye(3) * (i + 1)} for i in range(2)]
    x = jnp.arange(6.0).reshape(2, 3)
    feats = fj.logits.expert_features(models, x, lambda p, xx: xx @ p["w"])
    assert feats.shape == (2, 2, 3)
    w = jnp.array([[0.25, 0.75], [1.0, 0.0]])
    head = lambda t, f: f @ jnp.ones((3, 2)) + 1.0  # noqa: E731
    a = fj.logits.ensemble_logits(w, feats, head, 0, level="features")
    b = fj.logits.ensemble_logits(w, feats, head, 0, level="logits")
    np.testing.assert_allclose(a, b, rtol=1e-6)
