r"""Continuous position bias (SwinV2's CPB) and its exact piecewise-linear evaluation.

The bias of a (query, key) pair is a small ReLU MLP of one scalar, the signed distance ``d``
between them, optionally log-scaled:

.. math::  t = \operatorname{sign}(d)\,\log(1 + |d|), \qquad \text{bias} = \mathrm{MLP}(t).

Run naively, the MLP's hidden layer costs (pairs x hidden) memory and FLOPs, far more than the
attention it biases. But a ReLU MLP of a **scalar** is a continuous piecewise-linear function of
that scalar. Its kinks are where some hidden unit's pre-activation crosses zero; between two
consecutive kinks every unit keeps its sign, so the whole MLP is ``slope * t + intercept`` there.
:class:`ContinuousPositionBias` finds the kinks layer by layer, builds a (kinks + 1) table of
slopes and intercepts with autograd attached, and evaluates each pair with one ``searchsorted``
and one gather. Values match the MLP to float rounding and the gradients with respect to ``t``
and every MLP parameter are exact, because within an interval the MLP *is* that affine map.

Axis letters: p pairs (any leading shape), k kinks, i intervals (k + 1), u hidden units,
o outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ContinuousPositionBias",
    "PiecewiseLinearTable",
    "signed_log_distance",
    "signed_log_distance_inverse",
    "signed_log_distance_derivative",
    "transform_distance",
    "inverse_transform_distance",
    "piecewise_linear_table",
    "piecewise_linear_table_tensors",
    "piecewise_linear_bias",
    "table_bias_function",
]


# ------------------------------------------------------------------ the distance transform
# One home for t(d) = sign(d) log(1 + |d|), its inverse and its derivative; every kernel calls these.


def signed_log_distance(distance: Tensor) -> Tensor:
    r"""SwinV2's log-spaced distance: :math:`t = \operatorname{sign}(d)\log(1 + |d|)`.

    Its derivative at 0 is 1; autograd through ``sign`` and ``abs`` would say 0 there, and exact
    zeros occur (an odd ``r`` with zero offsets puts keys on query tokens), hence the ``where``.
    Built from ``where``/``sign``/``log1p`` only, so it also exports to ONNX.
    """
    return torch.where(distance == 0, distance, torch.sign(distance) * torch.log1p(distance.abs()))


def signed_log_distance_inverse(t: Tensor) -> Tensor:
    r"""The distance whose signed log is ``t``: :math:`d = \operatorname{sign}(t)(e^{|t|} - 1)`."""
    return torch.expm1(t.abs()) * torch.sign(t)  # not copysign: ONNX has no signbit


def signed_log_distance_derivative(distance: Tensor) -> Tensor:
    r""":math:`dt/dd = 1 / (1 + |d|)`, 1 at ``d = 0`` (see :func:`signed_log_distance`)."""
    return (distance.abs() + 1).reciprocal()


def transform_distance(distance: Tensor, log_distance: bool, *, keep_magnitude: bool = False):
    """The position bias's input ``t`` for each distance, computed in few passes (no autograd).

    For the kernels, which write their own backward: with ``log_distance`` the result is
    :func:`signed_log_distance` (rounding aside), else ``distance`` itself. With
    ``keep_magnitude`` it returns ``(t, |d|)``, the magnitude being what
    :func:`signed_log_distance_derivative` needs (``None`` without the log).
    """
    if not log_distance:
        return (distance, None) if keep_magnitude else distance
    if not keep_magnitude:
        return distance.abs().log1p_().copysign_(distance)
    magnitude = distance.abs()
    return torch.log1p(magnitude).copysign_(distance), magnitude


def inverse_transform_distance(t: Tensor, log_distance: bool) -> Tensor:
    """The distance at which the position bias's input reaches ``t``."""
    return signed_log_distance_inverse(t) if log_distance else t


class PiecewiseLinearTable(NamedTuple):
    """A continuous piecewise-linear function of one scalar, one output per head of a group.

    Interval ``i`` is ``(kinks[i - 1], kinks[i]]`` (open-ended at both extremes); on it the
    function is ``slopes[i] * t + intercepts[i]``.

    Attributes:
        kinks: (k,) sorted.
        slopes: (k + 1, o).
        intercepts: (k + 1, o).
    """

    kinks: Tensor
    slopes: Tensor
    intercepts: Tensor


