"""Session fixtures: digit classifiers trained from different seeds, aligned once."""

import pytest

from tests._testing import SEEDS


@pytest.fixture(scope="session")
def barriers():
    """``{seed: [BarrierResult per width]}`` (MLP pairs, naive / weight / activation matching)."""
    from fusionjax.demo import _alignment

    return _alignment.barrier_study(SEEDS)


@pytest.fixture(scope="session")
def fusions():
    """``{seed: [FusionResult equal widths, FusionResult different widths]}``."""
    from fusionjax.demo import _alignment

    return _alignment.fusion_study(SEEDS)


@pytest.fixture(scope="session")
def spec_results():
    """``{0: [ResNet result, transformer result]}``: hand vs derived spec, one pair each.

    One seed: with equal groups in the same order the two specs give the same matching,
    so more seeds would repeat the same comparison (numbers over 3 seeds are in the
    issue's closing note).
    """
    from fusionjax.demo import _alignment

    return _alignment.spec_study([0])
