"""The results as a text table and as a figure: time and peak memory against n, log-log.

In the figure each case has one colour; solid lines are forward + backward, dashed lines
forward. Rows whose status is not ``"ok"`` (skipped, timed out, out of memory) are left out of
the figure and named in the table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from .cases import CASES, MODES
from .store import normalize_environment, read_results

__all__ = ["format_table", "draw_results", "plot_results", "plot_title"]

_COLOURS = dict(zip(CASES, ("tab:red", "tab:blue", "tab:green", "tab:gray", "tab:olive")))


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
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


def draw_results(rows: Sequence[Mapping[str, Any]], time_axis, memory_axis) -> None:
    """Draw time and peak memory against n on two matplotlib axes, log-log.

    Args:
        rows: dicts as in ``results.csv`` (strings or numbers).
        time_axis: axis for the median wall time in seconds.
        memory_axis: axis for the peak memory above the baseline in MiB.
    """
    rows = [r for r in rows if r["status"] == "ok"]
    for case, label in CASES.items():
        for mode, style in (("fwd+bwd", "-"), ("fwd", "--")):
            points = sorted((int(r["n"]), float(r["median_s"]), float(r["peak_bytes"])) for r in rows
                            if r["case"] == case and r["mode"] == mode)
            if not points:
                continue
            n, seconds, peak = zip(*points)
            kwargs = dict(color=_COLOURS[case], linestyle=style, marker="o", markersize=3)
            time_axis.plot(n, seconds, label=f"{case}: {label}, {mode}", **kwargs)
            # a log axis cannot show 0 bytes: floor at one byte
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


def plot_title(meta: Mapping[str, Any]) -> str | None:
    """One line naming the machine, torch and the layer of a ``meta.json`` (None if it is empty).

    Reads the environment under current or old key names (see :mod:`.store`).
    """
    if not meta:
        return None
    env = normalize_environment(meta.get("environment", {}))
    settings = meta.get("settings", {})
    return (
        f"{env.get('device_name')} ({env.get('threads')} threads), torch {env.get('torch')}, "
        f"{settings.get('dtype')}, dim {settings.get('dim')}, heads {settings.get('heads')} x "
        f"{settings.get('dim_head')}, r {settings.get('downsample')}, batch {settings.get('batch')}"
    )


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
