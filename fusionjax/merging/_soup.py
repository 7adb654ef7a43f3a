"""Greedy model soup."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import Params
from fusionjax._src.merge import merge
from fusionjax.merging._linear import mean


class GreedySoupResult(NamedTuple):
    """Output of :func:`greedy_soup`.

    Attributes:
      params: The soup: the uniform average of the selected models.
      selected: Indices (into ``finetuned``) of the models in the soup, in the
        order they were added.
      score: The soup's score under ``evaluate``.
      individual_scores: Each model's own score, ``[T]``.
    """

    params: Params
    selected: tuple[int, ...]
    score: float
    individual_scores: np.ndarray


_MEAN = mean()  # one merger object, so its compiled leaf functions are reused


def _average(models: Sequence[Params]) -> Params:
    return merge(models[0], list(models), _MEAN)


def greedy_soup(
    finetuned: Sequence[Params], evaluate: Callable[[Params], float]
) -> GreedySoupResult:
    r"""Greedy soup: add models by decreasing score while the average improves.

    Models are sorted by their own score; starting from the best, each next
    model joins the soup if the uniform average with it scores at least as well
    as the soup without it (on held-out data, which ``evaluate`` should use).

    Args:
      finetuned: Non-empty list of fine-tuned models (same structure).
      evaluate: ``evaluate(params) -> float``, higher is better (e.g. validation
        accuracy). Called ``2T - 1`` times.

    Returns:
      A :class:`GreedySoupResult`.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> models = [{"w": jnp.array(1.0)}, {"w": jnp.array(3.0)}, {"w": jnp.array(9.0)}]
      >>> out = fj.merging.greedy_soup(models, lambda p: -abs(float(p["w"]) - 2.0))
      >>> out.selected, float(out.params["w"])
      ((0, 1), 2.0)

    References:
      Wortsman et al, `Model soups <https://arxiv.org/abs/2203.05482>`_, ICML 2022
    """
    validation.check_nonempty(finetuned)
    validation.check_models(finetuned[0], finetuned)
    scores = np.array([float(evaluate(m)) for m in finetuned])
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(
            f"evaluate returned {scores[bad]} for finetuned[{bad}]; scores must be finite."
        )
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    selected = [order[0]]
    soup, best = finetuned[order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = _average([finetuned[j] for j in selected + [i]])
        score = float(evaluate(candidate))
        if score >= best:
            selected.append(i)
            soup, best = candidate, score
    return GreedySoupResult(soup, tuple(selected), float(best), scores)
