"""Keywords of ``DeformableAttention1D`` that still work for one release, with a DeprecationWarning.

Two kinds of switch used to sit on the layer's constructor:

* **implementation** switches, which change how the output is computed but not what it is; they
  now live in one setting, :class:`deform_attn.kernels.Implementation`:
  ``attention_kernel`` -> ``kernel``, ``max_bias_elements``, ``check_finite``,
  ``fast_position_bias`` -> ``position_bias="table"/"mlp"``,
  ``fast_sampling`` -> ``sampling="gather"/"grid_sample"``;
* **ablation** switches, which change the model into another one; the experiments build those
  variants themselves (:mod:`deform_attn.experiments.variants`): ``use_offsets=False``
  (``layer.to_offsets = ZeroOffsets(r)``), ``position_bias="none"`` (``layer.position_bias =
  None``), ``offset_layer_norm`` and ``bounded_offsets`` (an :class:`deform_attn.OffsetNetwork`
  with ``layer_norm=`` / ``bounded=``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

from .kernels.plan import Implementation

__all__ = ["LegacyVariant", "split_deprecated_arguments", "POSITION_BIASES"]

POSITION_BIASES: tuple[str, ...] = ("cpb", "none")
_IMPLEMENTATION_FIELDS = {
    "attention_kernel": ("kernel", None),
    "max_bias_elements": ("max_bias_elements", None),
    "check_finite": ("check_finite", None),
    "fast_position_bias": ("position_bias", {True: "table", False: "mlp"}),
    "fast_sampling": ("sampling", {True: "gather", False: "grid_sample"}),
}
_VARIANT_ADVICE = {
    "use_offsets": "set layer.to_offsets = deform_attn.offsets.ZeroOffsets(downsample_factor)",
    "position_bias": "set layer.position_bias = None",
    "offset_layer_norm": "set layer.to_offsets = deform_attn.OffsetNetwork(..., layer_norm=True)",
    "bounded_offsets": "set layer.to_offsets = deform_attn.OffsetNetwork(..., bounded=False)",
}


@dataclass(frozen=True)
class LegacyVariant:
    """The ablation switches given through deprecated keywords (defaults: the plain layer)."""

    use_offsets: bool = True
    position_bias: str = "cpb"
    offset_layer_norm: bool = False
    bounded_offsets: bool = True


def split_deprecated_arguments(
    arguments: dict[str, Any], implementation: Implementation | None
) -> tuple[Implementation, LegacyVariant]:
    """Turn deprecated keywords into an :class:`Implementation` and a :class:`LegacyVariant`.

    Raises TypeError on an unknown keyword, ValueError on a bad value (naming the keyword), and
    warns once per deprecated keyword used.
    """
    if implementation is not None and not isinstance(implementation, Implementation):
        raise TypeError(f"implementation: expected a deform_attn.kernels.Implementation, got {type(implementation).__name__}")
    unknown = sorted(set(arguments) - set(_IMPLEMENTATION_FIELDS) - set(_VARIANT_ADVICE))
    if unknown:
        raise TypeError(f"DeformableAttention1D: unexpected keyword argument(s) {unknown}")
    implementation = implementation or Implementation()
    changes: dict[str, Any] = {}
    for keyword, (field, mapping) in _IMPLEMENTATION_FIELDS.items():
        if keyword not in arguments:
            continue
        value = arguments[keyword]
        warnings.warn(
            f"{keyword} is deprecated and will be removed in the next release; pass "
            f"implementation=deform_attn.Implementation({field}=...) instead",
            DeprecationWarning,
            stacklevel=3,  # the caller of DeformableAttention1D(...)
        )
        if mapping is not None:
            if not isinstance(value, bool):
                raise ValueError(f"{keyword}: expected a bool, got {value!r}")
            value = mapping[value]
        changes[field] = value
    try:
        implementation = replace(implementation, **changes)
    except ValueError as error:  # name the keyword the caller used
        for keyword, (field, _) in _IMPLEMENTATION_FIELDS.items():
            if keyword in arguments and f"implementation.{field}:" in str(error):
                raise ValueError(str(error).replace(f"implementation.{field}", keyword)) from None
        raise
    variant = {}
    for keyword, advice in _VARIANT_ADVICE.items():
        if keyword not in arguments:
            continue
        warnings.warn(
            f"{keyword} is deprecated and will be removed in the next release: ablation variants are built "
            f"outside the layer; {advice} (see deform_attn.experiments.variants)",
            DeprecationWarning,
            stacklevel=3,  # the caller of DeformableAttention1D(...)
        )
        variant[keyword] = arguments[keyword]
    if variant.get("position_bias", "cpb") not in POSITION_BIASES:
        raise ValueError(f"position_bias: expected one of {POSITION_BIASES}, got {variant['position_bias']!r}")
    return implementation, LegacyVariant(**variant)
