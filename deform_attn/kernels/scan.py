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

It computes the same function as the other kernels (tested against them) and is meant for
inference. Everything shaped is prepared outside the scan: its body reads no tensor sizes and
reshapes nothing, which is what lets ``torch.export`` trace it and ONNX's exporter convert it
with a dynamic batch and length.

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
from .sdpa import padding_bias

__all__ = ["scan_biased_attention", "table_bias_from_crossings"]


def table_bias_from_crossings(
    crossings: Tensor, first_query: Tensor, t: Tensor, row_table: Tensor, chunk: int
) -> Tensor:
    """The piecewise-linear bias of the pairs of one chunk, from the keys' kink crossings.

    Written without reading any tensor's size, so that it traces inside a scan body.

    Args:
        crossings: (rows, m, k) int64 first query index past each kink, 0 or more (as
            :func:`deform_attn.kernels.kink_crossings`, unclamped above).
        first_query: (1,) int64 index of the chunk's first query.
        t: (rows, m, c) the bias's input for each pair of the chunk, ``c = chunk``.
        row_table: (rows, k + 1, 2) each row's slope and intercept on each interval.
        chunk: queries per chunk.

    Returns:
        (rows, m, c) biases.
    """
    # column of each crossing inside the chunk; 0: passed before it starts, chunk: not yet passed
    column = (crossings - first_query).clamp(0, chunk)
    counts = F.pad(torch.zeros_like(t), (0, 1)).scatter_add(-1, column, torch.ones_like(column, dtype=t.dtype))
    interval = counts.cumsum(-1)[..., :chunk].to(torch.int64)  # (rows, m, c): kinks passed
    # shape: (rows, m, c) -> (rows, m c): one gather per row from its own table
    pieces = torch.gather(row_table, 1, interval.flatten(1, 2)[..., None].expand(-1, -1, 2))  # (rows, m c, 2)
    pieces = pieces.unflatten(1, (-1, chunk))  # (rows, m, c, 2)
    return pieces[..., 0] * t + pieces[..., 1]


