"""Evidence on the knowledge testbed (FuseLLM, FuseChat): the table of ``demo distill``.

Every student starts from the byte-level small base and is trained on the same windows,
steps and batches (:mod:`fusionjax.demo._distill`); scores are held-out bits per byte.
"The domains" are ``code`` and ``docs``; ``general`` is the pretraining corpus, where the
byte teacher is the only teacher better than the base. Margins sit below the smallest
value measured over seeds 0, 1, 2 (given in each docstring as seed 0 / 1 / 2).

Measured and not asserted, because it does not hold on every seed:
- fused beating every single teacher on the *three* corpora together: MinCE by
  0.0035 / 0.0060 / 0.0019 bits, AvgCE by 0.0012 / -0.0025 / -0.0060 (the byte teacher's
  student is better on general text, where MinCE often picks the docs teacher, whose
  training-window score there is lower but whose byte targets are worse);
- a FuseChat merge beating the better of its two pair targets on all corpora: VaRM by
  0.0043 / -0.0032 / -0.0020;
- each single teacher's student being best on its teacher's corpus: on seed 1 the byte
  teacher's student is better on docs (3.523) than the docs teacher's (3.534): the byte
  teacher's targets are its own next-byte distributions, the BPE teachers' are converted
  from tokens and condition on the tokenization (see :mod:`fusionjax.distill._bytes`).
"""

import numpy as np

from fusionjax.demo import _distill

DOMAINS = ("code", "docs")
SINGLES = ("teacher bpe[code]", "teacher bpe[docs]", "teacher byte")
MERGES = ("FuseChat VaRM", "FuseChat SCE")


def _rows(rows):
    return {r.name: r for r in rows}


def _domains(row):
    return float(np.mean([row.bits[c] for c in DOMAINS]))


def _all(row):
    return _distill.mean_bits(row)


def test_fused_teachers_beat_clm_alone(knowledge_rows):
    """FuseLLM's claim. Bits saved against CLM only, all corpora: MinCE 0.020 / 0.023 /
    0.021, AvgCE 0.018 / 0.014 / 0.013; on the domains: MinCE 0.017 / 0.024 / 0.020, AvgCE
    0.010 / 0.014 / 0.007."""
    for seed, rows in knowledge_rows.items():
        r = _rows(rows)
        clm = r["CLM only"]
        assert _all(r["FuseLLM MinCE"]) < _all(clm) - 0.015, seed
        assert _domains(r["FuseLLM MinCE"]) < _domains(clm) - 0.012, seed
        assert _all(r["FuseLLM AvgCE"]) < _all(clm) - 0.01, seed
        assert _domains(r["FuseLLM AvgCE"]) < _domains(clm) - 0.005, seed


def test_fused_teachers_beat_every_single_teacher_on_the_domains(knowledge_rows):
    """Against the best single-teacher student on code and docs together: MinCE 0.026 /
    0.026 / 0.029 bits better, AvgCE 0.019 / 0.015 / 0.016."""
    for seed, rows in knowledge_rows.items():
        r = _rows(rows)
        best = min(_domains(r[s]) for s in SINGLES)
        assert _domains(r["FuseLLM MinCE"]) < best - 0.02, seed
        assert _domains(r["FuseLLM AvgCE"]) < best - 0.01, seed


def test_min_ce_beats_avg_ce(knowledge_rows):
    """As in FuseLLM's ablation: on the domains by 0.0067 / 0.0109 / 0.0129 bits. AvgCE
    here is FuseLLM's code (softmax of the rewards exp(-CE)), which weighs three teachers
    within a factor e of each other: close to their plain average."""
    for seed, rows in knowledge_rows.items():
        r = _rows(rows)
        assert _domains(r["FuseLLM MinCE"]) < _domains(r["FuseLLM AvgCE"]) - 0.004, seed


def test_fusechat_merges_of_the_pair_targets(knowledge_rows):
    """FuseChat's second stage, all corpora: VaRM and SCE beat TIES by 0.060-0.070 bits,
    CLM only by 0.027-0.030 and FuseLLM MinCE (one fused target) by 0.0043-0.0095; they
    equal task arithmetic's average within 0.0007 (two targets that share the pivot
    teacher change every matrix by similar amounts, so VaRM's per-matrix weights are near
    1/2 and SCE's selection keeps all at density 1)."""
    for seed, rows in knowledge_rows.items():
        r = _rows(rows)
        for m in MERGES:
            assert _all(r[m]) < _all(r["TIES"]) - 0.05, (seed, m)
            assert _all(r[m]) < _all(r["CLM only"]) - 0.02, (seed, m)
            assert _all(r[m]) < _all(r["FuseLLM MinCE"]) - 0.003, (seed, m)
            assert abs(_all(r[m]) - _all(r["task arithmetic (average)"])) < 0.002, (seed, m)


def test_table_is_complete_and_students_learn(knowledge_rows):
    """Every row is present, and every student of mapped targets improves on its
    initialisation (the vocabulary-free rows are checked in vocab_free_evidence_test.py:
    ULD ends worse than the base on seed 0)."""
    names = [r.name for r in knowledge_rows[0]]
    assert names[:4] == ["bpe[code]", "bpe[docs]", "byte", "base"]
    assert {"CLM only", *SINGLES, "FuseLLM MinCE", "FuseLLM AvgCE", *MERGES} <= set(names)
    for seed, rows in knowledge_rows.items():
        r = _rows(rows)
        for row in rows:
            if row.losses is not None:
                assert np.all(np.isfinite(row.losses)), (seed, row.name)
                if row.note != "vocabulary-free":
                    assert _all(row) < _all(r["base"]) - 0.05, (seed, row.name)
    print("\n" + _distill.format_distill_table(knowledge_rows[0]))
