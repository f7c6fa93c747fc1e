"""The attention variants the ablations compare: one registered builder per variant.

A variant is a function ``ModelConfig -> nn.Module`` registered with :func:`register_variant`; the
module takes ``(x, mask)`` with x (batch, n, dim) and mask an optional (batch, n) bool key-padding
mask (True for real tokens), and returns (batch, n, dim). ``ModelConfig(attention=name)`` accepts
every registered name, and :class:`deform_attn.experiments.models.Encoder` builds one per block. So a
new variant is one decorated function here; running it in a preset adds its name to that preset.

The variants are built by the experiments, never by flags on the production layer:

* ``deformable``: :class:`deform_attn.DeformableAttention1D` (``batch_first=True``).
* ``downsampled``: the same layer with its offset network replaced by
  :class:`deform_attn.offsets.ZeroOffsets`: the ``n / r`` keys sit at the fixed window centres.
  It holds no offset weights, so it has fewer parameters than ``deformable`` (records of schema 1
  counted the unused offset network's weights too).
* ``bug018``: the layer with the sampling of ``deformable-attention`` <= 0.0.18
  (:class:`Bug018DeformableAttention1D`).
* ``full`` and ``local``: :class:`deform_attn.baselines.FullAttention1D` over all tokens, or over
  ``window`` tokens either side, with the same width (heads x dim_head).
* ``mlp_only``: the attention-free control: the attention branch outputs zeros, so each block is
  ``x + MLP(LN(x))`` and tokens meet only in the final mean pool. No preset runs it yet, so the
  published grids are unchanged.

The deformable variants read the layer's arguments from the config (:func:`deformable_layer`);
``position_bias="none"`` removes the layer's continuous position bias after construction, which
leaves every other weight initialised as in the biased layer.

Axis letters: b batch, n tokens, d channels, m sampled keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import Tensor, nn

from ..attention import DeformableAttention1D
from ..baselines import FullAttention1D
from ..geometry import normalize_positions
from ..kernels import Implementation
from ..offsets import ZeroOffsets, default_offset_kernel_size
from .config import check_new_name

if TYPE_CHECKING:
    from .models import ModelConfig

__all__ = [
    "Variant",
    "ATTENTION_VARIANTS",
    "register_variant",
    "build_attention",
    "deformable_layer",
    "DeformableBlockAttention",
    "Bug018DeformableAttention1D",
    "bug018_sample",
    "NoTokenMixing",
]

VariantBuilder = Callable[["ModelConfig"], nn.Module]


@dataclass(frozen=True)
class Variant:
    """A registered attention variant.

    Attributes:
        name: the value of ``ModelConfig.attention`` that selects it.
        build: config -> attention module (see the module docstring for its forward).
        description: one line for tables and listings (the builder's docstring's first line).
    """

    name: str
    build: VariantBuilder
    description: str


ATTENTION_VARIANTS: dict[str, Variant] = {}


def register_variant(name: str) -> Callable[[VariantBuilder], VariantBuilder]:
    """Decorator: register the builder it wraps as attention variant ``name``.

    Args:
        name: a new variant name (a registered name is refused, so a typo cannot shadow one).

    Returns:
        The decorator; it returns the builder unchanged.
    """
    check_new_name(name, ATTENTION_VARIANTS, "attention variant", "deformable")

    def register(build: VariantBuilder) -> VariantBuilder:
        description = (build.__doc__ or name).strip().splitlines()[0]
        ATTENTION_VARIANTS[name] = Variant(name=name, build=build, description=description)
        return build

    return register


def build_attention(config: ModelConfig) -> nn.Module:
    """The attention module of variant ``config.attention``."""
    if config.attention not in ATTENTION_VARIANTS:
        raise ValueError(f"attention: expected one of {tuple(ATTENTION_VARIANTS)}, got {config.attention!r}")
    return ATTENTION_VARIANTS[config.attention].build(config)


# ---------------------------------------------------------------------------- the deformable family


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


def deformable_layer(
    config: ModelConfig, layer_class: type[DeformableAttention1D] = DeformableAttention1D, *, causal: bool = False
) -> DeformableAttention1D:
    """The deformable layer that ``config`` describes, (batch, n, dim) in and out.

    Args:
        config: the model config; its deformable arguments are passed on, with
            ``offset_kernel_size=None`` resolved by :func:`deform_attn.offsets.default_offset_kernel_size`
            and ``position_bias="none"`` applied by removing the bias from the built layer.
        layer_class: the layer or a subclass of it (e.g. :class:`Bug018DeformableAttention1D`).
        causal: build the causal layer (``causal=True``).
    """
    r = config.downsample_factor
    kernel_size = config.offset_kernel_size if config.offset_kernel_size is not None else default_offset_kernel_size(r)
    layer = layer_class(
        dim=config.dim,
        dim_head=config.dim_head,
        heads=config.heads,
        downsample_factor=r,
        offset_scale=config.offset_scale,
        offset_groups=config.offset_groups,
        offset_kernel_size=kernel_size,
        cpb_log_distance=config.cpb_log_distance,
        geometry=config.geometry,
        batch_first=True,
        causal=causal,
        # training inputs are finite by construction; the check would cost a sync per forward
        implementation=Implementation(check_finite=False),
    )
    if config.position_bias == "none":
        # built with the bias, then dropped: the other weights start as in the biased layer
        layer.position_bias = None
    return layer


class DeformableBlockAttention(nn.Module):
    """A deformable layer in an encoder block: passes the mask only where the geometry supports one.

    Args:
        layer: the deformable layer (``batch_first=True``), kept as ``self.layer``.

    Forward:
        x: (batch, n, dim); mask: optional (batch, n) bool, True for real tokens. A mask without
        padding is dropped (the unmasked path is faster and gives the same result).
    """

    def __init__(self, layer: DeformableAttention1D):
        super().__init__()
        self.layer = layer
        # the 'lucidrains' geometry has no padding masks; its tasks are fixed-length (see presets)
        self.pass_mask = layer.geometry == "centered"

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None and bool(mask.all()):
            mask = None
        if mask is not None and not self.pass_mask:
            raise ValueError("geometry='lucidrains' cannot take padded batches; use fixed-length tasks")
        return self.layer(x, mask=mask)


@register_variant("deformable")
def deformable(config: ModelConfig) -> nn.Module:
    """Deformable attention: learned offsets, n / r sampled keys, continuous position bias."""
    return DeformableBlockAttention(deformable_layer(config))


@register_variant("downsampled")
def downsampled(config: ModelConfig) -> nn.Module:
    """Offsets off: the deformable layer sampling its n / r keys at the fixed window centres."""
    layer = deformable_layer(config)
    # the offset network's weights were drawn before it is replaced, so the rest of the model
    # is initialised as in the 'deformable' variant with the same seed
    layer.to_offsets = ZeroOffsets(config.downsample_factor)
    return DeformableBlockAttention(layer)


@register_variant("bug018")
def bug018(config: ModelConfig) -> nn.Module:
    """The deformable layer with the wrong-axis sampling of deformable-attention <= 0.0.18."""
    return DeformableBlockAttention(deformable_layer(config, Bug018DeformableAttention1D))


# ---------------------------------------------------------------------------- dense baselines, control


@register_variant("full")
def full(config: ModelConfig) -> nn.Module:
    """Multi-head attention over all tokens (scaled_dot_product_attention), the reference point."""
    return FullAttention1D(dim=config.dim, dim_head=config.dim_head, heads=config.heads, batch_first=True)


@register_variant("local")
def local(config: ModelConfig) -> nn.Module:
    """Multi-head attention over a window of config.window tokens either side."""
    return FullAttention1D(
        dim=config.dim, dim_head=config.dim_head, heads=config.heads, window=config.window, batch_first=True
    )


class NoTokenMixing(nn.Module):
    """An attention branch that mixes nothing: zeros of the input's shape, no parameters.

    Forward:
        x: (batch, n, dim); mask: ignored (nothing crosses tokens). Returns (batch, n, dim) zeros.
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return x.new_zeros(x.shape)


