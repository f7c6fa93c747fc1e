"""Aggregation of result records: mean +- 95% CI over seeds, paired differences, tables, plots.

A summary row is one (preset, task, variant, config hash) with its primary metric (test accuracy, or
test MSE for regression) over the seeds: ``n``, ``mean``, ``std`` and the half-width ``ci95`` of the
t-interval ``mean +- t(0.975, n - 1) * std / sqrt(n)``. Paired differences subtract the reference
variant's metric on the same seed before averaging, which removes the seed-to-seed variation the
variants share (the same data and batch order for a given seed).

Every function takes records as :class:`deform_attn.experiments.schema.Record` or as the parsed JSON
lines (read through ``Record.from_dict``, so any supported schema works). Rows are plain dicts;
:func:`to_dataframe` turns them into a pandas DataFrame when pandas is there.
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

from ..provenance import is_dirty_commit
from .schema import Record, as_record
from .stats import t_quantile

RecordLike = Record | dict[str, Any]

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

# t(0.975, df) for df = 1..30 (standard tables); beyond, stats.t_quantile (exact to ~1e-12).
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
    return t_quantile(0.975, df)


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


def _records(records: Iterable[RecordLike]) -> list[Record]:
    return [as_record(record) for record in records]


def _group(records: list[Record]) -> dict[tuple, list[Record]]:
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for record in records:
        groups[(record.preset, record.task, record.variant, record.config_hash)].append(record)
    return dict(sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))))


def summarize(records: Iterable[RecordLike], *, metric: str | None = None) -> list[dict[str, Any]]:
    """One row per (preset, task, variant, config): the metric's mean +- 95% CI over seeds."""
    rows = []
    for (preset, task, variant, chash), group in _group(_records(records)).items():
        first = group[0]
        name = metric or first.primary_metric
        stats = mean_ci(r.metric(metric) for r in group)
        rows.append(
            {
                "preset": preset,
                "task": task,
                "variant": variant,
                "axis": first.axis,
                "metric": name,
                **stats,
                "seeds": sorted(r.seed for r in group),
                "baseline": first.baseline.get(name, math.nan),
                "params": first.params,
                "train_time_s": sum(r.train_time_s for r in group) / len(group),
                "device": first.device,
                "torch": first.torch,
                "git_commit": first.git_commit,
                "config_hash": chash,
            }
        )
    return rows


def paired_differences(
    records: Iterable[RecordLike], *, reference: str = "full", metric: str | None = None
) -> list[dict[str, Any]]:
    """Per (preset, task, variant): mean +- 95% CI of (variant - reference) over the shared seeds.

    For an accuracy a positive difference favours the variant; for an MSE a negative one does.
    """
    records = _records(records)
    reference_by = {(r.preset, r.task, r.seed): r for r in records if r.variant == reference}
    rows = []
    for (preset, task, variant, chash), group in _group(records).items():
        if variant == reference:
            continue
        pairs = [(r, reference_by[(preset, task, r.seed)]) for r in group if (preset, task, r.seed) in reference_by]
        if not pairs:
            continue
        differences = [r.metric(metric) - ref.metric(metric) for r, ref in pairs]
        rows.append(
            {
                "preset": preset,
                "task": task,
                "variant": variant,
                "reference": reference,
                "metric": metric or group[0].primary_metric,
                **mean_ci(differences),
                "seeds": sorted(r.seed for r, _ in pairs),
                "config_hash": chash,
            }
        )
    return rows


def sweep_table(
    records: Iterable[RecordLike], task: str, axis: str, *, metric: str | None = None
) -> list[dict[str, Any]]:
    """The ``axis`` sweep on ``task``: the default deformable point plus every override on that axis."""
    records = [r for r in _records(records) if r.task == task and r.attention == "deformable"]
    chosen = [r for r in records if r.axis == axis or (not r.overrides and r.variant == "deformable")]
    has_sweep = any(r.axis == axis for r in chosen)
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


