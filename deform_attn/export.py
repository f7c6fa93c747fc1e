"""Deploying the layer: ``torch.export`` and ONNX, with a dynamic sequence length.

Two things stop a plain ``torch.export.export(layer, ...)``: the position bias's table has a
number of kinks that depends on the weights (a data-dependent shape), and the default kernels
loop over query chunks in Python and call ``searchsorted``, which ONNX lacks. So exporting

* freezes the table (:meth:`deform_attn.ContinuousPositionBias.freeze`): it becomes a constant
  of the exported program, exact for the weights at export time;
* runs the layer's forward with the ``"scan"`` kernel (:func:`deform_attn.kernels.scan_biased_attention`),
  which :func:`deform_attn.kernels.plan_attention` picks whenever ``torch.export`` is tracing: a
  traced loop over chunks of :data:`deform_attn.kernels.EXPORT_QUERY_CHUNK` queries, so memory
  grows linearly with the sequence length, and the same program serves every length.

Export a layer in eval mode; the exported program is for inference (no dropout, no gradients
of its own). A key-padding mask is not part of the exported signature.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.export import Dim

from .attention import DeformableAttention1D
from .kernels import EXPORT_QUERY_CHUNK

__all__ = ["frozen_position_bias", "dynamic_shapes", "tracing_input", "export_layer", "export_onnx"]


@contextmanager
def frozen_position_bias(module: nn.Module) -> Iterator[nn.Module]:
    """Freeze the position-bias tables of every deformable layer in ``module`` for the block.

    Tables that were frozen before stay frozen afterwards; the others are unfrozen again.
    """
    biases = [layer.position_bias for layer in module.modules()
              if isinstance(layer, DeformableAttention1D) and layer.position_bias is not None]
    newly_frozen = [bias for bias in biases if bias.frozen_table is None]
    for bias in newly_frozen:
        bias.freeze()
    try:
        yield module
    finally:
        for bias in newly_frozen:
            bias.unfreeze()


def _check_layer(layer: Any) -> None:
    if not isinstance(layer, DeformableAttention1D):
        raise TypeError(f"layer: expected a deform_attn.DeformableAttention1D, got {type(layer).__name__}")
    if layer.training:
        raise ValueError("layer: export a layer in eval mode (call layer.eval() first); the program is for inference")


@contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Silence the exporter's notes that concern torch itself (torchvision ops it skips, its own
    deprecations), which say nothing about this model."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            yield
    finally:
        registration.setLevel(level)


def _no_size_one_specialization():
    """Trace sizes without assuming they differ from 0 and 1, so that a batch of one works too."""
    return torch.fx.experimental._config.patch(backed_size_oblivious=True)


def dynamic_shapes(layer: DeformableAttention1D, *, min_length: int | None = None, max_length: int = 2**16) -> dict[str, Any]:
    """``torch.export`` dynamic shapes of ``layer``'s input: a dynamic batch and sequence length.

    Args:
        layer: the layer to export.
        min_length: shortest sequence the program must accept (default: ``downsample_factor``,
            the layer's own minimum).
        max_length: longest sequence.
    """
    _check_layer(layer)
    shortest = layer.downsample_factor if min_length is None else min_length
    if isinstance(shortest, bool) or not isinstance(shortest, int) or shortest < layer.downsample_factor:
        raise ValueError(
            f"min_length: expected an integer >= downsample_factor ({layer.downsample_factor}), got {min_length!r}"
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < shortest:
        raise ValueError(f"max_length: expected an integer >= min_length ({shortest}), got {max_length!r}")
    length_axis = 1 if layer.batch_first else 2
    return {"x": {0: Dim.DYNAMIC, length_axis: Dim.DYNAMIC(min=shortest, max=max_length)}}


def tracing_input(
    layer: DeformableAttention1D, example: Tensor | None, *, min_length: int | None, max_length: int
) -> Tensor:
    """The input the export traces with: two sequences spanning several query chunks.

    ``torch.export`` specialises a dynamic size that is 1 in the traced input, so a batch of one
    or a sequence that fits in one chunk would give a program for that case only. ``example``
    (if given) lends its dtype and device.
    """
    _check_layer(layer)
    if example is not None and not isinstance(example, Tensor):
        raise TypeError(f"example: expected None or a tensor whose dtype and device to use, got {type(example).__name__}")
    shortest = layer.downsample_factor if min_length is None else min_length
    length = min(max(3 * EXPORT_QUERY_CHUNK + 1, shortest), max_length)
    dtype = example.dtype if example is not None else layer.to_q.weight.dtype
    device = example.device if example is not None else layer.to_q.weight.device
    shape = (2, length, layer.dim) if layer.batch_first else (2, layer.dim, length)
    return torch.randn(shape, dtype=dtype, device=device)


def export_layer(
    layer: DeformableAttention1D,
    example: Tensor | None = None,
    *,
    min_length: int | None = None,
    max_length: int = 2**16,
) -> torch.export.ExportedProgram:
    """``torch.export`` the layer once, for every batch size and every length in ``[min_length, max_length]``.

    Args:
        layer: a :class:`deform_attn.DeformableAttention1D` in eval mode.
        example: optional input whose dtype and device the program takes (see
            :func:`tracing_input`); default: the layer's weights'.
        min_length, max_length: the range of sequence lengths (see :func:`dynamic_shapes`).

    Returns:
        The exported program; ``program.module()(x)`` runs it.
    """
    shapes = dynamic_shapes(layer, min_length=min_length, max_length=max_length)
    x = tracing_input(layer, example, min_length=min_length, max_length=max_length)
    with frozen_position_bias(layer), _no_size_one_specialization():
        return torch.export.export(layer, (x,), dynamic_shapes=shapes)


def export_onnx(
    layer: DeformableAttention1D,
    example: Tensor | None = None,
    path: str | os.PathLike | None = None,
    *,
    min_length: int | None = None,
    max_length: int = 2**16,
) -> Any:
    """Export the layer to ONNX through ``torch.onnx.export(..., dynamo=True)``.

    Needs the ``onnx`` and ``onnxscript`` packages (``pip install "deform-attn[export]"``).
    Arguments as in :func:`export_layer`; with ``path`` the model is also saved there.

    Returns:
        The ``torch.onnx.ONNXProgram``; run the saved file with ``onnxruntime``.
    """
    exported = export_layer(layer, example, min_length=min_length, max_length=max_length)
    with _quiet_onnx_exporter():
        program = torch.onnx.export(exported, dynamo=True, verbose=False)
    if path is not None:
        program.save(os.fspath(path))
    return program
