"""Aggregation of result records: mean +- 95% CI over seeds, paired differences, tables, plots.

A summary row is one (preset, task, variant, config hash) with its primary metric (test accuracy, or
test MSE for regression) over the seeds: ``n``, ``mean``, ``std`` and the half-width ``ci95`` of the
t-interval ``mean +- t(0.975, n - 1) * std / sqrt(n)``. Paired differences subtract the reference
variant's metric on the same seed before averaging, which removes the seed-to-seed variation the
variants share (the same data and batch order for a given seed).

Rows are plain dicts; :func:`to_dataframe` turns them into a pandas DataFrame when pandas is there.
Published results ship in ``deform_attn/experiments/data/<preset>/`` and load with
:func:`load_published`, also from an installed package (e.g. in Colab).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "t_quantile_975",
    "mean_ci",
    "summarize",
    "paired_differences",
    "sweep_table",
    "to_dataframe",
    "format_table",
    "plot_task",
    "plot_sweeps",
    "plot_all",
    "load_published",
    "published_presets",
    "publish",
]

# t(0.975, df) for df = 1..30 (standard tables); beyond, a Cornish-Fisher expansion around the normal.
_T975 = [
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
]


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95% interval)."""
    if df < 1:
        raise ValueError(f"df: expected at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_ci(values: Iterable[float]) -> dict[str, float]:
    """``n``, ``mean``, ``std`` (sample, ddof 1) and ``ci95`` half-width; NaN spread for n < 2."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci95": math.nan}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": math.nan, "ci95": math.nan}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "std": std, "ci95": t_quantile_975(n - 1) * std / math.sqrt(n)}


def _metric(record: dict[str, Any], metric: str | None) -> float:
    return float(record["metrics"][metric or record["primary_metric"]])


def _group(records: Iterable[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record.get("preset"), record["task"], record["variant"], record["config_hash"])].append(record)
    return groups


def summarize(records: Iterable[dict[str, Any]], *, metric: str | None = None) -> list[dict[str, Any]]:
    """One row per (preset, task, variant, config): the metric's mean +- 95% CI over seeds."""
    rows = []
    for (preset, task, variant, chash), group in sorted(_group(records).items(), key=lambda kv: tuple(map(str, kv[0]))):
        first = group[0]
        stats = mean_ci(_metric(r, metric) for r in group)
        rows.append(
            {
                "preset": preset,
                "task": task,
                "variant": variant,
                "axis": first.get("axis"),
                "metric": metric or first["primary_metric"],
                **stats,
                "seeds": sorted(r["seed"] for r in group),
                "baseline": first.get("baseline", {}).get(metric or first["primary_metric"], math.nan),
                "params": first.get("params"),
                "train_time_s": sum(r["train_time_s"] for r in group) / len(group),
                "device": first.get("device"),
                "torch": first.get("torch"),
                "git_commit": first.get("git_commit"),
                "config_hash": chash,
            }
        )
    return rows


def paired_differences(
    records: Iterable[dict[str, Any]], *, reference: str = "full", metric: str | None = None
) -> list[dict[str, Any]]:
    """Per (preset, task, variant): mean +- 95% CI of (variant - reference) over the shared seeds.

    For an accuracy a positive difference favours the variant; for an MSE a negative one does.
    """
    records = list(records)
    reference_by = {
        (r.get("preset"), r["task"], r["seed"]): r for r in records if r["variant"] == reference
    }
    rows = []
    for (preset, task, variant, chash), group in sorted(_group(records).items(), key=lambda kv: tuple(map(str, kv[0]))):
        if variant == reference:
            continue
        pairs = [(r, reference_by[(preset, task, r["seed"])]) for r in group if (preset, task, r["seed"]) in reference_by]
        if not pairs:
            continue
        differences = [_metric(r, metric) - _metric(ref, metric) for r, ref in pairs]
        rows.append(
            {
                "preset": preset,
                "task": task,
                "variant": variant,
                "reference": reference,
                "metric": metric or group[0]["primary_metric"],
                **mean_ci(differences),
                "seeds": sorted(r["seed"] for r, _ in pairs),
                "config_hash": chash,
            }
        )
    return rows


def sweep_table(records: Iterable[dict[str, Any]], task: str, axis: str, *, metric: str | None = None) -> list[dict[str, Any]]:
    """The ``axis`` sweep on ``task``: the default deformable point plus every override on that axis."""
    records = [r for r in records if r["task"] == task and r.get("attention") == "deformable"]
    chosen = [r for r in records if r.get("axis") == axis or (not r.get("overrides") and r["variant"] == "deformable")]
    has_sweep = any(r.get("axis") == axis for r in chosen)
    return summarize(chosen, metric=metric) if has_sweep else []


def to_dataframe(rows: list[dict[str, Any]]):
    """``rows`` as a pandas DataFrame (requires pandas); without pandas use the rows themselves."""
    import pandas as pd

    return pd.DataFrame(rows)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of summary or difference rows (no pandas needed)."""
    if not rows:
        return "(no rows)"
    lines = [f"{'task':14s} {'variant':40s} {'metric':14s} {'n':>2s} {'mean':>9s} {'+-95% CI':>9s}"]
    for row in rows:
        label = row["variant"] + (f" - {row['reference']}" if "reference" in row else "")
        lines.append(f"{row['task']:14s} {label:40s} {row['metric']:14s} {row['n']:2d} {row['mean']:9.4f} {row['ci95']:9.4f}")
    first = rows[0]
    if "device" in first:
        lines.append(f"device {first['device']}, torch {first['torch']}, commit {first['git_commit']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def plot_task(records: Iterable[dict[str, Any]], task: str, *, ax=None, metric: str | None = None):
    """Metric by variant on ``task``: mean with 95% CI bars, seeds as dots, trivial baseline dashed."""
    import matplotlib.pyplot as plt

    rows = [r for r in summarize([r for r in records if r["task"] == task], metric=metric) if r["axis"] is None]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.45 * max(len(rows), 2) + 1))
    for i, row in enumerate(rows):
        ax.errorbar(row["mean"], i, xerr=0 if math.isnan(row["ci95"]) else row["ci95"], fmt="o", capsize=4, color="C0")
    if rows and not math.isnan(rows[0]["baseline"]):
        ax.axvline(rows[0]["baseline"], color="grey", linestyle="--", label="trivial predictor")
        ax.legend(loc="best", fontsize="small")
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows])
    name = rows[0]["metric"] if rows else (metric or "metric")
    ax.set_xlabel(f"{name.replace('_', ' ')} (mean, 95% CI, n = {rows[0]['n'] if rows else 0} seeds)")
    ax.set_title(task)
    return ax


def plot_sweeps(records: Iterable[dict[str, Any]], task: str, *, metric: str | None = None):
    """One panel per swept axis on ``task``: metric (mean, 95% CI) for each value of the axis."""
    import matplotlib.pyplot as plt

    records = list(records)
    axes_present = sorted({r["axis"] for r in records if r["task"] == task and r.get("axis")})
    if not axes_present:
        return None
    figure, panels = plt.subplots(1, len(axes_present), figsize=(3.2 * len(axes_present), 3), squeeze=False)
    for panel, axis in zip(panels[0], axes_present):
        rows = sweep_table(records, task, axis, metric=metric)
        labels = [r["variant"].replace("deformable", "").strip("[]") or "default" for r in rows]
        panel.errorbar(range(len(rows)), [r["mean"] for r in rows],
                       yerr=[0 if math.isnan(r["ci95"]) else r["ci95"] for r in rows], fmt="o", capsize=4)
        panel.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize="small")
        panel.set_title(axis)
        panel.set_ylabel(rows[0]["metric"].replace("_", " ") if rows else "")
    figure.suptitle(f"{task}: deformable attention, one argument at a time")
    figure.tight_layout()
    return figure


def plot_all(records: Iterable[dict[str, Any]], directory: str | Path) -> list[Path]:
    """Write ``<task>.png`` and ``<task>_sweeps.png`` for every task into ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({r["task"] for r in records}):
        ax = plot_task(records, task)
        ax.figure.tight_layout()
        ax.figure.savefig(directory / f"{task}.png", dpi=120)
        plt.close(ax.figure)
        written.append(directory / f"{task}.png")
        figure = plot_sweeps(records, task)
        if figure is not None:
            figure.savefig(directory / f"{task}_sweeps.png", dpi=120)
            plt.close(figure)
            written.append(directory / f"{task}_sweeps.png")
    return written


# ---------------------------------------------------------------------------- shipped results


def _data_root():
    return resources.files("deform_attn.experiments").joinpath("data")


def published_presets() -> list[str]:
    """Presets whose results ship with the package."""
    root = _data_root()
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and entry.joinpath("results.jsonl").is_file())


