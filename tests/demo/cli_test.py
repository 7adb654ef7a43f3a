"""`fusionjax demo` prints the accuracy table."""

import subprocess
import sys

import pytest

from fusionjax._src import cli


@pytest.mark.slow
def test_demo_prints_table_and_learned_coefficients(capsys):
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


def test_unknown_method_is_rejected():
    from fusionjax import demo

    with pytest.raises(ValueError, match="unknown methods"):
        demo.run_merging_suite(object(), methods=["nope"])
