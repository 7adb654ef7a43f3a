"""The ``fusionjax`` command line: ``demo`` prints the tables; usage errors exit 2."""

import subprocess
import sys

import pytest

import fusionjax
from fusionjax import cli
from fusionjax.cli import _demo


def test_demo_prints_table_and_learned_coefficients(capsys, monkeypatch, suite):
    # The CLI's own work is loading the testbed and printing: the methods' results come
    # from the session's suite (the same calls on seed 0, tested in tests/merging and
    # tests/learned), so the demo's training is not repeated here.
    from fusionjax.demo import _merging

    def cached_suite(tb, *, methods, progress):
        keep = {"pretrained", "individual (upper bound)", *methods}
        for name in methods:
            progress(name)
        return [row for name, row in suite[0].items() if name in keep]

    monkeypatch.setattr(_merging, "run_merging_suite", cached_suite)
    assert cli.main(["demo", "--methods", "ties", "average", "layer-wise"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("pretrained") for line in lines)
    assert any(line.startswith("individual (upper bound)") for line in lines)
    assert any(line.startswith("TIES (density 0.2)") for line in lines)
    assert any(line.startswith("uniform soup (average)") for line in lines)
    assert any(line.startswith("AdaMerging (layer-wise)") for line in lines)
    assert not any(line.startswith("RegMean") for line in lines)
    assert "learned λ" in out and "Dense_2.kernel" in out


def _cached_alignment(monkeypatch, barriers, fusions, spec_results, pleas, clafusion):
    from fusionjax.demo import _alignment

    monkeypatch.setattr(_alignment, "barrier_study", lambda seeds: {s: barriers[s] for s in seeds})
    monkeypatch.setattr(_alignment, "fusion_study", lambda seeds: {s: fusions[s] for s in seeds})
    monkeypatch.setattr(_alignment, "spec_study", lambda seeds: {s: spec_results[s] for s in seeds})
    monkeypatch.setattr(_alignment, "pleas_study", lambda seeds: {s: pleas[s] for s in seeds})
    monkeypatch.setattr(
        _alignment, "clafusion_study", lambda seeds: {s: clafusion[s] for s in seeds}
    )


def test_demo_align_prints_barriers_fusion_and_specs(
    capsys, monkeypatch, barriers, fusions, spec_results, pleas_results, clafusion_results
):
    # As above, the studies' results come from the session fixtures (seed 0).
    _cached_alignment(
        monkeypatch, barriers, fusions, spec_results, pleas_results, clafusion_results
    )
    assert cli.main(["demo", "align"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "weight matching",
        "activation matching",
        "OT fusion (Sinkhorn)",
        "vanilla average",
        "64 + 128",
        "derived spec == hand spec: True",
        "ResNet (BatchNorm)",
        "Transformer",
        "PLeaS",
        "CLAFusion",
    ):
        assert needle in out, needle
    naive_16 = next(line for line in out.splitlines() if line.split()[:2] == ["16", "naive"])
    assert float(naive_16.split()[2]) == pytest.approx(
        barriers[0][0].curves["naive"].loss_barrier, abs=1e-3
    )


def test_demo_align_fast_skips_the_spec_study(
    capsys, monkeypatch, barriers, fusions, pleas_results, clafusion_results
):
    _cached_alignment(monkeypatch, barriers, fusions, None, pleas_results, clafusion_results)
    assert cli.main(["demo", "align", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "OT fusion" in out and "derived spec" not in out


def test_fast_leaves_out_the_learned_methods():
    from fusionjax.demo import _merging

    every = _demo.select_methods(None)
    fast = _demo.select_methods(None, fast=True)
    assert set(every) - set(fast) == set(_merging.LEARNED_METHODS)
    assert _demo.select_methods(["adamerging", "density"], fast=True) == ["TIES (density 0.2)"]
    assert _demo.select_methods(["ligand"]) == ["Neural Ligand (ensemble)", "Neural Ligand (merge)"]


def test_demo_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--seed" in out and "--methods" in out and "--fast" in out and "align" in out
    assert "distill" in out and "--no-cache" in out
    assert "``" not in out


def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "--version" in out
    assert "``" not in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusionjax {fusionjax.__version__}"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["demo", "--methods", "nonexistent"], "no method matches 'nonexistent'"),
        (["demo", "--methods", "ties", "nope"], "no method matches 'nope'"),
        (["demo", "--methods", "adamerging", "--fast"], "--fast leaves out every"),
        (["demo", "align", "--methods", "ties"], "--methods applies to the merge suite"),
        (["demo", "distill", "--methods", "ties"], "--methods applies to the merge suite"),
        (["demo", "nosuchsuite"], "invalid choice"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2_before_any_work(capsys, monkeypatch, argv, needle):
    def fail(args):
        raise AssertionError("a usage error must stop before the demo runs")

    monkeypatch.setattr(_demo, "run_merge", fail)
    monkeypatch.setattr(_demo, "run_align", fail)
    monkeypatch.setattr(_demo, "run_distill", fail)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    if "no method matches" in needle:  # the error lists what there is
        assert "TIES (density 0.2)" in err and "RegMean" in err


def test_module_entry_point():
    # One subprocess: ``python -m fusionjax.cli`` (what the console script runs) works.
    out = subprocess.run(
        [sys.executable, "-m", "fusionjax.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"fusionjax {fusionjax.__version__}"


def test_unknown_method_is_rejected():
    from fusionjax import demo

    with pytest.raises(ValueError, match="unknown methods"):
        demo.run_merging_suite(object(), methods=["nope"])


def test_demo_logits_prints_the_perplexity_table_and_generations(capsys, language_testbeds):
    # language_testbeds makes sure the cache holds seed 0: the demo only loads it.
    assert cli.main(["demo", "logits"]) == 0
    out = capsys.readouterr().out
    for name in ("proxy-tuning", "DExperts", "contrastive", "DLF (one", "DLF (both", "strong fine-tuned"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    strong = next(line for line in out.splitlines() if line.startswith("strong "))
    proxy = next(line for line in out.splitlines() if line.startswith("proxy-tuning"))
    # Proxy-tuning lowers the strong model's perplexity on both domains.
    assert all(float(p) < float(s) for s, p in zip(strong.split()[1:3], proxy.split()[1:3], strict=True))
    assert out.count("DLF (+ expert)") == 2 and "α per byte" in out


def test_demo_logits_rejects_methods():
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "logits", "--methods", "ties"])
    assert e.value.code == 2


def _cached_distillation(monkeypatch, knowledge_rows):
    # The rows come from the session's knowledge_rows (the same call on seed 0): the CLI's own
    # work is loading the testbed, naming the rows on the progress bar and printing.
    from fusionjax.demo import _distill

    calls = []

    def cached_rows(tb, setup=None, *, progress=None):
        calls.append((tb.seed, setup))
        rows = knowledge_rows[tb.seed]
        for row in rows:
            if row.name not in (*tb.teacher_names(), "base"):
                progress(row.name)
        return rows

    monkeypatch.setattr(_distill, "distillation_rows", cached_rows)
    return calls


def test_demo_distill_prints_the_teachers_and_the_table(capsys, monkeypatch, knowledge_rows):
    calls = _cached_distillation(monkeypatch, knowledge_rows)
    assert cli.main(["demo", "distill"]) == 0
    from fusionjax.demo import _distill

    assert calls == [(0, _distill.DistillSetup())]
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    rows = {r.name: r for r in knowledge_rows[0]}
    # Every row is printed in the table with its bits per byte and their mean.
    for name, row in rows.items():
        cells = [f"{v:.3f}" for v in (*row.bits.values(), _distill.mean_bits(row))]
        printed = [x[len(name) :].split()[: len(cells)] for x in lines if x.startswith(name + " ")]
        assert cells in printed, name
    # The teacher table: BPE tokens hold more than a byte each, and the teachers' bits per
    # byte are the table's.
    teachers = {x.split()[0]: x.split() for x in lines if x.startswith(("bpe[", "byte ", "base "))}
    for name in ("bpe[code]", "bpe[docs]"):
        row = next(x.split() for x in lines if x.startswith(name) and "BPE" in x)
        per_token = float(row[row.index("depth") + 2])
        assert 1.5 < per_token < 6.0, (name, per_token)
        assert [float(v) for v in row[-3:]] == pytest.approx(list(rows[name].bits.values()), abs=1e-3)
    assert "byte" in teachers and "FuseLLM MinCE" in captured.out
    # The progress bar on stderr names each trained row and merge as it starts.
    assert "knowledge testbed (seed 0)" in captured.err
    assert all(name in captured.err for name in ("CLM only", "FuseLLM MinCE", "TIES"))


def test_demo_distill_fast_trains_a_smaller_setup(capsys, monkeypatch, knowledge_rows):
    calls = _cached_distillation(monkeypatch, knowledge_rows)
    assert cli.main(["demo", "distill", "--fast"]) == 0
    assert calls[0][1].windows == 64 and calls[0][1].steps == 60
    assert "60 steps" in capsys.readouterr().out