def _representative_points(kinks: Tensor) -> Tensor:
    """One point strictly inside each of the ``len(kinks) + 1`` intervals the sorted kinks cut."""
    if kinks.numel() == 0:
        return kinks.new_zeros(1)
    left = kinks[:1] - (1 + kinks[:1].abs())
    right = kinks[-1:] + (1 + kinks[-1:].abs())
    middles = (kinks[:-1] + kinks[1:]) / 2
    return torch.cat([left, middles, right])


def _affine_pieces(linears: list[nn.Linear], points: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Slope and intercept of the MLP's last listed layer on the interval of each point.

    The activation pattern (which ReLUs pass) is read at ``points``; with it fixed, each layer is
    an affine map of ``t``, carried as (slope, intercept) pairs. Differentiable in the parameters.

    Returns:
        slopes, intercepts: (intervals, outputs of the last listed layer), pre-activation.
    """
    points = points.to(dtype)
    first = linears[0]
    # shape: (u, 1) weight -> (i, u) pieces, the same slope on every interval
    slopes = first.weight[:, 0].to(dtype).expand(points.shape[0], -1)
    intercepts = first.bias.to(dtype).expand(points.shape[0], -1)
    for layer in linears[1:]:
        active = (slopes * points[:, None] + intercepts > 0).to(dtype)
        slopes = (slopes * active) @ layer.weight.to(dtype).T
        intercepts = (intercepts * active) @ layer.weight.to(dtype).T + layer.bias.to(dtype)
    return slopes, intercepts


def _find_kinks(linears: list[nn.Linear]) -> Tensor:
    """Sorted kinks of the ReLU MLP ``linears`` (ReLU after all but the last), in float64.

    Computed in NumPy on a float64 copy of the weights: a few dozen operations on arrays of a few
    hundred numbers, where each torch call's overhead would cost more than its work (the table is
    rebuilt at every training step). The number of kinks depends on the weights, so under
    ``torch.compile`` this part runs eagerly; the table built from it compiles.
    """
    with torch.no_grad():
        layers = [
            (layer.weight.detach().to("cpu", torch.float64).numpy(), layer.bias.detach().to("cpu", torch.float64).numpy())
            for layer in linears
        ]
    kinks = np.zeros(0)
    for depth in range(1, len(layers)):
        # pre-activations of layer `depth - 1`'s units are affine on each current interval
        if kinks.size == 0:
            points = np.zeros(1)
        else:
            points = np.concatenate([kinks[:1] - (1 + abs(kinks[0])), (kinks[:-1] + kinks[1:]) / 2,
                                     kinks[-1:] + (1 + abs(kinks[-1]))])
        slopes = np.broadcast_to(layers[0][0][:, 0], (points.size, layers[0][0].shape[0]))
        intercepts = np.broadcast_to(layers[0][1], slopes.shape)
        for weight, bias in layers[1:depth]:
            active = slopes * points[:, None] + intercepts > 0
            slopes, intercepts = (slopes * active) @ weight.T, (intercepts * active) @ weight.T + bias
        lower = np.concatenate([[-np.inf], kinks])[:, None]
        upper = np.concatenate([kinks, [np.inf]])[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing = -intercepts / np.where(slopes != 0, slopes, 1.0)
        inside = (slopes != 0) & (crossing > lower) & (crossing < upper)
        kinks = np.unique(np.concatenate([kinks, crossing[inside]]))  # sorted, ties merged
    return torch.from_numpy(kinks).to(linears[0].weight.device)


class _CompiledTable(torch.autograd.Function):
    r"""The table in one C++ call each way (:func:`deform_attn.kernels.fused.table_forward`).

    Through torch operations the table took ~20 small operations each way (~0.45 ms forward and
    ~0.25 ms backward for the default layer's MLP, rebuilt at every training step), a third of
    the fused attention kernel's forward and backward at batch 64, n = 40. With the activation
    pattern :math:`A_l` of an interval fixed, layer :math:`l` maps the slope and intercept rows
    :math:`(s, c)` to
    :math:`((s \odot A_l) W_l^\top, (c \odot A_l) W_l^\top + b_l)`, so the backward pass is,
    per interval, :math:`\partial W_l \mathrel{+}= \bar s^\top (s \odot A_l) + \bar c^\top (c \odot A_l)`,
    :math:`\partial b_l \mathrel{+}= \bar c`, then
    :math:`(\bar s, \bar c) \leftarrow ((\bar s W_l) \odot A_l, (\bar c W_l) \odot A_l)`.
    """

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *parameters: Tensor):
        from .kernels.fused import table_forward

        weights, biases = [p.contiguous() for p in parameters[0::2]], [p.contiguous() for p in parameters[1::2]]
        kinks, slopes, intercepts = table_forward(weights, biases)
        ctx.save_for_backward(kinks, *weights, *biases)
        outputs = kinks.to(dtype), slopes.to(dtype), intercepts.to(dtype)
        ctx.mark_non_differentiable(outputs[0])
        return outputs

    @staticmethod
    def backward(ctx, grad_kinks, grad_slopes, grad_intercepts):
        from .kernels.fused import table_backward

        if torch.is_grad_enabled():  # create_graph=True: the C++ gradient has no graph
            raise RuntimeError(
                "the position bias's table cannot be differentiated twice; use "
                "Implementation(kernel='sdpa', position_bias='mlp') for gradient penalties or Hessians"
            )
        kinks, *parameters = ctx.saved_tensors
        layers = len(parameters) // 2
        weights, biases = parameters[:layers], parameters[layers:]
        grads = [None if g is None else g.to(torch.float64).contiguous() for g in (grad_slopes, grad_intercepts)]
        grad_weights, grad_biases = table_backward(weights, biases, kinks, *grads)
        return (None, *(g for pair in zip(grad_weights, grad_biases) for g in pair))


def _table_parameters(linears: list[nn.Linear]) -> list[Tensor]:
    """weight, bias of each layer in order, as :class:`_CompiledTable` takes them."""
    return [tensor for layer in linears for tensor in (layer.weight, layer.bias)]


def _table_compiled(linears: list[nn.Linear], dtype: torch.dtype) -> bool:
    """Whether :class:`_CompiledTable` builds the table: eager mode, the parameters on the CPU
    in one dtype (float32 or float64), the compiled library loaded."""
    from .kernels.fused import loops_available

    parameters = _table_parameters(linears)
    return dtype in (torch.float32, torch.float64) and all(p is not None for p in parameters) and loops_available(*parameters)


def piecewise_linear_table(linears: list[nn.Linear], dtype: torch.dtype) -> PiecewiseLinearTable:
    """Kinks and per-interval (slope, intercept) of a ReLU MLP of one scalar.

    Args:
        linears: the MLP's linear layers in order; a ReLU follows every one but the last. The
            first takes one input feature.
        dtype: dtype of the returned table (the dtype the pairs are evaluated in).

    Returns:
        kinks (k,), sorted; slopes (k + 1, o) and intercepts (k + 1, o), where row ``i`` holds
        the MLP on the interval ``(kinks[i - 1], kinks[i]]`` (open-ended at both extremes).
        Slopes and intercepts carry autograd to the MLP's parameters.

    On the CPU in eager mode the table is computed in float64 in C++, one autograd node
    (:class:`_CompiledTable`); elsewhere (other devices or dtypes, ``torch.compile``,
    ``torch.export``, no compiled library) by torch operations
    (:func:`piecewise_linear_table_tensors`) in ``dtype`` or the weights' dtype, whichever is wider.
    """
    if _table_compiled(linears, dtype):
        return PiecewiseLinearTable(*_CompiledTable.apply(dtype, *_table_parameters(linears)))
    return piecewise_linear_table_tensors(linears, dtype)


def piecewise_linear_table_tensors(linears: list[nn.Linear], dtype: torch.dtype) -> PiecewiseLinearTable:
    """:func:`piecewise_linear_table` through torch operations, on any device and under tracing."""
    kinks = _find_kinks(linears)
    points = _representative_points(kinks)  # constants: the pattern, not its position, matters
    device_type = linears[0].weight.device.type
    with torch.autocast(device_type=device_type, enabled=False):  # the table must be exact
        slopes, intercepts = _affine_pieces(linears, points, torch.promote_types(dtype, linears[0].weight.dtype))
    return PiecewiseLinearTable(kinks.to(dtype), slopes.to(dtype), intercepts.to(dtype))


def _same_values(snapshot: list[Tensor], parameters: list[Tensor]) -> bool:
    """Whether the parameters still hold the snapshot's numbers (same dtypes and devices too)."""
    return len(snapshot) == len(parameters) and all(
        saved.dtype == current.dtype and saved.device == current.device and torch.equal(saved, current)
        for saved, current in zip(snapshot, parameters)
    )


class ContinuousPositionBias(nn.Module):
    """SwinV2's continuous position bias for one offset group: distance -> bias per head.

    ``Linear(1, hidden) -> ReLU -> [Linear(hidden, hidden) -> ReLU] * (depth - 1) ->
    Linear(hidden, heads_per_group)``, applied to the signed (optionally log-scaled) distance.

    Args:
        hidden_dim: width of the hidden layers.
        num_outputs: bias values per pair (heads per offset group).
        depth: number of hidden layers (each followed by ReLU).
        log_distance: feed ``sign(d) log(1 + |d|)`` instead of ``d``.
        fast: evaluate through the exact piecewise-linear table (default) instead of running the
            MLP on every pair. Both give the same values and gradients; the reference path costs
            (pairs x hidden) memory.

    Shapes: forward takes distances of any shape (...) and returns (..., num_outputs).
    """

    def __init__(self, *, hidden_dim: int, num_outputs: int, depth: int = 2, log_distance: bool = True, fast: bool = True):
        super().__init__()
        for name, value in (("hidden_dim", hidden_dim), ("num_outputs", num_outputs), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        self.log_distance = log_distance
        self.fast = fast
        widths = [1] + [hidden_dim] * depth + [num_outputs]
        self.linears = nn.ModuleList(nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.frozen_table: PiecewiseLinearTable | None = None

    def transform(self, distance: Tensor) -> Tensor:
        """The MLP's input ``t`` for a distance (log-scaled or not)."""
        return signed_log_distance(distance) if self.log_distance else distance

    def mlp(self, t: Tensor) -> Tensor:
        """The plain MLP on a (..., 1) input; the reference path."""
        for layer in self.linears[:-1]:
            t = torch.relu(layer(t))
        return self.linears[-1](t)

    def table(self, dtype: torch.dtype) -> PiecewiseLinearTable:
        """Kinks, slopes and intercepts of the MLP (see :func:`piecewise_linear_table`).

        After :meth:`freeze`, the frozen table (no gradients), cast to ``dtype``.
        """
        if self.frozen_table is not None:
            return PiecewiseLinearTable(*(part.to(dtype) for part in self.frozen_table))
        linears = list(self.linears)
        parameters = _table_parameters(linears)
        if torch.is_grad_enabled() and any(parameter.requires_grad for parameter in parameters):
            return piecewise_linear_table(linears, dtype)  # carries the graph to the weights
        # Without gradients the table is a constant of the weights: reuse it while their values are
        # unchanged. Finding the kinks costs ~0.2 ms, 5% of an inference forward at batch 32, n = 96;
        # comparing the few hundred weights a few microseconds. Values are compared, not the tensors'
        # version counters: torch's fused optimizers and writes through .data change parameters
        # without bumping their versions, and a stale table would be silently wrong.
        cached = getattr(self, "_inference_table", None)
        if cached is None or cached[0] != dtype or not _same_values(cached[1], parameters):
            with torch.no_grad():
                snapshot = [parameter.detach().clone() for parameter in parameters]
                cached = (dtype, snapshot, piecewise_linear_table(linears, dtype))
            self._inference_table = cached
        return cached[2]

    def freeze(self) -> PiecewiseLinearTable:
        """Compute the table once, in float64, and use it until :meth:`unfreeze`.

        The number of kinks depends on the weights, so a graph traced through
        :func:`piecewise_linear_table` has a data-dependent shape; ``torch.export`` cannot trace
        that. Frozen, the table is a constant of the traced program (export it in eval mode).
        The frozen table carries no gradient: do not train while frozen.
        """
        with torch.no_grad():
            table = piecewise_linear_table(list(self.linears), torch.float64)
        self.frozen_table = PiecewiseLinearTable(*(part.detach() for part in table))
        return self.frozen_table

    def unfreeze(self) -> None:
        """Recompute the table from the MLP's weights at every call again."""
        self.frozen_table = None

    def _apply(self, fn, recurse=True):  # .to(device) moves the frozen table with the weights
        module = super()._apply(fn, recurse)
        if self.frozen_table is not None:
            device = self.linears[0].weight.device
            self.frozen_table = PiecewiseLinearTable(*(part.to(device) for part in self.frozen_table))
        return module

    def reference_bias(self, distance: Tensor) -> Tensor:
        """The MLP run on every distance: (...) -> (..., num_outputs). The reference path."""
        return self.mlp(self.transform(distance).unsqueeze(-1))

    def forward(self, distance: Tensor, table: PiecewiseLinearTable | None = None) -> Tensor:
        """Bias for each distance; ``table`` reuses one computed by :meth:`table`."""
        if not self.fast:
            return self.reference_bias(distance)
        return piecewise_linear_bias(distance, table if table is not None else self.table(distance.dtype), self.log_distance)


def table_bias_function(table: PiecewiseLinearTable, log_distance: bool):
    """``distance -> piecewise_linear_bias(distance, table, log_distance)``, for kernels that take a function."""

    def bias(distance: Tensor) -> Tensor:
        return piecewise_linear_bias(distance, table, log_distance)

    return bias


def piecewise_linear_bias(distance: Tensor, table: PiecewiseLinearTable, log_distance: bool) -> Tensor:
    """The table's function of ``t = transform(distance)``: (...) -> (..., o), exact first derivatives.

    Differentiable in ``distance`` and in the table's slopes and intercepts (once: a second
    derivative raises; use the MLP itself, :meth:`ContinuousPositionBias.reference_bias`).
    """
    return _PiecewiseLinearBias.apply(distance, table.kinks, table.slopes, table.intercepts, log_distance)


class _PiecewiseLinearBias(torch.autograd.Function):
    """``slopes[i] * t + intercepts[i]`` with ``i`` the interval of ``t = transform(distance)``.

    One autograd node instead of a chain of elementwise ones. Every step is a full pass over the
    (pairs,) tensors, so the pass count is what is optimised: the forward saves ``t``, the interval
    index and the local derivative ``d bias / d distance``; the backward is then one product for
    the distance and two ``index_add_`` reductions for the table. ``slopes``/``intercepts`` are
    (intervals, outputs).
    """

    @staticmethod
    def forward(ctx, distance: Tensor, kinks: Tensor, slopes: Tensor, intercepts: Tensor, log_distance: bool):
        t, magnitude = transform_distance(distance, log_distance, keep_magnitude=True)
        # int32 halves the saved index; a few hundred kinks never need more
        interval = torch.searchsorted(kinks, t.contiguous(), out_int32=True)
        flat = interval.reshape(-1)
        outputs = slopes.shape[-1]
        if outputs == 1:  # one head per group: 1-d gathers, the trailing axis only at the end
            slope = slopes[:, 0].index_select(0, flat).view(t.shape)
            bias = torch.addcmul(intercepts[:, 0].index_select(0, flat).view(t.shape), slope, t).unsqueeze(-1)
        else:
            slope = slopes.index_select(0, flat).view(*t.shape, outputs)
            bias = torch.addcmul(intercepts.index_select(0, flat).view(*t.shape, outputs), slope, t.unsqueeze(-1))
        # d bias / d distance = slope * dt/dd, with dt/dd = 1 / (1 + |d|) for the log distance
        if magnitude is None:
            local_derivative = slope
        else:
            one_plus_magnitude = magnitude.add_(1)
            local_derivative = slope / (one_plus_magnitude if outputs == 1 else one_plus_magnitude.unsqueeze(-1))
        ctx.outputs = outputs
        ctx.table_shape = slopes.shape
        ctx.save_for_backward(t, interval, local_derivative)
        return bias

    @staticmethod
    def backward(ctx, grad_bias: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the saved tensors carry no graph
            raise RuntimeError(
                "ContinuousPositionBias(fast=True) cannot be differentiated twice: its first derivative is "
                "exact, but higher-order ones are not implemented; use fast=False "
                "(DeformableAttention1D(implementation=Implementation(kernel='sdpa', position_bias='mlp'))) "
                "for gradient penalties or Hessians"
            )
        t, interval, local_derivative = ctx.saved_tensors
        outputs = ctx.outputs
        flat = interval.reshape(-1)
        grad_distance = grad_slopes = grad_intercepts = None
        if outputs == 1:  # reduce 1-d: index_add_ over (pairs, 1) rows is ~20x slower on CPU
            grad_rows, t_rows, table_shape = grad_bias.reshape(-1), t.reshape(-1), ctx.table_shape[:1]
        else:
            grad_rows, t_rows, table_shape = grad_bias.reshape(-1, outputs), t.reshape(-1, 1), ctx.table_shape
        if ctx.needs_input_grad[0]:
            if outputs == 1:
                grad_distance = local_derivative * grad_bias.squeeze(-1)
            else:
                grad_distance = (local_derivative * grad_bias).sum(-1)
        if ctx.needs_input_grad[2]:
            grad_slopes = grad_rows.new_zeros(table_shape).index_add_(0, flat, grad_rows * t_rows)
            grad_slopes = grad_slopes.view(ctx.table_shape)
        if ctx.needs_input_grad[3]:
            grad_intercepts = grad_rows.new_zeros(table_shape).index_add_(0, flat, grad_rows)
            grad_intercepts = grad_intercepts.view(ctx.table_shape)
        return grad_distance, None, grad_slopes, grad_intercepts, None
