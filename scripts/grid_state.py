"""Keep the training state of unfinished grid runs in ``grid_state/``, so the grid goes on elsewhere.

    python scripts/grid_state.py keep results/cpu/results.jsonl.checkpoints
    python scripts/grid_state.py prune          # drop the states of runs published since
    python scripts/grid_state.py --check        # exit 1 if grid_state/README.md is out of date

``keep`` copies each saved state of the folder into ``grid_state/<preset>/`` when its run belongs to
the preset's grid, is not published, trained part of its steps and names a clean commit; it
replaces an older state of the same run only by one that trained further. Both commands then drop
the kept states whose runs are published and write the generated block of ``grid_state/README.md``
(``<!-- generated: states -->`` to ``<!-- end generated -->``): the table of kept runs and, per
commit, the commands that go on from them. A state resumes only in a process of the commit it
names (:class:`deform_attn.experiments.train.Checkpoint` checks the identity), hence one worktree
per commit. ``tests/test_experiments.py`` checks the kept files and runs ``--check``.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from deform_attn.experiments import grid, results, runner  # noqa: E402
from deform_attn.provenance import is_dirty_commit  # noqa: E402

GRID_STATE = REPO_ROOT / "grid_state"
BLOCK = re.compile(r"(<!-- generated: states -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)


def published_data(preset: str) -> str | None:
    """The published results files holding runs of ``preset``'s grid, for the runner to skip."""
    keys = grid_runs(preset).keys()
    holding = [name for name in results.published_presets()
               if any(record["key"] in keys for record in results.load_published(name)[0])]
    if not holding:
        return None
    if len(holding) == 1:
        return f"deform_attn/experiments/data/{holding[0]}/results.jsonl"
    return "deform_attn/experiments/data/{" + ",".join(holding) + "}/results.jsonl"


@functools.lru_cache(maxsize=None)
def grid_runs(preset: str) -> dict:
    """The runs of ``preset``'s grid by key (building a grid takes seconds)."""
    return {run.key: run for run in grid.build_grid(preset)}


def published_keys() -> set[str]:
    return {record["key"] for preset in results.published_presets() for record in results.load_published(preset)[0]}


def read_state(path: Path) -> dict:
    """The identity and step of a saved state (the weights stay on disk)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {"identity": state["identity"], "step": int(state["step"])}


def why_not_kept(state: dict, preset: str, published: set[str]) -> str | None:
    """Why a saved state cannot go on in ``preset``'s grid from a checkout of main, or None."""
    identity = state["identity"]
    run = grid_runs(preset).get(identity["key"])
    if run is None or run.config_hash != identity["config_hash"]:
        return f"not a run of the {preset!r} grid"
    if identity["key"] in published:
        return "published"
    if is_dirty_commit(identity["git_commit"]):
        return f"trained by uncommitted code ({identity['git_commit']})"
    if not 0 < state["step"] < run.train.steps:
        return f"step {state['step']} is not part-way through {run.train.steps}"
    return None


def keep(source: Path, preset: str, root: Path = GRID_STATE, published: set[str] | None = None) -> list[str]:
    """Copy the states in ``source`` worth keeping into ``root/preset``; returns what it did, per file."""
    published = published_keys() if published is None else published
    target = root / preset
    done = []
    for path in sorted(Path(source).glob("*.pt")):
        state = read_state(path)
        reason = why_not_kept(state, preset, published)
        if reason is None:
            kept = target / runner.checkpoint_file(Path("results.jsonl"), state["identity"]["key"]).name
            kept_step = read_state(kept)["step"] if kept.exists() else -1
            if kept_step >= state["step"]:
                reason = f"the kept state trained as far or further ({kept_step})"
        if reason is not None:
            done.append(f"skipped {path.name}: {reason}")
            continue
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
        done.append(f"kept {path.name} at step {state['step']}")
    return done


