"""Vocabulary-free distillation on the knowledge testbed: the heads, and the table's rows.

The rows (``ULD (MinCE teacher)``, ``InfiFusion``) are trained by
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
