"""Argument and input checks of :class:`deform_attn.DeformableAttention1D`, with errors that name
the argument and what was expected. The layer calls these at its boundary (constructor, forward);
inside, it trusts the invariants they establish.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .geometry import GEOMETRIES
from .offsets import check_offset_kernel_size, default_offset_kernel_size

__all__ = ["positive_int", "resolve_layer_arguments", "check_input"]


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive ``int`` (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def resolve_layer_arguments(
    *,
    dim: int,
    dim_head: int,
    heads: int,
    dropout: float,
    downsample_factor: int,
    offset_scale: float | None,
    offset_groups: int | None,
    offset_kernel_size: int | None,
    geometry: str,
    has_position_bias: bool,
    causal: bool = False,
) -> dict[str, Any]:
    """Check the constructor's arguments; return them with every ``None`` default resolved.

    ``offset_groups=None`` is ``heads``; ``offset_scale=None`` is ``downsample_factor`` cells;
    ``offset_kernel_size=None`` is :func:`deform_attn.offsets.default_offset_kernel_size`.
    """
    for name, value in (("dim", dim), ("dim_head", dim_head), ("heads", heads), ("downsample_factor", downsample_factor)):
        positive_int(name, value)
    offset_groups = heads if offset_groups is None else positive_int("offset_groups", offset_groups)
    if offset_kernel_size is None:
        offset_kernel_size = default_offset_kernel_size(downsample_factor)
    positive_int("offset_kernel_size", offset_kernel_size)
    check_offset_kernel_size(offset_kernel_size, downsample_factor)
    offset_scale = downsample_factor if offset_scale is None else offset_scale
    if isinstance(offset_scale, bool) or not isinstance(offset_scale, (int, float)) or not 0 < offset_scale < math.inf:
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
    if dim < 4 and has_position_bias:
        raise ValueError(f"dim: the position bias MLP has dim // 4 hidden units, so dim must be >= 4, got {dim}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry: expected one of {GEOMETRIES}, got {geometry!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    if causal and geometry != "centered":
        raise ValueError(
            "causal: needs geometry='centered'; the 'lucidrains' geometry places every key by the whole "
            "sequence length, so no key can be computed from the past alone"
        )
    return {
        "offset_groups": offset_groups,
        "offset_kernel_size": offset_kernel_size,
        "offset_scale": offset_scale,
        "dropout": float(dropout),
    }


def _all_finite(x: Tensor) -> bool:
    """``torch.isfinite(x).all()`` in one reduction where it can: a NaN or infinity makes the sum
    NaN or infinite; only a finite sum beyond the dtype's range needs the elementwise check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_input(
    x: Any,
    mask: Any,
    *,
    dim: int,
    downsample_factor: int,
    batch_first: bool,
    geometry: str,
    check_finite: bool,
) -> None:
    """Check a forward pass's ``x`` and ``mask`` (see :class:`deform_attn.DeformableAttention1D`).

    Checks that read the data (finite values, where the padding sits) are skipped while
    ``torch.compile`` or ``torch.export`` traces, where they would break the graph.
    """
    layout = "(batch, n, dim)" if batch_first else "(batch, dim, n)"
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating point tensor, got dtype {x.dtype}")
    if x.ndim != 3:
        raise ValueError(f"x: expected a 3-d tensor of shape {layout}, got shape {tuple(x.shape)}")
    channels, length = (x.shape[2], x.shape[1]) if batch_first else (x.shape[1], x.shape[2])
    if channels != dim:
        raise ValueError(f"x: expected {dim} channels (dim) in shape {layout}, got shape {tuple(x.shape)}")
    if length < downsample_factor:
        raise ValueError(f"x: sequence length n = {length} must be at least downsample_factor = {downsample_factor}")
    if x.shape[0] == 0:
        raise ValueError(f"x: expected a batch of at least one sequence, got shape {tuple(x.shape)}")
    tracing = torch.compiler.is_compiling()
    not_finite_message = "x: contains NaN or infinity; pass implementation=Implementation(check_finite=False) to let them propagate"
    if mask is None:
        if check_finite and not tracing and not _all_finite(x):
            raise ValueError(not_finite_message)
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor (True = real token), got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != (x.shape[0], length):
        raise ValueError(f"mask: expected shape (batch, n) = {(x.shape[0], length)}, got {tuple(mask.shape)}")
    if geometry != "centered":
        raise ValueError(
            "mask: padding masks need geometry='centered'; in the 'lucidrains' geometry every sample "
            "position depends on the padded length"
        )
    if tracing:
        return
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask: padding must sit at the end of each row (True...True False...False)")
    too_short = mask.sum(-1) < downsample_factor
    if too_short.any():
        raise ValueError(
            f"mask: every row needs at least downsample_factor = {downsample_factor} real tokens; "
            f"rows {too_short.nonzero().flatten().tolist()} have fewer"
        )
    if check_finite:  # padding is never read, so only real tokens must be finite
        real = mask[:, :, None] if batch_first else mask[:, None, :]
        if not (torch.isfinite(x) | ~real).all():
            raise ValueError(not_finite_message)
