"""The ablation models' training step: the encoder with deformable attention against full attention.

``python -m deform_attn.bench.steps --out DIR`` builds, for every task and candidate recipe of a
preset of the ablation grid (default ``tune``, whose candidates cover every recipe the grid can
freeze), the encoder with the ``deformable`` variant and the same encoder with the ``full``
variant, on the candidate's model settings and batch size, and times one training step of each
as the runner takes it (forward, loss, backward, gradient clipping, AdamW update with the
candidate's settings; :func:`deform_attn.experiments.train.make_optimizer`) on the task's first
training batch, side by side in one
process: after ``--warmup`` untimed steps of each, ``--repeats`` rounds alternate ``--block``
consecutive timed steps of each model, so both see the same machine and each runs warm, as in
training (alternating single steps would time every step cache-cold). Writes ``results.csv`` (median, min and max seconds per
model) and ``meta.json`` (command, environment with the commit) and prints the ratio
deformable / full per task and candidate (below 1: the deformable model's step is faster).

Axis letters: b batch, n tokens.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..provenance import environment

__all__ = ["measure_pair", "main", "VARIANTS"]

VARIANTS = ("deformable", "full")


def _step_function(model: torch.nn.Module, kind: str, batch, train_config):
    """One training step of ``model`` on ``batch`` as the runner takes it, as a callable."""
    from ..experiments.train import _loss, clip_gradients, make_optimizer

    x, mask, y = batch
    optimizer = make_optimizer(model, train_config)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(kind, model(x, mask), y).backward()
        clip_gradients(model.parameters(), train_config.grad_clip)
        optimizer.step()

    return step


def measure_pair(run_by_variant: dict, *, repeats: int, warmup: int, block: int = 5) -> list[dict]:
    """Time a training step of each variant's model of one (task, candidate), alternating.

    Args:
        run_by_variant: :class:`deform_attn.experiments.grid.Run` per name in :data:`VARIANTS`,
            the same task, parameters, seed and recipe.
        repeats: timed rounds (``block`` consecutive steps of each model per round).
        warmup: untimed steps of each model first.
        block: consecutive steps of one model in a round.

    Returns:
        One row per variant: task, candidate, batch, tokens n, median/min/max seconds.
    """
    from ..experiments.tasks import make_task
    from ..experiments.train import _batch, _model_for, validation_split

    first = run_by_variant[VARIANTS[0]]
    data = make_task(first.task, dict(first.task_params), first.seed)
    train, _ = validation_split(data.train, first.train.validation_folds, first.train.validation_fold)
    index = torch.arange(min(first.train.batch_size, len(train)))
    batch = _batch(train, index, torch.device("cpu"))
    steps, times = {}, {}
    for name in VARIANTS:
        torch.manual_seed(first.seed)
        model = _model_for(data, run_by_variant[name].model).train()
        steps[name], times[name] = _step_function(model, data.kind, batch, run_by_variant[name].train), []
        for _ in range(warmup):
            steps[name]()
    for _ in range(repeats):
        for name in VARIANTS:
            for _ in range(block):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    rows = []
    for name in VARIANTS:
        rows.append({
            "task": first.task, "candidate": first.candidate or "", "variant": name,
            "batch": int(batch[0].shape[0]), "n": int(batch[0].shape[1]), "masked": batch[1] is not None,
            "median_s": statistics.median(times[name]), "min_s": min(times[name]), "max_s": max(times[name]),
            "steps": repeats * block,
        })
    return rows


def _pairs(preset: str, tasks: list[str] | None) -> list[dict]:
    """(task, candidate) -> {variant: run}, seed of the preset's first run, validation fold 0."""
    from ..experiments.grid import build_grid

    pairs: dict[tuple, dict] = {}
    for run in build_grid(preset, tasks=tasks):
        base = run.variant.split("[", 1)[0]
        if base not in VARIANTS or run.axis is not None or dict(run.overrides).get("fold", 0) != 0:
            continue
        pairs.setdefault((run.task, run.candidate, run.seed), {}).setdefault(base, run)
    first_seed = {}
    for task, candidate, seed in pairs:
        first_seed.setdefault((task, candidate), seed)
    return [runs for (task, candidate, seed), runs in pairs.items()
            if seed == first_seed[(task, candidate)] and set(runs) == set(VARIANTS)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deform_attn.bench.steps", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tune", help="ablation preset whose tasks and recipes to time (default: %(default)s)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the preset's tasks")
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds (default: %(default)s)")
    parser.add_argument("--block", type=int, default=5, help="consecutive steps of one model per round (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.block < 1:
        parser.error(f"--repeats/--warmup/--block: expected repeats >= 1, warmup >= 0, block >= 1, got "
                     f"{args.repeats}, {args.warmup}, {args.block}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    rows = []
    print(f"{'task':>13} {'candidate':>9} {'b':>3} {'n':>5} {'deformable ms':>14} {'full ms':>9} {'ratio':>6}")
    for runs in _pairs(args.preset, tasks):
        pair = measure_pair(runs, repeats=args.repeats, warmup=args.warmup, block=args.block)
        rows += pair
        deformable, full = pair
        print(f"{deformable['task']:>13} {deformable['candidate']:>9} {deformable['batch']:>3} {deformable['n']:>5} "
              f"{deformable['median_s'] * 1e3:>14.2f} {full['median_s'] * 1e3:>9.2f} "
              f"{deformable['median_s'] / full['median_s']:>6.2f}", flush=True)
    if not rows:
        parser.error(f"--preset/--tasks: no (task, candidate) with both {VARIANTS} in preset {args.preset!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    command = shlex.join(["python", "-m", "deform_attn.bench.steps", *(sys.argv[1:] if argv is None else argv)])
    meta = {"command": command, "environment": environment("cpu"), "variants": list(VARIANTS),
            "protocol": "one process; per (task, candidate) both models built from the run's seed, warm-up steps, "
                        "then rounds alternating a block of consecutive timed training steps (zero_grad, forward, "
                        "loss, backward, gradient clipping, the runner's AdamW step) of each on the task's first training batch; median per model"}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
