"""The ablation grid: presets, variants, run keys and sharding.

A run is (task, task parameters, variant, model config, train config, seed). Its key is
``task/variant/config-hash/seed``, where the hash covers everything but the seed, so a rerun with the
same settings finds the finished record and a changed setting is a new run.

Variants: the main comparison (``deformable``, ``downsampled`` = offsets off, ``full``, ``bug018``)
runs on every task; the axes sweeps vary one argument of the deformable layer at a time on the
preset's sweep tasks. The sweep's default point is the main ``deformable`` run itself (same key),
so it is trained once.

Recipe search (the ``tune`` preset): a preset with ``candidates`` trains every variant under each
candidate recipe (model and training overrides of the preset's base), on the validation fold;
with ``folds`` for a task it trains every fold of a k-fold split of the training data (for small
data sets). :mod:`deform_attn.experiments.recipes` scores the candidates and freezes the chosen
recipe per task. A preset may list any registered variant
(:data:`deform_attn.experiments.variants.ATTENTION_VARIANTS`) and any registered task
(:data:`deform_attn.experiments.tasks.TASKS`); a task without ``train`` (or ``params``) takes the
budget (or parameters) it was registered with.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from .models import ModelConfig
from .tasks import TASKS
from .train import TrainConfig
from .variants import ATTENTION_VARIANTS

__all__ = [
    "Run", "PRESETS", "MAIN_VARIANTS", "TUNED_VARIANTS", "CAUSAL_VARIANTS", "AXES", "CANDIDATES", "build_grid", "parse_shard", "shard",
    "config_hash",
]

# the published comparison, so listed here rather than derived: registering a variant must not change it
MAIN_VARIANTS: tuple[str, ...] = ("deformable", "downsampled", "full", "bug018")

# the autoregressive comparison: causal deformable, offsets off, full, and a local window
CAUSAL_VARIANTS: tuple[str, ...] = ("causal_deformable", "causal_downsampled", "causal_full", "causal_local")

# the variants whose mean validation metric scores a candidate recipe: the layer, the layer with
# its offsets off, and full attention, so that no single variant's taste picks the recipe
TUNED_VARIANTS: tuple[str, ...] = ("deformable", "downsampled", "full")

# The candidate recipes, the same four for every task: two learning rates crossed with two
# strengths of regularisation (residual dropout and weight decay), on the task's registered budget.
CANDIDATES: tuple[dict[str, Any], ...] = (
    {"name": "c0", "model": {"dropout": 0.0}, "train": {"lr": 1e-3, "weight_decay": 0.01}},
    {"name": "c1", "model": {"dropout": 0.0}, "train": {"lr": 3e-3, "weight_decay": 0.01}},
    {"name": "c2", "model": {"dropout": 0.1}, "train": {"lr": 1e-3, "weight_decay": 0.05}},
    {"name": "c3", "model": {"dropout": 0.1}, "train": {"lr": 3e-3, "weight_decay": 0.05}},
)

# axis name -> values; each value is a dict of overrides of the deformable config. position_bias
# 'none' is applied by the deformable variants' builder (it removes the bias), not by a layer flag.
AXES: dict[str, list[dict[str, Any]]] = {
    "offset_scale": [{"offset_scale": s} for s in (0.5, 1.0, 2.0, 8.0)],
    "downsample_factor": [{"downsample_factor": r} for r in (2, 8)],
    "offset_groups": [{"offset_groups": g} for g in (1, 2)],
    "position_bias": [{"position_bias": "none"}, {"cpb_log_distance": False}],
    "geometry": [{"geometry": "lucidrains"}],
}


def variant_name(attention: str, overrides: dict[str, Any]) -> str:
    """``deformable`` or e.g. ``deformable[offset_scale=2.0]``."""
    if not overrides:
        return attention
    return attention + "[" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) + "]"


@dataclass(frozen=True)
class Run:
    """One training run of the grid."""

    task: str
    task_params: tuple[tuple[str, Any], ...]
    variant: str
    overrides: tuple[tuple[str, Any], ...]
    axis: str | None
    model: ModelConfig
    train: TrainConfig
    seed: int
    candidate: str | None = None
    # the preset the run is published under (a part's name in a union preset); not in the key
    preset: str | None = field(default=None, compare=False)

    @property
    def config(self) -> dict[str, Any]:
        return {"task_params": dict(self.task_params), "model": self.model.to_dict(), "train": self.train.to_dict()}

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.variant}/{self.config_hash}/{self.seed}"


def config_hash(config: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON of ``config``."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


# Presets. 'micro*' exist for the tests (seconds); 'smoke' is the CI run; 'tune' chooses the recipes
# that 'main', 'lengths', 'compute' and 'sweeps' train with; 'cpu' is their union, everything the
# Ablations chapter shows; 'gpu' carries the length axis further on one large GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "micro_tune": {
        "threads": 1,
        "seeds": [0],
        "model": {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_ratio": 1},
        "tasks": {
            "adding": {"params": {"length": 32, "num_train": 64, "num_test": 32}, "train": {"steps": 3, "batch_size": 8, "warmup": 1}},
            "osuleaf": {"params": {}, "train": {"steps": 2, "batch_size": 4, "warmup": 1}, "folds": 2},
        },
        "variants": list(TUNED_VARIANTS),
        "candidates": list(CANDIDATES[:2]),
    },
    "micro_causal": {
        "threads": 1,
        "seeds": [0, 1],
        "model": {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_ratio": 1, "window": 4},
        "tasks": {
            "text": {"params": {"length": 24, "num_train": 64, "num_test": 4}, "train": {"steps": 3, "batch_size": 4, "warmup": 1}},
        },
        "variants": list(CAUSAL_VARIANTS),
    },
    "micro": {
        "threads": 1,
        "seeds": [0, 1],
        "model": {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_ratio": 1},
        "tasks": {
            "adding": {"params": {"length": 32, "num_train": 64, "num_test": 32}, "train": {"steps": 3, "batch_size": 8, "warmup": 1}},
        },
        "variants": ["deformable", "full", "downsampled"],
        "sweeps": {"adding": ["offset_scale"]},
        "sweep_values": {"offset_scale": [{"offset_scale": 1.0}]},
    },
    "smoke": {
        "threads": 1,
        "seeds": [0],
        "model": {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_ratio": 2},
        "tasks": {
            "adding": {"params": {"length": 64, "num_train": 256, "num_test": 128}, "train": {"steps": 20, "batch_size": 16, "warmup": 4}},
            "listops": {"params": {"min_length": 16, "max_length": 64, "num_train": 256, "num_test": 64}, "train": {"steps": 20, "batch_size": 16, "warmup": 4}},
            "mnist1d": {"params": {}, "train": {"steps": 20, "batch_size": 16, "warmup": 4}},
            "mnist1d_long": {"params": {"upsample": 2, "frame": 120}, "train": {"steps": 10, "batch_size": 16, "warmup": 2}},
            "osuleaf": {"params": {}, "train": {"steps": 5, "batch_size": 8, "warmup": 1}},
        },
        "variants": list(MAIN_VARIANTS) + ["local"],
        "sweeps": {"mnist1d": list(AXES)},
        "sweep_values": {axis: values[:1] for axis, values in AXES.items()},
    },
    # The recipe search: the base recipe of each task (a budget a 2-core CPU trains in minutes),
    # crossed with CANDIDATES, scored on validation data by the TUNED_VARIANTS. OSULeaf has 200
    # training examples, so its candidates are scored by 4-fold cross-validation. About 5
    # core-hours; run it with --jobs 2 and choose with `recipes`.
    "tune": {
        "threads": 1,
        "seeds": [0],
        "model": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_ratio": 2},
        "tasks": {
            "mnist1d": {"params": {}, "train": {"steps": 4000, "batch_size": 64, "warmup": 200}},
            "mnist1d_long": {"params": {"upsample": 4, "frame": 160},
                             "train": {"steps": 3000, "batch_size": 32, "warmup": 150}},
            "adding": {"params": {"length": 200, "num_train": 20_000, "num_test": 1000},
                       "train": {"steps": 3000, "batch_size": 32, "warmup": 150}},
            "listops": {"params": {"min_length": 64, "max_length": 192, "num_train": 20_000, "num_test": 1000},
                        "train": {"steps": 3000, "batch_size": 32, "warmup": 150}},
            "osuleaf": {"params": {}, "train": {"steps": 800, "batch_size": 16, "warmup": 40}, "folds": 4},
        },
        "variants": list(TUNED_VARIANTS),
        "candidates": list(CANDIDATES),
    },
    # The causal task's recipe search: character-level modelling of Python's help text, scored by
    # the three causal variants that mirror TUNED_VARIANTS. About 45 core-minutes.
    "tune_causal": {
        "threads": 1,
        "seeds": [0],
        "model": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_ratio": 2, "window": 16},
        "tasks": {"text": {"params": {"length": 256, "num_train": 20_000, "num_test": 160},
                           "train": {"steps": 2000, "batch_size": 32, "warmup": 100}}},
        "variants": list(CAUSAL_VARIANTS[:3]),
        "candidates": list(CANDIDATES),
    },
    # The main comparison on the frozen recipes (data/recipes.json, chosen on validation data by
    # 'tune'): every variant with 6 seeds, the <= 0.0.18 bug with 3. About 15 core-hours.
    "main": {
        "threads": 1,
        "seeds": [0, 1, 2, 3, 4, 5],
        "variant_seeds": {"bug018": [0, 1, 2]},
        "recipes": "frozen",
        "model": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_ratio": 2},
        "tasks": {"mnist1d": {}, "mnist1d_long": {}, "adding": {}, "listops": {}, "osuleaf": {}},
        "variants": list(MAIN_VARIANTS) + ["local", "mlp_only"],
    },
    # The length axis: MNIST-1D's content stretched 1x, 4x and 16x, on MNIST-1D's frozen recipe.
    "lengths": {
        "threads": 1,
        "seeds": [0, 1, 2],
        "recipes": "frozen",
        "model": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_ratio": 2},
        "tasks": {
            "mnist1d": {},
            "mnist1d_x4": {"recipe_from": "mnist1d", "params": {"upsample": 4, "frame": 160}},
            "mnist1d_x16": {"recipe_from": "mnist1d", "params": {"upsample": 16, "frame": 640}},
        },
        "variants": ["deformable", "downsampled", "full"],
    },
    # The axes of the layer, one at a time, on MNIST-1D's frozen recipe.
    "sweeps": {
        "threads": 1,
        "seeds": [0, 1, 2],
        "recipes": "frozen",
        "model": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_ratio": 2},
        "tasks": {"mnist1d": {}},
        "variants": ["deformable"],
        "sweeps": {"mnist1d": list(AXES)},
    },
    # The compute view: each variant trained for a FLOP budget, a fraction of what full attention
    # spends in its recipe's steps; a variant's steps are the budget over its own FLOPs per step
    # (warm-up scaled alike). Separate runs, not points read off a longer run's curve.
    "compute": {
        "threads": 1,
        "seeds": [0, 1, 2],
        "recipes": "frozen",
        "model": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_ratio": 2},
        "tasks": {"mnist1d": {}, "mnist1d_long": {}},
        "variants": ["deformable", "downsampled", "full"],
        "compute_budgets": [0.25, 0.5, 1.0],
        "compute_reference": "full",
    },
    # Everything the Ablations chapter shows: the union of its parts. Each run is published under
    # the first part that lists it (a run two parts share, such as MNIST-1D's deformable seeds in
    # 'main', 'lengths' and 'sweeps', trains once), and every part is read back as a view of the
    # pooled records (deform_attn.experiments.report.preset_view). About 25 core-hours.
    "cpu": {"threads": 1, "parts": ["main", "lengths", "compute", "sweeps"]},
    # The autoregressive comparison on the text task's frozen recipe (chosen by 'tune_causal').
    "causal": {
        "threads": 1,
        "seeds": [0, 1, 2, 3, 4, 5],
        "recipes": "frozen",
        "model": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_ratio": 2, "window": 16},
        "tasks": {"text": {}},
        "variants": list(CAUSAL_VARIANTS),
    },
    # The GPU setting: the length axis carried past what a 2-core CPU affords, MNIST-1D's content
    # stretched 1x, 4x, 16x and 64x (n = 40 to 2560) on MNIST-1D's frozen recipe, in bfloat16
    # autocast on CUDA: 36 runs of 4000 small steps, whose time goes mostly to kernel launches.
    # Sized for about 5 minutes on one large GPU with `--jobs 12` (worker processes sharing it);
    # `--time-limit` bounds a slower card, and the runner resumes. 'micro_gpu' below is the same
    # grid at micro scale, which the tests run on the CPU.
    "gpu": {
        "threads": 1,
        "seeds": [0, 1, 2],
        "recipes": "frozen",
        "model": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_ratio": 2},
        "tasks": {
            "mnist1d": {"train": {"amp": "bf16"}},
            "mnist1d_x4": {"recipe_from": "mnist1d", "params": {"upsample": 4, "frame": 160}, "train": {"amp": "bf16"}},
            "mnist1d_x16": {"recipe_from": "mnist1d", "params": {"upsample": 16, "frame": 640},
                            "train": {"amp": "bf16"}},
            "mnist1d_x64": {"recipe_from": "mnist1d", "params": {"upsample": 64, "frame": 2560},
                            "train": {"amp": "bf16"}},
        },
        "variants": ["deformable", "downsampled", "full"],
    },
}


# The GPU grid at micro scale (its tasks, lengths, recipes and variants; one seed, two steps of a
# small model), run by the tests on the CPU
PRESETS["micro_gpu"] = {
    **PRESETS["gpu"],
    "seeds": [0],
    "model": {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_ratio": 1},
    "tasks": {
        task: {**spec, "train": {**spec["train"], "steps": 2, "warmup": 1, "batch_size": 8, "curve_points": 1}}
        for task, spec in PRESETS["gpu"]["tasks"].items()
    },
}

def _budget_steps(
    spec: dict[str, Any], task: str, params: tuple, model: ModelConfig, train: dict[str, Any]
) -> dict[str, dict[float, tuple[int, int]]]:
    """Per variant and budget fraction: the (steps, warmup) that spend that share of the FLOP budget.

    The budget is a fraction of what ``compute_reference`` spends in the recipe's steps; each
    variant's FLOPs per step are counted once on the task's seed-0 data
    (:func:`deform_attn.experiments.train.step_flops`), so a run's key records its steps.
    """
    from .tasks import make_task
    from .train import step_flops

    data = make_task(task, dict(params), 0)
    base = TrainConfig.from_dict(train)
    per_step = {v: step_flops(data, replace(model, attention=v), base) for v in spec["variants"]}
    budget = per_step[spec["compute_reference"]] * base.steps
    plan: dict[str, dict[float, tuple[int, int]]] = {}
    for variant, flops in per_step.items():
        plan[variant] = {}
        for fraction in spec["compute_budgets"]:
            steps = max(1, round(fraction * budget / flops))
            plan[variant][fraction] = (steps, min(steps, round(base.warmup * steps / base.steps)))
    return plan


def _budgeted(budgets: dict | None, attention: str, train: TrainConfig):
    """``(budget fraction, train config)`` pairs of one variant; ``(None, train)`` without budgets."""
    if budgets is None:
        yield None, train
        return
    for fraction, (steps, warmup) in budgets[attention].items():
        yield fraction, replace(train, steps=steps, warmup=warmup)


def _frozen_recipe(preset: str, task: str, task_spec: dict[str, Any], recipes: dict[str, Any]) -> dict[str, Any]:
    """The frozen recipe a task of a ``"recipes": "frozen"`` preset trains with."""
    name = task_spec.get("recipe_from", task)
    if name not in recipes:
        raise ValueError(
            f"preset {preset!r}: no frozen recipe for task {name!r} (have: {sorted(recipes)}); choose one on "
            "validation data first: `python -m deform_attn.experiments run --preset tune` (or tune_causal), then "
            "`python -m deform_attn.experiments recipes RESULTS --write`"
        )
    return recipes[name]


def build_grid(
    preset: str,
    *,
    seeds: list[int] | None = None,
    tasks: list[str] | None = None,
    recipes: dict[str, Any] | None = None,
) -> list[Run]:
    """Every run of ``preset`` in a fixed order (task, seed, variant), without duplicates.

    Args:
        preset: a key of :data:`PRESETS`.
        seeds: replace the preset's seeds.
        tasks: restrict to these tasks (each must be in the preset).
        recipes: the frozen recipes for a ``"recipes": "frozen"`` preset (default: the package's
            ``data/recipes.json``, :func:`deform_attn.experiments.recipes.load_recipes`). Such a
            task trains with its recipe's training settings and model overrides (dropout, ...),
            and its recipe's task parameters unless the preset gives its own.
    """
    if preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    spec = PRESETS[preset]
    if "parts" in spec:
        return _union(preset, spec["parts"], seeds=seeds, tasks=tasks, recipes=recipes)
    unknown_variants = [v for v in spec["variants"] if v not in ATTENTION_VARIANTS]
    unknown_tasks = [t for t in spec["tasks"] if t not in TASKS]
    if unknown_variants or unknown_tasks:
        raise ValueError(
            f"preset {preset!r}: variants {unknown_variants} / tasks {unknown_tasks} are not registered; "
            f"expected variants from {tuple(ATTENTION_VARIANTS)} and tasks from {tuple(TASKS)}"
        )
    chosen = list(spec["tasks"])
    if tasks is not None:
        unknown = [t for t in tasks if t not in spec["tasks"]]
        if unknown:
            raise ValueError(f"--tasks: {unknown} not in preset {preset!r}; expected some of {chosen}")
        chosen = [t for t in chosen if t in tasks]
    seeds = list(spec["seeds"]) if seeds is None else seeds
    base_model = ModelConfig(**spec["model"])
    if spec.get("recipes") == "frozen" and recipes is None:
        from .recipes import load_recipes

        recipes = load_recipes()
    sweep_values = {**AXES, **spec.get("sweep_values", {})}
    candidates = spec.get("candidates", ({"name": None, "model": {}, "train": {}},))
    runs: list[Run] = []
    seen: set[str] = set()
    for task in chosen:
        task_spec, registered = spec["tasks"][task], TASKS[task]
        base_train = task_spec.get("train", registered.default_train)
        base_params = task_spec.get("params", registered.default_params)
        task_model = base_model
        if spec.get("recipes") == "frozen":
            recipe = _frozen_recipe(preset, task, task_spec, recipes)
            base_train = {**recipe["train"], **task_spec.get("train", {})}
            base_params = task_spec.get("params", recipe["task_params"])
            task_model = replace(base_model, **recipe["model"])
        params = tuple(sorted(base_params.items()))
        folds = task_spec.get("folds")
        fold_settings = [{}] if folds is None else [{"validation_folds": folds, "validation_fold": f} for f in range(folds)]
        variants: list[tuple[str, dict[str, Any], str | None]] = [(v, {}, None) for v in spec["variants"]]
        for axis in spec.get("sweeps", {}).get(task, []):
            variants += [("deformable", overrides, axis) for overrides in sweep_values[axis]]
        budgets = _budget_steps(spec, task, params, task_model, base_train) if "compute_budgets" in spec else None
        for candidate in candidates:
            for fold in fold_settings:
                train = TrainConfig.from_dict({**base_train, **candidate["train"], **fold})
                for seed in seeds:
                    for attention, overrides, axis in variants:
                        if axis is None and seed not in spec.get("variant_seeds", {}).get(attention, [seed]):
                            continue
                        model = replace(task_model, attention=attention, **candidate["model"], **overrides)
                        for budget, run_train in _budgeted(budgets, attention, train):
                            label = dict(overrides)
                            if budget is not None:
                                label["budget"] = budget
                            if candidate["name"] is not None:
                                label["candidate"] = candidate["name"]
                            if fold:
                                label["fold"] = fold["validation_fold"]
                            run = Run(task, params, variant_name(attention, label), tuple(sorted(overrides.items())),
                                      axis if budget is None else "compute", model, run_train, seed, candidate["name"],
                                      preset)
                            if run.key not in seen:
                                seen.add(run.key)
                                runs.append(run)
    return runs


def _union(
    preset: str, parts: list[str], *, seeds: list[int] | None, tasks: list[str] | None, recipes: dict[str, Any] | None
) -> list[Run]:
    """The runs of every part in turn, each once, published under the first part that lists it.

    ``tasks`` restricts every part to the tasks it has of them (and must name at least one task of
    some part); ``seeds`` replaces every part's seeds.
    """
    if tasks is not None:
        known = {task for part in parts for task in PRESETS[part]["tasks"]}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ValueError(f"--tasks: {unknown} not in preset {preset!r}; expected some of {sorted(known)}")
    runs: list[Run] = []
    seen: set[str] = set()
    for part in parts:
        chosen = None if tasks is None else [t for t in PRESETS[part]["tasks"] if t in tasks]
        if chosen == []:
            continue
        for run in build_grid(part, seeds=seeds, tasks=chosen, recipes=recipes):
            if run.key not in seen:
                seen.add(run.key)
                runs.append(run)
    return runs


_SHARD = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N (0-based, as ``$SLURM_ARRAY_TASK_ID/N`` with ``--array=0-(N-1)``)."""
    match = _SHARD.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"--shard: expected 'i/N' with integers 0 <= i < N (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard: expected 0 <= i < N and N >= 1, got {text!r}")
    return index, count


def shard(runs: list[Run], index: int, count: int) -> list[Run]:
    """Shard ``index`` of ``count``: runs whose position in key order is ``index`` modulo ``count``.

    Sorting by key makes the partition independent of the order the grid was built in; dealing the
    runs round-robin spreads the expensive tasks over the shards. The shard keeps the grid's order.
    """
    ordered = sorted(runs, key=lambda r: r.key)
    mine = {run.key for position, run in enumerate(ordered) if position % count == index}
    return [run for run in runs if run.key in mine]  # grid order, so a task's data is built once
