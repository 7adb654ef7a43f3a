r"""Alignment of models trained from different initialisations.

Hidden units of two independently trained networks are in arbitrary order, so their
weights cannot be averaged directly. A :class:`PermutationSpec` says which axes carry
the same units; alignment methods find one permutation (or transport map) per group
that moves ``other`` onto ``ref``, after which the two can be interpolated.

Beyond one-to-one alignment: :func:`pleas` merges two dense chains to a wider merged
width (partial matching, then per-layer least squares), :func:`clafusion` fuses networks
of different depths (cross-layer alignment, identity padding or layer merging, OT fusion), and
:func:`ot_fusion_many` fuses more than two models onto a reference.
"""

from fusionjax.alignment._activation_matching import ActivationStats
from fusionjax.alignment._activation_matching import activation_matching
from fusionjax.alignment._activation_matching import activation_stats_init
from fusionjax.alignment._activation_matching import activation_stats_update
from fusionjax.alignment._batchnorm import repair
from fusionjax.alignment._batchnorm import reset_batch_stats
from fusionjax.alignment._clafusion import CLAFusionOutput
from fusionjax.alignment._clafusion import align_layers
from fusionjax.alignment._clafusion import clafusion
from fusionjax.alignment._clafusion import linear_cka
from fusionjax.alignment._clafusion import merge_layers
from fusionjax.alignment._clafusion import pad_with_identities
from fusionjax.alignment._derive import derive_spec
from fusionjax.alignment._group_activations import group_activations
from fusionjax.alignment._hand_specs import mlp_spec
from fusionjax.alignment._hand_specs import resnet_spec
from fusionjax.alignment._hand_specs import transformer_spec
from fusionjax.alignment._hand_specs import vgg_spec
from fusionjax.alignment._interpolation import InterpolationCurve
from fusionjax.alignment._interpolation import barrier
from fusionjax.alignment._interpolation import interpolate
from fusionjax.alignment._interpolation import interpolation_curve
from fusionjax.alignment._merge_many import MergeManyOutput
from fusionjax.alignment._merge_many import merge_many
from fusionjax.alignment._ot_fusion import OTFusionOutput
from fusionjax.alignment._ot_fusion import ot_fusion
from fusionjax.alignment._ot_fusion_many import OTFusionManyOutput
from fusionjax.alignment._ot_fusion_many import ot_fusion_many
from fusionjax.alignment._ot_maps import apply_transports
from fusionjax.alignment._ot_maps import axis_roles
from fusionjax.alignment._ot_maps import transport_maps
from fusionjax.alignment._ot_transport import solve_transport
from fusionjax.alignment._pleas import PartialMatching
from fusionjax.alignment._pleas import PLeaSOutput
from fusionjax.alignment._pleas import dense_apply
from fusionjax.alignment._pleas import partial_matching
from fusionjax.alignment._pleas import pleas
from fusionjax.alignment._spec import AlignmentOutput
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import apply_permutations
from fusionjax.alignment._spec import check_permutations
from fusionjax.alignment._spec import identity_permutations
from fusionjax.alignment._spec import invert_permutation
from fusionjax.alignment._spec import leaf_paths
from fusionjax.alignment._spec import random_permutations
from fusionjax.alignment._ste import ste_matching
from fusionjax.alignment._weight_matching import weight_matching

__all__ = [
    "InterpolationCurve",
    "barrier",
    "interpolate",
    "interpolation_curve",
    "AlignmentOutput",
    "PermutationSpec",
    "apply_permutations",
    "check_permutations",
    "identity_permutations",
    "invert_permutation",
    "leaf_paths",
    "random_permutations",
    "ActivationStats",
    "activation_matching",
    "activation_stats_init",
    "activation_stats_update",
    "MergeManyOutput",
    "merge_many",
    "ste_matching",
    "weight_matching",
    "derive_spec",
    "group_activations",
    "mlp_spec",
    "resnet_spec",
    "transformer_spec",
    "vgg_spec",
    "OTFusionOutput",
    "apply_transports",
    "axis_roles",
    "ot_fusion",
    "solve_transport",
    "transport_maps",
    "repair",
    "reset_batch_stats",
    "OTFusionManyOutput",
    "ot_fusion_many",
    "PartialMatching",
    "PLeaSOutput",
    "dense_apply",
    "partial_matching",
    "pleas",
    "CLAFusionOutput",
    "align_layers",
    "clafusion",
    "linear_cka",
    "pad_with_identities",
    "merge_layers",
]
