"""Write the README's measured numbers from the committed results, never by hand.

    python scripts/readme_results.py            # rewrite the generated blocks of README.md
    python scripts/readme_results.py --check    # exit 1 if a block is out of date

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``;
everything else in the README is prose. The blocks:

- ``performance``: the long-sequence benchmark (``deform_attn/data/bench/cpu-2core-fp32``), median
  time and peak memory of a training step per case and length, the reference parity, and the
  speed ratios against full attention;
- ``floors``: the speed and memory targets of the default layer against the committed runs of
  the fused kernel (``deform_attn/data/bench/fused-cpu-2core``, :mod:`deform_attn.bench.floors`);
- ``ablations``: the paired differences of the main comparison's published records
  (``deform_attn/experiments/data/main``), computed by :mod:`deform_attn.experiments.report` as the
  Ablations chapter computes them.

``tests/test_readme.py`` runs the check.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

README = REPO_ROOT / "README.md"
BENCH = REPO_ROOT / "deform_attn" / "data" / "bench" / "cpu-2core-fp32"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)
CASES = {
    "a": "(a) deformable-attention",
    "b": "(b) ours, lucidrains geometry",
    "c": "(c) ours, default",
    "d": "(d) full attention",
    "e": "(e) ours, SDPA kernel",
}


def _seconds(value: float) -> str:
    return f"{value:.3g} s"


def _bench_rows(folder: Path = BENCH) -> dict[tuple[str, int, str], dict]:
    with open(folder / "results.csv", newline="") as handle:
        return {(row["case"], int(row["n"]), row["mode"]): row for row in csv.DictReader(handle)}


def performance_block(folder: Path = BENCH) -> str:
    rows = _bench_rows(folder)
    meta = json.loads((folder / "meta.json").read_text())
    lengths = sorted({n for _, n, _ in rows})
    lines = ["| n | " + " | ".join(CASES.values()) + " |", "| --- |" + " --- |" * len(CASES)]
    for n in lengths:
        cells = []
        for case in CASES:
            row = rows.get((case, n, "fwd+bwd"))
            if row is None:
                cells.append("not run")
            elif row["status"] != "ok":
                cells.append("does not fit" if row["status"] == "skipped" else row["status"])
            else:
                cells.append(f"{_seconds(float(row['median_s']))} / {float(row['peak_bytes']) / 2**20:.0f} MiB")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")

    def ratio(n: int, mode: str) -> float | None:
        ours, full = rows.get(("c", n, mode)), rows.get(("d", n, mode))
        if not ours or not full or "ok" not in (ours["status"], full["status"]) or ours["status"] != full["status"]:
            return None
        return float(full["median_s"]) / float(ours["median_s"])

    parity = meta["parity"]["max_abs_diff"]
    training = [(n, ratio(n, "fwd+bwd")) for n in lengths if ratio(n, "fwd+bwd") is not None]
    forward = [(n, ratio(n, "fwd")) for n in lengths if ratio(n, "fwd") is not None]
    faster_forward = [n for n, value in forward if value > 1]
    prose = " ".join([
        f"Case (b) returns case (a)'s output to {parity:.2g} (largest absolute difference). Full attention's",
        "time over the default layer's (above 1: the default layer is faster), forward + backward: "
        + ", ".join(f"{value:.2f}× at {n}" for n, value in training) + "; forward alone: "
        + ", ".join(f"{value:.2f}× at {n}" for n, value in forward) + ".",
        "The forward pass alone is faster from n = " + (str(min(faster_forward)) if faster_forward else "—")
        + " on. Environment: " + f"{meta['environment']['cpu_model']}, {meta['environment']['torch_threads']} threads, "
        + f"torch {meta['environment']['torch_version']}, fp32, dim {meta['settings']['dim']}, "
        + f"{meta['settings']['heads']} heads × {meta['settings']['dim_head']}, r = {meta['settings']['downsample']}, "
        + f"batch {meta['settings']['batch']}.",
    ])
    return "\n".join(lines) + "\n\n" + textwrap.fill(prose, width=100) + "\n"


def ablations_block() -> str:
    """The main comparison's paired differences, computed as the Ablations chapter computes them."""
    from deform_attn.experiments import report
    from deform_attn.experiments.recipes import load_recipes
    from deform_attn.experiments.results import load_published

    published, _ = load_published("main")
    view = report.preset_view(published, "main")
    missing: dict[str, int] = {}
    for key in report.missing_runs(published, "main"):
        missing[key.split("/")[0]] = missing.get(key.split("/")[0], 0) + 1
    complete = report.complete_tasks(published, "main")
    recipes = load_recipes()
    learned = {row["task"]: row["learned"] for row in report.learned_tasks(recipes)}
    rows = report.main_contrasts(published, recipes=recipes)
    contrasts = report.MAIN_CONTRASTS
    lines = [
        "| task (metric) | " + " | ".join(f"{v} − {r}" for v, r in contrasts) + " |",
        "| --- |" + " --- |" * len(contrasts),
    ]
    for task in complete:
        first = next(r for r in view if r.task == task)
        accuracy = first.primary_metric == "test_accuracy"
        scale, fmt = (100, ".1f") if accuracy else (1, ".4f")
        cells = []
        for variant, reference in contrasts:
            row = next((r for r in rows if (r["task"], r["variant"], r["reference"]) == (task, variant, reference)), None)
            if row is None:
                cells.append("—")
                continue
            mean, low, high = (scale * row[k] for k in ("mean", "low", "high"))
            cells.append(f"{mean:+{fmt}} [{low:+{fmt}}, {high:+{fmt}}], {row['verdict']} (n = {row['n']})")
        unit = "accuracy points" if accuracy else first.primary_metric.replace("_", " ")
        status = "" if learned.get(task) else ", not learned"
        lines.append(f"| {task} ({unit}{status}) | " + " | ".join(cells) + " |")
    model = view[0].config["model"] if view else {}
    total = len(view) + sum(missing.values())
    prose = (
        f"{len(view)} of {total} runs published. Model: dim {model.get('dim')}, {model.get('depth')} blocks, "
        f"{model.get('heads')} heads × {model.get('dim_head')}. Verdicts after Holm's correction over the "
        f"{sum(row['in_family'] for row in rows)} contrasts of the learned, complete tasks. "
        + ("Still to come: " + ", ".join(f"{task} ({count} runs)" for task, count in missing.items()) + "."
           if missing else "Every run is published.")
    )
    return "\n".join(lines) + "\n\n" + textwrap.fill(prose, width=100) + "\n"