def scan_biased_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_coordinates: Tensor,
    key_coordinates: Tensor,
    query_grid: QueryGrid,
    table: PiecewiseLinearTable | None,
    log_distance: bool,
    scale: float,
    chunk: int,
    key_padding: Tensor | None = None,
    visible_from: Tensor | None = None,
    null_k: Tensor | None = None,
    null_v: Tensor | None = None,
) -> Tensor:
    """``softmax(q k^T * scale + bias) v``, chunk by chunk of queries inside one traced scan.

    Args:
        q: (b, h, n, d) queries.
        k, v: (b, h, m, d) keys and values.
        query_coordinates: (n,) query coordinates :math:`u_i`, on ``query_grid``.
        key_coordinates: (b g, m) key coordinates :math:`w_j` per offset group.
        query_grid: :class:`deform_attn.geometry.QueryGrid` of the queries.
        table: the position bias as a :class:`PiecewiseLinearTable` with ``o = h / g`` outputs
            (evaluated from the kink crossings), or ``None`` for no bias.
        log_distance: the table's input is ``sign(d) log(1 + |d|)``.
        scale: factor on ``q k^T``.
        chunk: queries per scan step.
        key_padding: optional (b, m) bool, True where a key does not exist.
        visible_from: optional (b g, m) int64, the first query that sees each key (causal).
        null_k, null_v: optional (b, h, e, d) keys and values every query sees, without bias.

    Returns:
        (b, h, n, d).
    """
    batch, heads, length, channels = q.shape
    groups = key_coordinates.shape[0] // batch
    padded_length = (length + chunk - 1) // chunk * chunk
    # The padded queries repeat the last one; their outputs are dropped at the end. Gathering
    # (rather than padding) keeps the pad's size out of every tensor shape: a traced program
    # would otherwise specialise on a pad of 0 or 1.
    source = torch.arange(padded_length, device=q.device).clamp(max=length - 1)
    # shape: (b, h, n, d) -> (s, c, b h, d): the scan walks the leading axis; batch and heads
    # travel as one axis of "rows", so the body's products are plain batched matrix products
    q_steps = q.flatten(0, 1).transpose(0, 1).index_select(0, source).unflatten(0, (-1, chunk))
    k_rows, v_rows = k.flatten(0, 1), v.flatten(0, 1)  # (b h, m, d)
    coordinate_steps = query_coordinates.index_select(0, source).unflatten(0, (-1, chunk))  # (s, c)
    # (s, 1), not (s,): each step then sees a (1,) tensor, which ONNX's scan handles
    first_queries = torch.arange(0, padded_length, chunk, device=q.device)[:, None]
    # head = group * heads_per_group + o: each head's row of key coordinates, crossings and table
    head_group = torch.arange(heads, device=q.device) // (heads // groups)  # (h,)
    row_coordinates = key_coordinates.unflatten(0, (batch, groups))[:, head_group].flatten(0, 1)  # (b h, m)
    crossings = row_table = None
    if table is not None:
        crossings = kink_crossings(row_coordinates, table.kinks, None, query_grid, log_distance)  # (b h, m, k)
        head_output = torch.arange(heads, device=q.device) % (heads // groups)  # (h,)
        pieces = torch.stack([table.slopes, table.intercepts], -1).to(q.dtype)  # (k + 1, o, 2)
        row_table = pieces[:, head_output].transpose(0, 1).repeat(batch, 1, 1)  # (b h, k + 1, 2)
    padding = None
    if key_padding is not None:  # (b, 1, 1, m) -> (b h, 1, m)
        padding = padding_bias(key_padding, q.dtype).expand(-1, heads, -1, -1).flatten(0, 1)
    visible_rows = None
    if visible_from is not None:  # (b g, m) -> (b h, 1, m)
        visible_rows = visible_from.unflatten(0, (batch, groups))[:, head_group].flatten(0, 1)[:, None, :]
    null_k_rows, null_v_rows = (None, None) if null_k is None else (null_k.flatten(0, 1), null_v.flatten(0, 1))
    offsets_in_chunk = torch.arange(chunk, device=q.device)[None, :, None]  # (1, c, 1)

    def attend(carry: Tensor, step: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        q_chunk, u_chunk, first_query = step  # (c, b h, d), (c,), (1,)
        scores = torch.matmul(q_chunk.transpose(0, 1) * scale, k_rows.transpose(1, 2))  # (b h, c, m)
        if table is not None:
            distances = u_chunk - row_coordinates[..., None]  # (b h, m, c)
            t = signed_log_distance(distances) if log_distance else distances
            bias = table_bias_from_crossings(crossings, first_query, t, row_table, chunk)  # (b h, m, c)
            scores = scores + bias.transpose(1, 2)
        if padding is not None:
            scores = scores + padding
        if visible_rows is not None:  # query first_query + c sees key j from visible_from[j] on
            scores = scores.masked_fill(first_query + offsets_in_chunk < visible_rows, float("-inf"))
        # softmax(q k^T * scale + bias) v spelled out: ONNX's SDPA decomposition fails in a scan body
        if null_k_rows is None:
            out = torch.matmul(scores.softmax(-1), v_rows)  # (b h, c, d)
        else:  # the null keys join the softmax with their plain logits (one normaliser for both)
            null_scores = torch.matmul(q_chunk.transpose(0, 1) * scale, null_k_rows.transpose(1, 2))  # (b h, c, e)
            peak = torch.maximum(scores.amax(-1, keepdim=True), null_scores.amax(-1, keepdim=True))
            key_weights, null_weights = (scores - peak).exp(), (null_scores - peak).exp()
            total = key_weights.sum(-1, keepdim=True) + null_weights.sum(-1, keepdim=True)
            out = (torch.matmul(key_weights, v_rows) + torch.matmul(null_weights, null_v_rows)) / total
        # a scan body may not return its input itself, hence the clone
        return carry.clone(), out.transpose(0, 1)  # (c, b h, d)

    _, out_steps = scan(attend, q.new_zeros(()), (q_steps, coordinate_steps, first_queries))
    # shape: (s, c, b h, d) -> (n, b h, d) -> (b, h, n, d)
    return out_steps.flatten(0, 1)[:length].transpose(0, 1).unflatten(0, (batch, heads))
