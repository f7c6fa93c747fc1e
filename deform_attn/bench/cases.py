"""What the benchmark measures: the five cases and two modes, each case's layer, and parity b vs a.

Every layer is built on fp32 weights from the fixed seed :data:`SEED`, so two workers that build
the same case build the same weights. Cases **a** and **b** share their weights: **b** is
``from_lucidrains(a)`` (where ``deformable-attention`` is missing, **b** is built in the same
geometry from its own initialisation). Every case uses the offset kernel size of
:func:`deform_attn.offsets.default_offset_kernel_size` (6 for the default ``r = 4``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from ..attention import DeformableAttention1D, from_lucidrains
from ..baselines import FullAttention1D
from ..kernels import Implementation
from ..offsets import default_offset_kernel_size

__all__ = [
    "CASES",
    "MODES",
    "SEED",
    "PARITY_TOLERANCE",
    "lucidrains_available",
    "lucidrains_layer",
    "build_layer",
    "parity",
]

CASES: dict[str, str] = {
    "a": "deformable-attention 0.0.20",
    "b": "deform_attn, lucidrains geometry",
    "c": "deform_attn, defaults",
    "d": "full attention (SDPA)",
    "e": "deform_attn, SDPA kernel",
}
MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
SEED = 0
PARITY_TOLERANCE = 1e-5  # max |b(x) - a(x)| in fp32; the two differ only by float rounding


def lucidrains_available() -> bool:
    """Whether the reference package ``deformable-attention`` (case **a**) is installed."""
    return importlib.util.find_spec("deformable_attention") is not None


def lucidrains_layer(*, dim: int, dim_head: int, heads: int, downsample: int) -> nn.Module:
    """Case **a**: ``deformable_attention.DeformableAttention1D`` built from :data:`SEED`.

    The reference's own default kernel (6) is invalid for odd ``downsample``, so the kernel is
    passed explicitly with the same rule as this package's default.
    """
    from deformable_attention import DeformableAttention1D as ReferenceAttention1D

    torch.manual_seed(SEED)
    return ReferenceAttention1D(
        dim=dim,
        dim_head=dim_head,
        heads=heads,
        downsample_factor=downsample,
        offset_kernel_size=default_offset_kernel_size(downsample),
    )


def build_layer(case: str, *, dim: int, dim_head: int, heads: int, downsample: int) -> nn.Module:
    """The layer of ``case`` (a key of :data:`CASES`) on fp32 weights, built from :data:`SEED`.

    Args:
        case: ``"a"`` to ``"e"``, see :data:`CASES`.
        dim: channels of the input and output.
        dim_head: channels per head.
        heads: attention heads (= offset groups for the deformable layers).
        downsample: downsample factor r of the deformable layers (``n // r`` sampled keys);
            unused by case **d**.

    Returns:
        A module whose forward takes (batch, dim, n) and returns (batch, dim, n).
    """
    if case not in CASES:
        raise ValueError(f"case: expected one of {sorted(CASES)}, got {case!r}")
    shape = dict(dim=dim, dim_head=dim_head, heads=heads)
    if case == "a":
        return lucidrains_layer(**shape, downsample=downsample)
    if case == "b" and lucidrains_available():
        return from_lucidrains(lucidrains_layer(**shape, downsample=downsample))
    torch.manual_seed(SEED)
    if case == "d":
        return FullAttention1D(**shape)
    deformable = dict(**shape, downsample_factor=downsample, offset_kernel_size=default_offset_kernel_size(downsample))
    if case == "b":  # same shapes and geometry as a, own initialisation
        return DeformableAttention1D(**deformable, geometry="lucidrains")
    if case == "c":
        return DeformableAttention1D(**deformable)
    # case e: c on the SDPA kernel, the bias materialised chunk by chunk
    return DeformableAttention1D(**deformable, implementation=Implementation(kernel="sdpa"))


def parity(
    *, dim: int, dim_head: int, heads: int, downsample: int, batch: int, length: int, device: str
) -> dict[str, Any]:
    """Max |b(x) - a(x)| of the forward outputs in fp32, same weights and input.

    Args:
        dim, dim_head, heads, downsample: the layer, as for :func:`build_layer`.
        batch: batch size of the input x, (batch, dim, length).
        length: sequence length n in tokens.
        device: where both layers run (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    Returns:
        The ``parity`` record of ``meta.json``: ``status``, ``n``, ``dtype``, ``max_abs_diff``,
        ``max_abs_output`` (of a, for scale), ``tolerance`` and ``passed``.
    """
    reference = lucidrains_layer(dim=dim, dim_head=dim_head, heads=heads, downsample=downsample).to(device)
    ours = from_lucidrains(reference)
    x = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    with torch.no_grad():
        expected, actual = reference(x), ours(x)
    max_abs_diff = (actual - expected).abs().max().item()
    return {
        "status": "ok",
        "n": length,
        "dtype": "float32",
        "max_abs_diff": max_abs_diff,
        "max_abs_output": expected.abs().max().item(),
        "tolerance": PARITY_TOLERANCE,
        "passed": bool(max_abs_diff <= PARITY_TOLERANCE),
    }
