"""Proxy-tuning and Dynamic Logit Fusion on the byte-level language testbed, three seeds.

The setting of both papers (:mod:`fusionjax.testbed.language`): a strong model and a small
base pretrained on general text, small experts fine-tuned on ``code`` and ``docs``, and
the strong model fine-tuned on each domain as the upper bound. "Gap closed" is
``(nll_strong - nll_fused) / (nll_strong - nll_strong_ft)`` on held-out text of the
domain (256 windows of 64 bytes). Measured on 2026-12-02, seeds 0 / 1 / 2:

==========================================  =================  =================
gap closed                                  code               docs
==========================================  =================  =================
proxy-tuning, alpha = 1                     .519 / .533 / .580  .350 / .317 / .386
proxy-tuning, best fixed alpha (0.75)       .563 / .561 / .593  .411 / .351 / .403
DLF, own expert (exact solver)              .516 / .537 / .568  .358 / .341 / .370
DLF, both experts (the paper's rule)        .268 / .277 / .389  -.780 / -.551 / -.791
==========================================  =================  =================

What reproduces: proxy-tuning moves the strong model a third to a half of the way to
the fine-tuned strong model. Dynamic Logit Fusion with the right expert solves for
alpha = 1.01-1.07 on average and lands on proxy-tuning at alpha = 1 (within .024), so it
is *not* better than the best fixed alpha here (.01-.05 below it). With both experts, the
paper's rule (one active expert per step, the one whose solved objective against the
experts' mean targets is smallest) picks the code expert on 74-79% of docs positions:
our small experts drift far from the base out of domain (the code expert's docs
perplexity is 15.9 against the base's 12.8), so the wrong expert has the larger KL and
its curve reaches the mean targets; on docs the fusion is worse than the strong model.
The exact solver's alpha agrees with the paper's 0.1 grid to 0.056 at most and with a
0.002 grid to 0.0061 (it stops after a fixed number of Newton steps).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import logits as fl
from fusionjax.testbed import language
from tests._testing import SEEDS

ALPHAS = tuple(0.25 * i for i in range(1, 9))
DOMAINS = ("code", "docs")


def _gap_closed(lp, windows, domain, fused):
    strong = language.nll(lp["strong"], windows)
    target = language.nll(lp[f"strong_ft[{domain}]"], windows)
    return (strong - language.nll(np.asarray(fused), windows)) / (strong - target)


@pytest.fixture(scope="module")
def figures(language_testbeds, language_log_probs):
    """``{(seed, domain): {row: value}}``: every figure of the table above, once."""
    out = {}
    for seed, tb in language_testbeds.items():
        for d in DOMAINS:
            lp, w = language_log_probs[seed][d], tb.heldout[d]
            expert = lp[f"expert[{d}]"]
            row = {
                a: _gap_closed(lp, w, d, fl.proxy_tuning(lp["strong"], expert, lp["base"], alpha=a))
                for a in ALPHAS
            }
            exact = fl.dynamic_alpha(lp["strong"], expert, lp["base"], solver="exact")
            grid = fl.dynamic_alpha(lp["strong"], expert, lp["base"], solver="grid")
            head = (lp["strong"][:16], expert[:16], lp["base"][:16])  # 1,024 positions
            fine = fl.dynamic_alpha(*head, solver="grid", grid_step=0.002)
            dlf = fl.dynamic_logit_fusion(lp["strong"], expert, lp["base"])
            experts = jnp.stack([lp[f"expert[{e}]"] for e in tb.domains])
            multi = fl.dynamic_logit_fusion(lp["strong"], experts, lp["base"])
            row.update(
                best=max(row[a] for a in ALPHAS),
                dlf=_gap_closed(lp, w, d, dlf.log_probs),
                dlf_alpha=float(np.mean(dlf.alpha)),
                multi=_gap_closed(lp, w, d, multi.log_probs),
                multi_own=float(np.mean(np.asarray(multi.expert_index) == tb.domains.index(d))),
                alpha_gap=float(np.max(np.abs(np.asarray(exact.alpha) - np.asarray(grid.alpha)))),
                fine_gap=float(np.max(np.abs(np.asarray(exact.alpha[:16]) - np.asarray(fine.alpha)))),
                objective_excess=float(np.max(np.asarray(exact.objective - grid.objective))),
            )
            out[seed, d] = row
    return out


@pytest.mark.slow
def test_proxy_tuning_closes_part_of_the_gap_on_every_seed(figures):
    # Smallest measured: alpha = 1 .519 (code), .317 (docs); best fixed .561, .351.
    for seed in SEEDS:
        for d, at_one, best in (("code", 0.4, 0.45), ("docs", 0.2, 0.25)):
            assert figures[seed, d][1.0] > at_one, (seed, d, figures[seed, d])
            assert figures[seed, d]["best"] > best, (seed, d, figures[seed, d])
            # Too strong a push overshoots: alpha = 2 is worse than the best.
            assert figures[seed, d][2.0] < figures[seed, d]["best"] - 0.05


@pytest.mark.slow
def test_dynamic_logit_fusion_with_its_expert_matches_proxy_tuning_at_alpha_one(figures):
    # Measured |DLF - proxy(1)| <= .024, mean alpha 1.01-1.07, DLF gap >= .341.
    for seed in SEEDS:
        for d in DOMAINS:
            f = figures[seed, d]
            assert f["dlf"] > {"code": 0.45, "docs": 0.28}[d], (seed, d, f)
            assert abs(f["dlf"] - f[1.0]) < 0.04, (seed, d, f)
            assert 0.9 < f["dlf_alpha"] < 1.2, (seed, d, f)
            # The finding: not above the best fixed alpha on this testbed (.01-.05 below).
            assert f["dlf"] < f["best"] + 0.01, (seed, d, f)


@pytest.mark.slow
def test_exact_solver_agrees_with_the_grid_to_its_resolution(figures):
    # Measured: max |alpha_exact - alpha_grid(0.1)| = 0.056 over 16,384 positions per case,
    # max |alpha_exact - alpha_grid(0.002)| = 0.0061 on 1,024; where the 0.1 grid lands next
    # to a near-zero minimum (0.1-0.5% of positions) f(exact) exceeds f(grid) by <= 3.5e-5.
    for key, f in figures.items():
        assert f["alpha_gap"] <= 0.1, (key, f["alpha_gap"])
        assert f["fine_gap"] <= 0.01, (key, f["fine_gap"])
        assert f["objective_excess"] <= 1e-4, (key, f["objective_excess"])


@pytest.mark.slow
def test_multi_expert_rule_helps_on_code_and_picks_the_wrong_expert_on_docs(figures):
    # Measured: code .268/.277/.389; docs -.780/-.551/-.791, own expert on 21-26% of docs.
    for seed in SEEDS:
        code, docs = figures[seed, "code"], figures[seed, "docs"]
        assert code["multi"] > 0.15, (seed, code)
        assert docs["multi_own"] < 0.5 and docs["multi"] < docs["dlf"], (seed, docs)
