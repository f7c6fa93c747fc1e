r"""The exportable kernel: biased attention as a scan over fixed-size chunks of queries.

``torch.export`` needs a program whose ops do not depend on the data, and ONNX needs ops it
knows. The other two kernels break both rules: the piecewise kernel sorts its kink crossings and
walks a data-dependent number of chunks in Python; both use ``searchsorted``, which ONNX lacks.
This kernel is written for tracing instead:

* the queries are padded to a multiple of ``chunk`` and :func:`torch._higher_order_ops.scan`
  walks the chunks, so the loop is part of the exported program and memory grows with
  ``chunk x keys``, linearly in the sequence length, not with ``queries x keys``;
* the piecewise-linear bias finds each pair's interval without a search. As in the piecewise
  kernel, key :math:`j` passes kink :math:`k` at query :math:`r_{jk}`
  (:func:`deform_attn.kernels.kink_crossings`), so the interval of pair :math:`(i, j)` is the
  number of crossings at or before :math:`i`: a scatter-add of ones at the crossings and a
  cumulative sum along the chunk's queries.

It computes the same function as the other kernels (tested against them) and has no backward of
its own; it is meant for inference.

Axis letters: b batch, g offset groups, o heads per group (h = g o), n queries, c queries of one
chunk, s chunks, m keys, k kinks, d channels per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._higher_order_ops.scan import scan

from ..geometry import QueryGrid
from ..position_bias import PiecewiseLinearTable, signed_log_distance
from .piecewise import kink_crossings
from .sdpa import BiasFunction, padding_bias

__all__ = ["scan_biased_attention", "table_bias_from_crossings"]


def table_bias_from_crossings(
    crossings: Tensor, first_query: Tensor, t: Tensor, table: PiecewiseLinearTable
) -> Tensor:
    """The piecewise-linear bias of the pairs of one chunk, from the keys' kink crossings.

    Args:
        crossings: (rows, m, k) int64 first query index past each kink (see
            :func:`deform_attn.kernels.kink_crossings`).
        first_query: () int64 index of the chunk's first query.
        t: (rows, m, c) the bias's input for each pair of the chunk.
        table: kinks (k,), slopes and intercepts (k + 1, o).

    Returns:
        (rows, m, c, o) biases.
    """
    rows, cells, width = t.shape
    # column of each crossing inside the chunk; 0: passed before it starts, width: not yet passed
    column = (crossings - first_query).clamp(0, width)
    counts = torch.zeros(rows, cells, width + 1, dtype=t.dtype, device=t.device)
    counts = counts.scatter_add(2, column, torch.ones_like(column, dtype=t.dtype))
    interval = counts.cumsum(2)[:, :, :width].to(torch.int64).reshape(-1)  # (rows m c,)
    outputs = table.slopes.shape[1]
    slopes = table.slopes.to(t.dtype).index_select(0, interval).view(rows, cells, width, outputs)
    intercepts = table.intercepts.to(t.dtype).index_select(0, interval).view(rows, cells, width, outputs)
    return slopes * t[..., None] + intercepts


def scan_biased_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_coordinates: Tensor,
    key_coordinates: Tensor,
    query_grid: QueryGrid,
    position_bias: PiecewiseLinearTable | BiasFunction | None,
    log_distance: bool,
    scale: float,
    chunk: int,
    key_padding: Tensor | None = None,
) -> Tensor:
    """``softmax(q k^T * scale + bias) v``, chunk by chunk of queries inside one traced scan.

    Args:
        q: (b, h, n, d) queries.
        k, v: (b, h, m, d) keys and values.
        query_coordinates: (n,) query coordinates :math:`u_i`, on ``query_grid``.
        key_coordinates: (b g, m) key coordinates :math:`w_j` per offset group.
        query_grid: :class:`deform_attn.geometry.QueryGrid` of the queries.
        position_bias: a :class:`PiecewiseLinearTable` (evaluated from the kink crossings), a
            function from distances (b g, c, m) to biases (b g, c, m, o) (e.g. the CPB's MLP), or
            ``None``.
        log_distance: the table's input is ``sign(d) log(1 + |d|)`` (tables only).
        scale: factor on ``q k^T``.
        chunk: queries per scan step.
        key_padding: optional (b, m) bool, True where a key does not exist.

    Returns:
        (b, h, n, d).
    """
    batch, heads, length, channels = q.shape
    padded_length = (length + chunk - 1) // chunk * chunk
    steps = padded_length // chunk
    # the padded queries continue the grid; their outputs are dropped at the end
    index = torch.arange(padded_length, device=q.device)
    coordinates = torch.cat([query_coordinates, (index[length:] * query_grid.step + query_grid.origin).to(query_coordinates.dtype)])
    # shape: (b, h, n, d) -> (s, b, h, c, d): the scan walks the leading axis
    q_steps = F.pad(q, (0, 0, 0, padded_length - length)).view(batch, heads, steps, chunk, channels).permute(2, 0, 1, 3, 4)
    coordinate_steps = coordinates.view(steps, chunk)
    first_queries = index.view(steps, chunk)[:, 0]
    table = position_bias if isinstance(position_bias, PiecewiseLinearTable) else None
    crossings = None
    if table is not None:
        crossings = kink_crossings(key_coordinates, table.kinks, padded_length, query_grid, log_distance).to(torch.int64)
    padding = None if key_padding is None else padding_bias(key_padding, q.dtype)

    def attend(carry: Tensor, step: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        q_chunk, u_chunk, first_query = step  # (b, h, c, d), (c,), ()
        bias = None
        if position_bias is not None:
            distances = u_chunk[None, None, :] - key_coordinates[:, :, None]  # (b g, m, c)
            if table is not None:
                t = signed_log_distance(distances) if log_distance else distances
                pair_bias = table_bias_from_crossings(crossings, first_query, t, table)  # (b g, m, c, o)
            else:
                pair_bias = position_bias(distances.transpose(1, 2)).transpose(1, 2)
            # shape: (b g, m, c, o) -> (b, g o, c, m): head = group * heads_per_group + o. Sizes come
            # from the step's own tensors: the traced scan body cannot capture outer symbolic sizes.
            bias = pair_bias.unflatten(0, (q_chunk.shape[0], -1)).permute(0, 1, 4, 3, 2).flatten(1, 2).to(q_chunk.dtype)
        if padding is not None:
            bias = padding if bias is None else bias + padding
        out = F.scaled_dot_product_attention(q_chunk, k, v, attn_mask=bias, scale=scale)
        return carry.clone(), out  # a scan body may not return its input itself

    _, out_steps = scan(attend, q.new_zeros(()), (q_steps, coordinate_steps, first_queries))
    # shape: (s, b, h, c, d) -> (b, h, n, d)
    out = out_steps.permute(1, 2, 0, 3, 4).reshape(batch, heads, padded_length, channels)
    return out[:, :, :length]
