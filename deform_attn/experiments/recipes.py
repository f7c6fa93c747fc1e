"""Choosing each task's training recipe on validation data, and freezing it.

The ``tune`` preset trains every variant of :data:`deform_attn.experiments.grid.TUNED_VARIANTS`
under every candidate recipe of :data:`deform_attn.experiments.grid.CANDIDATES` (the same
number for every task), on a validation fold carved from the training split, or on every fold
of a k-fold split for small data sets. Here a candidate's **score** is the mean, over those
variants, of each variant's final validation metric (averaged over folds and seeds), so no single
variant's taste picks the recipe; the best score wins (highest accuracy, lowest MSE). The test
split plays no part.

:func:`choose_recipes` turns tuning records into one recipe per task, with every candidate's
score kept for audit; :func:`write_recipes` freezes them in a JSON file (the package ships
``data/recipes.json``) and :func:`load_recipes` reads them back for the main grid.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from ..provenance import is_dirty_commit
from .schema import Record, as_record

__all__ = ["candidate_scores", "choose_recipes", "write_recipes", "load_recipes", "RECIPES_FILE"]

RECIPES_FILE = Path(__file__).resolve().parent / "data" / "recipes.json"


def _validation_metric(record: Record) -> tuple[str, bool]:
    """The validation metric a record is scored by, and whether higher is better."""
    metric, higher = {
        "regression": ("validation_mse", False),
        "language_model": ("validation_bits_per_char", False),
    }.get(record.task_kind, ("validation_accuracy", True))
    return metric, higher


def candidate_scores(records: Iterable[Record | dict[str, Any]], variants: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per task and candidate: each variant's mean validation metric and the candidate's score.

    Args:
        records: tuning records (records without a candidate are ignored).
        variants: the variants whose mean scores a candidate; a candidate missing any of them
            gets no score (``None``) and ``complete=False``.

    Returns:
        ``{task: {candidate: {"metric", "higher_is_better", "by_variant": {variant: mean},
        "runs": n, "score", "complete"}}}``.
    """
    variants = tuple(variants)
    values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    direction: dict[str, tuple[str, bool]] = {}
    for record in map(as_record, records):
        if record.candidate is None or not record.validation_metrics:
            continue
        metric, higher = _validation_metric(record)
        direction[record.task] = (metric, higher)
        values[(record.task, record.candidate)][record.attention].append(float(record.validation_metrics[metric]))
    table: dict[str, dict[str, Any]] = defaultdict(dict)
    for (task, candidate), by_attention in sorted(values.items()):
        metric, higher = direction[task]
        means = {variant: sum(v) / len(v) for variant, v in sorted(by_attention.items()) if variant in variants}
        complete = all(variant in means for variant in variants)
        score = sum(means[v] for v in variants) / len(variants) if complete else None
        if score is not None and not math.isfinite(score):
            score = None
        table[task][candidate] = {
            "metric": metric,
            "higher_is_better": higher,
            "by_variant": means,
            "runs": sum(len(v) for v in by_attention.values()),
            "score": score,
            "complete": complete,
        }
    return dict(table)


def choose_recipes(
    records: Iterable[Record | dict[str, Any]],
    *,
    variants: Iterable[str] | None = None,
    candidates: Iterable[str] | None = None,
    allow_dirty: bool = False,
) -> dict[str, dict[str, Any]]:
    """The best-scoring complete candidate of every task, with its recipe and all the scores.

    Args:
        records: the tuning records.
        variants: the variants whose mean validation metric scores a candidate; ``None``: every
            variant found in a task's tuning records (the tuning preset's variants).
        candidates: the candidate names every task must have finished before one is chosen
            (default: the candidates of the preset that trained the task's records), so that a
            task whose search is under way is not decided on part of it.
        allow_dirty: also use records from a modified or unknown checkout.

    Returns:
        ``{task: {"candidate", "model": ModelConfig fields, "train": TrainConfig fields,
        "task_params", "score", "metric", "higher_is_better", "candidates": <candidate_scores>,
        "git_commits"}}`` for every task with at least one complete candidate.

    Raises:
        ValueError: for dirty records without ``allow_dirty``, or when no task has a complete
            candidate.
    """
    records = [as_record(r) for r in records]
    tuning = [r for r in records if r.candidate is not None]
    dirty = sorted({str(r.git_commit) for r in tuning if is_dirty_commit(r.git_commit)})
    if dirty and not allow_dirty:
        raise ValueError(f"records: {len(dirty)} commit(s) are modified or unknown ({dirty}); pass allow_dirty=True")
    chosen: dict[str, dict[str, Any]] = {}
    for task in sorted({r.task for r in tuning}):
        task_records = [r for r in tuning if r.task == task]
        required = set(candidates) if candidates is not None else _preset_candidates(task_records)
        task_variants = tuple(variants) if variants is not None else tuple(sorted({r.attention for r in task_records}))
        by_candidate = candidate_scores(task_records, task_variants).get(task, {})
        complete = {name: entry for name, entry in by_candidate.items() if entry["complete"] and entry["score"] is not None}
        if not required <= set(complete):  # the search of this task is not finished
            continue
        higher = next(iter(complete.values()))["higher_is_better"]
        best = (max if higher else min)(complete, key=lambda name: complete[name]["score"])
        example = next(r for r in task_records if r.candidate == best and r.attention == task_variants[0])
        model = {key: value for key, value in example.config["model"].items() if key != "attention"}
        train = dict(example.config["train"])
        train.pop("validation_fold", None)  # the main runs keep the default fold
        train.pop("validation_folds", None)
        chosen[task] = {
            "candidate": best,
            "score": complete[best]["score"],
            "metric": complete[best]["metric"],
            "higher_is_better": higher,
            "task_params": example.config["task_params"],
            "model": model,
            "train": train,
            "candidates": by_candidate,
            "variants": list(task_variants),
            "git_commits": sorted({str(r.git_commit) for r in tuning if r.task == task}),
        }
    if not chosen:
        raise ValueError("records: no task has every candidate finished with every scored variant")
    return chosen


def _preset_candidates(records: list[Record]) -> set[str]:
    """The candidate names of the preset(s) that trained ``records``."""
    from .grid import PRESETS

    names: set[str] = set()
    for preset in {r.preset for r in records}:
        if preset not in PRESETS or "candidates" not in PRESETS[preset]:
            raise ValueError(f"records: preset {preset!r} defines no candidates; pass candidates=")
        names |= {candidate["name"] for candidate in PRESETS[preset]["candidates"]}
    return names


def write_recipes(recipes: dict[str, dict[str, Any]], path: str | os.PathLike = RECIPES_FILE, *, command: str) -> Path:
    """Freeze ``recipes`` in ``path`` (JSON, replaced atomically), with the command that chose them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"command": command, "chosen_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tasks": recipes}
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(staging, path)
    return path


def load_recipes(path: str | os.PathLike = RECIPES_FILE) -> dict[str, dict[str, Any]]:
    """The frozen recipes per task (``{}`` when none have been chosen yet)."""
    path = Path(path)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["tasks"]
