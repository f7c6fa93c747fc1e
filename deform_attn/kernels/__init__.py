"""The functional core under :class:`deform_attn.DeformableAttention1D`: biased attention kernels.

Four kernels compute the same function, ``softmax(q k^T * scale + bias) v`` with the
continuous position bias of each (query, key) distance:

* :func:`fused_biased_attention` (CPU default): logits, bias, masks, softmax and values in one
  C++ pass per block of queries, the bias evaluated over runs of queries between kink crossings;
* :func:`piecewise_biased_attention` (CPU, long sequences, where the fused kernel cannot be compiled): the piecewise-linear bias
  by prefix sums along the queries, inside a chunked attention with a hand-written backward;
* :func:`sdpa_biased_attention` (everywhere else): the bias materialised per chunk of queries and
  passed to ``scaled_dot_product_attention``;
* :func:`scan_biased_attention` (while ``torch.export`` traces): a traced scan over fixed-size
  query chunks, with ops that ONNX knows.

:func:`plan_attention` decides which one a forward pass runs and in chunks of how many queries,
from numbers alone; :class:`Implementation` is the documented setting that steers it;
:func:`biased_attention` runs a plan.
"""

from __future__ import annotations

from torch import Tensor

from ..geometry import DistanceCoordinates
from ..position_bias import PiecewiseLinearTable, table_bias_function
from .fused import fused_available, fused_biased_attention, fused_unavailable_reason
from .piecewise import kink_crossings, piecewise_biased_attention
from .plan import (
    EXPORT_QUERY_CHUNK,
    KERNELS,
    PIECEWISE_LENGTH_PER_KINK,
    PIECEWISE_MIN_LENGTH,
    POSITION_BIAS_EVALUATIONS,
    SAMPLERS,
    Implementation,
    KernelPlan,
    default_max_bias_elements,
    plan_attention,
)
from .scan import scan_biased_attention, table_bias_from_crossings
from .sdpa import BiasFunction, sdpa_biased_attention

__all__ = [
    "Implementation",
    "KernelPlan",
    "plan_attention",
    "default_max_bias_elements",
    "biased_attention",
    "fused_biased_attention",
    "fused_available",
    "fused_unavailable_reason",
    "piecewise_biased_attention",
    "sdpa_biased_attention",
    "scan_biased_attention",
    "kink_crossings",
    "table_bias_from_crossings",
    "BiasFunction",
    "KERNELS",
    "POSITION_BIAS_EVALUATIONS",
    "SAMPLERS",
    "EXPORT_QUERY_CHUNK",
    "PIECEWISE_MIN_LENGTH",
    "PIECEWISE_LENGTH_PER_KINK",
]


def biased_attention(
    plan: KernelPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    coordinates: DistanceCoordinates,
    position_bias: PiecewiseLinearTable | BiasFunction | None,
    log_distance: bool,
    scale: float,
    key_padding: Tensor | None = None,
    dropout_p: float = 0.0,
    visible_from: Tensor | None = None,
    null_k: Tensor | None = None,
    null_v: Tensor | None = None,
    overwrite_q: bool = False,
    tokens_major_output: bool = False,
) -> Tensor:
    """Run ``plan``'s kernel: attention of the queries to the keys with a position bias.

    Args:
        plan: from :func:`plan_attention`.
        q: (b, h, n, d) queries; k, v: (b, h, m, d) keys and values.
        coordinates: query and key coordinates whose differences are the distances, with the
            queries' grid (:func:`deform_attn.geometry.distance_coordinates`).
        position_bias: a piecewise-linear table, a function from distances (b g, c, m) to
            biases (b g, c, m, h / g), or ``None`` for no bias.
        log_distance: the table's input is ``sign(d) log(1 + |d|)`` (tables only; a function
            applies its own transform).
        scale: factor on ``q k^T``.
        key_padding: optional (b, m) bool, True where a key does not exist.
        dropout_p: attention dropout (SDPA kernel only; the plan never picks another with it).
        visible_from: optional (b g, m) int64: query ``i`` sees key ``j`` of its group only if
            ``i >= visible_from[.., j]`` (causal attention).
        null_k, null_v: optional (b, h, e, d) keys and values every query sees, without position
            bias; needed whenever ``visible_from`` can hide every key from a query.
        overwrite_q: the fused kernel may write its output into ``q`` (a temporary, no gradients);
            the other kernels ignore it.
        tokens_major_output: the fused kernel stores its output as (b, n, h, d), so that it is a
            (b, n, h d) view; the other kernels ignore it.

    Returns:
        (b, h, n, d).
    """
    table = position_bias if isinstance(position_bias, PiecewiseLinearTable) else None
    if plan.kernel == "fused":
        if position_bias is not None and table is None:
            raise ValueError("position_bias: the fused kernel takes the bias as a PiecewiseLinearTable")
        return fused_biased_attention(
            q, k, v, query_coordinates=coordinates.queries, key_coordinates=coordinates.keys,
            query_grid=coordinates.grid, table=table, log_distance=log_distance, scale=scale, key_padding=key_padding,
            visible_from=visible_from, null_k=null_k, null_v=null_v, overwrite_q=overwrite_q,
            tokens_major_output=tokens_major_output,
        )
    if plan.kernel == "piecewise":
        if table is None:
            raise ValueError("position_bias: the piecewise kernel needs a PiecewiseLinearTable")
        return piecewise_biased_attention(
            q, k, v, query_coordinates=coordinates.queries, key_coordinates=coordinates.keys,
            query_grid=coordinates.grid, table=table, log_distance=log_distance, scale=scale, chunk=plan.chunk,
            key_padding=key_padding, visible_from=visible_from, null_k=null_k, null_v=null_v,
        )
    if plan.kernel == "scan":
        if position_bias is not None and table is None:
            raise ValueError("position_bias: the scan kernel takes the bias as a PiecewiseLinearTable")
        return scan_biased_attention(
            q, k, v, query_coordinates=coordinates.queries, key_coordinates=coordinates.keys,
            query_grid=coordinates.grid, table=table, log_distance=log_distance, scale=scale,
            chunk=plan.chunk, key_padding=key_padding, visible_from=visible_from, null_k=null_k, null_v=null_v,
        )
    if plan.kernel != "sdpa":
        raise ValueError(f"plan.kernel: expected 'fused', 'piecewise', 'sdpa' or 'scan', got {plan.kernel!r}")
    bias_function = position_bias if table is None else table_bias_function(table, log_distance)
    return sdpa_biased_attention(
        q, k, v, query_coordinates=coordinates.queries, key_coordinates=coordinates.keys,
        position_bias=bias_function, scale=scale, chunk=plan.chunk, key_padding=key_padding, dropout_p=dropout_p,
        visible_from=visible_from, null_k=null_k, null_v=null_v,
    )
