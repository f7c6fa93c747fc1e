"""A small pre-norm Transformer encoder with pluggable attention, for the ablations.

Axis letters: b batch, n tokens, h heads, d channels, m sampled keys.

Attention kinds (``ModelConfig.attention``):

* ``"deformable"``: :class:`deform_attn.DeformableAttention1D` (``batch_first=True``).
* ``"downsampled"``: the same layer with ``use_offsets=False``: identical sampling of ``n / r`` keys,
  offsets fixed at zero. The offset network's weights exist but receive no gradient.
* ``"bug018"``: the deformable layer with the sampling that ``deformable-attention`` <= 0.0.18
  computed (:class:`Bug018DeformableAttention1D`).
* ``"full"``: multi-head attention over all tokens through ``scaled_dot_product_attention``, with the
  same width (heads x dim_head); the reference point.
* ``"local"``: the same multi-head attention restricted to a window of ``window`` tokens either side.

Every kind sees the same token embedding and the same fixed sinusoidal positions, so that the
attention layer is the only difference between variants (the deformable kinds add their continuous
position bias on top, as the layer does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import DeformableAttention1D
from ..geometry import normalize_positions
from .config import RecordedConfig

__all__ = [
    "ATTENTION_KINDS",
    "ModelConfig",
    "Bug018DeformableAttention1D",
    "bug018_sample",
    "MultiHeadAttention",
    "Encoder",
    "build_model",
    "count_parameters",
]

ATTENTION_KINDS: tuple[str, ...] = ("deformable", "downsampled", "bug018", "full", "local")
DEFORMABLE_KINDS: tuple[str, ...] = ("deformable", "downsampled", "bug018")


@dataclass(frozen=True)
class ModelConfig(RecordedConfig):
    """Everything that defines a model; stored in every result record.

    Args:
        attention: one of :data:`ATTENTION_KINDS`.
        dim: model width (channels).
        depth: number of Transformer blocks.
        heads, dim_head: attention heads and channels per head (all kinds).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        dropout: dropout on the residual branches.
        downsample_factor, offset_scale, offset_groups, offset_kernel_size, position_bias,
            cpb_log_distance, geometry: passed to :class:`DeformableAttention1D` (deformable kinds).
            ``offset_kernel_size=None`` means ``downsample_factor + 2``, which satisfies the
            layer's rule (``>= r``, difference even) for every ``r``.
        window: tokens either side for ``"local"``.
    """

    attention: str = "deformable"
    dim: int = 64
    depth: int = 2
    heads: int = 4
    dim_head: int = 16
    mlp_ratio: int = 2
    dropout: float = 0.0
    downsample_factor: int = 4
    offset_scale: float | None = None
    offset_groups: int | None = None
    offset_kernel_size: int | None = None
    position_bias: str = "cpb"
    cpb_log_distance: bool = True
    geometry: str = "centered"
    window: int = 16

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention: expected one of {ATTENTION_KINDS}, got {self.attention!r}")


# ---------------------------------------------------------------------------- attention kinds


def bug018_sample(grouped_x: Tensor, positions: Tensor) -> Tensor:
    """What ``deformable-attention`` <= 0.0.18 sampled, in closed form.

    That version laid the sequence on the **height** axis of an (n, 1) image but put the normalized
    sample positions ``g`` into ``grid_sample``'s **x** (width) coordinate, with y = 0
    (``align_corners=False``, zero padding). y = 0 unnormalizes to row (n - 1) / 2, the middle
    token (the mean of the two middle tokens for even n); ``g`` unnormalizes to the width index
    ``x_idx = ((g + 1) * 1 - 1) / 2 = g / 2``, and the only column, 0, gets the bilinear weight
    ``max(0, 1 - |x_idx|)``. So every key is the middle token scaled by that weight.

    Args:
        grouped_x: (batch, channels, n) the sequence.
        positions: (batch, m) sample positions in tokens (as :func:`deform_attn.sample_positions`).

    Returns:
        (batch, channels, m) the samples.
    """
    length = grouped_x.shape[-1]
    normalized = normalize_positions(positions, length, align_corners=False)  # what grid_sample got
    width_index = ((normalized + 1.0) * 1 - 1.0) / 2.0  # unnormalized along a width of 1
    weight = (1.0 - width_index.abs()).clamp_min(0.0).to(grouped_x.dtype)  # (b, m)
    if length % 2:
        middle = grouped_x[..., (length - 1) // 2]
    else:
        middle = 0.5 * (grouped_x[..., length // 2 - 1] + grouped_x[..., length // 2])
    return middle[..., None] * weight[:, None, :]  # (b, c, 1) x (b, 1, m) -> (b, c, m)


class Bug018DeformableAttention1D(DeformableAttention1D):
    """``DeformableAttention1D`` with the wrong-axis sampling of ``deformable-attention`` <= 0.0.18.

    Everything else (offsets, projections, position bias) is the corrected layer; only
    :meth:`sample_keys` is replaced by :func:`bug018_sample`, which measures what the bug cost.
    The samples depend on the padded length, so this variant is not padding invariant.
    """

    def sample_keys(self, grouped_x: Tensor, positions: Tensor) -> Tensor:
        return bug018_sample(grouped_x, positions)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention over (batch, n, dim) through ``scaled_dot_product_attention``.

    Args:
        dim: channels in and out.
        heads, dim_head: heads and channels per head.
        window: if given, each query attends only to keys within ``window`` tokens (local attention).

    Forward:
        x: (batch, n, dim); mask: optional (batch, n) bool, True for real tokens. Padded keys get no
        weight; outputs at padded positions are zero.
    """

    def __init__(self, *, dim: int, heads: int, dim_head: int, window: int | None = None):
        super().__init__()
        if window is not None and window < 0:
            raise ValueError(f"window: expected a non-negative number of tokens, got {window}")
        self.heads, self.window = heads, window
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, length, _ = x.shape
        # shape: (b, n, 3 h d) -> 3 x (b, h, n, d)
        q, k, v = self.to_qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        allowed = None
        if mask is not None:
            allowed = mask[:, None, None, :]  # (b, 1, 1, n) keys
        if self.window is not None:
            index = torch.arange(length, device=x.device)
            band = (index[:, None] - index[None, :]).abs() <= self.window  # (n, n)
            allowed = band[None, None] if allowed is None else allowed & band[None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        out = self.to_out(out.transpose(1, 2).reshape(batch, length, -1))
        if mask is not None:
            out = out * mask[..., None].to(out.dtype)
        return out


class _DeformableBlockAttention(nn.Module):
    """Adapter: the deformable layer, with the mask passed only where its geometry supports one."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        cls = Bug018DeformableAttention1D if config.attention == "bug018" else DeformableAttention1D
        r = config.downsample_factor
        self.layer = cls(
            dim=config.dim,
            dim_head=config.dim_head,
            heads=config.heads,
            downsample_factor=r,
            offset_scale=config.offset_scale,
            offset_groups=config.offset_groups,
            offset_kernel_size=config.offset_kernel_size if config.offset_kernel_size is not None else r + 2,
            position_bias=config.position_bias,
            cpb_log_distance=config.cpb_log_distance,
            geometry=config.geometry,
            use_offsets=config.attention != "downsampled",
            batch_first=True,
            check_finite=False,
        )
        # The 'lucidrains' geometry has no padding masks; its tasks are fixed-length (see presets).
        self.pass_mask = config.geometry == "centered"

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None and bool(mask.all()):
            mask = None  # no padding in this batch: the faster unmasked path gives the same result
        if mask is not None and not self.pass_mask:
            raise ValueError("geometry='lucidrains' cannot take padded batches; use fixed-length tasks")
        return self.layer(x, mask=mask)


def _make_attention(config: ModelConfig) -> nn.Module:
    if config.attention in DEFORMABLE_KINDS:
        return _DeformableBlockAttention(config)
    window = config.window if config.attention == "local" else None
    return MultiHeadAttention(dim=config.dim, heads=config.heads, dim_head=config.dim_head, window=window)


# ---------------------------------------------------------------------------- encoder


def sinusoidal_positions(length: int, dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """(length, dim) fixed sinusoidal position encodings (Vaswani et al. 2017)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table.to(dtype)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.dim)
        self.attention = _make_attention(config)
        self.mlp_norm = nn.LayerNorm(config.dim)
        hidden = config.mlp_ratio * config.dim
        self.mlp = nn.Sequential(nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Encoder(nn.Module):
    """Embedding -> sinusoidal positions -> ``depth`` blocks -> LayerNorm -> masked mean pool -> head.

    Args:
        config: the :class:`ModelConfig`.
        num_outputs: classes, or 1 for regression (the head then returns (batch,)).
        vocab_size: token ids (0 = padding) for token input; or
        in_channels: channels of continuous input (batch, n, channels).

    Forward:
        x: (batch, n) int64 tokens or (batch, n, in_channels) floats; mask: optional (batch, n)
        bool, True for real tokens, padding at the end. Returns (batch, num_outputs) logits, or
        (batch,) for a regression head.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        num_outputs: int,
        vocab_size: int | None = None,
        in_channels: int | None = None,
    ):
        super().__init__()
        if (vocab_size is None) == (in_channels is None):
            raise ValueError("Encoder: give exactly one of vocab_size (token input) or in_channels (continuous input)")
        self.config = config
        self.num_outputs = num_outputs
        if vocab_size is not None:
            self.embed = nn.Embedding(vocab_size, config.dim, padding_idx=0)
        else:
            self.embed = nn.Linear(in_channels, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, num_outputs)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.embed(x)  # (b, n, d)
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], device=h.device, dtype=h.dtype)
        if mask is not None:
            h = h * mask[..., None].to(h.dtype)
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h)
        if mask is None:
            pooled = h.mean(1)
        else:
            weights = mask[..., None].to(h.dtype)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        out = self.head(pooled)
        return out.squeeze(-1) if self.num_outputs == 1 else out


def build_model(config: ModelConfig, *, num_outputs: int, vocab_size: int | None = None, in_channels: int | None = None) -> Encoder:
    """An :class:`Encoder` for ``config``."""
    return Encoder(config, num_outputs=num_outputs, vocab_size=vocab_size, in_channels=in_channels)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
