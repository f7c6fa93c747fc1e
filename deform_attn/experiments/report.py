"""The ablations' answer, computed from records: the tables the Ablations chapter shows.

``python -m deform_attn.experiments summarize --preset P FILES`` prints these tables, and the chapter
calls the same functions on the published records, so a rerun of the grid reproduces the chapter.

* :func:`preset_view`: the records of one preset, chosen by run key from a pool (a run that two
  presets share, such as MNIST-1D's deformable seeds in ``main`` and ``lengths``, trains once and
  counts in both); :func:`missing_runs` lists the preset's runs the pool lacks.
* :func:`learned_tasks`: did the best variant reach the task's validation target under the frozen
  recipe? A task that was not learned stays out of the verdict.
* :func:`variant_table`: each variant's test metric over seeds, and its margin over the trivial
  predictor of the same seed.
* :func:`contrast_table`: paired differences of the main contrasts with t intervals, the
  hierarchical bootstrap interval and Holm-adjusted p-values over the family of learned tasks.
* :func:`verdict`: better, worse or no significant difference, after the correction.
* :func:`compute_table`: the compute-matched runs, metric against training FLOPs.

Differences are ``variant - reference`` in the metric's units (accuracy as a fraction, MSE as
is); for an accuracy a positive difference favours the variant, for an MSE a negative one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Iterable

from .schema import Record, as_record
from .stats import baseline_differences, holm, mean_t_interval, paired_comparisons

__all__ = [
    "MAIN_CONTRASTS",
    "LENGTH_CONTRASTS",
    "TARGETS",
    "Target",
    "preset_view",
    "missing_runs",
    "complete_tasks",
    "complete_groups",
    "learned_tasks",
    "variant_table",
    "contrast_table",
    "main_contrasts",
    "verdict",
    "compute_table",
    "compute_contrasts",
    "format_rows",
    "preset_tables",
    "format_tables",
]

RecordLike = Record | dict[str, Any]

# (variant, reference): does moving the samples help, what does sampling n/r keys cost against all
# n, against a local window, what does attention add over the attention-free control, and what did
# the <= 0.0.18 bug cost
MAIN_CONTRASTS: tuple[tuple[str, str], ...] = (
    ("deformable", "downsampled"),
    ("deformable", "full"),
    ("deformable", "local"),
    ("deformable", "mlp_only"),
    ("bug018", "deformable"),
)

# the length axis: the two gaps whose growth with n the chapter follows
LENGTH_CONTRASTS: tuple[tuple[str, str], ...] = (("deformable", "downsampled"), ("deformable", "full"))


@dataclass(frozen=True)
class Target:
    """A task counts as learned when its best variant's mean validation metric reaches ``value``.

    With ``above_baseline`` the target is ``value`` above the trivial predictor's metric (the
    majority class), e.g. 20 points above it for a real data set.
    """

    metric: str
    value: float
    higher_is_better: bool = True
    above_baseline: bool = False

    def threshold(self, baseline: float | None) -> float:
        if not self.above_baseline:
            return self.value
        if baseline is None or math.isnan(baseline):
            raise ValueError(f"baseline: the target {self.value:+} over the trivial predictor needs its metric")
        return baseline + (self.value if self.higher_is_better else -self.value)

    def met(self, measured: float, baseline: float | None = None) -> bool:
        limit = self.threshold(baseline)
        return measured >= limit if self.higher_is_better else measured <= limit


# The validation targets the recipe search aimed for (fixed before it ran).
TARGETS: dict[str, Target] = {
    "mnist1d": Target("validation_accuracy", 0.85),
    "mnist1d_long": Target("validation_accuracy", 0.80),
    "listops": Target("validation_accuracy", 0.36),
    "adding": Target("validation_mse", 0.01, higher_is_better=False),
    "osuleaf": Target("validation_accuracy", 0.20, above_baseline=True),
}


# ---------------------------------------------------------------------------- views of a pool


@lru_cache(maxsize=None)
def _grid(preset: str) -> tuple:
    from .grid import build_grid

    return tuple(build_grid(preset))


def preset_view(records: Iterable[RecordLike], preset: str) -> list[Record]:
    """The records of ``preset``'s grid, found by run key in ``records``, labelled ``preset``.

    A run key names the task, variant, configuration and seed, not the preset, so records
    published under one preset serve every preset whose grid holds the same run.

    Raises:
        ValueError: if two records share a key (merge the results first).
    """
    by_key: dict[str, Record] = {}
    for record in map(as_record, records):
        if record.key in by_key:
            raise ValueError(f"records: two records of run {record.key!r}; merge the results files first")
        by_key[record.key] = record
    return [replace(by_key[run.key], preset=preset) for run in _grid(preset) if run.key in by_key]


def missing_runs(records: Iterable[RecordLike], preset: str) -> list[str]:
    """The keys of ``preset``'s runs that ``records`` lack, in grid order."""
    have = {as_record(record).key for record in records}
    return [run.key for run in _grid(preset) if run.key not in have]


