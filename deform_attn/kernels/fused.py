r"""The fused CPU kernel: biased attention in one pass per block of queries, in C++.

The other kernels pay for the position bias in full passes over (queries x keys) tensors: the
SDPA kernel materialises it (a search, two gathers and a few elementwise passes per pair), the
piecewise kernel builds it from prefix sums. On batched short sequences those passes cost more
than the attention itself. This kernel computes, for one block of 32 queries of one (sequence,
head) row at a time, the logits, the bias, the masks, the softmax and the product with the values
while the block sits in the cache, FlashAttention's recipe with the whole (short) key axis held
at once; the backward pass recomputes the logits from the saved log-sum-exp. It reads its inputs
and writes its outputs through their strides, so the projections' layouts need no copies.

The bias uses the regular query grid, as the piecewise kernel does: key :math:`j` passes kink
:math:`k` at query :math:`r_{jk}` (:func:`deform_attn.kernels.kink_crossings`), so between two
crossings a run of queries shares one slope and intercept, and the block evaluates
:math:`s\,t_{ij} + c` over each run with no search and no gather. In the backward pass the table's
gradients are sums over the same runs.

The source, ``fused_cpu.cpp``, uses no torch headers: it is compiled on first use with the
system's C++ compiler (about two seconds), cached under ``~/.cache/deform_attn`` (or
``$DEFORM_ATTN_CACHE``), and called through :mod:`ctypes`. Where no compiler is found, or with
``DEFORM_ATTN_FUSED=0``, :func:`fused_available` is false and ``kernel="auto"`` takes the other
kernels; :func:`fused_unavailable_reason` says why.

Axis letters: b batch, g offset groups, o heads per group (h = g o), n queries, m keys, e null
keys, d channels per head, k kinks. A "row" is one (sequence, head): rows = b h.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..geometry import QueryGrid
from ..position_bias import PiecewiseLinearTable, inverse_transform_distance
from .piecewise import check_kernel_arguments
from .sdpa import check_causal_arguments

__all__ = [
    "fused_biased_attention", "fused_available", "fused_unavailable_reason", "SOURCE", "loops_available",
    "depthwise_forward", "depthwise_backward", "sample_forward", "sample_backward", "offsets_forward",
    "offsets_backward", "tensor_path_grads", "table_forward", "table_backward",
]

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
_ABI = 8
_BLOCK = 32  # kBlock of fused_cpu.cpp
# -fopenmp first: the library then runs on PyTorch's own OpenMP threads (see fused_cpu.cpp)
_FLAG_SETS = (
    ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp"],
    ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"],  # no OpenMP
    ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"],  # compilers without -march=native
)


class _Layout(ctypes.Structure):
    """The C struct ``Layout``: the strides of a (b, h, len, d) tensor, in elements."""

    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "head", "token", "channel")]


_LAYOUTS = ("q", "k", "v", "out", "grad_out", "grad_q", "grad_k", "grad_v")


class _Problem(ctypes.Structure):
    """The C struct ``Problem`` of ``fused_cpu.cpp``, field for field."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "rows", "length", "cells", "channels", "null_keys", "kinks", "outputs", "heads", "threads",
            "log_distance", "has_bias",
        )
    ] + [(name, ctypes.c_double) for name in ("step", "origin", "scale")] + [
        (f"{name}_layout", _Layout) for name in _LAYOUTS
    ] + [
        (name, ctypes.c_void_p)
        for name in (
            "q", "k", "v", "null_k", "null_v", "query_coordinates", "key_coordinates", "thresholds", "slopes",
            "intercepts", "key_padding", "visible_from", "out", "lse", "grad_out", "grad_q", "grad_k", "grad_v",
            "grad_null_k", "grad_null_v", "grad_key_coordinates", "grad_slopes", "grad_intercepts",
        )
    ]