def load_published(preset: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The shipped records and meta of ``preset``, through importlib.resources (works when installed).

    Returns:
        (records, meta): the parsed JSON lines and ``meta.json`` (command, date, grid size, ...).
    """
    folder = _data_root().joinpath(preset)
    results = folder.joinpath("results.jsonl")
    if not results.is_file():
        raise FileNotFoundError(f"preset: no published results for {preset!r}; available: {published_presets()}")
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    meta_file = folder.joinpath("meta.json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return records, meta


def publish(inputs: Iterable[str | Path], preset: str, *, command: str, destination: str | Path | None = None) -> Path:
    """Merge ``inputs`` into ``<destination or package data>/<preset>/results.jsonl`` and write meta.json."""
    from .records import merge_records, read_records

    records = [r for r in read_records(list(inputs)) if r.get("preset") == preset]
    if not records:
        raise ValueError(f"inputs: no records of preset {preset!r}")
    folder = Path(destination) if destination is not None else Path(__file__).resolve().parent / "data"
    folder = folder / preset
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / "results.jsonl.in"
    staging.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    count = merge_records([staging], folder / "results.jsonl")
    staging.unlink()
    meta = {
        "preset": preset,
        "command": command,
        "records": count,
        "tasks": sorted({r["task"] for r in records}),
        "variants": sorted({r["variant"] for r in records}),
        "seeds": sorted({r["seed"] for r in records}),
        "devices": sorted({f"{r['device']} ({r.get('device_name')})" for r in records}),
        "torch": sorted({r["torch"] for r in records}),
        "git_commits": sorted({str(r.get("git_commit")) for r in records}),
        "total_run_wall_s": sum(r.get("run_wall_s", 0.0) for r in records),
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder
