"""The speed and memory floors of the default layer, checked against committed benchmark results.

``python -m deform_attn.bench.floors DIR`` reads a folder holding

* ``timeseries-r*/``: rounds of ``python -m deform_attn.bench --workload timeseries`` (cases c, d),
* ``long-r*/`` (or one ``long/``): rounds of ``python -m deform_attn.bench --workload long
  --cases c,d`` at n >= 2048,
* ``steps/``: ``python -m deform_attn.bench.steps``,

and prints every floor with the measured value, per round where there are rounds, and whether it
is met (in every round). Ratios are full attention's time over the default layer's (above 1: the
layer is faster); memory is the layer's training-step peak over full attention's; the training
step is the deformable model's time over the full-attention model's.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Floor", "FLOORS", "check_floors", "machine", "result_folders", "main"]


@dataclass(frozen=True)
class Floor:
    """One target: ``measure`` of ``workload`` at ``n`` (or ``task``) compared with ``bound``."""

    workload: str  # "timeseries", "long" or "steps"
    measure: str  # "fwd ratio", "fwd+bwd ratio", "memory", "step"
    n: int | None
    bound: float
    at_least: bool  # True: measured >= bound; False: measured <= bound
    task: str | None = None

    @property
    def label(self) -> str:
        relation = ">=" if self.at_least else "<="
        if self.workload == "steps":
            return f"ablation model's training step, {self.task} (deformable / full) {relation} {self.bound:g}"
        what = {
            "fwd ratio": "forward (full / ours)",
            "fwd+bwd ratio": "forward + backward (full / ours)",
            "memory": "training peak memory (ours / full)",
        }[self.measure]
        return f"{self.workload}, n = {self.n}: {what} {relation} {self.bound:g}"


FLOORS: tuple[Floor, ...] = (
    *(Floor("timeseries", mode, n, bound, True)
      for n, bounds in ((96, (0.8, 1.0)), (336, (1.2, 1.2)), (720, (1.5, 1.5)), (1440, (1.5, 1.5)))
      for mode, bound in zip(("fwd ratio", "fwd+bwd ratio"), bounds)),
    *(Floor("long", mode, n, bound, True) for n in (8192, 16384)
      for mode, bound in (("fwd ratio", 1.5), ("fwd+bwd ratio", 2.0))),
    *(Floor("long", "memory", n, 1.0, False) for n in (2048, 4096, 8192, 16384)),
    *(Floor("steps", "step", None, 1.25, False, task) for task in ("mnist1d", "mnist1d_long", "adding", "listops", "osuleaf")),
)


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _bench_value(rows: list[dict[str, str]], floor: Floor) -> float | None:
    def cell(case: str, mode: str) -> dict[str, str] | None:
        for row in rows:
            if row["case"] == case and int(row["n"]) == floor.n and row["mode"] == mode and row["status"] == "ok":
                return row
        return None

    if floor.measure == "memory":
        ours, full = cell("c", "fwd+bwd"), cell("d", "fwd+bwd")
        return None if ours is None or full is None else float(ours["peak_bytes"]) / float(full["peak_bytes"])
    mode = floor.measure.removesuffix(" ratio")
    ours, full = cell("c", mode), cell("d", mode)
    return None if ours is None or full is None else float(full["median_s"]) / float(ours["median_s"])


def _step_values(rows: list[dict[str, str]], task: str) -> list[float]:
    """deformable / full median step time for each candidate recipe of ``task``."""
    by_candidate: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["task"] == task:
            by_candidate.setdefault(row["candidate"], {})[row["variant"]] = float(row["median_s"])
    return [times["deformable"] / times["full"] for times in by_candidate.values() if {"deformable", "full"} <= set(times)]


def check_floors(folder: str | Path) -> list[dict]:
    """Every floor of :data:`FLOORS` with its measured values and whether it is met.

    Returns:
        One dict per floor: ``floor`` (:class:`Floor`), ``values`` (one per round of its workload,
        one per candidate recipe for a training step; empty where nothing was measured) and
        ``met`` (every value within the bound, and at least one value).
    """
    folder = Path(folder)
    rounds = sorted(folder.glob("timeseries-r*/results.csv"))
    sources = {"timeseries": [_read(path) for path in rounds]}
    # rounds of the long workload too: its resident memory moves with the C library's heap from
    # one process to the next
    long_rounds = sorted(folder.glob("long-r*/results.csv")) or sorted(folder.glob("long/results.csv"))
    sources["long"] = [_read(path) for path in long_rounds]
    steps_file = folder / "steps" / "results.csv"
    steps_rows = _read(steps_file) if steps_file.exists() else []
    checked = []
    for floor in FLOORS:
        if floor.workload == "steps":
            values = _step_values(steps_rows, floor.task)
        else:
            values = [v for v in (_bench_value(rows, floor) for rows in sources[floor.workload]) if v is not None]
        met = bool(values) and all(v >= floor.bound if floor.at_least else v <= floor.bound for v in values)
        checked.append({"floor": floor, "values": values, "met": met})
    return checked


def machine(folder: str | Path) -> str:
    """The CPU a folder's runs were measured on, from the environment in its ``meta.json`` files."""
    import json

    for meta in sorted(Path(folder).glob("*/meta.json")):
        environment = json.loads(meta.read_text()).get("environment", {})
        if environment.get("cpu_model"):
            return f"{environment['cpu_model']}, {environment.get('cpu_count')} cores"
    raise ValueError(f"folder: no meta.json with an environment under {folder}")


def result_folders(root: str | Path) -> list[Path]:
    """The folders of fused-kernel runs under ``root`` (``fused-cpu-*``), one per machine."""
    return sorted(path for path in Path(root).glob("fused-cpu-*") if path.is_dir())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deform_attn.bench.floors", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder with timeseries-r*/, long/ and steps/ results")
    args = parser.parse_args(argv)
    checked = check_floors(args.folder)
    for item in checked:
        values = ", ".join(f"{v:.2f}" for v in item["values"]) or "not measured"
        print(f"{'met  ' if item['met'] else 'UNMET'} {item['floor'].label:<46} measured {values}")
    unmet = sum(not item["met"] for item in checked)
    print(f"{len(checked) - unmet} of {len(checked)} floors met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
