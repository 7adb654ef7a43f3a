"""Greedy soup."""

import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj


def test_greedy_soup_adds_only_helpful_models():
    models = [{"w": jnp.array([x])} for x in (1.0, 3.0, 9.0, 2.5)]
    score = lambda p: -abs(float(p["w"][0]) - 2.2)  # noqa: E731
    out = fj.merging.greedy_soup(models, score)
    # by own score: 2.5 (0.3), 1.0 (1.2), 3.0 (0.8) -> order 3, 2?, ...
    assert out.selected[0] == 3
    np.testing.assert_allclose(out.params["w"], np.mean([models[i]["w"] for i in out.selected], 0))
    assert 2 not in out.selected
    assert out.score >= max(out.individual_scores)


def test_greedy_soup_rejects_nan_scores():
    models = [{"w": jnp.ones(1)}, {"w": 2 * jnp.ones(1)}]
    score = lambda p: float("nan") if float(p["w"][0]) == 2.0 else 1.0  # noqa: E731
    with pytest.raises(ValueError, match=r"evaluate returned nan for finetuned\[1\]"):
        fj.merging.greedy_soup(models, score)