def complete_groups(records: Iterable[RecordLike], preset: str) -> list[Record]:
    """The records of the (task, variant) groups none of whose runs of ``preset`` is missing.

    A paired contrast taken on these never rests on part of a variant's seeds: a group whose
    last seeds are still training stays out until they are in.
    """
    records = [as_record(r) for r in records]
    # "task/variant" of every run the grid still lacks
    incomplete = {key.rsplit("/", 2)[0] for key in missing_runs(records, preset)}
    return [r for r in records if f"{r.task}/{r.variant}" not in incomplete]


def complete_tasks(records: Iterable[RecordLike], preset: str) -> list[str]:
    """The tasks of ``preset``'s grid, in grid order, whose every run ``records`` hold."""
    have = {as_record(record).key for record in records}
    tasks: dict[str, bool] = {}
    for run in _grid(preset):
        tasks[run.task] = tasks.get(run.task, True) and run.key in have
    return [task for task, complete in tasks.items() if complete]


# ---------------------------------------------------------------------------- was it learned?


def learned_tasks(recipes: dict[str, Any], baselines: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Per task of ``recipes``: the best variant's mean validation metric under the frozen recipe.

    Args:
        recipes: the frozen recipes (``recipes.load_recipes()``), each with its candidates' mean
            validation metric per tuned variant.
        baselines: per task, the trivial predictor's metric, for targets set above it (default:
            its test metric on the task's data, built for seed 0).

    Returns:
        One row per task with a target: ``task``, ``recipe``, ``metric``, ``best_variant``,
        ``best``, ``target`` (the threshold), ``learned``.
    """
    rows = []
    for task, recipe in recipes.items():
        if task not in TARGETS:
            continue
        target = TARGETS[task]
        by_variant = recipe["candidates"][recipe["candidate"]]["by_variant"]
        pick = max if target.higher_is_better else min
        best_variant = pick(by_variant, key=by_variant.get)
        baseline = (baselines or {}).get(task)
        if target.above_baseline and baseline is None:
            from .tasks import make_task

            trivial = make_task(task, recipe["task_params"], seed=0).baseline
            baseline = trivial[target.metric.replace("validation_", "test_")]
        threshold = target.threshold(baseline)
        rows.append({
            "task": task,
            "recipe": recipe["candidate"],
            "metric": target.metric,
            "best_variant": best_variant,
            "best": by_variant[best_variant],
            "target": threshold,
            "learned": target.met(by_variant[best_variant], baseline),
        })
    return rows


# ---------------------------------------------------------------------------- tables


def variant_table(records: Iterable[RecordLike]) -> list[dict[str, Any]]:
    """Per task and variant: the test metric over seeds and its margin over each seed's trivial predictor.

    Returns:
        Rows with ``task``, ``variant``, ``metric``, ``higher_is_better``, ``n``, ``mean``,
        ``low``, ``high`` (95% t interval over seeds), ``baseline`` (the trivial predictor's mean
        over the same seeds), ``margin``, ``margin_low``, ``margin_high`` (variant - baseline,
        paired seed by seed) and ``train_cpu_s`` (mean CPU seconds of training).
    """
    records = [as_record(r) for r in records]
    margins = {(row["task"], row["variant"]): row for row in baseline_differences(records)}
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:
        groups[record.task, record.variant].append(record)
    rows = []
    for (task, variant), group in groups.items():
        first = group[0]
        interval = mean_t_interval([r.metric() for r in group])
        margin = margins[task, variant]
        cpu = [r.train_cpu_s for r in group if r.train_cpu_s is not None]
        rows.append({
            "task": task,
            "variant": variant,
            "metric": first.primary_metric,
            "higher_is_better": first.higher_is_better,
            "n": len(group),
            "mean": interval["mean"],
            "low": interval["low"],
            "high": interval["high"],
            "baseline": margin["baseline_mean"],
            "margin": margin["mean"],
            "margin_low": margin["low"],
            "margin_high": margin["high"],
            "train_cpu_s": sum(cpu) / len(cpu) if cpu else math.nan,
        })
    return rows


def contrast_table(
    records: Iterable[RecordLike],
    contrasts: Iterable[tuple[str, str]] = MAIN_CONTRASTS,
    *,
    family: Iterable[str] | None = None,
    alpha: float = 0.05,
    resamples: int = 10_000,
) -> list[dict[str, Any]]:
    """The paired differences of ``contrasts`` on every task, with Holm's correction over ``family``.

    Args:
        records: one preset's records (a :func:`preset_view`).
        contrasts: (variant, reference) pairs; each is compared on the seeds both have.
        family: the tasks whose contrasts form the Holm family (default: every task); the rows of
            other tasks keep their unadjusted p and get ``in_family=False`` (e.g. a task that was
            not learned).
        alpha: the family-wise error rate.
        resamples: of the hierarchical bootstrap (seeds, then test examples).

    Returns:
        Rows with ``task``, ``variant``, ``reference``, ``metric``, ``higher_is_better``, ``n``,
        ``mean``, ``low``, ``high`` (95% t interval), ``p``, ``bootstrap_low``,
        ``bootstrap_high``, ``in_family``, ``p_holm``, ``significant`` (Holm rejects at ``alpha``,
        in the family only) and ``verdict``.
    """
    records = [as_record(r) for r in records]
    rows = []
    for variant, reference in contrasts:
        pair = [r for r in records if r.variant in (variant, reference)]
        if not any(r.variant == variant for r in pair) or not any(r.variant == reference for r in pair):
            continue
        for row in paired_comparisons(pair, reference=reference, resamples=resamples):
            if row["variant"] == variant:
                rows.append({key: row[key] for key in (
                    "task", "variant", "reference", "metric", "higher_is_better", "n", "mean", "low", "high", "p",
                    "bootstrap_low", "bootstrap_high")})
    tasks = None if family is None else set(family)
    for row in rows:
        row.update(in_family=tasks is None or row["task"] in tasks, p_holm=math.nan, significant=False)
    members = [row for row in rows if row["in_family"]]
    for row, adjusted in zip(members, holm([row["p"] for row in members], alpha=alpha)):
        row.update(p_holm=adjusted["adjusted_p"], significant=adjusted["reject"])
    for row in rows:
        row["verdict"] = verdict(row)
    return rows


def main_contrasts(
    records: Iterable[RecordLike], *, recipes: dict[str, Any] | None = None, resamples: int = 10_000, seed: int = 0
) -> list[dict[str, Any]]:
    """The main comparison's contrasts as the chapter, the README and ``summarize`` report them.

    Only the tasks whose main comparison is complete (:func:`complete_tasks`) are compared, so
    that a verdict never rests on part of a task's seeds; Holm's family is their contrasts on the
    tasks that were learned (:func:`learned_tasks` of the frozen ``recipes``, default the
    committed ones).
    """
    from .recipes import load_recipes

    records = [as_record(r) for r in records]
    complete = complete_tasks(records, "main")
    learned = {row["task"] for row in learned_tasks(load_recipes() if recipes is None else recipes) if row["learned"]}
    view = [r for r in preset_view(records, "main") if r.task in complete]
    return contrast_table(view, MAIN_CONTRASTS, family=[task for task in complete if task in learned],
                          resamples=resamples)


def verdict(row: dict[str, Any]) -> str:
    """``better``, ``worse`` (for the row's variant), ``no significant difference``, ``too few seeds``
    or ``not learned`` (outside the correction's family)."""
    if not row["in_family"]:
        return "not learned"
    if row["n"] < 2 or math.isnan(row["p"]):
        return "too few seeds"
    if not row["significant"]:
        return "no significant difference"
    return "better" if (row["mean"] > 0) == row["higher_is_better"] else "worse"


def tally(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """How a set of contrast rows came out for their first variant: ``n`` rows, ``wins`` and
    ``losses`` (significant after the correction), ``ahead`` (the mean favours it, significant or
    not)."""
    rows = list(rows)
    return {
        "n": len(rows),
        "wins": sum(row["verdict"] == "better" for row in rows),
        "losses": sum(row["verdict"] == "worse" for row in rows),
        "ahead": sum((row["mean"] > 0) == row["higher_is_better"] for row in rows),
    }


def compute_table(records: Iterable[RecordLike]) -> list[dict[str, Any]]:
    """The compute-matched runs: per task, variant and budget, the mean FLOPs and test metric.

    Returns:
        Rows with ``task``, ``variant`` (the attention), ``budget`` (fraction of the reference's
        budget), ``n``, ``train_flops`` (mean), ``steps``, ``mean``, ``low``, ``high`` (95% t
        interval over seeds), ``metric``, ``higher_is_better``.
    """
    groups: dict[tuple[str, str, float], list[Record]] = defaultdict(list)
    for record in map(as_record, records):
        budget = _budget(record.variant)
        if budget is not None:
            groups[record.task, record.attention, budget].append(record)
    rows = []
    for (task, attention, budget), group in sorted(groups.items()):
        interval = mean_t_interval([r.metric() for r in group])
        flops = [r.train_flops for r in group if r.train_flops is not None]
        rows.append({
            "task": task,
            "variant": attention,
            "budget": budget,
            "n": len(group),
            "train_flops": sum(flops) / len(flops) if flops else math.nan,
            "steps": group[0].config["train"]["steps"],
            "mean": interval["mean"],
            "low": interval["low"],
            "high": interval["high"],
            "metric": group[0].primary_metric,
            "higher_is_better": group[0].higher_is_better,
        })
    return rows


def compute_contrasts(records: Iterable[RecordLike], *, resamples: int = 10_000) -> list[dict[str, Any]]:
    """At equal training compute: deformable against each other variant, budget by budget.

    For every budget fraction b of the compute runs, ``deformable[budget=b]`` minus
    ``full[budget=b]`` and minus ``downsampled[budget=b]`` (paired by seed, as
    :func:`contrast_table`), one Holm family over every task and budget. Only the (task,
    variant) groups whose runs of the ``compute`` grid are all in ``records`` take part, so that
    no verdict rests on part of its seeds.

    Returns:
        The rows of :func:`contrast_table`, each with its ``budget`` added, ordered by task,
        reference and budget.
    """
    records = complete_groups(records, "compute")
    budgets = sorted({b for b in map(_budget, (r.variant for r in records)) if b is not None})
    references = [v for v in ("full", "downsampled") if any(r.attention == v for r in records)]
    pairs = [(f"deformable[budget={b}]", f"{reference}[budget={b}]") for reference in references for b in budgets]
    rows = contrast_table(records, pairs, resamples=resamples)
    for row in rows:
        row["budget"] = _budget(row["variant"])
        row["reference"] = row["reference"].split("[")[0]
        row["variant"] = row["variant"].split("[")[0]
    return sorted(rows, key=lambda row: (row["task"], references.index(row["reference"]), row["budget"]))


def _budget(variant: str) -> float | None:
    """The budget fraction in a variant name such as ``full[budget=0.5]``."""
    if "[" not in variant:
        return None
    for item in variant[variant.index("[") + 1 : -1].split(","):
        name, _, value = item.partition("=")
        if name == "budget":
            return float(value)
    return None


def format_rows(rows: list[dict[str, Any]], columns: Iterable[str]) -> str:
    """A fixed-width text table of ``columns`` of ``rows`` (floats to 4 significant digits)."""
    columns = list(columns)

    def text(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    cells = [[text(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def preset_tables(
    records: Iterable[RecordLike], preset: str, *, recipes: dict[str, Any] | None = None, resamples: int = 10_000
) -> dict[str, list[dict[str, Any]]]:
    """Every table of ``preset`` the chapter shows, from a pool of records.

    ``main``: ``learned`` (the recipe search's targets), ``variants``, ``contrasts``
    (:func:`main_contrasts`: the complete tasks, Holm over the learned ones); ``lengths``: ``variants``, ``contrasts`` (the length
    contrasts on every stretch, one Holm family); ``sweeps``: ``contrasts`` (each swept setting
    against the default layer, one family); ``compute``: ``compute`` and ``compute_contrasts``
    (:func:`compute_contrasts`). Every preset also gets
    ``missing``: one row per task with the number of its runs the pool lacks. A union preset
    (``cpu``) gives each part's tables under ``"part/table"``.
    """
    from .grid import PRESETS

    records = [as_record(r) for r in records]
    if "parts" in PRESETS[preset]:
        return {
            f"{part}/{name}": table
            for part in PRESETS[preset]["parts"]
            for name, table in preset_tables(records, part, recipes=recipes, resamples=resamples).items()
        }
    view = preset_view(records, preset)
    missing: dict[str, int] = defaultdict(int)
    for key in missing_runs(records, preset):
        missing[key.split("/")[0]] += 1
    tables: dict[str, list[dict[str, Any]]] = {
        "missing": [{"task": task, "missing": count} for task, count in missing.items()]
    }
    if preset == "main":
        from .recipes import load_recipes

        recipes = load_recipes() if recipes is None else recipes
        tables["learned"] = learned_tasks(recipes)
        tables["variants"] = variant_table(view)
        tables["contrasts"] = main_contrasts(view, recipes=recipes, resamples=resamples)
    elif preset == "lengths":
        tables["variants"] = variant_table(view)
        tables["contrasts"] = contrast_table(complete_groups(view, preset), LENGTH_CONTRASTS, resamples=resamples)
    elif preset == "sweeps":
        points = sorted({r.variant for r in view if r.axis is not None})
        tables["contrasts"] = contrast_table(complete_groups(view, preset), [(p, "deformable") for p in points],
                                             resamples=resamples)
    elif preset == "compute":
        # as chapter 9 draws it: the budget points whose seeds are all in
        tables["compute"] = compute_table(complete_groups(view, preset))
        tables["compute_contrasts"] = compute_contrasts(view, resamples=resamples)
    else:
        tables["variants"] = variant_table(view)
    return tables


# the columns each table prints, in order
_COLUMNS: dict[str, tuple[str, ...]] = {
    "missing": ("task", "missing"),
    "learned": ("task", "recipe", "metric", "best_variant", "best", "target", "learned"),
    "variants": ("task", "variant", "n", "mean", "low", "high", "baseline", "margin", "margin_low", "margin_high"),
    "contrasts": ("task", "variant", "reference", "n", "mean", "low", "high", "bootstrap_low", "bootstrap_high", "p",
                  "p_holm", "verdict"),
    "compute": ("task", "variant", "budget", "n", "steps", "train_flops", "mean", "low", "high"),
    "compute_contrasts": ("task", "variant", "reference", "budget", "n", "mean", "low", "high", "p", "p_holm",
                          "verdict"),
}


def format_tables(tables: dict[str, list[dict[str, Any]]]) -> str:
    """The tables of :func:`preset_tables` as text, each under its name."""
    blocks = []
    for name, rows in tables.items():
        columns = _COLUMNS[name.rsplit("/", 1)[-1]]
        blocks.append(f"== {name}\n" + (format_rows(rows, columns) if rows else "(none)"))
    return "\n\n".join(blocks)
