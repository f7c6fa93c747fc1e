"""The offset network: where each group of heads should sample its keys.

A depthwise strided convolution looks at the queries of one offset group (kernel ``w``, stride
``r``, padding ``(w - r) / 2``, so cell ``j`` sees tokens centred on its window centre), GELU, a
pointwise convolution to one scalar per cell, then ``tanh`` and a scale: offsets lie in
``(-offset_scale, offset_scale)`` cells.

Options from DAT++: a LayerNorm over channels after the depthwise convolution, and unbounded
offsets (no ``tanh``; the scale still multiplies).

Axis letters: b batch, g offset groups, d channels per group, n tokens, m cells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels.fused import (
    depthwise_backward,
    depthwise_forward,
    loops_available,
    offsets_backward,
    offsets_forward,
    tensor_path_grads,
)

__all__ = [
    "OffsetNetwork", "ZeroOffsets", "default_offset_kernel_size", "check_offset_kernel_size", "strided_depthwise_conv",
]

# the reference's default kernel; valid for r = 2, 4, 6 only
REFERENCE_OFFSET_KERNEL_SIZE = 6


def check_offset_kernel_size(kernel_size: int, downsample_factor: int) -> None:
    """Raise unless ``kernel_size >= downsample_factor`` and their difference is even.

    The padding ``(w - r) / 2`` must be a whole number of tokens on each side, so that cell ``j``'s
    receptive field is centred on its window.
    """
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < downsample_factor
        or (kernel_size - downsample_factor) % 2
    ):
        raise ValueError(
            f"offset_kernel_size: expected an integer >= downsample_factor ({downsample_factor}) "
            f"with offset_kernel_size - downsample_factor even, got {kernel_size!r}"
        )


def default_offset_kernel_size(downsample_factor: int) -> int:
    """What ``offset_kernel_size=None`` means: the valid kernel size nearest to the reference's 6.

    Valid sizes are ``w >= r`` with ``w - r`` even. That is 6 itself for r = 2, 4, 6 (parity with
    ``deformable-attention``'s default), 7 for r = 1, 3, 5 (5 and 7 are equally near; the larger
    one sees one token beyond the cell on each side for r = 5), and r itself for r >= 7:
    ``w = max(6, r)``, plus one when ``w - r`` is odd.
    """
    if isinstance(downsample_factor, bool) or not isinstance(downsample_factor, int) or downsample_factor < 1:
        raise ValueError(f"downsample_factor: expected a positive integer, got {downsample_factor!r}")
    kernel_size = max(REFERENCE_OFFSET_KERNEL_SIZE, downsample_factor)
    return kernel_size + (kernel_size - downsample_factor) % 2


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (batch, channels, length) tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def _taps(length: int, kernel_size: int, stride: int, left: int, right: int):
    """(tap, first cell, stop cell, first token) for every tap that reads a token of the sequence.

    Cell ``j`` of tap ``k`` reads token ``j * stride + k - left``; cells whose token falls in the
    (zero) padding are left out, so no padded copy of the input is needed.
    """
    cells = (left + length + right - kernel_size) // stride + 1
    taps = []
    for tap in range(kernel_size):
        first = max(0, -(-(left - tap) // stride))  # first cell whose token is >= 0
        stop = min(cells, (length - 1 - tap + left) // stride + 1)  # cells whose token is < n
        if stop > first:
            taps.append((tap, first, stop, first * stride + tap - left))
    return cells, taps


def _depthwise_forward(x: Tensor, weight: Tensor, bias: Tensor, stride: int, left: int, right: int) -> Tensor:
    """The convolution from strided slices: a tap that reads every cell makes the output (a new
    tensor), the others add to the cells they reach. Plain tensor ops, so it also exports."""
    cells, taps = _taps(x.shape[-1], weight.shape[1], stride, left, right)
    full = [item for item in taps if item[1] == 0 and item[2] == cells]
    out = None
    if full:
        tap, _, _, token = full[0]
        out = torch.addcmul(bias[:, None], weight[:, tap, None], x[..., token : token + stride * (cells - 1) + 1 : stride])
    else:
        out = x.new_empty(*x.shape[:-1], cells).copy_(bias[:, None])
    for tap, first, stop, token in taps:
        if full and tap == full[0][0]:
            continue
        out[..., first:stop].addcmul_(weight[:, tap, None], x[..., token : token + stride * (stop - first - 1) + 1 : stride])
    return out


class _StridedDepthwiseConv(torch.autograd.Function):
    """Strided depthwise convolution whose backward writes the input's gradient into one buffer.

    Differentiating the forward's strided slices one by one would allocate a zero tensor of the
    input's size per tap (a slice's backward) and sum them: at n = 16384 that alone put a training
    step's peak memory above full attention's, and at every size it took twice as long (zero-filling
    and adding six input-sized tensors instead of one).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, left: int, right: int):
        ctx.compiled = _compiled_depthwise(x, weight, bias)
        if ctx.compiled:  # the compiled loops read contiguous rows; the backward reads the same copies
            x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, _taps(x.shape[-1], weight.shape[1], stride, left, right)[1], left)
        return _depthwise_without_grad(x, weight, bias, stride, left, right, ctx.compiled)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, taps, left = ctx.geometry
        if ctx.compiled and not torch.is_grad_enabled():  # a second derivative needs the graph below
            return (*depthwise_backward(x, weight, grad_out.contiguous(), stride, left, ctx.needs_input_grad[:3]),
                    None, None, None)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
        products = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            # one buffer for every tap's products, unless a second derivative needs the graph
            products = None if torch.is_grad_enabled() else torch.empty_like(grad_out)
        for tap, first, stop, token in taps:
            window = slice(token, token + stride * (stop - first - 1) + 1, stride)
            grad_cells = grad_out[..., first:stop]
            if grad_x is not None:  # in place on the strided view (autograd records it for a second derivative)
                grad_x[..., window].addcmul_(grad_cells, weight[:, tap, None])
            if grad_weight is not None:
                if products is None:
                    tap_products = grad_cells * x[..., window]
                else:
                    tap_products = torch.mul(grad_cells, x[..., window], out=products[..., : stop - first])
                grad_weight[:, tap] = tap_products.sum(dim=(0, 2))
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 2))
        return grad_x, grad_weight, grad_bias, None, None, None


