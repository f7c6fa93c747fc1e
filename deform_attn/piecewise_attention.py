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

Axis letters: b batch, g offset groups, o heads per group (h = g o), n queries, m keys, c queries
of one chunk, d channels per head, k kinks, e events (key, kink crossings inside the sequence).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["piecewise_biased_attention", "kink_crossings"]


def _inverse_transform(kinks: Tensor, log_distance: bool) -> Tensor:
    """Distances at which ``t`` reaches each kink: the inverse of ``sign(d) log(1 + |d|)``."""
    if not log_distance:
        return kinks
    return torch.expm1(kinks.abs()).copysign(kinks)


def kink_crossings(
    key_values: Tensor, kinks: Tensor, length: int, query_step: float, query_origin: float, log_distance: bool
) -> Tensor:
    """First query index past each kink, for every key: :math:`r_{jk}` in the module docstring.

    Args:
        key_values: (rows, m) key coordinates :math:`w_j`.
        kinks: (k,) sorted kinks of the bias in ``t``.
        length: number of queries ``n``.
        query_step, query_origin: ``a`` and ``c`` of the query coordinates :math:`u_i = a i + c`.
        log_distance: whether ``t`` is the signed log of the distance.

    Returns:
        (rows, m, k) int32 query indices in ``[0, n]``; ``0``: the kink is already passed at the
        first query, ``n``: never passed inside the sequence. Computed in float64; where a pair
        lies within rounding of a kink it may land on either side, which changes the bias by a
        rounding error only, because the bias is continuous at its kinks.
    """
    thresholds = _inverse_transform(kinks.to(torch.float64), log_distance)  # (k,)
    # u_i - w_j > D_k  <=>  i > (w_j + D_k - c) / a; in place: this tensor is (rows, m, k)
    boundary = key_values.to(torch.float64)[:, :, None] + (thresholds - query_origin)
    boundary.div_(query_step).clamp_(-1.0, float(length)).floor_().add_(1).clamp_(0, length)
    return boundary.to(torch.int32)


class _Events:
    """Kink crossings inside the sequence, sorted by chunk, with what each chunk needs to scatter."""

    def __init__(self, key_values, kinks, length, chunk, query_step, query_origin, log_distance, outputs):
        rows, cells = key_values.shape
        num_kinks = kinks.shape[0]
        self.rows, self.cells, self.outputs, self.chunk, self.length = rows, cells, outputs, chunk, length
        self.log_distance = log_distance
        crossings = kink_crossings(key_values, kinks, length, query_step, query_origin, log_distance)  # (rows, m, k)
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


def _chunk_distance_terms(query_values, key_values, log_distance, keep_magnitude):
    """``t`` and ``|d|`` of the (rows, m, c) pairs of one chunk (``|d|`` only if asked and logged)."""
    distance = query_values[None, None, :] - key_values[:, :, None]
    if not log_distance:
        return distance, None
    if not keep_magnitude:
        return distance.abs().log1p_().copysign_(distance), None
    magnitude = distance.abs()
    return torch.log1p(magnitude).copysign_(distance), magnitude


def _chunk_logits(events, slopes, intercepts, query_values, key_values, q_rows, k_rows, key_padding, scale, keep_magnitude):
    """Walk the query chunks in order; yield each chunk's logits ``q k^T * scale + bias``, (b h, m, c).

    Per chunk it yields ``(start, width, part, targets, pair_slopes, t, magnitude, logits)``:
    the chunk's crossings (slice and flat buffer indices), the slope of every (row, o, m, c) pair,
    ``t`` and ``|d|`` of the (row, m, c) pairs (see :func:`_chunk_distance_terms`). Slopes and
    intercepts are prefix sums of the steps at the crossings, seeded in column 0 with the exact
    table row of each key's interval at the chunk's first query, so rounding never carries
    across chunks.
    """
    rows, cells, outputs = events.rows, events.cells, events.outputs
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
        t, magnitude = _chunk_distance_terms(query_values[start : start + width], key_values, events.log_distance, keep_magnitude)
        # bias = slope * t + intercept, per head: (rows, o, m, c) -> (b h, m, c); the intercepts are done
        logits = coefficients[1].addcmul_(coefficients[0], t[:, None]).view(-1, cells, width)
        if key_padding is not None:
            logits.view(key_padding.shape[0], -1, cells, width).masked_fill_(key_padding[:, None, :, None], -math.inf)
        queries = q_rows[:, start : start + width]  # (b h, c, d)
        logits.baddbmm_(k_rows, queries.transpose(1, 2), alpha=scale)
        yield start, width, part, targets, coefficients[0], t, magnitude, logits
        interval += torch.bincount(events.key_index[part], minlength=rows * cells).view(rows, cells)


