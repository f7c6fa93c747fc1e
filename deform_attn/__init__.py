"""deform_attn: a correct, fast, tested 1D deformable attention layer.

The modules follow the order in which the book builds the layer: sampling, geometry, offsets,
position_bias, attention, piecewise_attention (the CPU attention kernel), bench.
"""

from .attention import ATTENTION_KERNELS, POSITION_BIASES, DeformableAttention1D, from_lucidrains
from .geometry import (
    GEOMETRIES,
    distance_coordinates,
    normalize_positions,
    num_cells,
    query_key_distances,
    reference_points,
    sample_positions,
    unnormalize_positions,
)
from .offsets import OffsetNetwork
from .piecewise_attention import kink_crossings, piecewise_biased_attention
from .position_bias import ContinuousPositionBias, piecewise_linear_table, signed_log_distance
from .sampling import linear_sample_1d, linear_sample_1d_reference

__version__ = "0.1.0"

__all__ = [
    "DeformableAttention1D",
    "from_lucidrains",
    "ContinuousPositionBias",
    "OffsetNetwork",
    "linear_sample_1d",
    "linear_sample_1d_reference",
    "piecewise_linear_table",
    "signed_log_distance",
    "normalize_positions",
    "unnormalize_positions",
    "num_cells",
    "reference_points",
    "sample_positions",
    "query_key_distances",
    "distance_coordinates",
    "piecewise_biased_attention",
    "kink_crossings",
    "GEOMETRIES",
    "POSITION_BIASES",
    "ATTENTION_KERNELS",
]