class _DepthwiseProblem(ctypes.Structure):
    """The C struct ``DepthwiseProblem`` of ``fused_cpu.cpp``, field for field."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in ("rows", "channels", "length", "cells", "kernel", "stride", "left", "threads")
    ] + [
        (name, ctypes.c_void_p)
        for name in ("x", "weight", "bias", "out", "grad_out", "grad_x", "grad_weight", "grad_bias")
    ]


class _OffsetProblem(ctypes.Structure):
    """The C struct ``OffsetProblem`` of ``fused_cpu.cpp``, field for field."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in ("sequences", "channels", "length", "cells", "kernel", "stride", "left", "threads", "bounded")
    ] + [("scale", ctypes.c_double)] + [
        (name, ctypes.c_void_p)
        for name in ("x", "weight", "bias", "pointwise", "out", "grad_out", "grad_x", "grad_weight", "grad_bias",
                     "grad_pointwise")
    ]


class _SampleProblem(ctypes.Structure):
    """The C struct ``SampleProblem`` of ``fused_cpu.cpp``, field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in ("rows", "channels", "length", "cells", "threads")] + [
        (name, ctypes.c_void_p) for name in ("x", "positions", "out", "grad_out", "grad_x", "grad_positions")
    ]


class _TableProblem(ctypes.Structure):
    """The C struct ``TableProblem`` of ``fused_cpu.cpp``, field for field."""

    _fields_ = [
        ("layers", ctypes.c_int64), ("widths", ctypes.POINTER(ctypes.c_int64)),
        ("weights", ctypes.POINTER(ctypes.c_void_p)), ("biases", ctypes.POINTER(ctypes.c_void_p)),
        ("capacity", ctypes.c_int64), ("kinks", ctypes.c_void_p), ("slopes", ctypes.c_void_p),
        ("intercepts", ctypes.c_void_p), ("count", ctypes.c_int64), ("grad_slopes", ctypes.c_void_p),
        ("grad_intercepts", ctypes.c_void_p), ("grad_weights", ctypes.POINTER(ctypes.c_void_p)),
        ("grad_biases", ctypes.POINTER(ctypes.c_void_p)),
    ]


def _cache_directory() -> Path:
    root = os.environ.get("DEFORM_ATTN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deform_attn")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's name and flags where Linux tells them."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The compiled library, or ``None`` and the reason it is missing."""
    if os.environ.get("DEFORM_ATTN_FUSED", "1") == "0":
        return None, "disabled by DEFORM_ATTN_FUSED=0"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)"
    try:
        source = SOURCE.read_bytes()
    except OSError as error:
        return None, f"the kernel's source is missing: {error}"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"the C++ compiler {compiler} does not run: {error}"
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_signature().encode()]))
        target = _cache_directory() / key.hexdigest()[:20] / "libdeform_attn_fused.so"
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                # compile beside the target, then rename: concurrent processes never load a partial file
                handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
                os.close(handle)
            except OSError as error:
                return None, f"cannot write the compiled kernel to {target.parent} (set DEFORM_ATTN_CACHE): {error}"
            result = subprocess.run(
                [compiler, *flags, "-o", partial, str(SOURCE)], capture_output=True, text=True, timeout=600
            )
            if result.returncode != 0:
                os.unlink(partial)
                errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-500:]}")
                continue
            os.replace(partial, target)
        try:
            library = ctypes.CDLL(str(target))
        except OSError as error:  # e.g. a cache on a filesystem mounted noexec
            errors.append(f"loading {target}: {error}")
            continue
        if library.deform_attn_fused_abi() != _ABI:
            errors.append(f"{target}: ABI {library.deform_attn_fused_abi()}, expected {_ABI}")
            continue
        for name in ("forward", "backward"):
            for suffix in ("f32", "f64"):
                getattr(library, f"deform_attn_fused_{name}_{suffix}").argtypes = [ctypes.POINTER(_Problem)]
                getattr(library, f"deform_attn_depthwise_{name}_{suffix}").argtypes = [ctypes.POINTER(_DepthwiseProblem)]
                getattr(library, f"deform_attn_sample_{name}_{suffix}").argtypes = [ctypes.POINTER(_SampleProblem)]
                getattr(library, f"deform_attn_offsets_{name}_{suffix}").argtypes = [ctypes.POINTER(_OffsetProblem)]
                getattr(library, f"deform_attn_table_{name}_{suffix}").argtypes = [ctypes.POINTER(_TableProblem)]
        return library, ""
    return None, "compiling fused_cpu.cpp failed: " + " | ".join(errors)


