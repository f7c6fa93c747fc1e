"""``DeformableAttention1D``: grouped queries, learned sampling of downsampled keys/values, CPB.

Axis letters: b batch, g offset groups, h heads, n queries (tokens), m sampled keys (cells),
d channels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .geometry import GEOMETRIES, Geometry, distance_coordinates, num_cells, query_key_distances, sample_positions
from .offsets import OffsetNetwork
from .piecewise_attention import piecewise_biased_attention
from .position_bias import ContinuousPositionBias
from .sampling import linear_sample_1d, linear_sample_1d_reference

__all__ = ["DeformableAttention1D", "from_lucidrains", "POSITION_BIASES", "ATTENTION_KERNELS"]

POSITION_BIASES: tuple[str, ...] = ("cpb", "none")
ATTENTION_KERNELS: tuple[str, ...] = ("auto", "piecewise", "sdpa")
# below max(these), "auto" keeps SDPA: see DeformableAttention1D.resolved_attention_kernel
_PIECEWISE_MIN_LENGTH = 384
_PIECEWISE_LENGTH_PER_KINK = 8


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


class DeformableAttention1D(nn.Module):
    """1D deformable attention (DAT, Xia et al. 2022) over a (batch, dim, n) sequence.

    Every offset group of heads predicts one offset per downsampled cell from its queries, samples
    the input there by linear interpolation, projects the samples to keys and values, and attends
    with a continuous position bias. Keyword arguments and defaults match
    ``deformable_attention.DeformableAttention1D``; the extras below are ours.

    Args:
        dim: channels of the input and output.
        dim_head: channels per head.
        heads: attention heads.
        dropout: dropout on the attention weights (training only).
        downsample_factor: ``r``; ``n // r`` keys are sampled.
        offset_scale: bound of the offsets in cells (default ``downsample_factor``).
        offset_groups: groups of heads sharing offsets (default ``heads``); divides ``heads``
            and ``dim``.
        offset_kernel_size: kernel of the offset network's depthwise convolution; ``>= r`` with
            ``offset_kernel_size - r`` even.
        cpb_log_distance: feed the position bias ``sign(d) log(1 + |d|)`` instead of ``d``.
        group_queries: the query projection is grouped by offset group.
        group_key_values: the key and value projections are grouped by offset group.
        geometry: ``"centered"`` (default) or ``"lucidrains"``; see :mod:`deform_attn.geometry`.
        batch_first: take and return (batch, n, dim) instead of (batch, dim, n).
        position_bias: ``"cpb"`` or ``"none"``.
        use_offsets: ``False`` fixes the offsets at zero (downsampled attention, for ablations).
        offset_layer_norm: DAT++'s LayerNorm inside the offset network.
        bounded_offsets: ``tanh`` on the offsets (DAT); ``False`` for DAT++'s unbounded offsets.
        fast_position_bias: exact piecewise-linear CPB (default) or the plain MLP on every pair.
        fast_sampling: gather-based interpolation (default) or ``grid_sample``.
        attention_kernel: how the biased attention is computed. ``"piecewise"``: this package's
            kernel (:mod:`deform_attn.piecewise_attention`), which evaluates the piecewise-linear
            CPB by prefix sums along the queries inside a chunked attention with its own backward;
            needs the fast CPB, float32/float64 and no attention dropout. ``"sdpa"``: the bias is
            materialised per chunk and passed to ``scaled_dot_product_attention`` (any device and
            dtype, dropout, double backward with ``fast_position_bias=False``). ``"auto"``
            (default): ``"piecewise"`` on CPU where it applies and the sequence is long enough
            to pay for its setup (see :meth:`resolved_attention_kernel`), else ``"sdpa"``.
        max_bias_elements: queries are processed in chunks so that one chunk's pair tensors hold at
            most this many elements (batch x heads x queries x keys); under autograd each chunk is
            recomputed in the backward pass instead of stored. ``None`` (default) picks per kernel:
            2**21 for ``"piecewise"`` (8 MiB per float32 pair tensor, near the CPU caches; the fastest
            of 2**20, 2**21 and 2**22 at n = 8192 and 16384 on 2 cores), and 2**23
            for ``"sdpa"``.
        check_finite: raise on non-finite input (skipped under ``torch.compile``).

    Forward:
        x: (batch, dim, n) (or (batch, n, dim) with ``batch_first``), floating point.
        mask: optional (batch, n) bool key-padding mask, True for real tokens, padding at the end
            of each row. Padded tokens are neither queried nor sampled: the outputs at the valid
            positions equal those of the unpadded sequence given alone, and the outputs at padded
            positions are zero. Centred geometry only.
        return_vgrid: also return the sample positions in cells, (batch * offset_groups, n // r),
            i.e. cell index + offset, as ``deformable-attention`` does.
    """

    def __init__(
        self,
        *,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        downsample_factor: int = 4,
        offset_scale: float | None = None,
        offset_groups: int | None = None,
        offset_kernel_size: int = 6,
        cpb_log_distance: bool = True,
        group_queries: bool = True,
        group_key_values: bool = True,
        geometry: Geometry = "centered",
        batch_first: bool = False,
        position_bias: str = "cpb",
        use_offsets: bool = True,
        offset_layer_norm: bool = False,
        bounded_offsets: bool = True,
        fast_position_bias: bool = True,
        fast_sampling: bool = True,
        attention_kernel: str = "auto",
        max_bias_elements: int | None = None,
        check_finite: bool = True,
    ):
        super().__init__()
        dim = _positive_int("dim", dim)
        dim_head = _positive_int("dim_head", dim_head)
        heads = _positive_int("heads", heads)
        downsample_factor = _positive_int("downsample_factor", downsample_factor)
        offset_kernel_size = _positive_int("offset_kernel_size", offset_kernel_size)
        if max_bias_elements is not None:
            max_bias_elements = _positive_int("max_bias_elements", max_bias_elements)
        offset_groups = heads if offset_groups is None else _positive_int("offset_groups", offset_groups)
        offset_scale = downsample_factor if offset_scale is None else offset_scale
        if (
            isinstance(offset_scale, bool)
            or not isinstance(offset_scale, (int, float))
            or not 0 < offset_scale < math.inf
        ):
            raise ValueError(f"offset_scale: expected a positive, finite number of cells, got {offset_scale!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if heads % offset_groups:
            raise ValueError(f"offset_groups: expected a divisor of heads ({heads}), got {offset_groups}")
        if dim % offset_groups:
            raise ValueError(
                f"dim: expected a multiple of offset_groups ({offset_groups}), since each group samples "
                f"its own dim / offset_groups channels; got {dim}"
            )
        if dim < 4 and position_bias == "cpb":
            raise ValueError(f"dim: the position bias MLP has dim // 4 hidden units, so dim must be >= 4, got {dim}")
        if offset_layer_norm and (dim_head * heads) // offset_groups < 2:
            raise ValueError(
                "offset_layer_norm: needs at least 2 query channels per offset group (LayerNorm over one "
                f"channel is constant); got heads * dim_head / offset_groups = {(dim_head * heads) // offset_groups}"
            )
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry: expected one of {GEOMETRIES}, got {geometry!r}")
        if position_bias not in POSITION_BIASES:
            raise ValueError(f"position_bias: expected one of {POSITION_BIASES}, got {position_bias!r}")
        if attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel: expected one of {ATTENTION_KERNELS}, got {attention_kernel!r}")
        if attention_kernel == "piecewise" and (position_bias != "cpb" or not fast_position_bias):
            raise ValueError(
                "attention_kernel: 'piecewise' evaluates the piecewise-linear CPB table, so it needs "
                "position_bias='cpb' and fast_position_bias=True"
            )

        self.dim, self.dim_head, self.heads = dim, dim_head, heads
        self.offset_groups = offset_groups
        self.downsample_factor = downsample_factor
        self.geometry = geometry
        self.batch_first = batch_first
        self.use_offsets = use_offsets
        self.fast_sampling = fast_sampling
        self.attention_kernel = attention_kernel
        self.max_bias_elements = max_bias_elements
        self.check_finite = check_finite
        self.dropout = float(dropout)
        self.scale = dim_head**-0.5
        inner_dim = dim_head * heads

        self.to_q = nn.Conv1d(dim, inner_dim, 1, groups=offset_groups if group_queries else 1, bias=False)
        self.to_k = nn.Conv1d(dim, inner_dim, 1, groups=offset_groups if group_key_values else 1, bias=False)
        self.to_v = nn.Conv1d(dim, inner_dim, 1, groups=offset_groups if group_key_values else 1, bias=False)
        self.to_out = nn.Conv1d(inner_dim, dim, 1)
        self.to_offsets = OffsetNetwork(
            channels=inner_dim // offset_groups,
            downsample_factor=downsample_factor,
            kernel_size=offset_kernel_size,
            offset_scale=offset_scale,
            layer_norm=offset_layer_norm,
            bounded=bounded_offsets,
        )
        self.position_bias = (
            ContinuousPositionBias(
                hidden_dim=dim // 4,
                num_outputs=heads // offset_groups,
                depth=2,
                log_distance=cpb_log_distance,
                fast=fast_position_bias,
            )
            if position_bias == "cpb"
            else None
        )

    # ------------------------------------------------------------------ validation

    def _check_input(self, x: Tensor, mask: Tensor | None) -> None:
        layout = "(batch, n, dim)" if self.batch_first else "(batch, dim, n)"
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape {layout}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating point tensor, got dtype {x.dtype}")
        if x.ndim != 3:
            raise ValueError(f"x: expected a 3-d tensor of shape {layout}, got shape {tuple(x.shape)}")
        channels = x.shape[2] if self.batch_first else x.shape[1]
        length = x.shape[1] if self.batch_first else x.shape[2]
        if channels != self.dim:
            raise ValueError(f"x: expected {self.dim} channels (dim) in shape {layout}, got shape {tuple(x.shape)}")
        if length < self.downsample_factor:
            raise ValueError(
                f"x: sequence length n = {length} must be at least downsample_factor = {self.downsample_factor}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"x: expected a batch of at least one sequence, got shape {tuple(x.shape)}")
        if mask is None:
            if self.check_finite and not torch.compiler.is_compiling() and not torch.isfinite(x).all():
                raise ValueError("x: contains NaN or infinity; pass check_finite=False to let them propagate")
            return
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor (True = real token), got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != (x.shape[0], length):
            raise ValueError(f"mask: expected shape (batch, n) = {(x.shape[0], length)}, got {tuple(mask.shape)}")
        if self.geometry != "centered":
            raise ValueError(
                "mask: padding masks need geometry='centered'; in the 'lucidrains' geometry every sample "
                "position depends on the padded length"
            )
        if torch.compiler.is_compiling():
            return
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("mask: padding must sit at the end of each row (True...True False...False)")
        too_short = mask.sum(-1) < self.downsample_factor
        if too_short.any():
            raise ValueError(
                f"mask: every row needs at least downsample_factor = {self.downsample_factor} real tokens; "
                f"rows {too_short.nonzero().flatten().tolist()} have fewer"
            )
        if self.check_finite:  # padding is never read, so only real tokens must be finite
            real = mask[:, :, None] if self.batch_first else mask[:, None, :]
            if not (torch.isfinite(x) | ~real).all():
                raise ValueError("x: contains NaN or infinity; pass check_finite=False to let them propagate")

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, mask: Tensor | None = None, return_vgrid: bool = False):
        self._check_input(x, mask)
        if self.batch_first:
            x = x.transpose(1, 2)
        batch, _, length = x.shape
        groups, r = self.offset_groups, self.downsample_factor
        position_dtype = torch.promote_types(x.dtype, torch.float32)

        if mask is not None:  # padded tokens become the zeros an unpadded sequence would see
            # masked_fill, not a product: padding may hold NaN or inf, and NaN * 0 is NaN
            x = x.masked_fill(~mask[:, None, :], 0)

        queries = self.to_q(x)  # (b, h d, n)
        # shape: (b, g d, n) -> (b g, d, n): each offset group predicts its own offsets
        grouped_queries = rearrange(queries, "b (g d) n -> (b g) d n", g=groups)
        if mask is not None:
            grouped_queries = grouped_queries.masked_fill(~mask.repeat_interleave(groups, 0)[:, None, :], 0)
        offsets = self.to_offsets(grouped_queries).to(position_dtype)  # (b g, m) in cells
        if not self.use_offsets:
            offsets = torch.zeros_like(offsets)
        cells = offsets.shape[-1]

        positions = sample_positions(offsets, length, r, geometry=self.geometry)  # (b g, m) tokens
        # shape: (b, g d, n) -> (b g, d, n): a group samples its own slice of the input channels
        sampled = self.sample_keys(rearrange(x, "b (g d) n -> (b g) d n", g=groups), positions)
        sampled = rearrange(sampled, "(b g) d m -> b (g d) m", b=batch)

        keys, values = self.to_k(sampled), self.to_v(sampled)  # (b, h d, m)
        # shape: (b, h d, len) -> (b, h, len, d); SDPA on CPU is ~3x slower on the strided views
        q, k, v = (rearrange(t, "b (h d) l -> b h l d", h=self.heads).contiguous() for t in (queries, keys, values))

        key_padding = None
        if mask is not None:  # keys whose cell lies in the padding do not exist for that sequence
            valid_cells = mask.sum(-1) // r
            key_padding = torch.arange(cells, device=x.device)[None, :] >= valid_cells[:, None]  # (b, m)

        out = self._attend_in_chunks(q, k, v, offsets, key_padding, length, position_dtype)
        out = self.to_out(rearrange(out, "b h n d -> b (h d) n"))  # (b, dim, n)
        if mask is not None:
            out = out.masked_fill(~mask[:, None, :], 0)
        if self.batch_first:
            out = out.transpose(1, 2)
        if return_vgrid:
            vgrid = torch.arange(cells, device=x.device, dtype=offsets.dtype) + offsets
            return out, vgrid
        return out

    def sample_keys(self, grouped_x: Tensor, positions: Tensor) -> Tensor:
        """Linear samples of each group's channels, zero outside; override to study other samplers.

        Args:
            grouped_x: (batch * offset_groups, dim / offset_groups, n) input channels per group.
            positions: (batch * offset_groups, cells) sample positions in tokens. They stay in
                float32 or wider even for low-precision inputs (bfloat16 cannot resolve token
                indices past 256).

        Returns:
            (batch * offset_groups, dim / offset_groups, cells) samples.
        """
        sample = linear_sample_1d if self.fast_sampling else linear_sample_1d_reference
        return sample(grouped_x, positions)

    def resolved_attention_kernel(self, x: Tensor, *, length: int | None = None, num_kinks: int | None = None) -> str:
        """The kernel a forward pass on ``x`` uses: ``"piecewise"`` or ``"sdpa"``.

        ``"auto"`` picks ``"piecewise"`` on CPU for float32/float64 without autocast or attention
        dropout in training. Given the sequence ``length`` and the CPB's ``num_kinks``, it also
        keeps short sequences on SDPA: the piecewise kernel's setup costs grow with keys x kinks
        and its savings with keys x queries, and on 2 CPU cores it was faster from
        ``length >= max(384, 8 * num_kinks)`` on (measured at dim 32, 128 and 512 with 17, 76 and
        255 kinks; the SDPA kernel was up to 1.8x faster below).
        """
        if self.attention_kernel != "auto":
            if self.attention_kernel == "piecewise" and self.training and self.dropout > 0:
                raise RuntimeError(
                    "attention_kernel: 'piecewise' has no attention dropout; use 'sdpa' or 'auto' to train with dropout"
                )
            return self.attention_kernel
        applies = (
            x.device.type == "cpu"
            and self.position_bias is not None
            and self.position_bias.fast
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")
            and not (self.training and self.dropout > 0)
        )
        if applies and length is not None and num_kinks is not None:
            applies = length >= max(_PIECEWISE_MIN_LENGTH, _PIECEWISE_LENGTH_PER_KINK * num_kinks)
        return "piecewise" if applies else "sdpa"

    def chunk_queries(self, kernel: str, batch: int, cells: int) -> int:
        """Queries per chunk for ``kernel`` at this batch size and number of keys."""
        budget = self.max_bias_elements
        if budget is None:
            budget = 2**21 if kernel == "piecewise" else 2**23
        return max(1, budget // max(1, batch * self.heads * cells))

    def _attend_in_chunks(self, q, k, v, offsets, key_padding, length, position_dtype) -> Tensor:
        batch, heads, _, _ = q.shape
        cells = k.shape[2]
        table = None
        if self.position_bias is not None and self.position_bias.fast:
            table = self.position_bias.table(position_dtype)
        kernel = self.resolved_attention_kernel(q, length=length, num_kinks=None if table is None else table[0].numel())
        chunk = self.chunk_queries(kernel, batch, cells)
        if kernel == "piecewise":
            query_positions = torch.arange(length, device=q.device)
            query_values, key_values, step, origin = distance_coordinates(
                query_positions, offsets, length, self.downsample_factor, geometry=self.geometry
            )
            q, k, v = (t.to(position_dtype) for t in (q, k, v))
            return piecewise_biased_attention(
                q, k, v, key_values=key_values, query_values=query_values, query_step=step, query_origin=origin,
                table=table, log_distance=self.position_bias.log_distance, scale=self.scale, chunk=chunk,
                key_padding=key_padding,
            )
        if chunk >= length:
            return self._attend(q, k, v, offsets, key_padding, table, 0, length)
        use_checkpoint = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, offsets, *(table or ()))
        )
        outputs = []
        for start in range(0, length, chunk):
            args = (q[:, :, start : start + chunk], k, v, offsets, key_padding, table, start, length)
            if use_checkpoint:
                outputs.append(checkpoint(self._attend, *args, use_reentrant=False))
            else:
                outputs.append(self._attend(*args))
        return torch.cat(outputs, dim=2)

    def _attend(self, q, k, v, offsets, key_padding, table, query_start: int, length: int) -> Tensor:
        """Attention of the queries ``query_start .. query_start + q.shape[2]`` to all keys."""
        batch, heads, queries, _ = q.shape
        bias = None
        if self.position_bias is not None:
            query_positions = torch.arange(query_start, query_start + queries, device=q.device)
            distances = query_key_distances(
                query_positions, offsets, length, self.downsample_factor, geometry=self.geometry
            )  # (b g, n, m)
            bias = self.position_bias(distances, table)  # (b g, n, m, o)
            # shape: (b g, n, m, o) -> (b, g o, n, m): head = group * heads_per_group + o
            bias = rearrange(bias, "(b g) n m o -> b (g o) n m", b=batch).to(q.dtype)
        if key_padding is not None:
            padding_bias = torch.zeros(key_padding.shape, dtype=q.dtype, device=q.device)
            padding_bias = padding_bias.masked_fill(key_padding, -math.inf)[:, None, None, :]  # (b, 1, 1, m)
            bias = padding_bias if bias is None else bias + padding_bias
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )


def from_lucidrains(module: nn.Module, **overrides: Any) -> DeformableAttention1D:
    """An equivalent ``DeformableAttention1D`` for a ``deformable_attention.DeformableAttention1D``.

    The result uses the ``"lucidrains"`` geometry and a copy of the module's weights, so that on the
    same input it returns the same output (to float rounding) and the same gradients.
    ``overrides`` pass further keyword arguments (e.g. ``fast_position_bias=False``).
    """
    required = ("to_q", "to_k", "to_v", "to_out", "to_offsets", "rel_pos_bias", "heads", "offset_groups")
    missing = [name for name in required if not hasattr(module, name)]
    if missing:
        raise TypeError(
            f"module: expected a deformable_attention.DeformableAttention1D, got {type(module).__name__} "
            f"without {missing}"
        )
    depthwise = module.to_offsets[0]
    scale = module.to_offsets[-1].scale
    cpb = module.rel_pos_bias
    inner_dim, dim = module.to_q.out_channels, module.to_q.in_channels
    ours = DeformableAttention1D(
        dim=dim,
        dim_head=inner_dim // module.heads,
        heads=module.heads,
        dropout=module.dropout.p,
        downsample_factor=depthwise.stride[0],
        offset_scale=scale,
        offset_groups=module.offset_groups,
        offset_kernel_size=depthwise.kernel_size[0],
        cpb_log_distance=cpb.log_distance,
        group_queries=module.to_q.groups > 1,
        group_key_values=module.to_k.groups > 1,
        geometry="lucidrains",
        **overrides,
    )
    theirs_linears = [cpb.mlp[0][0], cpb.mlp[1][0], cpb.mlp[2]]
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v", "to_out"):
            getattr(ours, name).load_state_dict(getattr(module, name).state_dict())
        ours.to_offsets.depthwise.load_state_dict(depthwise.state_dict())
        ours.to_offsets.pointwise.load_state_dict(module.to_offsets[2].state_dict())
        for mine, theirs in zip(ours.position_bias.linears, theirs_linears):
            mine.load_state_dict(theirs.state_dict())
    return ours.to(device=module.to_q.weight.device, dtype=module.to_q.weight.dtype)
