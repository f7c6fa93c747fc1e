"""Which attention kernel a forward pass runs, and in chunks of how many queries.

Everything here is a pure function of numbers and flags, so a test can ask what the layer would
do without running it. :class:`Implementation` is the one documented setting through which a
user changes *how* the layer computes (never *what*): the kernel, the chunk budget, the reference
paths of the position bias and of the sampler, and the input check.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "KERNELS",
    "POSITION_BIAS_EVALUATIONS",
    "SAMPLERS",
    "PIECEWISE_MIN_LENGTH",
    "PIECEWISE_LENGTH_PER_KINK",
    "EXPORT_QUERY_CHUNK",
    "Implementation",
    "KernelPlan",
    "plan_attention",
    "default_max_bias_elements",
]

KERNELS: tuple[str, ...] = ("auto", "fused", "piecewise", "sdpa")
POSITION_BIAS_EVALUATIONS: tuple[str, ...] = ("table", "mlp")
SAMPLERS: tuple[str, ...] = ("gather", "grid_sample")

# "auto" takes the piecewise kernel from n >= max(384, 8 * kinks): its setup grows with keys x kinks
# and its savings with keys x queries. Measured on 2 CPU cores at dim 32, 128 and 512 (17, 76 and
# 255 kinks); below, the SDPA kernel was up to 1.8x faster.
PIECEWISE_MIN_LENGTH = 384
PIECEWISE_LENGTH_PER_KINK = 8
# queries per step of the exported program's scan: fixed when tracing, so memory grows linearly in n
EXPORT_QUERY_CHUNK = 128


def default_max_bias_elements(kernel: str) -> int:
    """The chunk budget in pair elements when ``Implementation.max_bias_elements`` is ``None``.

    2**21 for ``"piecewise"`` (8 MiB per float32 pair tensor, near the CPU caches; the fastest of
    2**20, 2**21 and 2**22 at n = 8192 and 16384 on 2 cores) and 2**23 for ``"sdpa"``.
    """
    return 2**21 if kernel == "piecewise" else 2**23


@dataclass(frozen=True)
class Implementation:
    """How ``DeformableAttention1D`` computes its output; every choice gives the same result.

    Args:
        kernel: ``"auto"`` (default): on the CPU the fused kernel where it applies, else the
            piecewise kernel where the sequence is long enough to pay for its setup, else SDPA
            (see :func:`plan_attention`).
            ``"fused"``: :func:`deform_attn.kernels.fused_biased_attention`, one C++ pass per
            block of queries for logits, bias, masks, softmax and values (CPU, float32/float64,
            no autocast, no attention dropout, the table or no position bias, first derivatives
            only; compiled on first use, see :func:`deform_attn.kernels.fused_available`).
            ``"piecewise"``: :func:`deform_attn.kernels.piecewise_biased_attention`, which
            evaluates the piecewise-linear position bias by prefix sums inside a chunked attention
            with its own backward (float32/float64, no attention dropout, first derivatives only).
            ``"sdpa"``: :func:`deform_attn.kernels.sdpa_biased_attention`, the bias materialised
            per chunk of queries and passed to ``scaled_dot_product_attention`` (any device and
            dtype, dropout, double backward with ``position_bias="mlp"``).
        max_bias_elements: chunk the queries so that one chunk's pair tensors hold at most this
            many elements (batch x heads x queries x keys); ``None``: the kernel's default
            (:func:`default_max_bias_elements`). Under autograd the SDPA kernel recomputes each
            chunk in the backward pass instead of storing it.
        position_bias: ``"table"`` (default): the exact piecewise-linear table of the CPB MLP.
            ``"mlp"``: the reference path, the MLP run on every pair ((pairs x hidden) memory).
        sampling: ``"gather"`` (default): :func:`deform_attn.linear_sample_1d`. ``"grid_sample"``:
            the reference path through ``torch.nn.functional.grid_sample``.
        check_finite: raise on NaN or infinity in the input (skipped while compiling or exporting).
    """

    kernel: str = "auto"
    max_bias_elements: int | None = None
    position_bias: str = "table"
    sampling: str = "gather"
    check_finite: bool = True

    def __post_init__(self):
        for name, allowed in (("kernel", KERNELS), ("position_bias", POSITION_BIAS_EVALUATIONS), ("sampling", SAMPLERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"implementation.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        budget = self.max_bias_elements
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"implementation.max_bias_elements: expected a positive integer or None, got {budget!r}")
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"implementation.check_finite: expected a bool, got {self.check_finite!r}")
        if self.kernel == "piecewise" and self.position_bias != "table":
            raise ValueError(
                "implementation.kernel: 'piecewise' evaluates the piecewise-linear table, so it needs "
                "position_bias='table'"
            )


@dataclass(frozen=True)
class KernelPlan:
    """What one forward pass runs.

    Attributes:
        kernel: ``"fused"``, ``"piecewise"``, ``"sdpa"`` or ``"scan"`` (the exportable kernel, chosen only
            while ``torch.export`` traces).
        chunk: queries per chunk.
    """

    kernel: str
    chunk: int


def plan_attention(
    implementation: Implementation,
    *,
    length: int,
    batch: int,
    heads: int,
    cells: int,
    num_kinks: int | None,
    device_type: str = "cpu",
    floating_point: str = "float32",
    autocast: bool = False,
    dropout_in_use: bool = False,
    exporting: bool = False,
    bias_is_function: bool = False,
    fused_kernel_available: bool = False,
) -> KernelPlan:
    """The kernel and chunk for one forward pass.

    Args:
        implementation: the layer's :class:`Implementation`.
        length: queries (tokens) ``n``.
        batch, heads, cells: batch size, attention heads and sampled keys ``m``.
        num_kinks: kinks of the position bias's table, or ``None`` when there is no table (no
            position bias, or the MLP reference path).
        bias_is_function: the position bias is a function of the distances (the MLP reference
            path), which only the SDPA kernel evaluates.
        fused_kernel_available: the fused kernel's library is loaded and the call is not being
            compiled by ``torch.compile`` (:func:`deform_attn.kernels.fused_available`).
        device_type: ``"cpu"``, ``"cuda"``, ...
        floating_point: the attention's dtype name (``"float32"``, ``"float64"``, ``"bfloat16"``...).
        autocast: whether autocast is active on ``device_type``.
        dropout_in_use: attention dropout is on (training with ``dropout > 0``).
        exporting: ``torch.export`` is tracing: the ``"scan"`` kernel, whose loop over query chunks
            is part of the program, with :data:`EXPORT_QUERY_CHUNK` queries per step.

    ``"auto"`` picks ``"fused"`` when all of these hold: CPU, float32 or float64, no autocast,
    no attention dropout, a table or no position bias, and the fused kernel available; else
    ``"piecewise"`` when the same holds for it with a table and
    ``length >= max(384, 8 * num_kinks)``; else ``"sdpa"``.
    """
    if exporting:
        return KernelPlan("scan", EXPORT_QUERY_CHUNK)
    kernel = implementation.kernel
    precision_applies = floating_point in ("float32", "float64") and not autocast
    if kernel == "fused":
        if not fused_kernel_available:
            raise RuntimeError(
                "implementation.kernel: 'fused' is unavailable here (see "
                "deform_attn.kernels.fused_unavailable_reason()); use 'auto'"
            )
        if device_type != "cpu" or not precision_applies:
            raise ValueError(
                "implementation.kernel: 'fused' computes on the CPU in float32 or float64 without autocast, got "
                f"{floating_point} on {device_type}{' under autocast' if autocast else ''}; use 'auto'"
            )
        if dropout_in_use:
            raise RuntimeError(
                "implementation.kernel: 'fused' has no attention dropout; use 'sdpa' or 'auto' to train with dropout"
            )
        if bias_is_function:
            raise ValueError("implementation.kernel: 'fused' evaluates the table, so it needs position_bias='table'")
        return KernelPlan("fused", length)
    if kernel == "piecewise":
        if dropout_in_use:
            raise RuntimeError(
                "implementation.kernel: 'piecewise' has no attention dropout; use 'sdpa' or 'auto' to train with dropout"
            )
        if num_kinks is None:
            raise ValueError("implementation.kernel: 'piecewise' needs the position bias's piecewise-linear table")
        if floating_point not in ("float32", "float64") or autocast:
            raise ValueError(
                "implementation.kernel: 'piecewise' computes in float32 or float64 without autocast, got "
                f"{floating_point}{' under autocast' if autocast else ''}; use 'auto' or 'sdpa' for low precision"
            )
    elif kernel == "auto":
        if (
            fused_kernel_available and device_type == "cpu" and precision_applies and not dropout_in_use
            and not bias_is_function
        ):
            return KernelPlan("fused", length)
        applies = (
            device_type == "cpu"
            and num_kinks is not None
            and floating_point in ("float32", "float64")
            and not autocast
            and not dropout_in_use
            and length >= max(PIECEWISE_MIN_LENGTH, PIECEWISE_LENGTH_PER_KINK * num_kinks)
        )
        kernel = "piecewise" if applies else "sdpa"
    budget = implementation.max_bias_elements or default_max_bias_elements(kernel)
    return KernelPlan(kernel, max(1, budget // max(1, batch * heads * cells)))