def fused_available() -> bool:
    """Whether the fused kernel's library is compiled and loaded (compiling it on first call)."""
    return _load()[0] is not None


def fused_unavailable_reason() -> str:
    """Why :func:`fused_available` is false (empty when it is true)."""
    return _load()[1]


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class _Rows:
    """Everything of one call that is not differentiated, laid out per row (sequence, head)."""

    def __init__(self, q, key_coordinates, query_coordinates, query_grid, table, log_distance, scale, key_padding,
                 visible_from, null_keys):
        batch, heads, length, channels = q.shape
        groups = key_coordinates.shape[0] // batch
        self.batch, self.heads, self.length, self.channels, self.groups = batch, heads, length, channels, groups
        self.cells, self.null_keys = key_coordinates.shape[1], null_keys
        self.overwrite_q = self.tokens_major_output = False
        self.head_group = torch.arange(heads, device=q.device) // (heads // groups)  # (h,)
        # padded to whole blocks with the last coordinate, so the kernel loads whole vectors
        padded = -(-length // _BLOCK) * _BLOCK
        self.query_coordinates = query_coordinates.to(q.dtype)[torch.arange(padded).clamp(max=length - 1)].contiguous()
        self.grid, self.log_distance, self.scale = query_grid, log_distance, scale
        self.outputs = heads // groups
        self.thresholds = self.kinks = None
        if table is not None:
            self.kinks = table.kinks.shape[0]
            # in float64, as kink_crossings computes them: the same crossings as the piecewise kernel
            self.thresholds = inverse_transform_distance(table.kinks.to(torch.float64), log_distance).contiguous()
        self.key_padding = None
        if key_padding is not None:  # (b, m) -> (b h, m)
            self.key_padding = key_padding[:, None, :].expand(-1, heads, -1).reshape(batch * heads, -1)
            self.key_padding = self.key_padding.to(torch.uint8).contiguous()
        self.visible_from = None
        if visible_from is not None:  # (b g, m) -> (b h, m)
            rows = visible_from.unflatten(0, (batch, groups))[:, self.head_group]
            self.visible_from = rows.flatten(0, 1).contiguous()

    def row_coordinates(self, key_coordinates: Tensor) -> Tensor:
        """(b g, m) -> (b h, m): each head's key coordinates (differentiable)."""
        if self.outputs == 1:  # a group per head (the layer's default): the rows are the groups'
            return key_coordinates.contiguous()
        rows = key_coordinates.unflatten(0, (self.batch, self.groups))[:, self.head_group]
        return rows.flatten(0, 1).contiguous()

    def problem(self, q, k, v, null_k, null_v, coordinates, slopes, intercepts) -> _Problem:
        has_bias = slopes is not None
        return _Problem(
            q_layout=_layout(q), k_layout=_layout(k), v_layout=_layout(v),
            rows=self.batch * self.heads, length=self.length, cells=self.cells, channels=self.channels,
            null_keys=self.null_keys, kinks=self.kinks or 0, outputs=self.outputs, heads=self.heads,
            threads=torch.get_num_threads(), log_distance=int(self.log_distance), has_bias=int(has_bias),
            step=self.grid.step, origin=self.grid.origin, scale=self.scale, q=_pointer(q), k=_pointer(k),
            v=_pointer(v), null_k=_pointer(null_k), null_v=_pointer(null_v),
            query_coordinates=_pointer(self.query_coordinates), key_coordinates=_pointer(coordinates),
            thresholds=_pointer(self.thresholds), slopes=_pointer(slopes), intercepts=_pointer(intercepts),
            key_padding=_pointer(self.key_padding), visible_from=_pointer(self.visible_from),
        )


def _suffix(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"


def _layout(tensor: Tensor) -> _Layout:
    """The (b, h, len, d) strides of ``tensor``: the kernel reads and writes any view in place."""
    return _Layout(*tensor.stride())


def _writable_layout(q: Tensor) -> bool:
    """Whether ``q`` (b, h, n, d) may take the output in place: one of the layouts the layer makes."""
    return q.is_contiguous() or q.transpose(2, 3).is_contiguous() or q.transpose(1, 2).is_contiguous()


class _FusedBiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, coordinates, slopes, intercepts, null_k, null_v, rows: _Rows):
        null_k = None if null_k is None else null_k.contiguous()
        null_v = None if null_v is None else null_v.contiguous()
        if rows.overwrite_q:
            out = q
        elif rows.tokens_major_output:  # (b, n, h, d) storage: out as (b, n, h d) is a view
            out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
        else:
            out = torch.empty_like(q)  # q's strides where q is dense, else contiguous
        lse = q.new_empty(q.shape[:3])
        problem = rows.problem(q, k, v, null_k, null_v, coordinates, slopes, intercepts)
        problem.out, problem.lse, problem.out_layout = out.data_ptr(), lse.data_ptr(), _layout(out)
        getattr(_load()[0], f"deform_attn_fused_forward_{_suffix(q.dtype)}")(ctypes.byref(problem))
        ctx.rows = rows
        ctx.save_for_backward(q, k, v, coordinates, slopes, intercepts, null_k, null_v, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused attention kernel cannot be differentiated twice; use "
                "Implementation(kernel='sdpa', position_bias='mlp') for gradient penalties or Hessians"
            )
        q, k, v, coordinates, slopes, intercepts, null_k, null_v, lse = ctx.saved_tensors
        rows: _Rows = ctx.rows
        grads = {name: torch.empty_like(t) for name, t in (("q", q), ("k", k), ("v", v))}
        if null_k is not None:
            grads["null_k"], grads["null_v"] = torch.empty_like(null_k), torch.empty_like(null_v)
        has_bias = slopes is not None
        if has_bias:
            grads["coordinates"] = torch.empty_like(coordinates)
            grads["slopes"] = q.new_empty(coordinates.shape[0], slopes.shape[0])  # (b h, k + 1)
            grads["intercepts"] = q.new_empty(coordinates.shape[0], slopes.shape[0])
        problem = rows.problem(q, k, v, null_k, null_v, coordinates, slopes, intercepts)
        problem.lse, problem.grad_out, problem.grad_out_layout = lse.data_ptr(), grad_out.data_ptr(), _layout(grad_out)
        for name in ("q", "k", "v"):
            setattr(problem, f"grad_{name}_layout", _layout(grads[name]))
        for name in ("q", "k", "v", "null_k", "null_v", "coordinates", "slopes", "intercepts"):
            field = {"coordinates": "grad_key_coordinates"}.get(name, f"grad_{name}")
            setattr(problem, field, _pointer(grads.get(name)))
        getattr(_load()[0], f"deform_attn_fused_backward_{_suffix(q.dtype)}")(ctypes.byref(problem))
        grad_slopes = grad_intercepts = grad_coordinates = None
        if has_bias:
            grad_coordinates = grads["coordinates"]

            def per_output(per_row: Tensor) -> Tensor:  # (b h, k + 1) -> (k + 1, o), head = g o + o'
                return per_row.view(rows.batch, rows.groups, rows.outputs, -1).sum((0, 1)).T.contiguous()

            grad_slopes, grad_intercepts = per_output(grads["slopes"]), per_output(grads["intercepts"])
        return (
            grads["q"], grads["k"], grads["v"], grad_coordinates, grad_slopes, grad_intercepts,
            grads.get("null_k"), grads.get("null_v"), None,
        )


def fused_biased_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_coordinates: Tensor,
    key_coordinates: Tensor,
    query_grid: QueryGrid,
    table: PiecewiseLinearTable | None,
    log_distance: bool,
    scale: float,
    key_padding: Tensor | None = None,
    visible_from: Tensor | None = None,
    null_k: Tensor | None = None,
    null_v: Tensor | None = None,
    overwrite_q: bool = False,
    tokens_major_output: bool = False,
) -> Tensor:
    """``softmax(q k^T * scale + bias) v`` with ``bias[h, i, j] = f_h(t(u_i - w_j))``, fused on the CPU.

    The same function as :func:`deform_attn.kernels.piecewise_biased_attention` (and the same
    arguments, without ``chunk``), with ``table=None`` for no position bias. float32 or float64 on
    the CPU; differentiable once in ``q``, ``k``, ``v``, ``key_coordinates``, the table's slopes
    and intercepts, ``null_k`` and ``null_v``.

    Args:
        q: (b, h, n, d) queries.
        k, v: (b, h, m, d) keys and values.
        query_coordinates: (n,) query coordinates :math:`u_i` on ``query_grid``.
        key_coordinates: (b g, m) key coordinates :math:`w_j` of each offset group.
        query_grid: :class:`QueryGrid` ``(step > 0, origin)`` of the query coordinates.
        table: the bias as a :class:`PiecewiseLinearTable` with ``o = h / g`` outputs, or ``None``.
        log_distance: ``t`` is ``sign(d) log(1 + |d|)`` instead of ``d``.
        scale: factor on ``q k^T``.
        key_padding: optional (b, m) bool, True where a key does not exist.
        visible_from: optional (b g, m) int64: query ``i`` sees key ``j`` iff ``i >= visible_from``.
        null_k, null_v: optional (b, h, e, d) keys and values every query sees, without bias.
        overwrite_q: write the output into ``q``'s memory and return ``q`` (no gradient may be
            needed): each block of queries is read before its outputs are written, and a large
            fresh output costs page faults (~4 ms per 12 MB on the 2-core CPU). The layer uses
            it in inference, where its queries are a temporary.
        tokens_major_output: store the output as (b, n, h, d), so that it is a (b, n, h d) view
            for a projection over tokens; otherwise it takes q's layout. q, k, v and the
            output's gradient are read in whatever layout they come (no copies).

    Returns:
        (b, h, n, d). A query that sees no key at all gets a zero output.
    """
    library, reason = _load()
    if library is None:
        raise RuntimeError(f"the fused kernel is unavailable: {reason}")
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"q: the fused kernel runs float32 or float64 on the CPU, got {q.dtype} on {q.device}")
    for name, tensor in (("k", k), ("v", v), ("null_k", null_k), ("null_v", null_v)):
        if tensor is not None and (tensor.dtype != q.dtype or tensor.device != q.device):
            raise ValueError(f"{name}: expected {q.dtype} on {q.device} like q, got {tensor.dtype} on {tensor.device}")
    if table is not None:
        kinks, slopes, intercepts = table
    else:
        kinks = slopes = intercepts = None
    check_kernel_arguments(
        q, k, v, key_coordinates, query_coordinates, kinks, slopes, intercepts, query_grid, None, key_padding
    )
    check_causal_arguments(q, key_coordinates, visible_from, null_k, null_v)
    grid = QueryGrid(float(query_grid[0]), float(query_grid[1]))
    null_keys = 0 if null_k is None else null_k.shape[2]
    rows = _Rows(q, key_coordinates, query_coordinates, grid, table, bool(log_distance), float(scale), key_padding,
                 visible_from, null_keys)
    coordinates = rows.row_coordinates(key_coordinates.to(q.dtype))
    if table is not None:
        slopes, intercepts = slopes.to(q.dtype).contiguous(), intercepts.to(q.dtype).contiguous()
    if overwrite_q:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, coordinates, slopes, intercepts, null_k, null_v)
        )
        if needs_grad:
            raise ValueError("overwrite_q: only without gradients (torch.no_grad() or inputs that need none)")
        if tokens_major_output and not q.transpose(1, 2).is_contiguous():
            raise ValueError("overwrite_q: with tokens_major_output, q must be stored as (b, n, h, d)")
        if not _writable_layout(q):
            raise ValueError("overwrite_q: q must be stored as (b, h, n, d), (b, h, d, n) or (b, n, h, d)")
        rows.overwrite_q = True
    rows.tokens_major_output = bool(tokens_major_output)
    return _FusedBiasedAttention.apply(q, k, v, coordinates, slopes, intercepts, null_k, null_v, rows)


