"""deform_attn: a correct, fast, tested 1D deformable attention layer.

The modules follow the order in which the book builds the layer: sampling, geometry, offsets,
position_bias, kernels (the functional core: biased attention kernels and the choice between
them), attention (the layer, a thin module over the parts), streaming (causal inference a token
at a time), export, bench. Around them: validation (argument checks), legacy (deprecated
keywords), baselines (full and local attention), provenance (commit and environment of every
record). The experiments (``deform_attn.experiments``) depend on the layer, never the other way
round.
"""

from .attention import POSITION_BIASES, DeformableAttention1D, from_lucidrains
from .baselines import FullAttention1D
from .geometry import (
    GEOMETRIES,
    DistanceCoordinates,
    causal_visibility,
    QueryGrid,
    distance_coordinates,
    normalize_positions,
    num_cells,
    query_key_distances,
    reference_points,
    sample_positions,
    unnormalize_positions,
)
from .kernels import (
    KERNELS,
    Implementation,
    KernelPlan,
    biased_attention,
    kink_crossings,
    piecewise_biased_attention,
    plan_attention,
    scan_biased_attention,
    sdpa_biased_attention,
)
from .offsets import OffsetNetwork, ZeroOffsets, default_offset_kernel_size
from .position_bias import (
    ContinuousPositionBias,
    PiecewiseLinearTable,
    piecewise_linear_bias,
    piecewise_linear_table,
    signed_log_distance,
    signed_log_distance_derivative,
    signed_log_distance_inverse,
)
from .sampling import linear_sample_1d, linear_sample_1d_reference, linear_sample_1d_tensors

__version__ = "0.1.0"

# the name of the kernel choices before they moved into Implementation
ATTENTION_KERNELS = KERNELS

__all__ = [
    "DeformableAttention1D",
    "from_lucidrains",
    "Implementation",
    "KernelPlan",
    "plan_attention",
    "biased_attention",
    "piecewise_biased_attention",
    "sdpa_biased_attention",
    "scan_biased_attention",
    "kink_crossings",
    "FullAttention1D",
    "ContinuousPositionBias",
    "PiecewiseLinearTable",
    "OffsetNetwork",
    "ZeroOffsets",
    "default_offset_kernel_size",
    "linear_sample_1d",
    "linear_sample_1d_reference",
    "linear_sample_1d_tensors",
    "piecewise_linear_table",
    "piecewise_linear_bias",
    "signed_log_distance",
    "signed_log_distance_inverse",
    "signed_log_distance_derivative",
    "normalize_positions",
    "unnormalize_positions",
    "num_cells",
    "reference_points",
    "sample_positions",
    "query_key_distances",
    "distance_coordinates",
    "DistanceCoordinates",
    "QueryGrid",
    "causal_visibility",
    "GEOMETRIES",
    "POSITION_BIASES",
    "KERNELS",
    "ATTENTION_KERNELS",
]