def _compiled_depthwise(x: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether the compiled loops of ``fused_cpu.cpp`` take this convolution (fp32/fp64 on the CPU)."""
    return loops_available(x, weight, bias)


def _depthwise_without_grad(x: Tensor, weight: Tensor, bias: Tensor, stride: int, left: int, right: int,
                            compiled: bool) -> Tensor:
    """The convolution's values, by the compiled loops or tap by tap (no autograd graph needed)."""
    if compiled:
        cells = _taps(x.shape[-1], weight.shape[1], stride, left, right)[0]
        return depthwise_forward(x.contiguous(), weight.contiguous(), bias.contiguous(), stride, left, cells)
    return _depthwise_forward(x, weight, bias, stride, left, right)


def strided_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor, stride: int, left: int, right: int) -> Tensor:
    """``conv1d(pad(x, (left, right)), weight[:, None], bias, stride, groups=channels)`` without the pad.

    Args:
        x: (batch, channels, n).
        weight: (channels, kernel_size); bias: (channels,).
        stride: the stride ``r``; left, right: zero padding in tokens.

    Returns:
        (batch, channels, (left + n + right - kernel_size) // stride + 1).
    """
    if torch.compiler.is_exporting():  # the taps' bounds would make the traced program guard on n
        return F.conv1d(F.pad(x, (left, right)), weight[:, None], bias, stride=stride, groups=weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if not needs_grad:
        return _depthwise_without_grad(x, weight, bias, stride, left, right, _compiled_depthwise(x, weight, bias))
    return _StridedDepthwiseConv.apply(x, weight, bias, stride, left, right)


def _offset_head(hidden: Tensor, pointwise: Tensor, bounded: bool, scale: float) -> Tensor:
    """Hidden activations (b g, d, m) -> offsets (b g, m): the pointwise product, tanh and scale."""
    # a matrix product, not conv1d: one output channel through mkldnn costs more than it computes
    raw = torch.matmul(pointwise[None, :], hidden).squeeze(1)  # (bg, 1, m) -> (bg, m)
    return (torch.tanh(raw) if bounded else raw) * scale


def _offsets_with_tensors(x, weight, bias, pointwise, stride: int, left: int, right: int, bounded: bool, scale):
    """The offset network without a LayerNorm in tensor operations (differentiable twice)."""
    return _offset_head(F.gelu(strided_depthwise_conv(x, weight, bias, stride, left, right)), pointwise, bounded, scale)


class _CompiledOffsets(torch.autograd.Function):
    """The whole offset network in one compiled call each way (``fused_cpu.cpp``).

    Through tensor operations the network is a dozen calls each way on tensors of a few thousand
    values in the ablation models (convolution, GELU, product, tanh, scale and their gradients),
    and it keeps the convolution's output and the GELU's, (b g, d, m) each, for the backward
    pass. The compiled loops keep only the inputs and recompute the hidden activations.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pointwise, stride: int, left: int, right: int, bounded: bool, scale: float):
        x, weight, bias, pointwise = x.contiguous(), weight.contiguous(), bias.contiguous(), pointwise.contiguous()
        ctx.save_for_backward(x, weight, bias, pointwise)
        ctx.settings = (stride, left, right, bounded, scale)
        cells = _taps(x.shape[-1], weight.shape[1], stride, left, right)[0]
        return offsets_forward(x, weight, bias, pointwise, stride, left, cells, bounded, scale)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = ctx.saved_tensors
        stride, left, right, bounded, scale = ctx.settings
        needs = ctx.needs_input_grad[:4]
        if not torch.is_grad_enabled():
            grads = offsets_backward(*inputs, grad_out.contiguous(), stride, left, bounded, scale, needs)
            return (*grads, None, None, None, None, None)
        def tensor_path(*parts):
            return _offsets_with_tensors(*parts, stride, left, right, bounded, scale)

        return (*tensor_path_grads(tensor_path, inputs, needs, grad_out), None, None, None, None, None)


class OffsetNetwork(nn.Module):
    """Queries of one offset group -> one offset per downsampled cell, in cells.

    Args:
        channels: channels of one offset group's queries (``heads * dim_head / offset_groups``).
        downsample_factor: ``r``, the convolution's stride (tokens per cell).
        kernel_size: ``w`` >= ``r`` with ``w - r`` even, so the padding ``(w - r) / 2`` is whole.
        offset_scale: offsets are ``tanh(.) * offset_scale`` cells (or ``. * offset_scale``
            when unbounded).
        layer_norm: DAT++'s LayerNorm after the depthwise convolution.
        bounded: ``tanh`` before the scale (DAT); ``False`` for DAT++'s unbounded offsets.
        causal: pad all ``w - r`` tokens on the left instead of half on each side, so cell ``j``'s
            window ends at the cell's last token, ``(j + 1) r - 1``: its offset depends on no
            later token.

    Shapes: forward takes (batch * groups, channels, n) and returns (batch * groups, n // r).
    """

    def __init__(
        self,
        *,
        channels: int,
        downsample_factor: int,
        kernel_size: int,
        offset_scale: float,
        layer_norm: bool = False,
        bounded: bool = True,
        causal: bool = False,
    ):
        super().__init__()
        check_offset_kernel_size(kernel_size, downsample_factor)
        self.downsample_factor = downsample_factor
        self.offset_scale = offset_scale
        self.bounded = bounded
        self.causal = causal
        padding = kernel_size - downsample_factor
        # (left, right) tokens of zero padding: centred windows, or windows that end with their cell
        self.padding = (padding, 0) if causal else (padding // 2, padding // 2)
        self.depthwise = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            stride=downsample_factor,
            padding=(kernel_size - downsample_factor) // 2,
        )
        self.norm = _ChannelLayerNorm(channels) if layer_norm else nn.Identity()
        self.activation = nn.GELU()
        self.pointwise = nn.Conv1d(channels, 1, 1, bias=False)

    def depthwise_conv(self, grouped_queries: Tensor, padding: tuple[int, int] | None = None) -> Tensor:
        """``self.depthwise`` computed tap by tap over strided slices (:func:`strided_depthwise_conv`).

        Same result as calling the convolution, but PyTorch's CPU backward of a strided depthwise
        ``conv1d`` is pathologically slow (seconds at n = 2048), and the taps need no padded copy.
        ``padding`` overrides the (left, right) zero padding, e.g. ``(0, 0)`` for queries that
        already carry their left context (streaming).
        """
        conv = self.depthwise
        left, right = self.padding if padding is None else padding
        return strided_depthwise_conv(grouped_queries, conv.weight[:, 0], conv.bias, self.downsample_factor, left, right)

    def forward(self, grouped_queries: Tensor, padding: tuple[int, int] | None = None) -> Tensor:
        left, right = self.padding if padding is None else padding
        conv = self.depthwise
        parts = (grouped_queries, conv.weight[:, 0], conv.bias, self.pointwise.weight[0, :, 0])
        if self._compiled(*parts):
            return _CompiledOffsets.apply(*parts, self.downsample_factor, left, right, self.bounded, self.offset_scale)
        hidden = self.activation(self.norm(self.depthwise_conv(grouped_queries, padding)))
        return _offset_head(hidden, parts[3], self.bounded, self.offset_scale)

    def _compiled(self, x: Tensor, *parameters: Tensor) -> bool:
        """Whether the whole network runs in one compiled call: no LayerNorm, exact GELU, and
        inputs the compiled loops take (:func:`deform_attn.kernels.fused.loops_available`)."""
        plain = isinstance(self.norm, nn.Identity) and type(self.activation) is nn.GELU
        return plain and self.activation.approximate == "none" and loops_available(x, *parameters)


class ZeroOffsets(nn.Module):
    """An offset network that always answers zero: every cell samples its reference point.

    Put in place of :class:`OffsetNetwork` (``layer.to_offsets = ZeroOffsets(r)``), it turns the
    deformable layer into attention over ``n // r`` keys sampled at fixed window centres, the
    "downsampled" ablation, without running (or keeping) an offset network.

    Shapes: forward takes (batch * groups, channels, n) and returns (batch * groups, n // r) zeros.
    """

    def __init__(self, downsample_factor: int):
        super().__init__()
        self.downsample_factor = downsample_factor

    def forward(self, grouped_queries: Tensor) -> Tensor:
        rows, _, length = grouped_queries.shape
        return grouped_queries.new_zeros(rows, length // self.downsample_factor)
