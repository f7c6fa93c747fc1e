"""The command line: arguments, their validation, and the run loop over (n, case, mode).

A run records the command and environment in ``meta.json``, checks the parity of **b**
against **a** at the smallest length, then measures every (n, case, mode) not already in
``results.csv`` in its own worker (:mod:`.worker`), writing the CSV after each row, and ends
with the plot and the table (:mod:`.plot`).
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cases import CASES, MODES, PARITY_TOLERANCE, SEED, lucidrains_available
from .memory import lucidrains_peak_bytes, memory_limit_bytes
from .plot import format_table, plot_results, plot_title
from .store import environment, read_meta, read_results, row_key, write_meta, write_results
from .worker import run_spec, run_worker

__all__ = ["DEFAULT_LENGTHS", "DTYPES", "parse_lengths", "main"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_LENGTHS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384, 32768)
_PROTOCOL = (
    "one fresh process per (case, n, mode); fwd under torch.no_grad(); fwd+bwd = forward + out.backward(g); "
    "median/min/max over the timed repeats after the warm-up calls (at least --repeats, more until the case's "
    "timed calls add up to --min-time seconds); peak memory above the baseline taken after "
    "building the layer and input (see deform_attn.bench.worker and deform_attn.bench.memory)"
)
_INTERLEAVED = (
    "; times (median/min/max) from one more fresh process per (n, mode) that builds every case and calls them "
    "in turn, the order rotated each round (timing = interleaved; solo_median_s is the case's own process)"
)


def parse_lengths(text: str) -> list[int]:
    """``"512,1024"`` -> ``[512, 1024]``: positive integers, sorted, duplicates removed."""
    lengths = []
    for item in text.split(","):
        item = item.strip()
        if not re.fullmatch(r"[0-9]+", item) or int(item) < 1:
            raise ValueError(f"--lengths: expected comma-separated positive integers such as 512,1024, got {text!r}")
        lengths.append(int(item))
    return sorted(set(lengths))


def _positive(kind: type, name: str, minimum: float = 1) -> Callable[[str], Any]:
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a {kind.__name__} >= {minimum}, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{name}: expected a {kind.__name__} >= {minimum}, got {text!r}")
        return value

    return convert


# Named settings: 'long' is one long sequence at dim 512 (the committed results); 'timeseries' is
# where most users of 1D deformable attention work, batches of shorter series at width 128; 'gpu'
# is the long workload in bfloat16 on a GPU up to n = 65536, against full attention's fused
# kernel, without the reference (case a) whose memory grows with n^2. Flags given on the command
# line override a workload's values. The timeseries workload's calls take 5-20 ms at n = 96: five
# of them left its rounds' ratios 30% apart, so it times each case for at least two seconds.
WORKLOADS: dict[str, dict[str, Any]] = {
    "long": {"lengths": ",".join(map(str, DEFAULT_LENGTHS)), "dim": 512, "heads": 8, "dim_head": 64, "batch": 1,
             "cases": "a,b,c,d", "dtype": "float32", "interleave": True, "min_time": 0.0},
    "timeseries": {"lengths": "96,192,336,720,1440", "dim": 128, "heads": 4, "dim_head": 32, "batch": 32,
                   "cases": "c,d", "dtype": "float32", "interleave": True, "min_time": 2.0},
    "gpu": {"lengths": "1024,4096,16384,65536", "dim": 512, "heads": 8, "dim_head": 64, "batch": 1,
            "cases": "c,d,e", "dtype": "bfloat16", "interleave": True, "min_time": 0.0},
}


def apply_workload(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every size the command line left unset from ``args.workload``'s settings."""
    for name, value in WORKLOADS[args.workload].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deform-attn-bench",
        description="Time and peak memory of deformable attention (lucidrains' reference and deform_attn) "
        "against full attention, one fresh process per measurement.",
    )
    parser.add_argument("--workload", default="long", choices=sorted(WORKLOADS),
                        help="named sizes: long (batch 1, dim 512, 8 x 64, n 512-32768), timeseries (batch 32, "
                        "dim 128, 4 x 32, n 96-1440) or gpu (long in bfloat16 up to n = 65536); flags below "
                        "override them (default: %(default)s)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated sequence lengths n in tokens (default: the workload's)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated subset of a (deformable-attention 0.0.20), b (deform_attn, lucidrains "
                        "geometry, same weights), c (deform_attn defaults), d (full attention), e (c on the SDPA "
                        "kernel); default: the workload's")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of fwd, fwd+bwd")
    parser.add_argument("--dim", type=_positive(int, "--dim", 4), default=None, help="channels (default: the workload's)")
    parser.add_argument("--heads", type=_positive(int, "--heads"), default=None,
                        help="heads = offset groups (default: the workload's)")
    parser.add_argument("--dim-head", type=_positive(int, "--dim-head"), default=None,
                        help="channels per head (default: the workload's)")
    parser.add_argument("--downsample", type=_positive(int, "--downsample"), default=4,
                        help="downsample factor r; n // r keys are sampled (default: %(default)s)")
    parser.add_argument("--batch", type=_positive(int, "--batch"), default=None, help="batch size (default: the workload's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="float32, or bfloat16 under autocast with fp32 weights (default: the workload's)")
    parser.add_argument("--repeats", type=_positive(int, "--repeats"), default=5, help="timed calls (default: %(default)s)")
    parser.add_argument("--min-time", type=_positive(float, "--min-time", 0), default=None, metavar="SECONDS",
                        help="keep timing (beyond --repeats, up to 1000 calls) until each case's timed calls add up "
                        "to this many seconds (default: the workload's: 2 for timeseries, 0 otherwise)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="time the cases side by side, calls alternated in one more process per (n, mode); "
                        "memory still from each case's own process (default: the workload's, on)")
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
        "min_time": args.min_time, "threads": threads,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _check_parity(meta: dict[str, Any], args: argparse.Namespace, settings: dict[str, Any], limit: int) -> None:
    """Set ``meta["parity"]``: b against a at the smallest length, fp32, same weights and input.

    A parity that an earlier run into this folder measured for the same layer is kept, unless
    ``--force`` asks again and case a fits.
    """
    n0 = args.lengths[0]
    layer = {"device": args.device, "dim": args.dim, "heads": args.heads, "dim_head": args.dim_head,
             "downsample": args.downsample, "batch": args.batch, "n": n0}
    previous = meta.get("parity", {})
    # the earlier parity may be at another smallest length: the layer is what must match
    same_layer = {k: v for k, v in previous.get("layer", {}).items() if k != "n"} == {
        k: v for k, v in layer.items() if k != "n"
    }
    installed = lucidrains_available()
    cannot_measure = not installed or lucidrains_peak_bytes(
        length=n0, dim=args.dim, heads=args.heads, downsample=args.downsample, batch=args.batch, mode="fwd"
    ) > limit
    if previous.get("status") == "ok" and same_layer and (cannot_measure or not args.force):
        pass
    elif not installed:
        meta["parity"] = {"status": "skipped", "reason": "deformable-attention is not installed", "n": n0}
    elif cannot_measure:
        meta["parity"] = {"status": "skipped", "reason": "case a does not fit in memory at the smallest length", "n": n0}
    else:
        spec = {**settings, "case": "parity", "n": n0, "mode": "fwd", "dtype": "float32"}
        meta["parity"] = {**run_worker(spec, args.timeout), "layer": layer}
    parity = meta["parity"]
    if parity.get("status") == "ok":
        verdict = "ok" if parity["passed"] else f"FAILED (tolerance {PARITY_TOLERANCE:g})"
        print(f"parity b vs a at n = {parity.get('n', n0)}: max |diff| = {parity['max_abs_diff']:.3g}  {verdict}", flush=True)
    else:
        print(f"parity b vs a at n = {n0}: {parity.get('status')} ({parity.get('reason')})", flush=True)


def _measure_rows(out: Path, args: argparse.Namespace, settings: dict[str, Any], limit: int) -> None:
    """Measure every (n, case, mode) not yet in ``results.csv``, rewriting the CSV after each."""
    installed = lucidrains_available()
    threads = settings["threads"]
    rows = read_results(out)
    done = {row_key(r) for r in rows}
    for n in args.lengths:
        fresh: set[tuple[str, str]] = set()  # (case, mode) measured by this run at this length
        for case in args.cases:
            for mode in args.modes:
                row: dict[str, Any] = {"case": case, "label": CASES[case], "n": n, "mode": mode, **settings,
                                       "estimated_bytes": "", "memory_method": "", "reason": ""}
                key = row_key(row)
                if key in done and not args.force:
                    print(f"  {case} n={n:<6} {mode:<8} already in results.csv, skipped (use --force to redo)", flush=True)
                    continue
                if case == "a":
                    estimate = lucidrains_peak_bytes(length=n, dim=args.dim, heads=args.heads,
                                                     downsample=args.downsample, batch=args.batch, mode=mode,
                                                     dtype=args.dtype)
                    row["estimated_bytes"] = estimate
                if case == "a" and not installed:
                    row.update(status="skipped", reason="deformable-attention is not installed")
                elif case == "a" and estimate > limit:
                    row.update(status="skipped", reason=f"estimated peak {estimate / 1e9:.1f} GB exceeds the "
                               f"memory limit {limit / 1e9:.1f} GB")
                else:
                    started = time.perf_counter()
                    row.update(run_worker({**row, **settings}, args.timeout), timing="solo", solo_median_s="")
                    fresh.add((case, mode))
                    row["threads"] = threads  # the key setting, whatever the worker reports
                    print(f"  {case} n={n:<6} {mode:<8} {row['status']:<8} "
                          + (f"median {1e3 * row['median_s']:.2f} ms, peak {row['peak_bytes'] / 2**20:.1f} MiB"
                             if row["status"] == "ok" else row["reason"])
                          + f"  [{time.perf_counter() - started:.1f} s]", flush=True)
                rows = [r for r in rows if row_key(r) != key] + [row]
                write_results(out, rows)
        if args.interleave:
            rows = _interleave(out, rows, n, fresh, args, settings)
    if not (out / "results.csv").exists():
        write_results(out, rows)


def _interleave(out: Path, rows: list[dict[str, Any]], n: int, fresh: set[tuple[str, str]],
                args: argparse.Namespace, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Replace the times of length ``n``'s rows by side-by-side ones, one interleaved process per mode.

    The cases of a mode that this run measured (``fresh``) and that ran ("ok") take part; rows of
    an earlier run are left as they are, and a mode with fewer than two such cases keeps its times.
    """
    for mode in args.modes:
        current = {str(r["case"]): r for r in rows if int(r["n"]) == n and r["mode"] == mode
                   and row_key(r) == row_key({**r, **settings, "n": n, "mode": mode})}
        cases = [c for c in args.cases if (c, mode) in fresh and c in current and current[c]["status"] == "ok"]
        if len(cases) < 2:
            continue
        started = time.perf_counter()
        result = run_worker({**settings, "case": "interleaved", "cases": cases, "n": n, "mode": mode}, args.timeout)
        if result["status"] != "ok":
            print(f"  interleaved n={n:<6} {mode:<8} {result['status']}: {result['reason']}", flush=True)
            continue
        for case in cases:
            row = current[case]
            row.update(result["cases"][case], timing="interleaved", solo_median_s=row["median_s"])
        print(f"  interleaved n={n:<6} {mode:<8} "
              + ", ".join(f"{c} {1e3 * float(current[c]['median_s']):.2f} ms" for c in cases)
              + f"  [{time.perf_counter() - started:.1f} s]", flush=True)
        write_results(out, rows)
    return rows


def _run(args: argparse.Namespace, command: str) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or torch.get_num_threads()
    settings = _settings(args, threads)
    limit = int(args.memory_limit * 1e9) if args.memory_limit else memory_limit_bytes(args.device)

    meta = read_meta(out)
    history = meta.get("commands", [])
    history.append(command)
    if args.note is not None:
        meta["note"] = args.note
    meta.update({
        "command": command,
        "commands": history,
        "started": _now(),
        "environment": environment(args.device, threads),
        "settings": {**settings, "lengths": args.lengths, "cases": args.cases, "modes": args.modes,
                     "timeout_s": args.timeout, "seed": SEED},
        "cases": {c: CASES[c] for c in args.cases},
        "memory_limit_bytes": limit,
        "protocol": _PROTOCOL + (_INTERLEAVED if args.interleave else ""),
    })
    _check_parity(meta, args, settings, limit)
    meta_path = write_meta(out, meta)

    _measure_rows(out, args, settings, limit)

    meta["finished"] = _now()
    write_meta(out, meta)
    plot = plot_results(out, plot_title(meta))
    print()
    print(format_table(read_results(out)))
    print(f"\nresults: {out / 'results.csv'}, {meta_path}" + (f", {plot}" if plot else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deform_attn.bench`` and ``deform-attn-bench``.

    Args:
        argv: the arguments (without the program name); ``None`` reads ``sys.argv``.

    Returns:
        The exit status, 0; bad arguments exit with status 2 and a message naming the argument.
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = apply_workload(parser.parse_args(argv))
    if args.worker is not None:
        return run_spec(args.worker)
    if args.plot_only is not None:
        folder = Path(args.plot_only)
        if not (folder / "results.csv").exists():
            parser.error(f"--plot-only: no results.csv in {str(folder)!r}")
        plot = plot_results(folder, plot_title(read_meta(folder)))
        print(format_table(read_results(folder)))
        if plot:
            print(f"\nplot: {plot}")
        return 0
    _validate(parser, args)
    # record the command as the user would retype it
    if from_command_line and sys.argv[0].endswith("__main__.py"):
        program = ["python", "-m", "deform_attn.bench"]
    else:
        program = ["deform-attn-bench"]
    command = shlex.join([*program, *argv])
    return _run(args, command)