# ---------------------------------------------------------------------------- the compiled loops


def loops_available(*tensors: Tensor) -> bool:
    """Whether the compiled loops below (depthwise convolution, offset network, sampler) take these
    tensors: all on the CPU in one dtype, float32 or float64, outside ``torch.compile`` and
    ``torch.export`` tracing (which see tensor operations only), and the library loaded."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return False
    dtype = tensors[0].dtype
    return (
        dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
        and fused_available()
    )


def tensor_path_grads(function, inputs: tuple[Tensor, ...], needs: tuple[bool, ...], grad_out: Tensor):
    """Gradients of ``function(*inputs)`` for the inputs in ``needs`` (``None`` elsewhere), with a graph.

    The compiled loops have no second derivative: their autograd functions call this from the
    backward pass when a graph is asked for, with ``function`` their tensor path, whose graph
    reaches the inputs.
    """
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(function(*inputs), wanted, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


# ---------------------------------------------------------------------------- the offset network's convolution


def _depthwise_problem(x: Tensor, weight: Tensor, stride: int, left: int, cells: int) -> _DepthwiseProblem:
    batch, channels, length = x.shape
    return _DepthwiseProblem(
        rows=batch * channels, channels=channels, length=length, cells=cells, kernel=weight.shape[1],
        stride=stride, left=left, threads=torch.get_num_threads(), x=x.data_ptr(), weight=weight.data_ptr(),
    )


def depthwise_forward(x: Tensor, weight: Tensor, bias: Tensor, stride: int, left: int, cells: int) -> Tensor:
    """The strided depthwise convolution of :func:`deform_attn.offsets.strided_depthwise_conv` in C++.

    Args:
        x: (batch, channels, n), contiguous, on the CPU, fp32 or fp64 (:func:`loops_available`).
        weight: (channels, kernel_size); bias: (channels,); both of x's dtype and contiguous.
        stride: tokens per cell; left: zero padding on the left, in tokens; cells: output length.

    Returns:
        (batch, channels, cells).
    """
    out = x.new_empty(x.shape[0], x.shape[1], cells)
    problem = _depthwise_problem(x, weight, stride, left, cells)
    problem.bias, problem.out = bias.data_ptr(), out.data_ptr()
    getattr(_load()[0], f"deform_attn_depthwise_forward_{_suffix(x.dtype)}")(ctypes.byref(problem))
    return out


def depthwise_backward(
    x: Tensor, weight: Tensor, grad_out: Tensor, stride: int, left: int, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`depthwise_forward` for x, weight and bias (``None`` where not in ``needs``).

    The weight's and bias's gradients are summed in a fixed order, so they are the same on any
    number of threads.
    """
    grad_x = torch.empty_like(x) if needs[0] else None
    grad_weight = torch.empty_like(weight) if needs[1] else None
    grad_bias = weight.new_empty(weight.shape[0]) if needs[2] else None
    problem = _depthwise_problem(x, weight, stride, left, grad_out.shape[-1])
    problem.grad_out = grad_out.data_ptr()
    problem.grad_x, problem.grad_weight, problem.grad_bias = (_pointer(t) for t in (grad_x, grad_weight, grad_bias))
    getattr(_load()[0], f"deform_attn_depthwise_backward_{_suffix(x.dtype)}")(ctypes.byref(problem))
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------- the whole offset network


