"""Streaming inference for causal deformable attention: one token (or a chunk) at a time.

:class:`CausalStream` keeps what a causal :class:`deform_attn.DeformableAttention1D` needs to
produce the outputs of new tokens without recomputing the past:

* the input tokens that a key not yet cached may still read, and the last ``w - r`` queries (the
  offset network's look-back); with bounded offsets (``tanh``), older tokens are dropped, so the
  memory does not grow with the stream;
* per complete cell, its sample position and the first query that may see it
  (:func:`deform_attn.geometry.causal_visibility`);
* a cache of keys and values: a key enters it once **every token it reads has arrived**, not
  merely when its cell is complete, since an offset may move it forward past the newest token.

Each step computes the new tokens' queries, the offsets of the cells they complete, the keys that
became readable, and the attention of the new queries to the cached keys (and the null key).
The outputs equal the full causal pass over the same tokens (tested at several chunk sizes); the
cost of a step grows with the number of cached keys, not with the length of the past.

Axis letters: b batch, g offset groups, h heads, n tokens, m cells (keys), d channels.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from .attention import DeformableAttention1D
from .geometry import causal_visibility, sample_positions
from .kernels import sdpa_biased_attention
from .offsets import OffsetNetwork
from .position_bias import PiecewiseLinearTable, table_bias_function
from .sampling import linear_sample_1d

__all__ = ["CausalStream"]


class _Growing:
    """A tensor that grows along its last axis with amortised O(1) appends (capacity doubling).

    ``origin`` is the absolute index of the first element kept: :meth:`forget_before` drops a
    prefix that is no longer needed, so a stream's memory follows what it can still read.
    """

    def __init__(self, template: Tensor):
        self.storage, self.size, self.origin = template, 0, 0

    def forget_before(self, index: int) -> None:
        """Drop the elements before absolute ``index`` (when at least half the storage is dropped)."""
        drop = min(index - self.origin, self.size)
        if drop <= 0 or 2 * drop < self.storage.shape[-1]:  # compact rarely: amortised O(1)
            return
        kept = self.storage[..., drop : self.size].clone()
        self.storage = self.storage.new_zeros(*self.storage.shape[:-1], max(2 * kept.shape[-1], 16))
        self.storage[..., : kept.shape[-1]] = kept
        self.size, self.origin = kept.shape[-1], self.origin + drop

    def append(self, part: Tensor) -> None:
        needed = self.size + part.shape[-1]
        if needed > self.storage.shape[-1]:
            capacity = max(needed, 2 * self.storage.shape[-1], 16)
            grown = self.storage.new_zeros(*self.storage.shape[:-1], capacity)
            grown[..., : self.size] = self.storage[..., : self.size]
            self.storage = grown
        self.storage[..., self.size : needed] = part
        self.size = needed

    @property
    def data(self) -> Tensor:
        return self.storage[..., : self.size]


class CausalStream:
    """Feed a causal layer its input a chunk at a time and get each chunk's outputs.

    Args:
        layer: a :class:`deform_attn.DeformableAttention1D` with ``causal=True``, in eval mode,
            with its :class:`deform_attn.OffsetNetwork` (not an ablation's replacement). Its
            weights must not change while the stream runs (the position bias's table is
            computed once, when the stream is made).
        batch_size: sequences fed side by side (all advance together; no padding mask).

    Example::

        stream = CausalStream(layer, batch_size=1)
        outputs = [stream.step(x[..., i : i + 1]) for i in range(n)]  # = layer(x), token by token
    """

    def __init__(self, layer: DeformableAttention1D, *, batch_size: int = 1):
        if not isinstance(layer, DeformableAttention1D) or not layer.causal:
            raise ValueError("layer: expected a DeformableAttention1D built with causal=True")
        if layer.training:
            raise ValueError("layer: stream a layer in eval mode (call layer.eval() first)")
        if not isinstance(layer.to_offsets, OffsetNetwork):
            raise ValueError(f"layer: streaming needs the layer's OffsetNetwork, found {type(layer.to_offsets).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.layer, self.batch = layer, batch_size
        weight = layer.to_q.weight
        groups, heads, r = layer.offset_groups, layer.heads, layer.downsample_factor
        self.context = layer.to_offsets.depthwise.kernel_size[0] - r  # query tokens a new cell looks back on
        rows, group_channels = batch_size * groups, layer.heads * layer.dim_head // groups
        self.tokens = 0
        self.inputs = _Growing(weight.new_zeros(batch_size, layer.dim, 0))  # (b, dim, n)
        self.grouped_queries = _Growing(weight.new_zeros(rows, group_channels, 0))  # (b g, d, n)
        self.positions = _Growing(weight.new_zeros(rows, 0, dtype=torch.promote_types(weight.dtype, torch.float32)))
        self.visible_from = _Growing(torch.zeros(rows, 0, dtype=torch.int64, device=weight.device))
        self.ready = _Growing(torch.zeros(rows, 0, dtype=torch.bool, device=weight.device))
        self.keys = _Growing(weight.new_zeros(batch_size, heads, layer.dim_head, 0))  # (b, h, d, m)
        self.values = _Growing(weight.new_zeros(batch_size, heads, layer.dim_head, 0))
        # the position bias, evaluated once: a stream serves fixed weights (eval mode)
        self.position_bias = layer.bias_for_kernels(self.positions.storage.dtype)
        if isinstance(self.position_bias, PiecewiseLinearTable):
            self.position_bias = table_bias_function(self.position_bias, layer.position_bias.log_distance)

    @property
    def cells(self) -> int:
        """Cells whose offsets are known (complete cells)."""
        return self.positions.size

    def step(self, x: Tensor) -> Tensor:
        """The outputs of the next ``c`` tokens.

        Args:
            x: (batch, dim, c) new tokens, or (batch, c, dim) for a ``batch_first`` layer.

        Returns:
            Their outputs, in the layout of ``x``.
        """
        layer = self.layer
        x = self._check(x)
        if layer.batch_first:
            x = x.transpose(1, 2)
        start, groups, r = self.tokens, layer.offset_groups, layer.downsample_factor
        self.tokens += x.shape[-1]
        self.inputs.append(x)
        queries = layer.to_q(x)  # (b, h d, c)
        self.grouped_queries.append(rearrange(queries, "b (g d) n -> (b g) d n", g=groups))
        self._complete_cells()
        self._cache_readable_keys()
        self._forget_unreadable_tokens()

        # attention of the new queries (absolute indices start..tokens-1) to every cached key
        q = rearrange(queries, "b (h d) n -> b h n d", h=layer.heads)
        keys, values = (t.data.transpose(2, 3) for t in (self.keys, self.values))  # (b, h, m, d)
        query_coordinates = torch.arange(start, self.tokens, device=x.device, dtype=self.positions.data.dtype) / r
        null_k, null_v = (t[None, :, None].expand(self.batch, -1, -1, -1) for t in (layer.null_key, layer.null_value))
        out = sdpa_biased_attention(
            q, keys, values, query_coordinates=query_coordinates, key_coordinates=self.positions.data / r,
            position_bias=self.position_bias, scale=layer.scale, chunk=q.shape[2], visible_from=self.visible_from.data - start,
            null_k=null_k, null_v=null_v,
        )
        out = layer.to_out(rearrange(out, "b h n d -> b (h d) n"))  # (b, dim, c)
        return out.transpose(1, 2) if layer.batch_first else out

    def _check(self, x: Tensor) -> Tensor:
        layout = "(batch, c, dim)" if self.layer.batch_first else "(batch, dim, c)"
        channel_axis = 2 if self.layer.batch_first else 1
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[0] != self.batch or x.shape[channel_axis] != self.layer.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a tensor of shape {layout} with batch {self.batch} and dim {self.layer.dim}, got {shape}")
        if x.shape[3 - channel_axis] == 0:
            raise ValueError("x: expected at least one new token")
        return x.to(self.inputs.storage.dtype)

    def _complete_cells(self) -> None:
        """Offsets, sample positions and visibility of the cells the new tokens completed."""
        layer, r = self.layer, self.layer.downsample_factor
        done, complete = self.cells, self.tokens // r
        if complete == done:
            return
        # cell j's causal window is tokens j r - (w - r) .. (j + 1) r - 1, zero before token 0
        first = done * r - self.context
        origin = self.grouped_queries.origin
        window = self.grouped_queries.data[..., max(first, 0) - origin : complete * r - origin]
        window = torch.nn.functional.pad(window, (max(-first, 0), 0))
        offsets = layer.to_offsets(window, padding=(0, 0)).to(self.positions.storage.dtype)  # (b g, new cells)
        positions = sample_positions(offsets, self.tokens, r, first_cell=done)
        self.positions.append(positions)
        self.visible_from.append(causal_visibility(positions, r, first_cell=done))
        self.ready.append(torch.zeros_like(positions, dtype=torch.bool))
        for cache in (self.keys, self.values):
            cache.append(cache.storage.new_zeros(*cache.storage.shape[:-1], complete - done))

    def _forget_unreadable_tokens(self) -> None:
        """Drop tokens no future key can read and queries no future cell's window covers."""
        layer, r = self.layer, self.layer.downsample_factor
        self.grouped_queries.forget_before(self.cells * r - self.context)
        offsets = layer.to_offsets
        if not offsets.bounded:  # unbounded offsets may reach any token
            return
        # the next cell samples at least s cells before its centre; waiting keys where they sample
        earliest = self.cells * r + (r - 1) / 2 - offsets.offset_scale * r
        waiting = self.positions.data[~self.ready.data]
        if waiting.numel():
            earliest = min(earliest, waiting.min().item())
        self.inputs.forget_before(max(0, math.floor(earliest)))

    def _cache_readable_keys(self) -> None:
        """Sample, project and cache the keys whose every token has now arrived."""
        layer = self.layer
        newly = (self.visible_from.data <= self.tokens - 1) & ~self.ready.data  # (b g, m)
        columns = newly.any(0).nonzero().flatten()
        if columns.numel() == 0:
            return
        groups = layer.offset_groups
        grouped_inputs = rearrange(self.inputs.data, "b (g d) n -> (b g) d n", g=groups)
        # positions relative to the first kept token; a position before it reads zeros, as before token 0
        relative = self.positions.data[:, columns] - self.inputs.origin
        samples = linear_sample_1d(grouped_inputs, relative)  # (b g, d, s)
        samples = rearrange(samples, "(b g) d s -> b (g d) s", g=groups)
        # shape: (b, h d, s) -> (b, h, d, s)
        new_keys, new_values = (rearrange(f(samples), "b (h d) s -> b h d s", h=layer.heads) for f in (layer.to_k, layer.to_v))
        # a (row, key) enters only where it became readable: rows are (b, g), heads (g, o)
        take = rearrange(newly[:, columns], "(b g) s -> b g s", g=groups).repeat_interleave(layer.heads // groups, 1)
        for cache, new in ((self.keys, new_keys), (self.values, new_values)):
            current = cache.storage[..., columns]
            cache.storage[..., columns] = torch.where(take[:, :, None, :], new, current)
        self.ready.storage[:, columns] |= newly[:, columns]
