r"""Alignment of models trained from different initialisations.

Hidden units of two independently trained networks are in arbitrary order, so their
weights cannot be averaged directly. A :class:`PermutationSpec` says which axes carry
the same units; alignment methods find one permutation (or transport map) per group
that moves ``other`` onto ``ref``, after which the two can be interpolated.
"""

from fusionjax.alignment._spec import AlignmentOutput
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import apply_permutations
from fusionjax.alignment._spec import check_permutations
from fusionjax.alignment._spec import identity_permutations
from fusionjax.alignment._spec import invert_permutation
from fusionjax.alignment._spec import leaf_paths
from fusionjax.alignment._spec import random_permutations

__all__ = [
    "AlignmentOutput",
    "PermutationSpec",
    "apply_permutations",
    "check_permutations",
    "identity_permutations",
    "invert_permutation",
    "leaf_paths",
    "random_permutations",
]