class _PiecewiseBiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_values, kinks, slopes, intercepts, query_values, geometry, key_padding):
        query_step, query_origin, log_distance, scale, chunk = geometry
        batch, heads, length, _ = q.shape
        rows, cells = key_values.shape
        outputs = slopes.shape[1]
        events = _Events(key_values.detach(), kinks, length, chunk, query_step, query_origin, log_distance, outputs)

        q_rows, k_rows, v_rows = (t.reshape(batch * heads, t.shape[2], t.shape[3]) for t in (q, k, v))
        out = torch.empty_like(q)
        out_rows = out.view(batch * heads, length, -1)  # (b h, n, d)
        log_sum_exp = q_rows.new_empty(batch * heads, length)
        chunks = _chunk_logits(events, slopes, intercepts, query_values, key_values, q_rows, k_rows, key_padding, scale, False)
        for start, width, _, _, _, _, _, scores in chunks:
            # softmax over the keys (dim 1); the normalisation is applied to the (d, c) output
            peak = scores.amax(dim=1, keepdim=True)
            weights = scores.sub_(peak).exp_()
            total = weights.sum(dim=1, keepdim=True)  # (b h, 1, c)
            chunk_out = torch.bmm(v_rows.transpose(1, 2), weights).div_(total)  # (b h, d, c)
            out_rows[:, start : start + width] = chunk_out.transpose(1, 2)
            log_sum_exp[:, start : start + width] = (peak + total.log()).squeeze(1)

        ctx.scale = scale
        ctx.events = events
        ctx.save_for_backward(q, k, v, key_values, kinks, slopes, intercepts, query_values, key_padding, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the piecewise attention kernel cannot be differentiated twice; use "
                "DeformableAttention1D(attention_kernel='sdpa', fast_position_bias=False) for higher derivatives"
            )
        q, k, v, key_values, kinks, slopes, intercepts, query_values, key_padding, out, log_sum_exp = ctx.saved_tensors
        scale, events = ctx.scale, ctx.events
        chunk = events.chunk
        batch, heads, length, _ = q.shape
        rows, cells = key_values.shape
        outputs = slopes.shape[1]

        q_rows, k_rows, v_rows = (t.reshape(batch * heads, t.shape[2], t.shape[3]) for t in (q, k, v))
        grad_rows = grad_out.reshape(batch * heads, length, -1)
        grad_q, grad_k, grad_v = torch.empty_like(q_rows), torch.zeros_like(k_rows), torch.zeros_like(v_rows)
        # D_i = sum_d dO * O: the softmax backward's row term
        row_term = (grad_rows * out.view_as(grad_rows)).sum(-1)  # (b h, n)
        grad_key_values = torch.zeros_like(key_values)
        # running sums over the queries seen so far, per (row, o, m): of g t (slopes) and g (intercepts)
        running = q_rows.new_zeros(2, rows * outputs * cells)
        event_prefix = q_rows.new_empty(2, events.key_index.shape[0] * outputs)
        prefix_buffer = q_rows.new_empty(2, rows * outputs * cells * chunk)
        chunks = _chunk_logits(events, slopes, intercepts, query_values, key_values, q_rows, k_rows, key_padding, scale, True)
        for start, width, part, targets, pair_slopes, t, magnitude, scores in chunks:
            stop = start + width
            queries, grad_chunk = q_rows[:, start:stop], grad_rows[:, start:stop]  # (b h, c, d)
            weights = scores.sub_(log_sum_exp[:, None, start:stop]).exp_()  # (b h, m, c)
            grad_v.baddbmm_(weights, grad_chunk)
            # dS = P * (dP - D), dP = V dO^T
            grad_scores = torch.bmm(v_rows, grad_chunk.transpose(1, 2))
            grad_scores.sub_(row_term[:, None, start:stop]).mul_(weights)  # (b h, m, c) = d loss / d bias
            grad_q[:, start:stop] = torch.bmm(grad_scores.transpose(1, 2), k_rows).mul_(scale)
            grad_k.baddbmm_(grad_scores, queries, alpha=scale)

            grad_bias = grad_scores.view(rows, outputs, cells, width)
            # distance: d bias / d w_j = -slope * dt/dd
            grad_t = (grad_bias * pair_slopes).sum(1) if outputs > 1 else grad_bias[:, 0] * pair_slopes[:, 0]
            if magnitude is not None:
                grad_t.div_(magnitude.add_(1))
            grad_key_values -= grad_t.sum(-1)
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

        shape = q.shape
        return (
            grad_q.view(shape), grad_k.view(k.shape), grad_v.view(v.shape), grad_key_values,
            None, grad_slopes, grad_intercepts, None, None, None,
        )