def prune(root: Path = GRID_STATE, published: set[str] | None = None) -> list[str]:
    """Remove the kept states whose runs are published (and folders left empty)."""
    published = published_keys() if published is None else published
    done = []
    for path in sorted(root.glob("*/*.pt")):
        if read_state(path)["identity"]["key"] in published:
            path.unlink()
            done.append(f"removed {path.parent.name}/{path.name}: published")
    for folder in root.iterdir() if root.exists() else []:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return done


def states_block(root: Path = GRID_STATE) -> str:
    """The generated part of grid_state/README.md: the kept runs and how to go on from them."""
    kept = defaultdict(list)  # (preset, commit) -> [(key, step, steps, torch, device)]
    for path in sorted(root.glob("*/*.pt")):
        preset = path.parent.name
        state = read_state(path)
        identity = state["identity"]
        steps = grid_runs(preset)[identity["key"]].train.steps
        kept[preset, identity["git_commit"]].append(
            (identity["key"], state["step"], steps, identity["torch"], identity["device"])
        )
    if not kept:
        return "No training state is kept: any run still to train starts from its first step.\n"
    lines = [
        "| preset | run | steps trained | commit | torch | device |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (preset, commit), rows in sorted(kept.items()):
        for key, step, steps, torch_version, device in rows:
            lines.append(f"| {preset} | `{key}` | {step} of {steps} | {commit} | {torch_version} | {device} |")
    lines += ["", "## Going on", "", "From a checkout of main, whose published records the grid skips:", ""]
    for (preset, commit), rows in sorted(kept.items()):
        tasks = ",".join(sorted({key.split("/")[0] for key, *_ in rows}))
        worktree = f"../deform-attn-grid-{commit[:7]}"
        folder = f"{worktree}/results/{preset}/results.jsonl.checkpoints"
        files = " ".join(f"grid_state/{preset}/" + runner.checkpoint_file(Path("r"), key).name for key, *_ in rows)
        commands = [f"git worktree add --detach {worktree} {commit}", f"mkdir -p {folder}",
                    f"cp {files} \\", f"    {folder}/"]
        published = published_data(preset)
        if published is not None:  # the runner skips the runs already published
            commands += [f"python -m deform_attn.experiments merge {worktree}/results/{preset}/results.jsonl \\",
                         f"    {published}"]
        lines += [
            "```bash",
            *commands,
            f"cd {worktree}",
            f"PYTHONPATH=$PWD python -m deform_attn.experiments run --preset {preset} --jobs 2 \\",
            f"    --tasks {tasks} --out results/{preset}/results.jsonl",
            "```",
            "",
        ]
    lines += [
        "`PYTHONPATH` makes the worktree's package the one that trains (the commit each record names).",
        "Each run above goes on from its saved step when its worker reaches it; the rest start afresh.",
    ]
    return "\n".join(lines) + "\n"


def render(text: str, root: Path = GRID_STATE) -> str:
    match = BLOCK.search(text)
    if match is None:
        raise ValueError("grid_state/README.md has no '<!-- generated: states -->' block")
    return text[: match.start("body")] + states_block(root) + text[match.end("body") :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if grid_state/README.md is out of date")
    commands = parser.add_subparsers(dest="command")
    keep_parser = commands.add_parser("keep", help="keep the unfinished runs' states of a checkpoint folder")
    keep_parser.add_argument("source", type=Path, help="a runner's <results>.checkpoints folder")
    keep_parser.add_argument("--preset", default="cpu", help="the grid the states belong to (default: cpu)")
    commands.add_parser("prune", help="drop the states of published runs")
    args = parser.parse_args(argv)
    readme = GRID_STATE / "README.md"
    if args.check:
        if args.command is not None:
            parser.error("--check takes no command")
        current = readme.read_text()
        if render(current) != current:
            print("grid_state/README.md is out of date: run python scripts/grid_state.py prune", file=sys.stderr)
            return 1
        return 0
    if args.command == "keep":
        if not args.source.is_dir():
            parser.error(f"source: expected a folder of saved states, got {args.source}")
        for line in keep(args.source, args.preset):
            print(line)
    for line in prune():
        print(line)
    readme.write_text(render(readme.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
