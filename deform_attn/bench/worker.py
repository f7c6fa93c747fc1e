"""One measurement in a fresh process: the benchmark's protocol.

Protocol
    Every (case, n, mode) runs in a fresh worker process (``python -m deform_attn.bench --worker
    SPEC``), so the allocations of one measurement cannot raise the memory peak of another and an
    out-of-memory kill or a timeout only loses that one row. The worker builds the layer and the
    input, runs ``--warmup`` untimed calls and ``--repeats`` timed calls, more (up to
    :data:`MOST_CALLS`) until the timed calls add up to ``--min-time`` seconds; the median, minimum
    and maximum wall time of the timed calls are reported. ``fwd`` runs the forward under
    ``torch.no_grad()``; ``fwd+bwd`` runs the forward with gradients and ``out.backward(g)`` for
    a fixed random ``g`` (gradients of the parameters and of the input, reset to ``None`` before
    each call as ``zero_grad(set_to_none=True)`` does). CUDA work is synchronized before each
    clock read. ``--dtype bfloat16`` keeps fp32 weights and runs the calls under
    ``torch.autocast`` (mixed precision). Peak memory is measured as :mod:`.memory` describes.

With ``--interleave`` the times come instead from one more fresh process per (n, mode) that
builds every case and alternates their calls (:func:`measure_interleaved`), so that the ratios
between cases are measured side by side; the memory still comes from each case's own process.

A spec is a JSON object with ``case`` (a key of :data:`~.cases.CASES`, ``"parity"`` for b
against a, or ``"interleaved"`` with ``cases``, a list of keys), ``n``, ``mode``, ``device``,
``dtype``, ``dim``, ``heads``, ``dim_head``, ``downsample``, ``batch``, ``repeats``, ``warmup``,
``min_time`` (seconds, optional), ``threads`` (``None``: torch's default) and ``result_file``, where the worker writes its result as
JSON. Other keys are ignored.

Axis letters: b batch, d channels (of the layer), n tokens.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .cases import SEED, build_layer, parity
from .memory import PeakMemory

__all__ = ["measure", "measure_interleaved", "run_spec", "run_worker", "MOST_CALLS"]

# timed calls per case at most, whatever --min-time asks
MOST_CALLS = 1000


def _more_calls(spec: dict[str, Any], times: list[float]) -> bool:
    """Whether a case timed ``times`` so far needs another call: fewer than ``repeats``, or less
    than ``min_time`` seconds in all (and fewer than :data:`MOST_CALLS`)."""
    return len(times) < spec["repeats"] or (sum(times) < spec.get("min_time", 0.0) and len(times) < MOST_CALLS)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer_shape(spec: dict[str, Any]) -> dict[str, int]:
    return {name: spec[name] for name in ("dim", "dim_head", "heads", "downsample")}


def _prepare(spec: dict[str, Any], case: str):
    """Build ``case``'s layer and the input, and return a function that makes one call."""
    device = torch.device(spec["device"])
    layer = build_layer(case, **_layer_shape(spec)).to(device)
    generator = torch.Generator().manual_seed(SEED + 1)
    # shape: x and g are (b, d, n)
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

    def timed() -> float:
        _synchronize(device)
        start = time.perf_counter()
        call(x, output_grad)
        _synchronize(device)
        return time.perf_counter() - start

    return timed


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one (case, n, mode) measurement in this process, as the protocol says.

    Returns:
        The row's measured fields: ``status`` ("ok"), ``reason``, ``median_s``, ``min_s``,
        ``max_s``, ``peak_bytes``, ``memory_method`` and ``threads``.
    """
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    timed = _prepare(spec, spec["case"])
    memory = PeakMemory(device)
    memory.start()
    for _ in range(spec["warmup"]):
        timed()
    times: list[float] = []
    while _more_calls(spec, times):
        times.append(timed())
    return {
        "status": "ok",
        "reason": "",
        **_summary(times),
        "peak_bytes": memory.peak(),
        "memory_method": memory.method,
        "threads": torch.get_num_threads(),
    }


def measure_interleaved(spec: dict[str, Any]) -> dict[str, Any]:
    """Time several cases at one (n, mode) side by side in this process, calls interleaved.

    Every case of ``spec["cases"]`` is built and warmed up; then each round calls every case once,
    in an order rotated from round to round, so that a slow stretch of the machine (another
    process, a frequency change) lands on all cases alike rather than on whichever ran then. Rounds
    go on while any case needs more calls (``repeats``, ``min_time``). No memory is measured
    here: the layers share the process.

    Returns:
        ``{"status": "ok", "reason": "", "cases": {case: {"median_s", "min_s", "max_s"}}}``.
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cases = list(spec["cases"])
    timed = {case: _prepare(spec, case) for case in cases}
    for _ in range(spec["warmup"]):
        for case in cases:
            timed[case]()
    times: dict[str, list[float]] = {case: [] for case in cases}
    round_index = 0
    while any(_more_calls(spec, times[case]) for case in cases):
        shift = round_index % len(cases)
        round_index += 1
        for case in cases[shift:] + cases[:shift]:
            times[case].append(timed[case]())
    return {"status": "ok", "reason": "", "cases": {case: _summary(values) for case, values in times.items()}}


def run_spec(spec_json: str) -> int:
    """The worker process's body: run the spec, write the result (or the failure) to its file.

    An out-of-memory error or another ``RuntimeError`` becomes a result with status ``"oom"``
    or ``"failed"``, so that the parent records why the row has no numbers. Returns 0.
    """
    spec = json.loads(spec_json)
    try:
        if spec["case"] == "parity":
            result = parity(**_layer_shape(spec), batch=spec["batch"], length=spec["n"], device=spec["device"])
        elif spec["case"] == "interleaved":
            result = measure_interleaved(spec)
        else:
            result = measure(spec)
    except torch.cuda.OutOfMemoryError as error:
        result = {"status": "oom", "reason": f"CUDA out of memory: {str(error).splitlines()[0]}"}
    except RuntimeError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        status = "oom" if "out of memory" in message.lower() or "can't allocate" in message.lower() else "failed"
        result = {"status": status, "reason": f"{type(error).__name__}: {message}"}
    with open(spec["result_file"], "w") as f:
        json.dump(result, f)
    return 0


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one spec in a fresh ``python -m deform_attn.bench --worker`` process.

    Args:
        spec: the spec (see the module docstring), without ``result_file``.
        timeout: seconds before the worker is killed and the result is status ``"timeout"``.

    Returns:
        The worker's result, or a record with status ``"timeout"``, ``"killed"`` (SIGKILL, most
        likely the out-of-memory killer) or ``"failed"`` and the reason. Never raises for a failed
        worker, only for an interrupt (``KeyboardInterrupt``, the worker is killed first).
    """
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
