"""Vocabulary-free distillation on the knowledge testbed: the heads, and the table's rows.

The rows (``ULD (MinCE teacher)``, ``InfiFusion``, ``InfiGFusion``) are trained by
``fusionjax.demo._distill`` with the same data, steps, optimizer and batches as the other
students; the assertions hold on every seed, with margins below the smallest measured gap.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import distill
from fusionjax.demo import _distill
from fusionjax.testbed import _language
from tests._testing import SEEDS


@pytest.fixture(scope="module")
def heads(knowledge_testbeds):
    tb = knowledge_testbeds[SEEDS[0]]
    windows = np.concatenate(list(tb.train_windows(16).values()))
    return tb, windows, {n: tb.token_targets(n, windows, k=64) for n in tb.teacher_names()}


def test_token_heads_are_aligned_as_the_byte_targets(heads):
    # The same rows as next_byte_distributions: a BPE teacher's head is masked exactly
    # where its next-byte target is (first token, past its context, last row).
    tb, windows, out = heads
    for name, h in out.items():
        assert h.targets.log_probs.shape == (len(windows), windows.shape[1], 64)
        np.testing.assert_array_equal(h.where, tb.byte_targets(name, windows, k=4).where)
        assert not h.where[:, -1].any()
        lp = h.targets.log_probs[h.where]
        assert np.all(np.diff(lp, axis=-1) <= 1e-6)  # most likely first
        mass = np.exp(lp.astype(np.float64)).sum(-1)
        assert np.all(mass <= 1.0 + 1e-4) and np.all(mass > 0.2)  # not renormalised
        assert np.all(h.targets.ids[~h.where] == -1)
    # Every byte of a BPE token shares its teacher row: runs of equal heads.
    code = out["bpe[code]"].targets.log_probs
    same = np.all(code[:, 1:] == code[:, :-1], axis=-1)
    assert same.mean() > 0.3


def test_standardised_head_is_the_librarys(heads):
    tb, windows, out = heads
    lp = _language.log_probs(tb.language.strong_module, tb.language.strong, windows)
    ref = distill.uld_teacher_targets(jnp.asarray(lp), k=64, standardize=True)
    where = out["byte"].where
    np.testing.assert_allclose(
        out["byte"].standardized.log_probs[where], np.asarray(ref.log_probs)[where],
        rtol=1e-5, atol=1e-5,
    )


def test_teacher_graphs_are_the_librarys_graphs_of_the_heads(heads):
    # The byte teacher's head of 256 slots is its whole distribution: its graphs are the
    # library's co-activation graphs of its log-probabilities, on the rows all hold.
    tb, windows, _ = heads
    full = [tb.token_targets(n, windows, k=256) for n in tb.teacher_names()]
    where = np.all([h.where for h in full], axis=0)
    graphs = _distill.teacher_graphs(tb, [h.targets for h in full], where, 8, chunk=20)
    assert graphs.shape == (len(windows), 3, 8, 8) and np.all(np.isfinite(graphs))
    np.testing.assert_allclose(graphs, np.swapaxes(graphs, -1, -2), atol=0)
    lp = _language.log_probs(tb.language.strong_module, tb.language.strong, windows)
    ref = distill.coactivation_graph(jnp.asarray(lp), k=8, where=jnp.asarray(where)).graph
    byte = tb.teacher_names().index("byte")
    np.testing.assert_allclose(graphs[:, byte], np.asarray(ref), rtol=1e-4, atol=1e-7)


def _means(rows):
    return {r.name: _distill.mean_bits(r) for r in rows}


# Measured (seeds 0, 1, 2; mean held-out bits per byte over the three corpora):
#   InfiFusion - CLM only:              +0.018 +0.017 +0.017
#   InfiFusion - best of MinCE/AvgCE:   +0.036 +0.031 +0.030
#   ULD (MinCE teacher) - InfiFusion:   +0.225 +0.115 +0.128
#   ULD (MinCE teacher) - CLM only:     +0.243 +0.132 +0.145
# The vocabulary-free losses do not reproduce FuseLLM's gain here: the student is
# byte-level, so most of its rows sit inside a teacher token, where the teacher's
# distribution is over whole tokens (flat: its top 64 hold 52-75 % of the mass) while the
# student's next byte is nearly certain; matching sorted values then pulls the student's
# confidence towards the token distribution's, whatever the bytes.
#   InfiGFusion - InfiFusion:           +0.075 +0.060 +0.067
# Nor does InfiGFusion's graph term (gamma = 1.7e4-2.2e4, the rule that equals it to
# InfiFusion's distance at the base): the teachers' graphs are co-activations of whole
# tokens (every byte row of a token repeats its row), the student's of bytes; matching
# them by sorted GW pulls the byte student's structure toward the tokens'.


def test_vocabulary_free_rows_trail_clm_and_the_mapped_fusion(knowledge_rows):
    for seed, rows in knowledge_rows.items():
        m = _means(rows)
        infi, uld = m["InfiFusion"], m["ULD (MinCE teacher)"]
        assert infi > m["CLM only"] + 0.010, (seed, infi, m["CLM only"])
        assert infi > min(m["FuseLLM MinCE"], m["FuseLLM AvgCE"]) + 0.020, (seed, m)
        assert uld > infi + 0.080, (seed, uld, infi)
        assert uld > m["CLM only"] + 0.080, (seed, uld, m["CLM only"])
        assert m["InfiGFusion"] > infi + 0.040, (seed, m["InfiGFusion"], infi)


def test_vocabulary_free_students_learn(knowledge_rows):
    # Not a diverged run: the distillation term falls and InfiFusion stays within 0.1 bit
    # of CLM only on every corpus (measured: 0.015-0.020).
    for seed, rows in knowledge_rows.items():
        by = {r.name: r for r in rows}
        for name in ("InfiFusion", "ULD (MinCE teacher)", "InfiGFusion"):
            losses = by[name].losses
            assert np.all(np.isfinite(losses)) and losses[-10:].mean() < losses[:10].mean()
        for c, b in by["InfiFusion"].bits.items():
            assert b < by["CLM only"].bits[c] + 0.1, (seed, c)