def _offset_problem(x, weight, bias, pointwise, stride, left, cells, bounded, scale) -> _OffsetProblem:
    sequences, channels, length = x.shape
    return _OffsetProblem(
        sequences=sequences, channels=channels, length=length, cells=cells, kernel=weight.shape[1], stride=stride,
        left=left, threads=torch.get_num_threads(), bounded=int(bounded), scale=float(scale), x=x.data_ptr(),
        weight=weight.data_ptr(), bias=bias.data_ptr(), pointwise=pointwise.data_ptr(),
    )


def offsets_forward(
    x: Tensor, weight: Tensor, bias: Tensor, pointwise: Tensor, stride: int, left: int, cells: int, bounded: bool,
    scale: float,
) -> Tensor:
    """:class:`deform_attn.offsets.OffsetNetwork` without a LayerNorm, in C++ (no gradients).

    Args:
        x: (sequences, channels, n) queries of each offset group, contiguous, fp32 or fp64 on
            the CPU (:func:`loops_available`).
        weight: (channels, kernel_size), bias: (channels,): the depthwise convolution's.
        pointwise: (channels,) the pointwise convolution's weight. All of x's dtype, contiguous.
        stride: tokens per cell; left: zero padding on the left, in tokens; cells: offsets per
            sequence; bounded: ``tanh`` before the scale; scale: the offset scale.

    Returns:
        (sequences, cells) offsets.
    """
    out = x.new_empty(x.shape[0], cells)
    problem = _offset_problem(x, weight, bias, pointwise, stride, left, cells, bounded, scale)
    problem.out = out.data_ptr()
    getattr(_load()[0], f"deform_attn_offsets_forward_{_suffix(x.dtype)}")(ctypes.byref(problem))
    return out


