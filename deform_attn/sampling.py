"""Linear sampling of a sequence at fractional positions: the 1D analogue of ``grid_sample``.

Positions are in **token index units**: position ``p`` lies between token ``floor(p)`` and token
``floor(p) + 1`` and blends them linearly. Token ``j`` sits exactly at position ``j``. Outside the
sequence the values are zero (``grid_sample``'s ``padding_mode="zeros"``), so a position in
``(-1, 0)`` or ``(n - 1, n)`` fades a border token towards zero and anything farther out is zero.

Axis letters: b batch, c channels, n tokens, m sampled positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import normalize_positions
from .kernels.fused import loops_available, sample_backward, sample_forward, tensor_path_grads

__all__ = ["linear_sample_1d", "linear_sample_1d_tensors", "linear_sample_1d_reference"]


def _check_sample_inputs(values: Tensor, positions: Tensor) -> None:
    if not isinstance(values, Tensor) or values.ndim != 3:
        raise ValueError(
            f"values: expected a tensor of shape (batch, channels, length), got "
            f"{tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}"
        )
    if not isinstance(positions, Tensor) or positions.ndim != 2:
        raise ValueError(
            f"positions: expected a tensor of shape (batch, num_samples), got "
            f"{tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__}"
        )
    if positions.shape[0] != values.shape[0]:
        raise ValueError(
            f"positions: batch size {positions.shape[0]} does not match values' batch size {values.shape[0]}"
        )
    if not positions.is_floating_point():
        raise TypeError(f"positions: expected a floating point tensor, got {positions.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"values: expected a floating point tensor, got {values.dtype}")


def linear_sample_1d(values: Tensor, positions: Tensor) -> Tensor:
    """Sample ``values`` at fractional ``positions`` by linear interpolation, zero outside.

    Differentiable with respect to both ``values`` and ``positions`` (the gradient with respect to
    a position is the difference of its two neighbouring tokens). On the CPU in float32 and
    float64 the compiled loops of :mod:`deform_attn.kernels.fused` compute it and keep only the
    inputs for the backward pass; elsewhere (other devices and dtypes, ``torch.compile``,
    ``torch.export``) :func:`linear_sample_1d_tensors` does, with the same result to rounding.

    Args:
        values: (batch, channels, length) sequence to sample from.
        positions: (batch, num_samples) positions in token index units (token ``j`` at ``j``).

    Returns:
        (batch, channels, num_samples) interpolated values.
    """
    _check_sample_inputs(values, positions)
    positions = positions.to(torch.promote_types(positions.dtype, values.dtype))
    if loops_available(values, positions):
        return _CompiledLinearSample.apply(values, positions)
    return _sample_with_tensors(values, positions)


def linear_sample_1d_tensors(values: Tensor, positions: Tensor) -> Tensor:
    """:func:`linear_sample_1d` in tensor operations on any device and dtype: one gather of both neighbours."""
    _check_sample_inputs(values, positions)
    return _sample_with_tensors(values, positions.to(torch.promote_types(positions.dtype, values.dtype)))


def _sample_with_tensors(values: Tensor, positions: Tensor) -> Tensor:
    batch, channels, length = values.shape
    cells = positions.shape[1]
    left_index = positions.floor()
    right_weight = positions - left_index  # gradient w.r.t. positions flows through here
    left_index = left_index.long()
    # shape: (b, 2, m): the left and the right neighbour of every position
    index = torch.stack([left_index, left_index + 1], dim=1)
    inside = (index >= 0) & (index < length)
    # a neighbour outside the sequence weighs zero (its index is clamped only to keep gather in range)
    weights = torch.stack([1 - right_weight, right_weight], dim=1).to(values.dtype) * inside.to(values.dtype)
    # one gather, not one per neighbour: its backward zero-fills one (b, c, n) gradient, not two
    safe_index = index.clamp(0, length - 1).flatten(1).unsqueeze(1).expand(batch, channels, -1)  # (b, c, 2 m)
    neighbours = values.gather(-1, safe_index)  # (b, c, 2 m)
    left, right = neighbours[..., :cells], neighbours[..., cells:]  # (b, c, m) each, views
    return torch.addcmul(left * weights[:, None, 0], right, weights[:, None, 1])


class _CompiledLinearSample(torch.autograd.Function):
    """:func:`linear_sample_1d` through the compiled loops.

    The tensor path keeps its gather of both neighbours and their weighted copies, (b, c, 3 m),
    for the backward pass; this one keeps only the inputs, which exist anyway, and recomputes the
    neighbours (at n = 16384 and dim 512, 24 MB less at the peak of a training step), in one call
    each way instead of a dozen tensor operations.
    """

    @staticmethod
    def forward(ctx, values, positions):
        values, positions = values.contiguous(), positions.contiguous()
        ctx.save_for_backward(values, positions)
        return sample_forward(values, positions)

    @staticmethod
    def backward(ctx, grad_out):
        values, positions = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return sample_backward(values, positions, grad_out.contiguous(), ctx.needs_input_grad[:2])
        return tensor_path_grads(_sample_with_tensors, (values, positions), ctx.needs_input_grad[:2], grad_out)


def linear_sample_1d_reference(values: Tensor, positions: Tensor) -> Tensor:
    """The same sampling through ``torch.nn.functional.grid_sample``; the reference path.

    The sequence is laid along the **width** axis of a height-1 image, the axis ``grid_sample``
    reads from the grid's **first** (x) coordinate. Positions are normalized with
    ``align_corners=False``, the inverse of the unnormalization ``grid_sample`` applies, so the
    two paths agree to rounding.

    Args:
        values: (batch, channels, length) sequence to sample from.
        positions: (batch, num_samples) positions in token index units.

    Returns:
        (batch, channels, num_samples) interpolated values.
    """
    _check_sample_inputs(values, positions)
    length = values.shape[-1]
    x = normalize_positions(positions.to(values.dtype), length, align_corners=False)
    # shape: (b, m) -> (b, 1, m, 2): x along the sequence, y = 0 on the single row
    grid = torch.stack([x, torch.zeros_like(x)], dim=-1).unsqueeze(1)
    image = values.unsqueeze(2)  # (b, c, 1, n): height 1, width n
    sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.squeeze(2)  # (b, c, 1, m) -> (b, c, m)
