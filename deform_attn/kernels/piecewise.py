r"""Attention with a piecewise-linear position bias, evaluated by prefix sums, chunk by chunk.

:mod:`deform_attn.position_bias` turns the CPB MLP into a table: kinks :math:`\tau_1 < \dots <
\tau_K` and, on each interval, a slope and an intercept. Evaluated pair by pair, that still costs
a binary search and two gathers per (query, key) pair, far more than the attention's matrix
products. This module uses the one structure the 1D layer has and a 2D or general one does not:
**queries sit on a regular grid**. The distance from query :math:`i` to key :math:`j` is

.. math::  d_{ij} = u_i - w_j, \qquad u_i = a\, i + c \quad (a > 0),

so for a fixed key the distance, and with it the interval index, only grows along the queries.
Key :math:`j` enters the interval past kink :math:`\tau_k` at the first query

.. math::  r_{jk} = \min\{\, i : u_i - w_j > D_k \,\}, \qquad D_k = \text{transform}^{-1}(\tau_k),

one number per (key, kink) instead of one search per pair. The slope (and likewise the intercept)
of pair :math:`(i, j)` is then a prefix sum along the queries,

.. math::  S_{ij} = S_{0j} + \sum_{k:\ r_{jk} \le i} (s_{k+1} - s_k),

and a prefix sum along a contiguous axis is one cheap pass. In the backward pass the same
structure turns the per-interval gradient reductions into prefix sums too:
:math:`\partial L / \partial (s_{k+1} - s_k) = \sum_{i \ge r_{jk}} g_{ij} t_{ij}`.

The attention itself is computed chunk by chunk along the queries with a hand-written backward
(the FlashAttention recipe: save the output and the log-sum-exp, recompute the scores), so no
(queries x keys) tensor larger than one chunk exists, and each chunk's tensors stay near the CPU
caches. Pair tensors are laid out (heads, keys, queries): the prefix sums then run along the
contiguous axis, where they are fast.

**Causal mode.** Key :math:`j` of row ``r`` may be hidden from the queries before
``visible_from[r, j]``: its logits there are :math:`-\infty` (set in the chunk's logits, like key
padding). Null keys, always visible and without position bias (logit ``q . null_k * scale``),
join the softmax of every query: in the forward pass their logits enter the maximum,
the sum and the output, so the log-sum-exp saved for the backward pass covers them, and the
backward pass adds their terms of the softmax gradient to ``grad_q``. They are kept apart from
the (keys x queries) buffers, as (b h, e', c) logits per chunk.

Axis letters: b batch, g offset groups, o heads per group (h = g o), n queries, m keys, c queries
of one chunk, d channels per head, k kinks, e events (key, kink crossings inside the sequence),
e' null keys. A "row" is one (sequence, offset group): rows = b g.

Buffer layout, used throughout: per-pair buffers of a chunk are (rows, o, m, c), flattened in that
order; a key is addressed by ``row * m + key`` (its "key index"); an event by its flat index into
the (rows, m, k) crossing tensor, ``key_index * k + kink``.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from ..geometry import QueryGrid
from ..position_bias import PiecewiseLinearTable, inverse_transform_distance, transform_distance
from .sdpa import check_causal_arguments

__all__ = ["piecewise_biased_attention", "kink_crossings", "check_kernel_arguments"]


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


class _Events:
    """Kink crossings inside the sequence, sorted by chunk, with what each chunk needs to scatter.

    Attributes (e events): ``key_index`` (e,) int32 key indices; ``kink`` (e,) int32; ``query``
    (e,) the crossing query; ``bounds`` chunk ``i``'s events are ``bounds[i]:bounds[i + 1]``;
    ``first_interval`` (rows, m) each key's interval at query 0.
    """

    def __init__(self, key_coordinates, kinks, length, chunk, query_grid, log_distance, outputs):
        rows, cells = key_coordinates.shape
        num_kinks = kinks.shape[0]
        self.rows, self.cells, self.outputs, self.chunk, self.length = rows, cells, outputs, chunk, length
        self.log_distance = log_distance
        crossings = kink_crossings(key_coordinates, kinks, length, query_grid, log_distance)  # (rows, m, k)
        # interval at the first query: the kinks already passed there
        self.first_interval = (crossings == 0).sum(-1)  # (rows, m)
        flat = ((crossings > 0) & (crossings < length)).view(-1).nonzero().squeeze(1)  # (e,) into (rows m k)
        query = crossings.view(-1)[flat]
        del crossings
        num_chunks = -(-length // chunk)
        # a stable sort by chunk keeps each key's crossings in kink order; small keys sort fastest
        chunk_of_event = torch.div(query, chunk, rounding_mode="floor")
        chunk_of_event = chunk_of_event.to(torch.int16 if num_chunks < 2**15 else torch.int32)
        order = torch.argsort(chunk_of_event, stable=True)
        self.bounds = [0] + torch.cumsum(torch.bincount(chunk_of_event.to(torch.int32), minlength=num_chunks), 0).tolist()
        flat, self.query = flat[order], query[order]
        key_index = torch.div(flat, num_kinks, rounding_mode="floor")
        # int32 halves what is kept for the backward pass
        self.key_index = key_index.to(torch.int32)  # row * m + key
        self.kink = (flat - key_index * num_kinks).to(torch.int32)

    def chunk_events(self, index: int, width: int) -> tuple[slice, Tensor, Tensor]:
        """Crossings in chunk ``index``: their slice, kinks, and flat indices into a
        (rows, o, m, width) buffer (one per event and output) at their column."""
        part = slice(self.bounds[index], self.bounds[index + 1])
        key_index = self.key_index[part].to(torch.int64)
        column = self.query[part] - index * self.chunk
        if self.outputs == 1:
            return part, self.kink[part], key_index * width + column
        row, key = key_index // self.cells, key_index % self.cells
        output = torch.arange(self.outputs, device=key_index.device)
        buffer_row = (row[:, None] * self.outputs + output) * self.cells + key[:, None]  # (e, o)
        return part, self.kink[part], (buffer_row * width + column[:, None]).reshape(-1)


class _ChunkTerms(NamedTuple):
    """What one chunk of queries ``start .. start + width`` hands to the forward and backward passes."""

    start: int
    width: int
    events: slice  # the chunk's crossings in the sorted event arrays
    targets: Tensor  # (e o,) flat indices of the crossings into the chunk's (rows, o, m, c) buffer
    pair_slopes: Tensor  # (rows, o, m, c) slope of every pair
    t: Tensor  # (rows, m, c) the position bias's input
    magnitude: Tensor | None  # (rows, m, c) |d|, kept for the backward of the log distance
    logits: Tensor  # (b h, m, c) q k^T * scale + bias (+ -inf at padded and hidden keys)
    null_logits: Tensor | None  # (b h, e', c) q null_k^T * scale, or None without null keys


def _chunk_logits(
    events, slopes, intercepts, query_coordinates, key_coordinates, q_rows, k_rows, key_padding, scale, keep_magnitude,
    visible_from=None, null_k_rows=None,
) -> Iterator[_ChunkTerms]:
    """Walk the query chunks in order and yield each chunk's :class:`_ChunkTerms`.

    Slopes and intercepts are prefix sums of the steps at the crossings, seeded in column 0 with
    the exact table row of each key's interval at the chunk's first query, so rounding never
    carries across chunks.
    """
    rows, cells, outputs = events.rows, events.cells, events.outputs
    if visible_from is not None:
        query_index = torch.arange(events.length, device=visible_from.device)
    buffer = q_rows.new_empty(2, rows * outputs * cells * events.chunk)
    steps = torch.stack([slopes.diff(dim=0), intercepts.diff(dim=0)])  # (2, k, o) step at each kink
    interval = events.first_interval.clone()  # (rows, m), exact
    for index, start in enumerate(range(0, events.length, events.chunk)):
        width = min(events.chunk, events.length - start)
        part, kink, targets = events.chunk_events(index, width)
        coefficients = buffer[:, : rows * outputs * cells * width].view(2, rows, outputs, cells, width)
        coefficients.zero_()
        flat = interval.reshape(-1)
        # shape: (intervals, o) table -> (rows, o, m) start values
        coefficients[0, ..., 0] = slopes.index_select(0, flat).view(rows, cells, outputs).transpose(1, 2)
        coefficients[1, ..., 0] = intercepts.index_select(0, flat).view(rows, cells, outputs).transpose(1, 2)
        for which in range(2):  # crossing kink k adds the step between the pieces on either side
            coefficients[which].view(-1).index_add_(0, targets, steps[which].index_select(0, kink).view(-1))
        coefficients = torch.cumsum(coefficients, dim=-1)  # (2, rows, o, m, c)
        distance = query_coordinates[None, None, start : start + width] - key_coordinates[:, :, None]
        if keep_magnitude:
            t, magnitude = transform_distance(distance, events.log_distance, keep_magnitude=True)
        else:
            t, magnitude = transform_distance(distance, events.log_distance), None
        # bias = slope * t + intercept, per head: (rows, o, m, c) -> (b h, m, c); the intercepts are done
        logits = coefficients[1].addcmul_(coefficients[0], t[:, None]).view(-1, cells, width)
        if key_padding is not None:
            logits.view(key_padding.shape[0], -1, cells, width).masked_fill_(key_padding[:, None, :, None], -math.inf)
        if visible_from is not None:  # key j is hidden from the queries i < visible_from[row, j]
            hidden = visible_from[:, None, :, None] > query_index[start : start + width]  # (rows, 1, m, c)
            logits.view(rows, outputs, cells, width).masked_fill_(hidden, -math.inf)
        queries = q_rows[:, start : start + width]  # (b h, c, d)
        logits.baddbmm_(k_rows, queries.transpose(1, 2), alpha=scale)
        null_logits = None
        if null_k_rows is not None:  # (b h, e', c), no position bias
            null_logits = torch.bmm(null_k_rows, queries.transpose(1, 2)).mul_(scale)
        yield _ChunkTerms(start, width, part, targets, coefficients[0], t, magnitude, logits, null_logits)
        interval += torch.bincount(events.key_index[part], minlength=rows * cells).view(rows, cells)


class _PiecewiseBiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_coordinates, kinks, slopes, intercepts, query_coordinates, query_grid, log_distance,
                scale, chunk, key_padding, visible_from, null_k, null_v):
        batch, heads, length, _ = q.shape
        outputs = slopes.shape[1]
        events = _Events(key_coordinates.detach(), kinks, length, chunk, query_grid, log_distance, outputs)

        q_rows, k_rows, v_rows = (t.reshape(batch * heads, t.shape[2], t.shape[3]) for t in (q, k, v))
        null_k_rows = null_v_rows = None
        if null_k is not None:
            null_k_rows, null_v_rows = (t.reshape(batch * heads, t.shape[2], t.shape[3]) for t in (null_k, null_v))
        out = torch.empty_like(q)
        out_rows = out.view(batch * heads, length, -1)  # (b h, n, d)
        log_sum_exp = q_rows.new_empty(batch * heads, length)
        chunks = _chunk_logits(
            events, slopes, intercepts, query_coordinates, key_coordinates, q_rows, k_rows, key_padding, scale, False,
            visible_from, null_k_rows,
        )
        for terms in chunks:
            start, width, scores, null_scores = terms.start, terms.width, terms.logits, terms.null_logits
            # softmax over the keys (dim 1); the normalisation is applied to the (d, c) output
            peak = scores.amax(dim=1, keepdim=True)
            if null_scores is not None:  # finite even where every sampled key is hidden
                peak = torch.maximum(peak, null_scores.amax(dim=1, keepdim=True))
            weights = scores.sub_(peak).exp_()
            total = weights.sum(dim=1, keepdim=True)  # (b h, 1, c)
            chunk_out = torch.bmm(v_rows.transpose(1, 2), weights)  # (b h, d, c)
            if null_scores is not None:
                null_weights = null_scores.sub_(peak).exp_()  # (b h, e', c)
                total += null_weights.sum(dim=1, keepdim=True)
                chunk_out.baddbmm_(null_v_rows.transpose(1, 2), null_weights)
            chunk_out.div_(total)
            out_rows[:, start : start + width] = chunk_out.transpose(1, 2)
            log_sum_exp[:, start : start + width] = (peak + total.log()).squeeze(1)

        ctx.scale = scale
        ctx.events = events
        ctx.save_for_backward(
            q, k, v, key_coordinates, kinks, slopes, intercepts, query_coordinates, key_padding, out, log_sum_exp,
            visible_from, null_k, null_v,
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the piecewise attention kernel cannot be differentiated twice; use DeformableAttention1D("
                "implementation=Implementation(kernel='sdpa', position_bias='mlp')) for higher derivatives"
            )
        (q, k, v, key_coordinates, kinks, slopes, intercepts, query_coordinates, key_padding, out, log_sum_exp,
         visible_from, null_k, null_v) = ctx.saved_tensors
        scale, events = ctx.scale, ctx.events
        chunk = events.chunk
        batch, heads, length, _ = q.shape
        rows, cells = key_coordinates.shape
        outputs = slopes.shape[1]

        q_rows, k_rows, v_rows = (t.reshape(batch * heads, t.shape[2], t.shape[3]) for t in (q, k, v))
        grad_rows = grad_out.reshape(batch * heads, length, -1)
        grad_q, grad_k, grad_v = torch.empty_like(q_rows), torch.zeros_like(k_rows), torch.zeros_like(v_rows)
        null_k_rows = null_v_rows = grad_null_k = grad_null_v = None
        if null_k is not None:
            null_k_rows, null_v_rows = (t.reshape(batch * heads, t.shape[2], t.shape[3]) for t in (null_k, null_v))
            grad_null_k, grad_null_v = torch.zeros_like(null_k_rows), torch.zeros_like(null_v_rows)
        # D_i = sum_d dO * O: the softmax backward's row term
        row_term = (grad_rows * out.view_as(grad_rows)).sum(-1)  # (b h, n)
        grad_key_coordinates = torch.zeros_like(key_coordinates)
        # running sums over the queries seen so far, per (row, o, m): of g t (slopes) and g (intercepts)
        running = q_rows.new_zeros(2, rows * outputs * cells)
        event_prefix = q_rows.new_empty(2, events.key_index.shape[0] * outputs)
        prefix_buffer = q_rows.new_empty(2, rows * outputs * cells * chunk)
        chunks = _chunk_logits(
            events, slopes, intercepts, query_coordinates, key_coordinates, q_rows, k_rows, key_padding, scale, True,
            visible_from, null_k_rows,
        )
        for terms in chunks:
            start, width, part, targets = terms.start, terms.width, terms.events, terms.targets
            pair_slopes, t, magnitude, scores = terms.pair_slopes, terms.t, terms.magnitude, terms.logits
            stop = start + width
            queries, grad_chunk = q_rows[:, start:stop], grad_rows[:, start:stop]  # (b h, c, d)
            weights = scores.sub_(log_sum_exp[:, None, start:stop]).exp_()  # (b h, m, c)
            grad_v.baddbmm_(weights, grad_chunk)
            # dS = P * (dP - D), dP = V dO^T
            grad_scores = torch.bmm(v_rows, grad_chunk.transpose(1, 2))
            grad_scores.sub_(row_term[:, None, start:stop]).mul_(weights)  # (b h, m, c) = d loss / d bias
            chunk_grad_q = torch.bmm(grad_scores.transpose(1, 2), k_rows)  # (b h, c, d)
            if null_k_rows is not None:  # the null keys' share of the softmax, as for the sampled keys
                null_weights = terms.null_logits.sub_(log_sum_exp[:, None, start:stop]).exp_()  # (b h, e', c)
                grad_null_v.baddbmm_(null_weights, grad_chunk)
                grad_null_scores = torch.bmm(null_v_rows, grad_chunk.transpose(1, 2))
                grad_null_scores.sub_(row_term[:, None, start:stop]).mul_(null_weights)
                chunk_grad_q.baddbmm_(grad_null_scores.transpose(1, 2), null_k_rows)
                grad_null_k.baddbmm_(grad_null_scores, queries, alpha=scale)
            grad_q[:, start:stop] = chunk_grad_q.mul_(scale)
            grad_k.baddbmm_(grad_scores, queries, alpha=scale)

            grad_bias = grad_scores.view(rows, outputs, cells, width)
            # distance: d bias / d w_j = -slope * dt/dd
            grad_t = (grad_bias * pair_slopes).sum(1) if outputs > 1 else grad_bias[:, 0] * pair_slopes[:, 0]
            if magnitude is not None:  # dt/dd = 1 / (1 + |d|), in place
                grad_t.div_(magnitude.add_(1))
            grad_key_coordinates -= grad_t.sum(-1)
            # table: inclusive prefix sums of g t (slopes) and g (intercepts) along the chunk's queries
            prefixes = prefix_buffer[:, : rows * outputs * cells * width].view(2, rows, outputs, cells, width)
            torch.cumsum(torch.mul(grad_bias, t[:, None]), -1, out=prefixes[0])
            torch.cumsum(grad_bias, -1, out=prefixes[1])
            prefixes = prefixes.view(2, -1)
            # a crossing at column c sees the sum over the queries before it: columns < c
            before = prefixes.index_select(1, (targets - 1).clamp_(min=0))
            before.masked_fill_(targets % width == 0, 0)
            event_prefix[:, part.start * outputs : part.stop * outputs] = before + running.index_select(1, targets // width)
            running += prefixes.view(2, -1, width)[:, :, -1]

        # running now holds the totals; a crossing's gradient is the sum over the queries past it
        totals = running.view(2, rows, outputs, cells)
        flat_totals = totals.permute(0, 1, 3, 2).reshape(2, rows * cells, outputs)
        crossing_grad = flat_totals.index_select(1, events.key_index) - event_prefix.view(2, -1, outputs)  # (2, e, o)
        # reduce 1-d over (interval, output) cells: index_add_ over 2-d rows is far slower on CPU
        output = torch.arange(outputs, device=q.device)
        first_cells = (events.first_interval.reshape(-1, 1) * outputs + output).reshape(-1)
        kink_cells = (events.kink.to(torch.int64)[:, None] * outputs + output).reshape(-1)
        grad_tables = []
        for which in range(2):
            grad_table = torch.zeros_like(slopes).view(-1)
            grad_table.index_add_(0, first_cells, flat_totals[which].reshape(-1))
            grad_table.index_add_(0, kink_cells + outputs, crossing_grad[which].reshape(-1))
            grad_table.index_add_(0, kink_cells, crossing_grad[which].reshape(-1).neg())
            grad_tables.append(grad_table.view_as(slopes))
        grad_slopes, grad_intercepts = grad_tables

        if null_k is not None:
            grad_null_k, grad_null_v = grad_null_k.view(null_k.shape), grad_null_v.view(null_v.shape)
        shape = q.shape
        return (
            grad_q.view(shape), grad_k.view(k.shape), grad_v.view(v.shape), grad_key_coordinates,
            None, grad_slopes, grad_intercepts, None, None, None, None, None, None, None, grad_null_k, grad_null_v,
        )


def check_kernel_arguments(
    q, k, v, key_coordinates, query_coordinates, kinks, slopes, intercepts, query_grid, chunk, key_padding
):
    """Raise ``ValueError`` naming the argument unless the shapes fit (b, h, n, d) queries.

    ``chunk=None``: the kernel has no chunks; ``kinks=None``: no table (no position bias).
    """
    if not isinstance(query_grid, tuple) or len(query_grid) != 2:
        raise ValueError(f"query_grid: expected a QueryGrid(step, origin), got {query_grid!r}")
    step = query_grid[0]
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
        raise ValueError(f"query_grid: expected a positive step, got {step!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    if q.ndim != 4:
        raise ValueError(f"q: expected shape (b, h, n, d), got {tuple(q.shape)}")
    batch, heads, length, channels = q.shape
    for name, tensor in (("k", k), ("v", v)):
        if tensor.ndim != 4 or tensor.shape[:2] != (batch, heads) or tensor.shape[3] != channels:
            raise ValueError(f"{name}: expected shape (b, h, m, d) = ({batch}, {heads}, m, {channels}), got {tuple(tensor.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k, {tuple(k.shape)}, got {tuple(v.shape)}")
    cells = k.shape[2]
    if key_coordinates.ndim != 2 or key_coordinates.shape[1] != cells or key_coordinates.shape[0] % batch:
        raise ValueError(f"key_coordinates: expected shape (b g, m) with b = {batch}, m = {cells}, got {tuple(key_coordinates.shape)}")
    groups = key_coordinates.shape[0] // batch
    if groups == 0 or heads % groups:
        raise ValueError(f"key_coordinates: {groups} groups per sequence do not divide the {heads} heads")
    if query_coordinates.shape != (length,):
        raise ValueError(f"query_coordinates: expected shape (n,) = ({length},), got {tuple(query_coordinates.shape)}")
    if kinks is not None and (kinks.ndim != 1 or slopes.shape != (kinks.shape[0] + 1, heads // groups) or intercepts.shape != slopes.shape):
        raise ValueError(
            f"table: expected kinks (k,), slopes and intercepts (k + 1, h / g = {heads // groups}); got "
            f"{tuple(kinks.shape)}, {tuple(slopes.shape)}, {tuple(intercepts.shape)}"
        )
    if key_padding is not None and (key_padding.dtype != torch.bool or key_padding.shape != (batch, cells)):
        raise ValueError(
            f"key_padding: expected a bool tensor of shape (b, m) = ({batch}, {cells}), got "
            f"{key_padding.dtype} {tuple(key_padding.shape)}"
        )


def piecewise_biased_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_coordinates: Tensor,
    key_coordinates: Tensor,
    query_grid: QueryGrid,
    table: PiecewiseLinearTable,
    log_distance: bool,
    scale: float,
    chunk: int,
    key_padding: Tensor | None = None,
    visible_from: Tensor | None = None,
    null_k: Tensor | None = None,
    null_v: Tensor | None = None,
) -> Tensor:
    """``softmax(q k^T * scale + bias) v`` with ``bias[h, i, j] = f_h(t(u_i - w_j))``, ``f`` piecewise linear.

    With null keys, the softmax of every query runs over the m keys and then the e' null keys,
    whose logits are ``q null_k^T * scale`` (no position bias, never hidden or padded), and the
    output is the weights times ``[v; null_v]``.

    Args:
        q: (b, h, n, d) queries.
        k, v: (b, h, m, d) keys and values.
        query_coordinates: (n,) query coordinates :math:`u_i`, equal to ``step * i + origin`` of
            ``query_grid`` up to rounding.
        key_coordinates: (b g, m) key coordinates :math:`w_j` of each offset group (``g`` divides
            ``h``; head ``g * o_per_group + o`` uses group ``g``).
        query_grid: :class:`QueryGrid` ``(step > 0, origin)`` of the query coordinates.
        table: :class:`deform_attn.position_bias.PiecewiseLinearTable` with ``o = h / g``
            outputs, from :func:`deform_attn.position_bias.piecewise_linear_table`.
        log_distance: ``t`` is ``sign(d) log(1 + |d|)`` instead of ``d``.
        scale: factor on ``q k^T``.
        chunk: queries per chunk.
        key_padding: optional (b, m) bool, True where a key does not exist.
        visible_from: optional (b g, m) int64, causal visibility: query ``i`` sees key ``j`` of
            row ``r`` (sequence, offset group) iff ``i >= visible_from[r, j]`` (``<= 0``: every
            query, ``>= n``: none). Not differentiable. ``None``: every key is visible.
        null_k, null_v: optional (b, h, e', d) null keys and values, both or neither, seen by
            every query. Pass them whenever ``visible_from`` (with ``key_padding``) can hide every
            key from a query: a query that sees no key at all has an undefined output (NaN).

    Returns:
        (b, h, n, d). Differentiable once in ``q``, ``k``, ``v``, ``key_coordinates``, the
        table's slopes and intercepts, ``null_k`` and ``null_v``.
    """
    kinks, slopes, intercepts = table
    check_kernel_arguments(q, k, v, key_coordinates, query_coordinates, kinks, slopes, intercepts, query_grid, chunk, key_padding)
    check_causal_arguments(q, key_coordinates, visible_from, null_k, null_v)
    grid = QueryGrid(float(query_grid[0]), float(query_grid[1]))
    return _PiecewiseBiasedAttention.apply(
        q, k, v, key_coordinates, kinks, slopes, intercepts, query_coordinates, grid, bool(log_distance),
        float(scale), int(chunk), key_padding, visible_from, null_k, null_v,
    )
