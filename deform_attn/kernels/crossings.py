r"""Where each sampled key passes each kink of the position bias, for queries on a regular grid.

The piecewise-linear bias has kinks :math:`\tau_1 < \dots < \tau_K` in the transformed distance
:math:`t`. Queries sit on a grid, :math:`u_i = a\, i + c`, so for one key the distance, and with
it the interval of :math:`t`, only grows along the queries: key :math:`j` passes kink
:math:`\ell` at one query, and the interval of pair :math:`(i, j)` is the number of kinks the key
has passed by query :math:`i`. One number per (key, kink) replaces a binary search per (query,
key) pair; the kernels count with it in different ways (events and prefix sums in
:mod:`~deform_attn.kernels.piecewise`, a scatter and a cumulative sum in
:mod:`~deform_attn.kernels.scan` and :mod:`~deform_attn.kernels.sdpa`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import QueryGrid
from ..position_bias import inverse_transform_distance

__all__ = ["kink_crossings", "intervals_on_grid"]


def kink_crossings(
    key_coordinates: Tensor, kinks: Tensor, length: int | None, query_grid: QueryGrid, log_distance: bool
) -> Tensor:
    """First query index past each kink, for every key: :math:`r_{jk}` in the module docstring.

    Args:
        key_coordinates: (rows, m) key coordinates :math:`w_j`.
        kinks: (k,) sorted kinks of the bias in ``t``.
        length: number of queries ``n``; ``None``: no upper clamp, int64 indices up to 2**31
            (the exported scan, which must not turn a symbolic length into a float).
        query_grid: ``a`` and ``c`` of the query coordinates :math:`u_i = a i + c`.
        log_distance: whether ``t`` is the signed log of the distance.

    Returns:
        (rows, m, k) int32 query indices in ``[0, n]``; ``0``: the kink is already passed at the
        first query, ``n``: never passed inside the sequence. Computed in float64; where a pair
        lies within rounding of a kink it may land on either side, which changes the bias by a
        rounding error only, because the bias is continuous at its kinks.
    """
    thresholds = inverse_transform_distance(kinks.to(torch.float64), log_distance)  # (k,)
    # u_i - w_j > D_k  <=>  i > (w_j + D_k - c) / a; in place: this tensor is (rows, m, k)
    boundary = key_coordinates.to(torch.float64)[:, :, None] + (thresholds - query_grid.origin)
    if length is None:  # a traced program must not turn a symbolic length into a float
        return boundary.div_(query_grid.step).clamp_(-1.0, 2.0**31).floor_().add_(1).to(torch.int64)
    boundary.div_(query_grid.step).clamp_(-1.0, float(length)).floor_().add_(1).clamp_(0, length)
    return boundary.to(torch.int32)


def intervals_on_grid(crossings: Tensor, start: int, width: int) -> Tensor:
    """The interval of every (key, query) pair for queries ``start .. start + width - 1``.

    Args:
        crossings: (rows, m, k) from :func:`kink_crossings` (clamped to ``[0, n]``).
        start, width: the first query and the number of queries.

    Returns:
        (rows, m, width) int32: the kinks each key has passed at each query, equal to
        ``searchsorted(kinks, t)`` of the pair up to pairs within rounding of a kink. Laid out
        (keys, queries): counting runs along the contiguous axis.
    """
    # a crossing at or before `start` counts from the first column; one past the chunk never does
    column = (crossings - start).clamp_(0, width).to(torch.int64)
    counts = torch.zeros((*crossings.shape[:2], width + 1), dtype=torch.int32, device=crossings.device)
    counts.scatter_add_(2, column, torch.ones((), dtype=torch.int32, device=crossings.device).expand(column.shape))
    return counts[..., :width].cumsum(2, dtype=torch.int32)