def offsets_backward(
    x: Tensor, weight: Tensor, bias: Tensor, pointwise: Tensor, grad_out: Tensor, stride: int, left: int,
    bounded: bool, scale: float, needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Gradients of :func:`offsets_forward` for x, weight, bias and pointwise (``None`` where not in
    ``needs``); the parameters' are summed in a fixed order, the same on any number of threads."""
    grads = [
        torch.empty_like(t) if need else None for t, need in zip((x, weight, bias, pointwise), needs)
    ]
    problem = _offset_problem(x, weight, bias, pointwise, stride, left, grad_out.shape[-1], bounded, scale)
    problem.grad_out = grad_out.data_ptr()
    problem.grad_x, problem.grad_weight, problem.grad_bias, problem.grad_pointwise = (_pointer(t) for t in grads)
    getattr(_load()[0], f"deform_attn_offsets_backward_{_suffix(x.dtype)}")(ctypes.byref(problem))
    return tuple(grads)


# ---------------------------------------------------------------------------- linear sampling


def _sample_problem(x: Tensor, positions: Tensor) -> _SampleProblem:
    rows, channels, length = x.shape
    return _SampleProblem(
        rows=rows, channels=channels, length=length, cells=positions.shape[1], threads=torch.get_num_threads(),
        x=x.data_ptr(), positions=positions.data_ptr(),
    )


def sample_forward(x: Tensor, positions: Tensor) -> Tensor:
    """:func:`deform_attn.sampling.linear_sample_1d` in C++ (no gradients; see :func:`sample_backward`).

    Args:
        x: (batch, channels, n), contiguous; positions: (batch, m), contiguous, of x's dtype
            (:func:`loops_available`).

    Returns:
        (batch, channels, m).
    """
    out = x.new_empty(x.shape[0], x.shape[1], positions.shape[1])
    problem = _sample_problem(x, positions)
    problem.out = out.data_ptr()
    getattr(_load()[0], f"deform_attn_sample_forward_{_suffix(x.dtype)}")(ctypes.byref(problem))
    return out


def sample_backward(
    x: Tensor, positions: Tensor, grad_out: Tensor, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`sample_forward` for x and the positions (``None`` where not in ``needs``).

    A position's gradient is summed over the channels in a fixed order, so it is the same on any
    number of threads.
    """
    grad_x = torch.empty_like(x) if needs[0] else None
    grad_positions = torch.empty_like(positions) if needs[1] else None
    problem = _sample_problem(x, positions)
    problem.grad_out = grad_out.data_ptr()
    problem.grad_x, problem.grad_positions = _pointer(grad_x), _pointer(grad_positions)
    getattr(_load()[0], f"deform_attn_sample_backward_{_suffix(x.dtype)}")(ctypes.byref(problem))
    return grad_x, grad_positions


# ---------------------------------------------------------------------------- the position bias's table


def _table_problem(weights: list[Tensor], biases: list[Tensor]) -> tuple[_TableProblem, list]:
    """The problem of an MLP given by its layers' (contiguous) weights and biases, and the ctypes
    arrays it points into (keep them alive while it is used)."""
    widths = (ctypes.c_int64 * (len(weights) + 1))(weights[0].shape[1], *(w.shape[0] for w in weights))
    weight_pointers = (ctypes.c_void_p * len(weights))(*(w.data_ptr() for w in weights))
    bias_pointers = (ctypes.c_void_p * len(biases))(*(b.data_ptr() for b in biases))
    problem = _TableProblem(layers=len(weights), widths=widths, weights=weight_pointers, biases=bias_pointers)
    return problem, [widths, weight_pointers, bias_pointers]


def table_forward(weights: list[Tensor], biases: list[Tensor], capacity: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Kinks (k,), slopes and intercepts (k + 1, o) of a ReLU MLP of one scalar, in float64, in C++.

    Args:
        weights, biases: per linear layer, (out, in) and (out,), contiguous, all of one dtype
            (float32 or float64) on the CPU (:func:`loops_available`); the first layer has one
            input, and a ReLU follows every layer but the last.
        capacity: kinks to make room for first; the call repeats with room for all if more.

    No gradients: :class:`deform_attn.position_bias.piecewise_linear_table` attaches them.
    """
    suffix = _suffix(weights[0].dtype)
    problem, keep = _table_problem(weights, biases)
    outputs = weights[-1].shape[0]
    while True:
        kinks = torch.empty(capacity, dtype=torch.float64)
        slopes = torch.empty(capacity + 1, outputs, dtype=torch.float64)
        intercepts = torch.empty(capacity + 1, outputs, dtype=torch.float64)
        problem.capacity = capacity
        problem.kinks, problem.slopes, problem.intercepts = kinks.data_ptr(), slopes.data_ptr(), intercepts.data_ptr()
        getattr(_load()[0], f"deform_attn_table_forward_{suffix}")(ctypes.byref(problem))
        if problem.count <= capacity:
            count = problem.count
            return kinks[:count], slopes[: count + 1], intercepts[: count + 1]
        capacity = problem.count


def table_backward(
    weights: list[Tensor], biases: list[Tensor], kinks: Tensor, grad_slopes: Tensor | None,
    grad_intercepts: Tensor | None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Gradients of :func:`table_forward`'s slopes and intercepts for the weights and biases.

    Args:
        weights, biases: as given to :func:`table_forward`.
        kinks: (k,) float64, the kinks it returned.
        grad_slopes, grad_intercepts: (k + 1, o) float64 contiguous, or ``None`` for zero.

    Returns:
        (weight gradients, bias gradients), each in the parameters' dtype, summed over the intervals
        in order.
    """
    problem, keep = _table_problem(weights, biases)
    grad_weights = [torch.empty_like(w) for w in weights]
    grad_biases = [torch.empty_like(b) for b in biases]
    weight_pointers = (ctypes.c_void_p * len(weights))(*(g.data_ptr() for g in grad_weights))
    bias_pointers = (ctypes.c_void_p * len(biases))(*(g.data_ptr() for g in grad_biases))
    problem.count, problem.kinks = kinks.shape[0], kinks.data_ptr()
    problem.grad_slopes, problem.grad_intercepts = _pointer(grad_slopes), _pointer(grad_intercepts)
    problem.grad_weights, problem.grad_biases = weight_pointers, bias_pointers
    getattr(_load()[0], f"deform_attn_table_backward_{_suffix(weights[0].dtype)}")(ctypes.byref(problem))
    return grad_weights, grad_biases
