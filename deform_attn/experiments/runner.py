"""The ablation runner: ``python -m deform_attn.experiments``.

Commands::

    run        train the grid of a preset (resumable, shardable), one JSON line per finished run; the
               run in progress saves its training state every minute, so a killed run goes on
    list       print the runs of a preset (or of one shard) without training
    merge      merge result files (e.g. one per shard) into one, dropping duplicates
    summarize  mean +- 95% CI per task and variant, paired differences, optional plots; with
               --preset, the tables the Ablations chapter shows (deform_attn.experiments.report)
    publish    copy merged results and a meta.json into the package's data/<preset>/ (records from a
               modified checkout are refused unless --allow-dirty)

Examples::

    python -m deform_attn.experiments run --preset smoke
    python -m deform_attn.experiments run --preset cpu --jobs 2
    python -m deform_attn.experiments run --preset gpu --jobs 12 --time-limit 240
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..provenance import git_commit  # re-exported: runner.git_commit was public before provenance

__all__ = ["main", "run_grid", "check_resumable", "checkpoint_folder", "checkpoint_file", "git_commit"]

DEFAULT_RESULTS_DIR = Path("results")


def check_resumable(output: Path) -> list[dict[str, Any]]:
    """The records already in ``output`` (none if it does not exist), if a run may append to it.

    Raises:
        ValueError: if ``output`` holds records of an older schema: their keys can name runs that
            now build a different model (see :mod:`deform_attn.experiments.schema`), so resuming
            would skip runs that were never trained with this code.
    """
    from .records import read_records
    from .schema import SCHEMA_VERSION

    existing = read_records(output, warn=False) if output.exists() else []
    outdated = sum(record.get("schema") != SCHEMA_VERSION for record in existing)
    if outdated:
        raise ValueError(
            f"--out: {output} holds {outdated} records of an older schema, whose keys may name runs that "
            f"now build a different model; write schema-{SCHEMA_VERSION} results to a new file"
        )
    return existing


def checkpoint_folder(output: Path) -> Path:
    """Where the runs of results file ``output`` keep their training state while they train."""
    output = Path(output)
    return output.with_name(output.name + ".checkpoints")


def checkpoint_file(output: Path, key: str) -> Path:
    """The training-state file of the run ``key`` writing into ``output``."""
    return checkpoint_folder(output) / (re.sub(r"[^A-Za-z0-9._=-]+", "_", key) + ".pt")


def _default_output(preset: str, shard_spec: str | None) -> Path:
    name = "results.jsonl" if shard_spec is None else "results-shard{}of{}.jsonl".format(*shard_spec.split("/"))
    return DEFAULT_RESULTS_DIR / preset / name


def run_grid(
    preset: str,
    output: Path,
    *,
    shard_spec: str | None = None,
    seeds: list[int] | None = None,
    tasks: list[str] | None = None,
    device: str = "auto",
    progress: bool = True,
    command: str | None = None,
    time_limit: float | None = None,
    checkpoint_every: float | None = 60.0,
) -> dict[str, int]:
    """Train every unfinished run of ``preset`` (this shard's part) and append one record per run.

    Args:
        preset, shard_spec, seeds, tasks: which runs (see :func:`deform_attn.experiments.grid.build_grid`).
        output: the results file; runs whose key it already holds are skipped (resume). It must
            hold records of the current schema only: older records share keys with runs whose
            models have changed since (see :mod:`deform_attn.experiments.schema`).
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:i]"``.
        progress: show a progress bar.
        command: the command line stored in every record.
        time_limit: seconds after which no further run starts (a run in progress finishes);
            the runs left are counted in ``left`` and a later call resumes with them.
        checkpoint_every: wall seconds between saves of the training state of the run in
            progress, in :func:`checkpoint_folder` (``None``: no saves). A run killed part-way
            goes on from its last save in the next call, if that call has the same commit, torch
            and device (such runs are trained first), and ends as it would have uninterrupted;
            its record's ``run_wall_s``, ``run_cpu_s``, ``train_time_s`` and ``train_cpu_s`` add
            the time the earlier processes spent up to that save. The file is removed once the
            record is written.

    Returns:
        Counts: ``grid``, ``skipped``, ``trained``, ``left`` and ``non_finite`` runs.
    """
    from ..provenance import environment as provenance_environment
    from .grid import build_grid, parse_shard, shard
    from .records import append_record
    from .schema import ENVIRONMENT_FIELDS, SCHEMA_VERSION, Record
    from .tasks import make_task
    from .train import Checkpoint, primary_metric, resolve_device, train_and_evaluate

    runs = build_grid(preset, seeds=seeds, tasks=tasks)
    if shard_spec is not None:
        runs = shard(runs, *parse_shard(shard_spec))
    target = resolve_device(device)
    done = {record["key"] for record in check_resumable(output) if "key" in record}
    todo = [run for run in runs if run.key not in done]
    if checkpoint_every is not None:  # runs stopped part-way go on first, so their saved steps are not left waiting
        todo.sort(key=lambda run: not checkpoint_file(output, run.key).is_file())
    provenance = provenance_environment(target)
    environment = {name: provenance[name] for name in ENVIRONMENT_FIELDS}
    iterator: Any = todo
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(todo, desc=f"{preset}{'' if shard_spec is None else ' shard ' + shard_spec}", unit="run")
    cache_key, data = None, None
    failed = trained = 0
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    for run in iterator:
        if deadline is not None and time.perf_counter() >= deadline:
            break
        if progress:
            iterator.set_postfix_str(f"{run.task} {run.variant} seed {run.seed}")
        if cache_key != (run.task, run.task_params, run.seed):
            cache_key, data = (run.task, run.task_params, run.seed), None
            data = make_task(run.task, dict(run.task_params), run.seed)
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        checkpoint = None
        if checkpoint_every is not None:
            identity = {"key": run.key, "config_hash": run.config_hash, "git_commit": environment["git_commit"],
                        "torch": environment["torch"], "device": str(target)}
            checkpoint = Checkpoint(checkpoint_file(output, run.key), checkpoint_every, identity)
        result = train_and_evaluate(data, run.model, run.train, seed=run.seed, device=target, progress=False,
                                    checkpoint=checkpoint)
        primary, higher_is_better = primary_metric(data.kind)
        record = Record(
            schema=SCHEMA_VERSION,
            key=run.key,
            preset=run.preset or preset,
            task=run.task,
            task_kind=data.kind,
            variant=run.variant,
            attention=run.model.attention,
            axis=run.axis,
            overrides=dict(run.overrides),
            config_hash=run.config_hash,
            config=run.config,
            seed=run.seed,
            shard=shard_spec,
            command=command,
            candidate=run.candidate,
            primary_metric=primary,
            higher_is_better=higher_is_better,
            metrics=result["metrics"],
            validation_metrics=result["validation"],
            learning_curve=result["learning_curve"],
            test_outcomes=result["test_outcomes"],
            finite=result["finite"],
            baseline=data.baseline,
            reference=data.reference,
            sequence_length=data.max_length,
            num_train=result["num_train"],
            num_validation=result["num_validation"],
            num_test=len(data.test),
            params=result["params"],
            train_time_s=result["train_time_s"],
            train_cpu_s=result["train_cpu_s"],
            train_flops=result["train_flops"],
            eval_time_s=result["eval_time_s"],
            run_wall_s=result["earlier_wall_s"] + time.perf_counter() - wall_start,
            run_cpu_s=result["earlier_cpu_s"] + time.process_time() - cpu_start,
            amp=result["amp_used"],
            **environment,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        failed += not result["finite"]
        trained += 1
        append_record(output, record.to_dict())
        if checkpoint is not None:
            checkpoint.path.unlink(missing_ok=True)
    return {"grid": len(runs), "skipped": len(runs) - len(todo), "trained": trained, "left": len(todo) - trained,
            "non_finite": failed}


def _run_jobs(args: argparse.Namespace, output: Path) -> int:
    """``--jobs J``: J worker processes, shard j/J each, one torch thread each, one shared output file."""
    workers = []
    for j in range(args.jobs):
        command = [sys.executable, "-m", "deform_attn.experiments", "run", "--preset", args.preset,
                   "--shard", f"{j}/{args.jobs}", "--out", str(output), "--device", args.device, "--threads", "1"]
        if args.seeds is not None:
            command += ["--seeds", *map(str, args.seeds)]
        if args.tasks is not None:
            command += ["--tasks", *args.tasks]
        if args.time_limit is not None:
            command += ["--time-limit", str(args.time_limit)]
        if args.no_checkpoints:
            command.append("--no-checkpoints")
        else:
            command += ["--checkpoint-every", str(args.checkpoint_every)]
        if j > 0 or args.quiet:
            command.append("--quiet")
        workers.append(subprocess.Popen(command))
    codes = [worker.wait() for worker in workers]
    return max(codes)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from .grid import PRESETS

    parser = argparse.ArgumentParser(prog="python -m deform_attn.experiments", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_grid_arguments(sub):
        sub.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
        sub.add_argument("--shard", default=None, help="i/N: run only shard i (0-based) of N")
        sub.add_argument("--seeds", type=int, nargs="+", default=None, help="replace the preset's seeds")
        sub.add_argument("--tasks", nargs="+", default=None, help="restrict to these tasks")

    run = commands.add_parser("run", help="train the grid (resumable)")
    add_grid_arguments(run)
    run.add_argument("--out", type=Path, default=None, help="results JSONL (default results/<preset>/results[-shard].jsonl)")
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 thread each) on this machine")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                     help="start no run after SECONDS (runs in progress finish; a later call resumes)")
    run.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                     help="save the training state of the run in progress every SECONDS of wall time, next to "
                          "--out; a run killed part-way goes on from there in the next call (default: %(default)s)")
    run.add_argument("--no-checkpoints", action="store_true", help="save no training state (a killed run starts over)")

    listing = commands.add_parser("list", help="print the runs without training")
    add_grid_arguments(listing)

    merge = commands.add_parser("merge", help="merge result files, dropping duplicates")
    merge.add_argument("output", type=Path)
    merge.add_argument("inputs", type=Path, nargs="+")

    summarize = commands.add_parser("summarize", help="tables (and plots) of result files")
    summarize.add_argument("inputs", type=Path, nargs="+")
    summarize.add_argument("--preset", default=None,
                           help="print the tables the Ablations chapter shows for this preset (cpu: all of them)")
    summarize.add_argument("--reference", default="full", help="variant the paired differences are taken against")
    summarize.add_argument("--plots", type=Path, default=None, help="write one PNG per task and per sweep here")

    recipes = commands.add_parser("recipes", help="score the tune preset's candidates; --write freezes the best per task")
    recipes.add_argument("inputs", type=Path, nargs="+", help="tuning results files or folders")
    recipes.add_argument("--write", type=Path, nargs="?", const="package", default=None,
                         help="freeze the chosen recipes (default path: the package's data/recipes.json)")
    recipes.add_argument("--allow-dirty", action="store_true", help="use records from a modified checkout too")

    publish = commands.add_parser("publish", help="ship results inside the package as data/<preset>/")
    publish.add_argument("--preset", required=True)
    publish.add_argument("--command", dest="recorded_command", required=True, help="the command that produced the results")
    publish.add_argument("--allow-dirty", action="store_true",
                         help="publish records from a modified (or unknown) checkout too")
    publish.add_argument("--destination", type=Path, default=None,
                         help="folder to publish into (default: the package's experiments/data)")
    publish.add_argument("inputs", type=Path, nargs="+")

    args = parser.parse_args(argv)
    try:
        if getattr(args, "preset", None) is not None and args.preset not in PRESETS:
            raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {args.preset!r}")
        if getattr(args, "shard", None) is not None:
            from .grid import parse_shard

            parse_shard(args.shard)
        if args.command == "run":
            if args.jobs < 1:
                raise ValueError(f"--jobs: expected a positive integer, got {args.jobs}")
            if args.jobs > 1 and args.shard is not None:
                raise ValueError("--jobs and --shard: give one of them (--jobs deals shards to local workers)")
            if args.threads is not None and args.threads < 1:
                raise ValueError(f"--threads: expected a positive integer, got {args.threads}")
            if args.time_limit is not None and not args.time_limit > 0:
                raise ValueError(f"--time-limit: expected a positive number of seconds, got {args.time_limit}")
            if not args.checkpoint_every > 0:
                raise ValueError(
                    f"--checkpoint-every: expected a positive number of seconds, got {args.checkpoint_every}"
                )
            from .train import resolve_device

            resolve_device(args.device)
            args.out = args.out or _default_output(args.preset, args.shard)
            check_resumable(args.out)
        if getattr(args, "tasks", None) is not None:
            from .grid import build_grid

            build_grid(args.preset, tasks=args.tasks)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.command == "list":
        from .grid import build_grid, parse_shard, shard

        runs = build_grid(args.preset, seeds=args.seeds, tasks=args.tasks)
        if args.shard:
            runs = shard(runs, *parse_shard(args.shard))
        for run in runs:
            print(run.key)
        print(f"{len(runs)} runs", file=sys.stderr)
        return 0
    if args.command == "run":
        output = args.out
        if args.jobs > 1:
            start = time.perf_counter()
            code = _run_jobs(args, output)
            print(f"{args.preset}: {args.jobs} workers finished in {time.perf_counter() - start:.0f} s -> {output}")
            return code
        from .grid import PRESETS

        threads = args.threads if args.threads is not None else PRESETS[args.preset].get("threads")
        if threads is not None:  # small models gain nothing from intra-op threads; they only contend
            import torch

            torch.set_num_threads(threads)
        start = time.perf_counter()
        command = shlex.join(["python", "-m", "deform_attn.experiments", *(sys.argv[1:] if argv is None else argv)])
        counts = run_grid(args.preset, output, shard_spec=args.shard, seeds=args.seeds, tasks=args.tasks,
                          device=args.device, progress=not args.quiet, command=command, time_limit=args.time_limit,
                          checkpoint_every=None if args.no_checkpoints else args.checkpoint_every)
        print(f"{args.preset}: {counts} in {time.perf_counter() - start:.0f} s -> {output}")
        return 1 if counts["non_finite"] else 0
    if args.command == "merge":
        from .records import merge_records

        print(f"{merge_records(args.inputs, args.output)} records -> {args.output}")
        return 0
    if args.command == "summarize":
        from .records import read_records
        from .results import format_table, paired_differences, plot_all, summarize

        records = read_records(args.inputs)
        if args.preset is not None:
            from .report import format_tables, preset_tables

            print(format_tables(preset_tables(records, args.preset)))
            return 0
        print(format_table(summarize(records)))
        print()
        print(format_table(paired_differences(records, reference=args.reference)))
        if args.plots is not None:
            for path in plot_all(records, args.plots):
                print(path)
        return 0
    if args.command == "recipes":
        from .recipes import RECIPES_FILE, choose_recipes, write_recipes
        from .records import read_records

        # every task is scored by the variants its tuning preset trained
        chosen = choose_recipes(read_records(args.inputs), allow_dirty=args.allow_dirty)
        for task, recipe in chosen.items():
            print(f"{task}: {recipe['candidate']} ({recipe['metric']} {recipe['score']:.4f})")
            for name, entry in recipe["candidates"].items():
                by_variant = ", ".join(f"{v} {m:.4f}" for v, m in entry["by_variant"].items())
                score = "incomplete" if entry["score"] is None else f"{entry['score']:.4f}"
                print(f"    {name}: {score}  [{by_variant}]")
        if args.write is not None:
            path = RECIPES_FILE if str(args.write) == "package" else args.write
            command = shlex.join(["python", "-m", "deform_attn.experiments", *(sys.argv[1:] if argv is None else argv)])
            print(write_recipes(chosen, path, command=command))
        return 0
    if args.command == "publish":
        from .results import publish

        try:
            folder = publish(args.inputs, args.preset, command=args.recorded_command,
                             destination=args.destination, allow_dirty=args.allow_dirty)
        except ValueError as error:
            print(f"publish: {error}", file=sys.stderr)
            return 2
        print(folder)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
