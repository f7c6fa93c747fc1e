"""A small pre-norm Transformer encoder with pluggable attention, for the ablations.

Axis letters: b batch, n tokens, d channels.

The attention of every block is the variant ``ModelConfig.attention`` names, one of the registered
:data:`deform_attn.experiments.variants.ATTENTION_VARIANTS` (``deformable``, ``downsampled``,
``bug018``, ``full``, ``local``, ``mlp_only``; see :mod:`deform_attn.experiments.variants`).

Every variant sees the same token embedding and the same fixed sinusoidal positions, so that the
attention layer is the only difference between variants (the deformable ones add their continuous
position bias on top, as the layer does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import RecordedConfig
from .variants import ATTENTION_VARIANTS, Bug018DeformableAttention1D, build_attention, bug018_sample

__all__ = [
    "ModelConfig",
    "Encoder",
    "build_model",
    "count_parameters",
    "sinusoidal_positions",
    # re-exported from .variants, where they live now
    "Bug018DeformableAttention1D",
    "bug018_sample",
]

POSITION_BIAS_CHOICES: tuple[str, ...] = ("cpb", "none")


@dataclass(frozen=True)
class ModelConfig(RecordedConfig):
    """Everything that defines a model; stored in every result record (and hashed into run keys).

    Args:
        attention: a registered variant, a key of
            :data:`deform_attn.experiments.variants.ATTENTION_VARIANTS`.
        dim: model width (channels).
        depth: number of Transformer blocks.
        heads, dim_head: attention heads and channels per head (every variant with attention).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        dropout: dropout on the residual branches.
        downsample_factor, offset_scale, offset_groups, offset_kernel_size, cpb_log_distance,
            geometry: passed to :class:`deform_attn.DeformableAttention1D` (deformable variants).
            ``offset_kernel_size=None`` means :func:`deform_attn.offsets.default_offset_kernel_size`
            of ``downsample_factor``: 6 for r = 2, 4, 6 (the reference's kernel), the nearest valid
            size otherwise. (Records of schema 1 used ``r + 2``, the same for r = 4 only.)
        position_bias: ``"cpb"`` (continuous position bias) or ``"none"``: the deformable variants
            are built with the bias and then have it removed (see
            :func:`deform_attn.experiments.variants.deformable_layer`).
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
        if self.attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention: expected one of {tuple(ATTENTION_VARIANTS)}, got {self.attention!r}")
        if self.position_bias not in POSITION_BIAS_CHOICES:
            raise ValueError(f"position_bias: expected one of {POSITION_BIAS_CHOICES}, got {self.position_bias!r}")


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
        self.attention = build_attention(config)
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
        per_token: no pooling: the head predicts at every token (language models, with a
            causal attention variant).

    Forward:
        x: (batch, n) int64 tokens or (batch, n, in_channels) floats; mask: optional (batch, n)
        bool, True for real tokens, padding at the end. Returns (batch, num_outputs) logits, or
        (batch,) for a regression head; with ``per_token``, (batch, n, num_outputs).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        num_outputs: int,
        vocab_size: int | None = None,
        in_channels: int | None = None,
        per_token: bool = False,
    ):
        super().__init__()
        self.per_token = per_token
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
        if self.per_token:
            return self.head(h)  # (b, n, outputs)
        if mask is None:
            pooled = h.mean(1)
        else:
            weights = mask[..., None].to(h.dtype)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        out = self.head(pooled)
        return out.squeeze(-1) if self.num_outputs == 1 else out


def build_model(
    config: ModelConfig,
    *,
    num_outputs: int,
    vocab_size: int | None = None,
    in_channels: int | None = None,
    per_token: bool = False,
) -> Encoder:
    """An :class:`Encoder` for ``config``."""
    return Encoder(config, num_outputs=num_outputs, vocab_size=vocab_size, in_channels=in_channels, per_token=per_token)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
