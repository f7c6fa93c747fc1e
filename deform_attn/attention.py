"""``DeformableAttention1D``: grouped queries, learned sampling of downsampled keys/values, CPB.

A thin module over the functional parts, in the order the book builds them: the offset network
(:mod:`.offsets`) moves each cell's reference point (:mod:`.geometry`), the input is sampled there
(:mod:`.sampling`), and the queries attend to the samples with a continuous position bias
(:mod:`.position_bias`) through one of the kernels of :mod:`.kernels`.

Axis letters: b batch, g offset groups, h heads, n queries (tokens), m sampled keys (cells),
d channels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .geometry import Geometry, causal_visibility, distance_coordinates, sample_positions
from .kernels import Implementation, KernelPlan, biased_attention, fused_available, plan_attention
from .legacy import POSITION_BIASES, split_deprecated_arguments
from .offsets import OffsetNetwork, ZeroOffsets
from .position_bias import ContinuousPositionBias, PiecewiseLinearTable
from .sampling import linear_sample_1d, linear_sample_1d_reference
from .validation import check_input, resolve_layer_arguments

__all__ = ["DeformableAttention1D", "from_lucidrains", "POSITION_BIASES", "PointwiseConv1d"]


class PointwiseConv1d(nn.Conv1d):
    """A kernel-size-1 ``Conv1d`` (grouped or not) computed as a matrix product.

    The same parameters, state dict and hooks as ``nn.Conv1d(in, out, 1, groups=g)`` (the
    reference's layout), but on the CPU mkldnn's grouped 1x1 convolution was 10x slower than the
    product (5.1 vs 0.5 ms for the queries at batch 32, dim 128, n = 336) and its dense one 2x.
    An ungrouped projection of a tokens-major input (a (b, in, n) view of (b, n, in) storage) is
    one product over all tokens and returns a tokens-major output; otherwise a batched product
    per sequence (and group) keeps the channels-first layout.

    Shapes: (b, in_channels, n) -> (b, out_channels, n), or unbatched (in_channels, n).
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting():  # the traced product would guard on the batch size
            return super().forward(x)
        if x.dim() == 2:  # unbatched (in_channels, n), as Conv1d accepts
            return self(x[None])[0]
        groups = self.groups
        if groups == 1 and x.transpose(1, 2).is_contiguous():
            # (b, n, in) storage: one product over every token (a batched product with the weight
            # broadcast over the sequences took 2.4x as long per FLOP, and its weight gradient a
            # (b, out, in) temporary); the output is a (b, out, n) view of (b, n, out) storage
            return F.linear(x.transpose(1, 2), self.weight[:, :, 0], self.bias).transpose(1, 2)
        batch, _, length = x.shape
        # shape: (out, in / g, 1) -> (g, out / g, in / g); x (b, in, n) -> (b, g, in / g, n)
        weight = self.weight.view(groups, self.out_channels // groups, -1)
        out = torch.matmul(weight, x.reshape(batch, groups, -1, length)).view(batch, self.out_channels, length)
        # in place: the product is a fresh tensor, and a second one would cost its page faults; the
        # bias in the product's dtype (under autocast the product is in the low precision)
        return out if self.bias is None else out.add_(self.bias[:, None].to(out.dtype))


class DeformableAttention1D(nn.Module):
    """1D deformable attention (DAT, Xia et al. 2022) over a (batch, dim, n) sequence.

    Every offset group of heads predicts one offset per downsampled cell from its queries, samples
    the input there by linear interpolation, projects the samples to keys and values, and attends
    with a continuous position bias. Keyword arguments and defaults match
    ``deformable_attention.DeformableAttention1D``, except ``offset_kernel_size``, whose default
    is valid for every ``downsample_factor``; ``geometry``, ``batch_first``, ``causal`` and
    ``implementation`` are ours.

    Args:
        dim: channels of the input and output.
        dim_head: channels per head.
        heads: attention heads.
        dropout: dropout on the attention weights (training only).
        downsample_factor: ``r``; ``n // r`` keys are sampled.
        offset_scale: bound of the offsets in cells (default ``downsample_factor``).
        offset_groups: groups of heads sharing offsets (default ``heads``); divides ``heads``
            and ``dim``.
        offset_kernel_size: kernel of the offset network's depthwise convolution, ``>= r`` with
            ``offset_kernel_size - r`` even. ``None`` (default): the valid size nearest to the
            reference's 6 (:func:`deform_attn.offsets.default_offset_kernel_size`): 6 for
            r = 2, 4, 6, 7 for r = 1, 3, 5, and r for r >= 7.
        cpb_log_distance: feed the position bias ``sign(d) log(1 + |d|)`` instead of ``d``.
        group_queries: the query projection is grouped by offset group.
        group_key_values: the key and value projections are grouped by offset group.
        geometry: ``"centered"`` (default) or ``"lucidrains"``; see :mod:`deform_attn.geometry`.
        batch_first: take and return (batch, n, dim) instead of (batch, dim, n).
        causal: output ``i`` depends on inputs ``0..i`` only: the offset network looks back only,
            a key is visible from the first query at or after every token it was computed from
            (:func:`deform_attn.geometry.causal_visibility`), and a learned null key and value
            per head, always visible and without position bias, give the first queries, which
            see no complete cell yet, something to attend to. Centred geometry only.
        implementation: how the output is computed (kernel, chunking, reference paths, input
            check); :class:`deform_attn.kernels.Implementation`, default ``Implementation()``.
            Every choice computes the same function. Deprecated keywords (``attention_kernel``,
            ``use_offsets``, ...) still work for one release; see :mod:`deform_attn.legacy`.

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
        offset_kernel_size: int | None = None,
        cpb_log_distance: bool = True,
        group_queries: bool = True,
        group_key_values: bool = True,
        geometry: Geometry = "centered",
        batch_first: bool = False,
        causal: bool = False,
        implementation: Implementation | None = None,
        **deprecated: Any,
    ):
        super().__init__()
        implementation, variant = split_deprecated_arguments(deprecated, implementation)
        resolved = resolve_layer_arguments(
            dim=dim, dim_head=dim_head, heads=heads, dropout=dropout, downsample_factor=downsample_factor,
            offset_scale=offset_scale, offset_groups=offset_groups, offset_kernel_size=offset_kernel_size,
            geometry=geometry, has_position_bias=variant.position_bias == "cpb", causal=causal,
        )
        groups = resolved["offset_groups"]
        self.dim, self.dim_head, self.heads, self.offset_groups = dim, dim_head, heads, groups
        self.downsample_factor, self.geometry, self.batch_first, self.causal = downsample_factor, geometry, batch_first, causal
        self.implementation, self.dropout, self.scale = implementation, resolved["dropout"], dim_head**-0.5
        inner_dim = dim_head * heads
        if variant.offset_layer_norm and inner_dim // groups < 2:
            raise ValueError(
                "offset_layer_norm: needs at least 2 query channels per offset group (LayerNorm over one "
                f"channel is constant); got heads * dim_head / offset_groups = {inner_dim // groups}"
            )

        self.to_q = PointwiseConv1d(dim, inner_dim, groups=groups if group_queries else 1, bias=False)
        self.to_k = PointwiseConv1d(dim, inner_dim, groups=groups if group_key_values else 1, bias=False)
        self.to_v = PointwiseConv1d(dim, inner_dim, groups=groups if group_key_values else 1, bias=False)
        self.to_out = PointwiseConv1d(inner_dim, dim)
        self.to_offsets: nn.Module = OffsetNetwork(
            channels=inner_dim // groups, downsample_factor=downsample_factor,
            kernel_size=resolved["offset_kernel_size"], offset_scale=resolved["offset_scale"],
            layer_norm=variant.offset_layer_norm, bounded=variant.bounded_offsets, causal=causal,
        )
        self.position_bias: ContinuousPositionBias | None = None
        if variant.position_bias == "cpb":
            self.position_bias = ContinuousPositionBias(
                hidden_dim=dim // 4, num_outputs=heads // groups, depth=2, log_distance=cpb_log_distance,
                fast=implementation.position_bias == "table",
            )
        if not variant.use_offsets:
            self.to_offsets = ZeroOffsets(downsample_factor)
        # (h, d) null key and value: zero value, so a query that sees nothing outputs to_out's bias
        self.null_key = nn.Parameter(torch.randn(heads, dim_head) * dim_head**-0.5) if causal else None
        self.null_value = nn.Parameter(torch.zeros(heads, dim_head)) if causal else None
        if implementation.kernel == "piecewise" and self.position_bias is None:
            raise ValueError("implementation.kernel: 'piecewise' evaluates the position bias, and this layer has none")

    def forward(self, x: Tensor, mask: Tensor | None = None, return_vgrid: bool = False):
        check_input(
            x, mask, dim=self.dim, downsample_factor=self.downsample_factor, batch_first=self.batch_first,
            geometry=self.geometry, check_finite=self.implementation.check_finite,
        )
        if self.batch_first:
            x = x.transpose(1, 2)
        # channels-first storage (a copy for (b, n, dim) storage): the grouped projection and the
        # sampler then read each group's channels as whole rows (a training step of the MNIST-1D
        # model's layer took 0.35 ms less than with strided reads)
        x = x.contiguous()
        batch, _, length = x.shape
        groups, r = self.offset_groups, self.downsample_factor
        if mask is not None:  # masked_fill, not a product: padding may hold NaN or inf, and NaN * 0 is NaN
            x = x.masked_fill(~mask[:, None, :], 0)

        queries = self.to_q(x)  # (b, h d, n)
        # shape: (b, g d, n) -> (b g, d, n): each offset group predicts its own offsets
        grouped_queries = rearrange(queries, "b (g d) n -> (b g) d n", g=groups)
        if mask is not None:
            grouped_queries = grouped_queries.masked_fill(~mask.repeat_interleave(groups, 0)[:, None, :], 0)
        # sample positions stay in float32 or wider: bfloat16 cannot resolve token indices past 256
        offsets = self.to_offsets(grouped_queries).to(torch.promote_types(x.dtype, torch.float32))  # (b g, m) cells
        positions = sample_positions(offsets, length, r, geometry=self.geometry)  # (b g, m) tokens
        # shape: (b, g d, n) -> (b g, d, n): a group samples its own slice of the input channels
        sampled = self.sample_keys(rearrange(x, "b (g d) n -> (b g) d n", g=groups), positions)
        sampled = rearrange(sampled, "(b g) d m -> b (g d) m", b=batch)
        keys, values = self.to_k(sampled), self.to_v(sampled)  # (b, h d, m)
        # shape: (b, h d, len) -> (b, h, len, d), views
        q, k, v = (rearrange(t, "b (h d) l -> b h l d", h=self.heads) for t in (queries, keys, values))

        cells = offsets.shape[-1]
        key_padding = None
        if mask is not None:  # keys whose cell lies in the padding do not exist for that sequence
            key_padding = torch.arange(cells, device=x.device)[None, :] >= (mask.sum(-1) // r)[:, None]  # (b, m)
        coordinates = distance_coordinates(torch.arange(length, device=x.device), offsets, length, r, geometry=self.geometry)
        bias = self.bias_for_kernels(offsets.dtype)
        plan = self.attention_plan(q, cells=cells, bias=bias)
        if plan.kernel != "fused":  # SDPA on CPU is ~3x slower on the strided views; the fused kernel takes them
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        causal = {}
        if self.causal:  # (b g, m) first visible query; (b, h, 1, d) null key and value
            # under autocast q is in the low precision and the parameters are not
            null_k, null_v = (t.to(q.dtype)[None, :, None].expand(batch, -1, -1, -1) for t in (self.null_key, self.null_value))
            causal = dict(visible_from=causal_visibility(positions, r), null_k=null_k, null_v=null_v)
        # in inference the queries are a temporary the output can overwrite; in training the output
        # is stored tokens-major, so that to_out is one product over every token
        inference = not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
        out = biased_attention(
            plan, q, k, v, coordinates=coordinates, position_bias=bias, scale=self.scale, key_padding=key_padding,
            log_distance=self.position_bias is not None and self.position_bias.log_distance,
            dropout_p=self.dropout if self.training else 0.0, **causal, overwrite_q=inference,
            tokens_major_output=not inference,
        )
        out = self.to_out(rearrange(out, "b h n d -> b (h d) n"))  # (b, dim, n)
        if mask is not None:
            out = out.masked_fill(~mask[:, None, :], 0)
        if self.batch_first:
            out = out.transpose(1, 2)
        if return_vgrid:
            return out, torch.arange(cells, device=x.device, dtype=offsets.dtype) + offsets
        return out

    def sample_keys(self, grouped_x: Tensor, positions: Tensor) -> Tensor:
        """Linear samples of each group's channels, zero outside; override to study other samplers.

        Args:
            grouped_x: (batch * offset_groups, dim / offset_groups, n) input channels per group.
            positions: (batch * offset_groups, cells) sample positions in tokens (float32 or wider).

        Returns:
            (batch * offset_groups, dim / offset_groups, cells) samples.
        """
        gather = self.implementation.sampling == "gather"
        if self.causal and not gather:  # grid_sample's rounding leaks ~1e-16 of the token after ceil(p)
            raise ValueError("implementation.sampling: a causal layer samples with 'gather' (exact zero weights)")
        return (linear_sample_1d if gather else linear_sample_1d_reference)(grouped_x, positions)

    def bias_for_kernels(self, dtype: torch.dtype) -> PiecewiseLinearTable | Any | None:
        """The position bias as the kernels take it: the table (in ``dtype``), the MLP, or ``None``."""
        if self.position_bias is None:
            return None
        if torch.compiler.is_exporting():  # the exported program always evaluates the frozen table
            if self.position_bias.frozen_table is None:
                raise RuntimeError(
                    "torch.export: the position bias's table has a data-dependent number of kinks; call "
                    "layer.position_bias.freeze() first, or export with deform_attn.export.export_layer"
                )
        elif self.implementation.position_bias == "mlp":
            return self.position_bias.reference_bias
        return self.position_bias.table(dtype)

    def attention_plan(self, q: Tensor, *, cells: int, bias: PiecewiseLinearTable | Any | None) -> KernelPlan:
        """The kernel and chunk a forward pass with queries ``q`` (b, h, n, d) runs (:func:`plan_attention`)."""
        return plan_attention(
            self.implementation, length=q.shape[2], batch=q.shape[0], heads=self.heads, cells=cells,
            num_kinks=bias.kinks.numel() if isinstance(bias, PiecewiseLinearTable) else None,
            device_type=q.device.type, floating_point=str(q.dtype).removeprefix("torch."),
            autocast=torch.is_autocast_enabled(q.device.type), dropout_in_use=self.training and self.dropout > 0,
            exporting=torch.compiler.is_exporting(), bias_is_function=bias is not None and not isinstance(bias, PiecewiseLinearTable),
            fused_kernel_available=q.device.type == "cpu" and not torch.compiler.is_compiling() and fused_available(),
        )


def from_lucidrains(module: nn.Module, **overrides: Any) -> DeformableAttention1D:
    """An equivalent ``DeformableAttention1D`` for a ``deformable_attention.DeformableAttention1D``.

    The result uses the ``"lucidrains"`` geometry and a copy of the module's weights, so that on the
    same input it returns the same output (to float rounding) and the same gradients.
    ``overrides`` pass further keyword arguments (e.g. ``implementation=Implementation(position_bias="mlp")``).
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
