"""Write the header every chapter opens with: where it sits in the layer, what to read first, and
how long it runs.

    python scripts/chapter_headers.py            # rewrite the header cells
    python scripts/chapter_headers.py --check    # exit 1 if any header is out of date

The header is the Markdown cell right after a chapter's title cell and its Colab install cell
(which the book hides), marked by the cell tag ``chapter-header``. Its three lines come from data, never typed into the notebook:

- **You are here**: the layer's stages in data-flow order, the chapter's own in bold, from
  ``deform_attn.diagram`` (the introduction draws the same stages);
- **Before this chapter**: :data:`PREREQUISITES` below;
- **Run time**: the wall time of the chapter's last full execution by
  ``scripts/execute_notebooks.py``, recorded with its machine in ``notebooks/run_times.json``.

``tests/test_notebooks.py`` runs the check, so a header cannot drift from the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from deform_attn.diagram import CHAPTER_STAGES, STAGES  # noqa: E402

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
RUN_TIMES = NOTEBOOK_DIR / "run_times.json"
HEADER_TAG = "chapter-header"
HEADER_INDEX = 2  # after the title cell and the Colab install cell

# chapter -> (chapters to read first, what they give this one); 02 needs only Python and PyTorch
PREREQUISITES: dict[str, tuple[tuple[str, ...], str]] = {
    "02_grid_sampling": ((), "Python and PyTorch tensors; no earlier chapter"),
    "03_coordinates": (("02_grid_sampling",), "sampling at fractional positions"),
    "04_offsets": (("03_coordinates",), "reference points and offsets in cells"),
    "05_position_bias": (("03_coordinates",), "distances in cells"),
    "06_attention": (("02_grid_sampling", "03_coordinates", "04_offsets", "05_position_bias"), "every part of the layer"),
    "07_piecewise_kernel": (("05_position_bias", "06_attention"), "the piecewise-linear bias and the assembled layer"),
    "08_performance": (("06_attention",), "the layer; chapter 7 explains its kernel"),
    "09_ablations": (("06_attention",), "the layer and its variants"),
    "10_what_offsets_learn": (("04_offsets", "09_ablations"), "the offset network and the ablation tasks"),
    "11_causal": (("04_offsets", "06_attention"), "the offset network and the assembled layer"),
}


def chapter_number(stem: str) -> int:
    return int(stem.split("_", 1)[0])


def you_are_here(stem: str) -> str:
    """The stages in data-flow order, this chapter's in bold; 'the whole layer' when it builds none."""
    own = CHAPTER_STAGES[stem]
    if not own:
        return "the whole layer (" + " → ".join(stage.title for stage in STAGES) + ")"
    return " → ".join(f"**{stage.title}**" if stage.key in own else stage.title for stage in STAGES)


def prerequisites(stem: str) -> str:
    chapters, why = PREREQUISITES[stem]
    if not chapters:
        return why
    links = ", ".join(f"[chapter {chapter_number(c)}]({c}.ipynb)" for c in chapters)
    return f"{links} ({why})"


def run_time(stem: str, run_times: dict) -> str:
    """``about 40 s on <machine>`` from the recorded execution; rounded, since it varies run to run."""
    record = run_times["chapters"].get(stem)
    if record is None:
        raise KeyError(f"{RUN_TIMES.name}: no run time recorded for {stem}; run scripts/execute_notebooks.py")
    seconds = record["seconds"]
    shown = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    return f"about {shown} on {run_times['machine']}"


def header_source(stem: str, run_times: dict) -> str:
    return "\n".join([
        f"**You are here:** {you_are_here(stem)}  ",
        f"**Before this chapter:** {prerequisites(stem)}  ",
        f"**Run time:** {run_time(stem, run_times)}; with `DEFORM_ATTN_QUICK=1` it runs a smoke version.",
    ])


def load_run_times() -> dict:
    return json.loads(RUN_TIMES.read_text(encoding="utf-8"))


def header_problems(nb: nbformat.NotebookNode, stem: str, run_times: dict) -> list[str]:
    expected = header_source(stem, run_times)
    headers = [index for index, cell in enumerate(nb.cells) if HEADER_TAG in cell.metadata.get("tags", [])]
    if headers != [HEADER_INDEX]:
        return [f"{stem}: expected one header cell (tag {HEADER_TAG!r}) after the install cell, found at {headers}"]
    if nb.cells[HEADER_INDEX].source != expected:
        return [f"{stem}: the header is out of date; run scripts/chapter_headers.py"]
    return []


def write_header(nb: nbformat.NotebookNode, stem: str, run_times: dict) -> None:
    nb.cells = [cell for cell in nb.cells if HEADER_TAG not in cell.metadata.get("tags", [])]
    cell = nbformat.v4.new_markdown_cell(header_source(stem, run_times))
    cell.metadata["tags"] = [HEADER_TAG]
    nb.cells.insert(HEADER_INDEX, cell)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report out-of-date headers and exit 1; write nothing")
    args = parser.parse_args(argv)
    run_times = load_run_times()
    stale = []
    for path in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        found = header_problems(nb, path.stem, run_times)
        stale.extend(found)
        if found and not args.check:
            write_header(nb, path.stem, run_times)
            nbformat.write(nb, path)
            print(f"updated {path.name}")
    if args.check:
        for line in stale:
            print(line, file=sys.stderr)
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