def plot_task(records: Iterable[RecordLike], task: str, *, ax=None, metric: str | None = None):
    """Metric by variant on ``task``: mean with 95% CI bars, seeds as dots, trivial baseline dashed."""
    import matplotlib.pyplot as plt

    rows = [r for r in summarize([r for r in _records(records) if r.task == task], metric=metric) if r["axis"] is None]
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


def plot_sweeps(records: Iterable[RecordLike], task: str, *, metric: str | None = None):
    """One panel per swept axis on ``task``: metric (mean, 95% CI) for each value of the axis."""
    import matplotlib.pyplot as plt

    records = _records(records)
    axes_present = sorted({r.axis for r in records if r.task == task and r.axis})
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


def plot_all(records: Iterable[RecordLike], directory: str | Path) -> list[Path]:
    """Write ``<task>.png`` and ``<task>_sweeps.png`` for every task into ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _records(records)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({r.task for r in records}):
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
        (records, meta): the records as dicts of every field of :class:`Record` (fields newer than
        a record's schema hold their defaults), and ``meta.json`` (command, date, grid size, ...).
    """
    folder = _data_root().joinpath(preset)
    results = folder.joinpath("results.jsonl")
    if not results.is_file():
        raise FileNotFoundError(f"preset: no published results for {preset!r}; available: {published_presets()}")
    lines = [line for line in results.read_text().splitlines() if line.strip()]
    records = [Record.from_dict(json.loads(line)).to_dict() for line in lines]
    meta_file = folder.joinpath("meta.json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return records, meta


def publish(
    inputs: Iterable[str | Path],
    preset: str,
    *,
    command: str,
    destination: str | Path | None = None,
    allow_dirty: bool = False,
) -> Path:
    """Merge ``inputs`` into ``<destination or package data>/<preset>/results.jsonl`` and write meta.json.

    Args:
        inputs: results files (or folders of them); only records of ``preset`` are published.
        preset: the preset's name, also the folder's.
        command: the command that produced the results, stored in meta.json.
        destination: the folder that receives ``<preset>/`` (default: the package's ``data``).
        allow_dirty: also publish records whose ``git_commit`` is a modified checkout (``-dirty``)
            or unknown; by default they are refused, since no commit reproduces them.

    Raises:
        ValueError: if no record is of ``preset``, or some come from a dirty checkout and
            ``allow_dirty`` is False. Nothing is written then.
    """
    from .records import merge_records, read_records

    records = [r for r in _records(read_records(list(inputs))) if r.preset == preset]
    if not records:
        raise ValueError(f"inputs: no records of preset {preset!r}")
    dirty = sorted({str(r.git_commit) for r in records if is_dirty_commit(r.git_commit)})
    if dirty and not allow_dirty:
        count = sum(is_dirty_commit(r.git_commit) for r in records)
        raise ValueError(
            f"inputs: {count} of {len(records)} records come from a modified or unknown checkout "
            f"(git_commit {dirty}); commit, re-run and publish those, or pass --allow-dirty"
        )
    folder = Path(destination) if destination is not None else Path(__file__).resolve().parent / "data"
    folder = folder / preset
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / "results.jsonl.in"
    staging.write_text("".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in records))
    count = merge_records([staging], folder / "results.jsonl")
    staging.unlink()
    meta = {
        "preset": preset,
        "command": command,
        "records": count,
        "tasks": sorted({r.task for r in records}),
        "variants": sorted({r.variant for r in records}),
        "seeds": sorted({r.seed for r in records}),
        "devices": sorted({f"{r.device} ({r.device_name})" for r in records}),
        "torch": sorted({r.torch for r in records}),
        "git_commits": sorted({str(r.git_commit) for r in records}),
        "schemas": sorted({r.schema for r in records}),
        "total_run_wall_s": sum(r.run_wall_s for r in records),
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder
