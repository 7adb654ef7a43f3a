"""`fusionjax demo` prints the accuracy table."""

import subprocess
import sys

import pytest

from fusionjax._src import cli


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
    assert any(l.startswith("pretrained") for l in lines)
    assert any(l.startswith("individual (upper bound)") for l in lines)
    assert any(l.startswith("TIES (density 0.2)") for l in lines)
    assert any(l.startswith("uniform soup (average)") for l in lines)
    assert any(l.startswith("AdaMerging (layer-wise)") for l in lines)
    assert not any(l.startswith("RegMean") for l in lines)
    assert "learned λ" in out and "Dense_2.kernel" in out


def _cached_alignment(monkeypatch, barriers, fusions, spec_results):
    from fusionjax.demo import _alignment

    monkeypatch.setattr(_alignment, "barrier_study", lambda seeds: {s: barriers[s] for s in seeds})
    monkeypatch.setattr(_alignment, "fusion_study", lambda seeds: {s: fusions[s] for s in seeds})
    monkeypatch.setattr(_alignment, "spec_study", lambda seeds: {s: spec_results[s] for s in seeds})


def test_demo_align_prints_barriers_fusion_and_specs(
    capsys, monkeypatch, barriers, fusions, spec_results
):
    # As above, the studies' results come from the session fixtures (seed 0).
    _cached_alignment(monkeypatch, barriers, fusions, spec_results)
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
    ):
        assert needle in out, needle
    naive_16 = next(l for l in out.splitlines() if l.split()[:2] == ["16", "naive"])
    assert float(naive_16.split()[2]) == pytest.approx(
        barriers[0][0].curves["naive"].loss_barrier, abs=1e-3
    )


def test_demo_align_fast_skips_the_spec_study(capsys, monkeypatch, barriers, fusions):
    _cached_alignment(monkeypatch, barriers, fusions, spec_results=None)
    assert cli.main(["demo", "align", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "OT fusion" in out and "derived spec" not in out


def test_fast_leaves_out_the_learned_methods():
    from fusionjax.demo import _merging

    every = cli.select_methods(None)
    fast = cli.select_methods(None, fast=True)
    assert set(every) - set(fast) == set(_merging.LEARNED_METHODS)
    assert cli.select_methods(["adamerging", "density"], fast=True) == ["TIES (density 0.2)"]
    assert cli.select_methods(["ligand"]) == ["Neural Ligand (ensemble)", "Neural Ligand (merge)"]


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "fusionjax._src.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--seed" in out.stdout and "--methods" in out.stdout and "--fast" in out.stdout
    assert "align" in out.stdout


def test_unknown_method_is_rejected():
    from fusionjax import demo

    with pytest.raises(ValueError, match="unknown methods"):
        demo.run_merging_suite(object(), methods=["nope"])