FUSED_BENCH = REPO_ROOT / "deform_attn" / "data" / "bench" / "fused-cpu-2core"


def floors_block(root: Path = FUSED_BENCH.parent) -> str:
    """Every target against each machine's committed rounds, one column per machine."""
    from deform_attn.bench.floors import check_floors, machine, result_folders

    folders = result_folders(root)
    checked = [check_floors(folder) for folder in folders]
    lines = [
        "| target | " + " | ".join(f"{machine(folder)} (`{folder.name}`)" for folder in folders) + " |",
        "| --- |" + " --- |" * len(folders),
    ]
    for items in zip(*checked):
        cells = []
        for item in items:
            values = ", ".join(f"{value:.2f}" for value in item["values"]) or "not measured"
            cells.append(f"{values}: {'met' if item['met'] else '**not met**'}")
        lines.append(f"| {items[0]['floor'].label} | " + " | ".join(cells) + " |")
    lines.append("")
    for folder, items in zip(folders, checked):
        met = sum(item["met"] for item in items)
        lines.append(f"{machine(folder)}: {met} of {len(items)} targets met in every round.  ")
    lines[-1] = lines[-1].rstrip()
    return "\n".join(lines) + "\n"


GENERATORS = {"performance": performance_block, "floors": floors_block, "ablations": ablations_block}


def render(text: str) -> str:
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise KeyError(f"README.md: unknown generated block {name!r}; known: {sorted(GENERATORS)}")
        return match.group(1) + GENERATORS[name]() + match.group(4)

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date; write nothing")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    updated = render(text)
    if args.check:
        if updated != text:
            print("README.md: generated blocks are out of date; run scripts/readme_results.py", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        README.write_text(updated, encoding="utf-8")
        print("updated README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