def _check_arguments(q, k, v, key_values, query_values, kinks, slopes, intercepts, query_step, chunk, key_padding):
    if not (isinstance(query_step, (int, float)) and query_step > 0):
        raise ValueError(f"query_step: expected a positive number, got {query_step!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
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
    if key_values.ndim != 2 or key_values.shape[1] != cells or key_values.shape[0] % batch:
        raise ValueError(f"key_values: expected shape (b g, m) with b = {batch}, m = {cells}, got {tuple(key_values.shape)}")
    groups = key_values.shape[0] // batch
    if groups == 0 or heads % groups:
        raise ValueError(f"key_values: {groups} groups per sequence do not divide the {heads} heads")
    if query_values.shape != (length,):
        raise ValueError(f"query_values: expected shape (n,) = ({length},), got {tuple(query_values.shape)}")
    if kinks.ndim != 1 or slopes.shape != (kinks.shape[0] + 1, heads // groups) or intercepts.shape != slopes.shape:
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
    key_values: Tensor,
    query_values: Tensor,
    query_step: float,
    query_origin: float,
    table: tuple[Tensor, Tensor, Tensor],
    log_distance: bool,
    scale: float,
    chunk: int,
    key_padding: Tensor | None = None,
) -> Tensor:
    """``softmax(q k^T * scale + bias) v`` with ``bias[h, i, j] = f_h(t(u_i - w_j))``, ``f`` piecewise linear.

    Args:
        q: (b, h, n, d) queries.
        k, v: (b, h, m, d) keys and values.
        key_values: (b g, m) key coordinates :math:`w_j` of each offset group (``g`` divides
            ``h``; head ``g o_per + o`` uses group ``g``).
        query_values: (n,) query coordinates :math:`u_i`, equal to ``query_step * i +
            query_origin`` up to rounding; ``query_step > 0``.
        table: (kinks (k,), slopes (k + 1, o), intercepts (k + 1, o)) from
            :func:`deform_attn.position_bias.piecewise_linear_table`, ``o = h / g``.
        log_distance: ``t`` is ``sign(d) log(1 + |d|)`` instead of ``d``.
        scale: factor on ``q k^T``.
        chunk: queries per chunk.
        key_padding: optional (b, m) bool, True where a key does not exist.

    Returns:
        (b, h, n, d). Differentiable once in ``q``, ``k``, ``v``, ``key_values`` and the table's
        slopes and intercepts.
    """
    kinks, slopes, intercepts = table
    _check_arguments(q, k, v, key_values, query_values, kinks, slopes, intercepts, query_step, chunk, key_padding)
    return _PiecewiseBiasedAttention.apply(
        q, k, v, key_values, kinks, slopes, intercepts, query_values,
        (float(query_step), float(query_origin), bool(log_distance), float(scale), int(chunk)), key_padding,
    )