@register_variant("mlp_only")
def mlp_only(config: ModelConfig) -> nn.Module:
    """Attention-free control: blocks are x + MLP(LN(x)); tokens meet only in the mean pool."""
    return NoTokenMixing()


# ---------------------------------------------------------------------------- causal variants
# For autoregressive tasks: output i may use inputs 0..i only (the model then predicts per token).


@register_variant("causal_deformable")
def causal_deformable(config: ModelConfig) -> nn.Module:
    """Causal deformable attention: past-only offsets, keys visible once their tokens have arrived."""
    return DeformableBlockAttention(deformable_layer(config, causal=True))


@register_variant("causal_downsampled")
def causal_downsampled(config: ModelConfig) -> nn.Module:
    """Causal, offsets off: n / r keys at the fixed window centres, each visible from its cell's end."""
    layer = deformable_layer(config, causal=True)
    layer.to_offsets = ZeroOffsets(config.downsample_factor)
    return DeformableBlockAttention(layer)


@register_variant("causal_full")
def causal_full(config: ModelConfig) -> nn.Module:
    """Causal multi-head attention over every earlier token."""
    return FullAttention1D(dim=config.dim, dim_head=config.dim_head, heads=config.heads, batch_first=True, causal=True)


@register_variant("causal_local")
def causal_local(config: ModelConfig) -> nn.Module:
    """Causal multi-head attention over the config.window tokens before each query (and itself)."""
    return FullAttention1D(
        dim=config.dim, dim_head=config.dim_head, heads=config.heads, window=config.window, batch_first=True, causal=True
    )
