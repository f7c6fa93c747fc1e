"""Benchmark command: time and peak memory of five attention layers against sequence length.

``python -m deform_attn.bench`` (or the console script ``deform-attn-bench``) measures, for each
sequence length ``n``, the forward time, the forward + backward time and the peak memory of

* **a** ``deformable_attention.DeformableAttention1D`` 0.0.20, the reference (only where that
  package is installed, and only at lengths where its estimated memory fits, see
  :func:`lucidrains_peak_bytes`);
* **b** ``deform_attn.from_lucidrains(a)``: this package in the reference's geometry, with the
  same weights as **a** (built from the same seed even where **a** itself is skipped);
* **c** ``deform_attn.DeformableAttention1D`` with its defaults (centred geometry, fast paths);
* **d** full multi-head attention of the same width, :class:`FullAttention1D`;
* **e** case **c** with ``attention_kernel="sdpa"``: the bias materialised chunk by chunk and
  passed to ``scaled_dot_product_attention``, the layer's path before the piecewise kernel
  (on a GPU, **c** already takes this path). Not in the default ``--cases``.

Protocol
    Every (case, n, mode) runs in a fresh worker process (``python -m deform_attn.bench --worker
    SPEC``), so the allocations of one measurement cannot raise the memory peak of another and an
    out-of-memory kill or a timeout only loses that one row. The worker builds the layer and the
    input, runs ``--warmup`` untimed calls and ``--repeats`` timed calls; the median, minimum and
    maximum wall time of the timed calls are reported. ``fwd`` runs the forward under
    ``torch.no_grad()``; ``fwd+bwd`` runs the forward with gradients and ``out.backward(g)`` for
    a fixed random ``g`` (gradients of the parameters and of the input, reset to ``None`` before
    each call as ``zero_grad(set_to_none=True)`` does). CUDA work is synchronized before each
    clock read. ``--dtype bfloat16`` keeps fp32 weights and runs the calls under
    ``torch.autocast`` (mixed precision).

Peak memory (bytes above the worker's baseline, the baseline taken after the layer, the input
and the output gradient exist and after one call at a tiny length (4 cells), which pays the
process's one-time costs: thread pools, kernel caches, lazy initialisation; the peak is over the
warm-up and timed calls together)
    * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
      ``memory_allocated()`` at the baseline: tensor memory only, not the caching allocator's
      reserve.
    * CPU (``memory_method = "vmhwm"``): the resident-set high-water mark ``VmHWM`` of
      ``/proc/self/status`` after resetting it to the current RSS by writing ``5`` to
      ``/proc/self/clear_refs`` (Linux >= 4.0), minus ``VmRSS`` at the baseline. Because the mark
      is reset at the baseline, whatever the process touched earlier (importing torch, building
      the layer) cannot leak into the number, and memory the allocator keeps after a call counts
      once, not once per call. This is resident memory, so it includes the allocator's slack.
    * CPU fallback where ``clear_refs`` is not writable (``memory_method = "ru_maxrss"``):
      ``getrusage(RUSAGE_SELF).ru_maxrss`` is a lifetime maximum, so the difference to the
      baseline is exact when the process's earlier peak was below the measured one and an
      over-estimate by at most (earlier peak - baseline) otherwise. Running ``fwd`` and
      ``fwd+bwd`` in separate processes is what keeps this bound tight.

Outputs in ``--out``: ``results.csv`` (one row per case x n x mode), ``meta.json`` (environment,
commands, parity of **b** against **a**, memory limit) and ``results.png`` (time and peak memory
against ``n``, log-log; solid forward + backward, dashed forward). A rerun into the same folder
skips every row already present with the same settings (so an interrupted run continues);
``--force`` measures them again. ``--plot-only DIR`` redraws the plot and the table.

Axis letters: b batch, h heads, n tokens, d channels per head.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "CASES",
    "MODES",
    "CSV_COLUMNS",
    "SETTING_COLUMNS",
    "FullAttention1D",
    "lucidrains_peak_bytes",
    "memory_limit_bytes",
    "parse_lengths",
    "read_results",
    "draw_results",
    "plot_results",
    "format_table",
    "main",
]

CASES: dict[str, str] = {
    "a": "deformable-attention 0.0.20",
    "b": "deform_attn, lucidrains geometry",
    "c": "deform_attn, defaults",
    "d": "full attention (SDPA)",
    "e": "deform_attn, SDPA kernel",
}
MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_LENGTHS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384, 32768)
PARITY_TOLERANCE = 1e-5
SEED = 0

# the settings a stored row must match to be reused by a resumed run
SETTING_COLUMNS: tuple[str, ...] = (
    "device", "dtype", "dim", "heads", "dim_head", "downsample", "batch", "repeats", "warmup", "threads",
)
CSV_COLUMNS: tuple[str, ...] = (
    "case", "label", "n", "mode", "status", "reason", "median_s", "min_s", "max_s", "peak_bytes",
    "estimated_bytes", "memory_method", *SETTING_COLUMNS,
)


# ---------------------------------------------------------------------------------------------
# the layers


class FullAttention1D(nn.Module):
    """Full multi-head self-attention over a (batch, dim, n) sequence: case **d**.

    The same projections as the deformable layers (1x1 convolutions to ``heads * dim_head``
    channels, no bias on q/k/v, bias on the output) and every query attends to every token
    through ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        dim: channels of the input and output.
        dim_head: channels per head.
        heads: attention heads.

    Shapes: forward takes (batch, dim, n) and returns (batch, dim, n).
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        for name, value in (("dim", dim), ("dim_head", dim_head), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        self.heads = heads
        inner_dim = heads * dim_head
        self.to_q = nn.Conv1d(dim, inner_dim, 1, bias=False)
        self.to_k = nn.Conv1d(dim, inner_dim, 1, bias=False)
        self.to_v = nn.Conv1d(dim, inner_dim, 1, bias=False)
        self.to_out = nn.Conv1d(inner_dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        # shape: (b, h d, n) -> (b, h, n, d); contiguous, or CPU SDPA runs ~3x slower
        q, k, v = (
            rearrange(f(x), "b (h d) n -> b h n d", h=self.heads).contiguous() for f in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b (h d) n"))


def _offset_kernel_size(downsample: int) -> int:
    """The reference's default kernel 6 where it is valid, else the smallest valid one above it."""
    kernel = max(6, downsample)
    return kernel + (kernel - downsample) % 2


def _lucidrains_available() -> bool:
    return importlib.util.find_spec("deformable_attention") is not None


def _lucidrains_module(spec: dict[str, Any]) -> nn.Module:
    from deformable_attention import DeformableAttention1D as ReferenceAttention1D

    torch.manual_seed(SEED)
    return ReferenceAttention1D(
        dim=spec["dim"],
        dim_head=spec["dim_head"],
        heads=spec["heads"],
        downsample_factor=spec["downsample"],
        offset_kernel_size=_offset_kernel_size(spec["downsample"]),
    )


def _build_layer(case: str, spec: dict[str, Any]) -> nn.Module:
    """The layer of ``case`` on fp32 weights, built from a fixed seed."""
    from .attention import DeformableAttention1D, from_lucidrains

    if case == "a":
        return _lucidrains_module(spec)
    if case == "b":
        if _lucidrains_available():
            return from_lucidrains(_lucidrains_module(spec))
        torch.manual_seed(SEED)  # same shapes and geometry, own initialisation
        return DeformableAttention1D(
            dim=spec["dim"], dim_head=spec["dim_head"], heads=spec["heads"], downsample_factor=spec["downsample"],
            offset_kernel_size=_offset_kernel_size(spec["downsample"]), geometry="lucidrains",
        )
    torch.manual_seed(SEED)
    if case in ("c", "e"):
        return DeformableAttention1D(
            dim=spec["dim"], dim_head=spec["dim_head"], heads=spec["heads"], downsample_factor=spec["downsample"],
            offset_kernel_size=_offset_kernel_size(spec["downsample"]),
            attention_kernel="auto" if case == "c" else "sdpa",
        )
    if case == "d":
        return FullAttention1D(dim=spec["dim"], dim_head=spec["dim_head"], heads=spec["heads"])
    raise ValueError(f"case: expected one of {sorted(CASES)}, got {case!r}")


# ---------------------------------------------------------------------------------------------
# memory


def lucidrains_peak_bytes(
    *,
    length: int,
    dim: int,
    heads: int,
    downsample: int,
    batch: int = 1,
    mode: str = "fwd+bwd",
    dtype: str = "float32",
    offset_groups: int | None = None,
) -> int:
    """Estimated peak memory of ``deformable_attention.DeformableAttention1D`` 0.0.20, in bytes.

    Its position-bias MLP runs on every (query, key) pair: with ``m = n // downsample`` keys and
    ``dim // 4`` hidden units it materialises hidden tensors of shape (batch * offset_groups, n,
    m, dim // 4). A forward without gradients holds two of them at once (a layer's input and
    output); forward + backward keeps the two ReLU outputs for the backward pass and adds two
    gradients of the same shape. The attention logits, bias, softmax and their gradients,
    (batch, heads, n, m) each, are counted three (forward) or six (forward + backward) times.
    Measured on CPU at n = 2048 with the default settings, fp32: 17.3 GB; estimate: 17.4 GB.
    Under bf16 autocast the hidden tensors are bf16 (2 bytes).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    element = 2 if dtype == "bfloat16" else 4
    groups = heads if offset_groups is None else offset_groups
    cells = length // downsample
    hidden = batch * groups * length * cells * (dim // 4) * element
    scores = batch * heads * length * cells * 4
    if mode == "fwd":
        return 2 * hidden + 3 * scores
    return 4 * hidden + 6 * scores


def memory_limit_bytes(device: str) -> int:
    """Memory a single measurement may use: the GPU's total memory, or physical RAM on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        with open("/proc/meminfo") as f:
            total_kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        return total_kib * 1024
    except (OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


class _PeakMemory:
    """Peak memory above a baseline; see the module docstring for the method on each device."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                _proc_status_bytes("VmHWM")
                self.method = "vmhwm"
            except (OSError, AttributeError):
                self.method = "ru_maxrss"

    def start(self) -> None:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif self.method == "vmhwm":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.baseline = _proc_status_bytes("VmRSS")
        else:
            import resource

            self.baseline = _proc_status_bytes("VmRSS") if os.path.exists("/proc/self/status") else (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            )

    def peak(self) -> int:
        if self.method == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        if self.method == "vmhwm":
            return _proc_status_bytes("VmHWM") - self.baseline
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return max(0, maxrss - self.baseline)


# ---------------------------------------------------------------------------------------------
# worker: one measurement in its own process


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one (case, n, mode) measurement in this process; returns the row's measured fields."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    layer = _build_layer(spec["case"], spec).to(device)
    generator = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(spec["batch"], spec["dim"], spec["n"], generator=generator).to(device)
    backward = spec["mode"] == "fwd+bwd"
    layer.train(backward)
    output_grad = torch.randn(spec["batch"], spec["dim"], spec["n"], generator=generator).to(device) if backward else None
    if backward:
        x.requires_grad_(True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bfloat16")

    def call(inputs: Tensor, grad: Tensor | None) -> None:
        if backward:
            layer.zero_grad(set_to_none=True)
            inputs.grad = None
            with autocast:
                out = layer(inputs)
            out.backward(grad.to(out.dtype))
        else:
            with torch.no_grad(), autocast:
                layer(inputs)

    # one call at a tiny length first: thread pools, kernel caches and lazy initialisation cost
    # the process a fixed amount of memory that belongs to no sequence length
    tiny = torch.randn(spec["batch"], spec["dim"], 4 * spec["downsample"], generator=generator).to(device)
    call(tiny.requires_grad_(backward), torch.ones_like(tiny) if backward else None)
    layer.zero_grad(set_to_none=True)
    del tiny

    memory = _PeakMemory(device)
    memory.start()
    times = []
    for step in range(spec["warmup"] + spec["repeats"]):
        _synchronize(device)
        start = time.perf_counter()
        call(x, output_grad)
        _synchronize(device)
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    return {
        "status": "ok",
        "reason": "",
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "peak_bytes": memory.peak(),
        "memory_method": memory.method,
        "threads": torch.get_num_threads(),
    }


def _parity(spec: dict[str, Any]) -> dict[str, Any]:
    """Max |b(x) - a(x)| of the forward outputs in fp32 at one length, same weights and input."""
    from .attention import from_lucidrains

    device = torch.device(spec["device"])
    reference = _lucidrains_module(spec).to(device)
    ours = from_lucidrains(reference)
    x = torch.randn(spec["batch"], spec["dim"], spec["n"], generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    with torch.no_grad():
        expected, actual = reference(x), ours(x)
    max_abs_diff = (actual - expected).abs().max().item()
    return {
        "status": "ok",
        "n": spec["n"],
        "dtype": "float32",
        "max_abs_diff": max_abs_diff,
        "max_abs_output": expected.abs().max().item(),
        "tolerance": PARITY_TOLERANCE,
        "passed": bool(max_abs_diff <= PARITY_TOLERANCE),
    }


def _worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = _parity(spec) if spec["case"] == "parity" else _measure(spec)
    except torch.cuda.OutOfMemoryError as error:
        result = {"status": "oom", "reason": f"CUDA out of memory: {str(error).splitlines()[0]}"}
    except RuntimeError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        status = "oom" if "out of memory" in message.lower() or "can't allocate" in message.lower() else "failed"
        result = {"status": status, "reason": f"{type(error).__name__}: {message}"}
    with open(spec["result_file"], "w") as f:
        json.dump(result, f)
    return 0


def _run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one spec in a fresh ``python -m deform_attn.bench --worker`` process; never raises
    for a failed worker, only for an interrupt."""
    with tempfile.TemporaryDirectory(prefix="deform-attn-bench-") as scratch:
        spec = {**spec, "result_file": str(Path(scratch) / "result.json")}
        command = [sys.executable, "-m", "deform_attn.bench", "--worker", json.dumps(spec)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return {"status": "timeout", "reason": f"exceeded --timeout {timeout:g} s"}
        except KeyboardInterrupt:
            process.kill()
            process.communicate()
            raise
        if process.returncode == -signal.SIGINT:
            raise KeyboardInterrupt
        if process.returncode == -signal.SIGKILL:
            return {"status": "killed", "reason": "worker killed by SIGKILL (most likely the out-of-memory killer)"}
        if process.returncode != 0 or not Path(spec["result_file"]).exists():
            tail = " | ".join(stderr.strip().splitlines()[-3:]) if stderr else ""
            return {"status": "failed", "reason": f"worker exited with code {process.returncode}: {tail}"[:500]}
        return json.loads(Path(spec["result_file"]).read_text())


# ---------------------------------------------------------------------------------------------
# results files


def read_results(out: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of ``out/results.csv`` as dicts of strings (an empty list if there is none)."""
    path = Path(out) / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``results.csv`` atomically, so that an interrupted run leaves a whole file."""
    rows = sorted(rows, key=lambda r: (str(r["case"]), int(r["n"]), MODES.index(r["mode"]), str(r["device"])))
    temporary = out / "results.csv.tmp"
    with open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, out / "results.csv")


def _row_key(row: dict[str, Any]) -> tuple[str, ...]:
    return (str(row["case"]), str(row["n"]), str(row["mode"]), *(str(row[c]) for c in SETTING_COLUMNS))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def _environment(device: str, threads: int) -> dict[str, Any]:
    from . import __version__

    environment: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "deform_attn_version": __version__,
        "git_commit": _git_commit(),
    }
    try:
        from importlib.metadata import version

        environment["deformable_attention_version"] = version("deformable-attention")
    except Exception:  # not installed
        environment["deformable_attention_version"] = None
    return environment


# ---------------------------------------------------------------------------------------------
# table and plot


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Compact text table: one line per (n, case), median time and peak memory of both modes."""
    header = f"{'n':>7}  {'case':<34} {'fwd ms':>10} {'fwd MiB':>9} {'f+b ms':>10} {'f+b MiB':>9}  note"
    lines = [header, "-" * len(header)]
    by_key = {(str(r["case"]), int(r["n"]), r["mode"]): r for r in rows}
    for n in sorted({int(r["n"]) for r in rows}):
        for case in sorted({str(r["case"]) for r in rows}):
            cells, notes = [], []
            for mode in MODES:
                row = by_key.get((case, n, mode))
                if row is None:
                    cells += ["", ""]
                    continue
                if row["status"] != "ok":
                    cells += [row["status"], ""]
                    notes.append(f"{mode}: {row['reason']}"[:70])
                    continue
                cells += [f"{1e3 * float(row['median_s']):.2f}", f"{float(row['peak_bytes']) / 2**20:.1f}"]
            if not any(cells):
                continue
            label = f"{case} {CASES.get(case, '')}"
            lines.append(
                f"{n:>7}  {label:<34} {cells[0]:>10} {cells[1]:>9} {cells[2]:>10} {cells[3]:>9}  {'; '.join(notes)}"
            )
    return "\n".join(lines)


def draw_results(rows: Sequence[dict[str, Any]], time_axis, memory_axis) -> None:
    """Draw time and peak memory against n on two matplotlib axes, log-log.

    One colour per case, solid forward + backward, dashed forward; rows whose status is not
    ``"ok"`` are left out. ``rows`` are dicts as in ``results.csv`` (strings or numbers).
    """
    rows = [r for r in rows if r["status"] == "ok"]
    colours = dict(zip(CASES, ("tab:red", "tab:blue", "tab:green", "tab:gray", "tab:olive")))
    for case, label in CASES.items():
        for mode, style in (("fwd+bwd", "-"), ("fwd", "--")):
            points = sorted((int(r["n"]), float(r["median_s"]), float(r["peak_bytes"])) for r in rows
                            if r["case"] == case and r["mode"] == mode)
            if not points:
                continue
            n, seconds, peak = zip(*points)
            kwargs = dict(color=colours[case], linestyle=style, marker="o", markersize=3)
            time_axis.plot(n, seconds, label=f"{case}: {label}, {mode}", **kwargs)
            memory_axis.plot(n, [max(p, 1.0) / 2**20 for p in peak], **kwargs)
    for axis, ylabel in ((time_axis, "median wall time (s)"), (memory_axis, "peak memory above baseline (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length n (tokens)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.set_title("time (solid: forward + backward, dashed: forward)", fontsize=10)
    memory_axis.set_title("peak memory", fontsize=10)
    if rows:
        time_axis.legend(fontsize=7)


def plot_results(out: str | os.PathLike, title: str | None = None) -> Path | None:
    """Draw ``out/results.png`` from ``out/results.csv`` with :func:`draw_results`.

    Returns the path, or None when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'deform-attn[bench]')", file=sys.stderr)
        return None
    out = Path(out)
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    draw_results(read_results(out), time_axis, memory_axis)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = out / "results.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_title(out: Path) -> str | None:
    meta_path = out / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    env, settings = meta.get("environment", {}), meta.get("settings", {})
    return (
        f"{env.get('device_name')} ({env.get('torch_threads')} threads), torch {env.get('torch_version')}, "
        f"{settings.get('dtype')}, dim {settings.get('dim')}, heads {settings.get('heads')} x "
        f"{settings.get('dim_head')}, r {settings.get('downsample')}, batch {settings.get('batch')}"
    )


# ---------------------------------------------------------------------------------------------
# command line


def parse_lengths(text: str) -> list[int]:
    """``"512,1024"`` -> ``[512, 1024]``: positive integers, sorted, duplicates removed."""
    lengths = []
    for item in text.split(","):
        item = item.strip()
        if not re.fullmatch(r"[0-9]+", item) or int(item) < 1:
            raise ValueError(f"--lengths: expected comma-separated positive integers such as 512,1024, got {text!r}")
        lengths.append(int(item))
    return sorted(set(lengths))


def _positive(kind: type, name: str, minimum: float = 1):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a {kind.__name__} >= {minimum}, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{name}: expected a {kind.__name__} >= {minimum}, got {text!r}")
        return value

    return convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deform-attn-bench",
        description="Time and peak memory of deformable attention (lucidrains' reference and deform_attn) "
        "against full attention, one fresh process per measurement.",
    )
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                        help="comma-separated sequence lengths n in tokens (default: %(default)s)")
    parser.add_argument("--cases", default="a,b,c,d",
                        help="comma-separated subset of a (deformable-attention 0.0.20), b (deform_attn, lucidrains "
                        "geometry, same weights), c (deform_attn defaults), d (full attention); default: %(default)s")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of fwd, fwd+bwd")
    parser.add_argument("--dim", type=_positive(int, "--dim", 4), default=512, help="channels (default: %(default)s)")
    parser.add_argument("--heads", type=_positive(int, "--heads"), default=8, help="heads = offset groups (default: %(default)s)")
    parser.add_argument("--dim-head", type=_positive(int, "--dim-head"), default=64, help="channels per head (default: %(default)s)")
    parser.add_argument("--downsample", type=_positive(int, "--downsample"), default=4,
                        help="downsample factor r; n // r keys are sampled (default: %(default)s)")
    parser.add_argument("--batch", type=_positive(int, "--batch"), default=1, help="batch size (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="float32, or bfloat16 under autocast with fp32 weights (default: %(default)s)")
    parser.add_argument("--repeats", type=_positive(int, "--repeats"), default=5, help="timed calls (default: %(default)s)")
    parser.add_argument("--warmup", type=_positive(int, "--warmup", 0), default=1, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--threads", type=_positive(int, "--threads"), default=None,
                        help="torch threads in each worker (default: torch's default)")
    parser.add_argument("--timeout", type=_positive(float, "--timeout", 1e-3), default=3600.0,
                        help="seconds one (case, n, mode) may take before it is recorded as timed out (default: %(default)s)")
    parser.add_argument("--memory-limit", type=_positive(float, "--memory-limit", 1e-6), default=None, metavar="GB",
                        help="skip case a where its estimated peak exceeds this many GB "
                        "(default: physical RAM, or the GPU's memory)")
    parser.add_argument("--out", default="bench-out", help="results folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="measure again rows already in results.csv")
    parser.add_argument("--note", default=None,
                        help="free text stored in meta.json as 'note' (what this run is for); kept by later runs")
    parser.add_argument("--plot-only", metavar="DIR", help="redraw DIR/results.png and print the table; measure nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        args.lengths = parse_lengths(args.lengths)
    except ValueError as error:
        parser.error(str(error))
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        parser.error(f"--cases: expected a comma-separated subset of {','.join(CASES)}, got {unknown or args.cases}")
    args.cases = sorted(set(args.cases))
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {args.modes}")
    if args.dim % args.heads:
        parser.error(f"--dim: expected a multiple of --heads ({args.heads}), since every head is an offset group; got {args.dim}")
    too_short = [n for n in args.lengths if n < args.downsample]
    if too_short:
        parser.error(f"--lengths: every n must be at least --downsample ({args.downsample}); got {too_short}")
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", args.device):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device: {args.device} requested but torch.cuda.is_available() is False")


def _settings(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    return {
        "device": args.device, "dtype": args.dtype, "dim": args.dim, "heads": args.heads, "dim_head": args.dim_head,
        "downsample": args.downsample, "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
        "threads": threads,
    }


def _run(args: argparse.Namespace, command: str) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or torch.get_num_threads()
    settings = _settings(args, threads)
    limit = int(args.memory_limit * 1e9) if args.memory_limit else memory_limit_bytes(args.device)
    lucidrains = _lucidrains_available()

    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    history = meta.get("commands", [])
    history.append(command)
    if args.note is not None:
        meta["note"] = args.note
    meta.update({
        "command": command,
        "commands": history,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(args.device, threads),
        "settings": {**settings, "lengths": args.lengths, "cases": args.cases, "modes": args.modes,
                     "timeout_s": args.timeout, "seed": SEED},
        "cases": {c: CASES[c] for c in args.cases},
        "memory_limit_bytes": limit,
        "protocol": "one fresh process per (case, n, mode); fwd under torch.no_grad(); fwd+bwd = forward + "
        "out.backward(g); median/min/max over the timed repeats after the warm-up calls; peak memory above the "
        "baseline taken after building the layer and input (see deform_attn.bench's docstring)",
    })

    # parity: b against a at the smallest length, fp32, same weights and input
    n0 = args.lengths[0]
    parity_spec = {**settings, "case": "parity", "n": n0, "mode": "fwd", "dtype": "float32"}
    parity_key = {"device": args.device, "dim": args.dim, "heads": args.heads, "dim_head": args.dim_head,
                  "downsample": args.downsample, "batch": args.batch, "n": n0}
    previous = meta.get("parity", {})
    same_layer = {k: v for k, v in previous.get("layer", {}).items() if k != "n"} == {
        k: v for k, v in parity_key.items() if k != "n"
    }
    cannot_measure = not lucidrains or lucidrains_peak_bytes(
        length=n0, dim=args.dim, heads=args.heads, downsample=args.downsample, batch=args.batch, mode="fwd"
    ) > limit
    if previous.get("status") == "ok" and same_layer and (cannot_measure or not args.force):
        pass  # measured by an earlier run into this folder with the same layer (at its smallest length)
    elif not lucidrains:
        meta["parity"] = {"status": "skipped", "reason": "deformable-attention is not installed", "n": n0}
    elif cannot_measure:
        meta["parity"] = {"status": "skipped", "reason": "case a does not fit in memory at the smallest length", "n": n0}
    else:
        meta["parity"] = {**_run_worker(parity_spec, args.timeout), "layer": parity_key}
    parity = meta["parity"]
    if parity.get("status") == "ok":
        verdict = "ok" if parity["passed"] else f"FAILED (tolerance {PARITY_TOLERANCE:g})"
        print(f"parity b vs a at n = {parity.get('n', n0)}: max |diff| = {parity['max_abs_diff']:.3g}  {verdict}", flush=True)
    else:
        print(f"parity b vs a at n = {n0}: {parity.get('status')} ({parity.get('reason')})", flush=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    rows = read_results(out)
    done = {_row_key(r) for r in rows}
    for n in args.lengths:
        for case in args.cases:
            for mode in args.modes:
                row: dict[str, Any] = {"case": case, "label": CASES[case], "n": n, "mode": mode, **settings,
                                       "estimated_bytes": "", "memory_method": "", "reason": ""}
                key = _row_key(row)
                if key in done and not args.force:
                    print(f"  {case} n={n:<6} {mode:<8} already in results.csv, skipped (use --force to redo)", flush=True)
                    continue
                if case == "a":
                    estimate = lucidrains_peak_bytes(length=n, dim=args.dim, heads=args.heads,
                                                     downsample=args.downsample, batch=args.batch, mode=mode,
                                                     dtype=args.dtype)
                    row["estimated_bytes"] = estimate
                if case == "a" and not lucidrains:
                    row.update(status="skipped", reason="deformable-attention is not installed")
                elif case == "a" and estimate > limit:
                    row.update(status="skipped", reason=f"estimated peak {estimate / 1e9:.1f} GB exceeds the "
                               f"memory limit {limit / 1e9:.1f} GB")
                else:
                    started = time.perf_counter()
                    row.update(_run_worker({**row, **settings}, args.timeout))
                    row["threads"] = threads  # the key setting, whatever the worker reports
                    print(f"  {case} n={n:<6} {mode:<8} {row['status']:<8} "
                          + (f"median {1e3 * row['median_s']:.2f} ms, peak {row['peak_bytes'] / 2**20:.1f} MiB"
                             if row["status"] == "ok" else row["reason"])
                          + f"  [{time.perf_counter() - started:.1f} s]", flush=True)
                rows = [r for r in rows if _row_key(r) != key] + [row]
                _write_results(out, rows)

    if not (out / "results.csv").exists():
        _write_results(out, rows)
    meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    plot = plot_results(out, _plot_title(out))
    print()
    print(format_table(read_results(out)))
    print(f"\nresults: {out / 'results.csv'}, {meta_path}" + (f", {plot}" if plot else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deform_attn.bench`` and ``deform-attn-bench``."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _worker(args.worker)
    if args.plot_only is not None:
        folder = Path(args.plot_only)
        if not (folder / "results.csv").exists():
            parser.error(f"--plot-only: no results.csv in {str(folder)!r}")
        plot = plot_results(folder, _plot_title(folder))
        print(format_table(read_results(folder)))
        if plot:
            print(f"\nplot: {plot}")
        return 0
    _validate(parser, args)
    if from_command_line and sys.argv[0].endswith(("bench.py", "__main__.py")):
        program = ["python", "-m", "deform_attn.bench"]
    else:
        program = ["deform-attn-bench"]
    command = shlex.join([*program, *argv])
    return _run(args, command)


if __name__ == "__main__":
    sys.exit(main())
