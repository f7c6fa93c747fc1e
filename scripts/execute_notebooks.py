"""Re-execute notebooks in place, top to bottom, so their committed outputs match the package.

    python scripts/execute_notebooks.py                      # notebooks/ and book/ (the introduction)
    python scripts/execute_notebooks.py notebooks/02_grid_sampling.ipynb
    python scripts/execute_notebooks.py --quick              # DEFORM_ATTN_QUICK=1 (smoke run)

Each notebook runs in a fresh ``python3`` kernel of the interpreter running this script, with its
own folder as the working directory and ``DEFORM_ATTN_QUICK=0`` unless ``--quick`` is given. After
the run, execution timestamps and other volatile metadata are stripped, so re-running an unchanged
notebook on the same machine gives the same file except for timings the notebook itself prints.
A notebook that raises stops the script with a non-zero exit status and is left unchanged on disk.

A full run (without ``--quick``) records each chapter's wall time, with the machine, torch and the
commit, in ``notebooks/run_times.json``; ``scripts/chapter_headers.py`` shows it at the top of
the chapter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]

# Notebook-level metadata worth keeping; everything else (widgets state, papermill, ...) goes.
# "deform_attn" lists what the Colab install cell installs (scripts/sync_repository_url.py)
KEPT_NOTEBOOK_METADATA = ("kernelspec", "language_info", "deform_attn")
# Cell-level metadata that editors or executors add and the book does not use.
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime", "papermill", "jupyter")


def strip_volatile_metadata(nb: nbformat.NotebookNode) -> None:
    """Drop timestamps and per-run metadata from the notebook and its cells, in place."""
    nb.metadata = nbformat.from_dict({key: nb.metadata[key] for key in KEPT_NOTEBOOK_METADATA if key in nb.metadata})
    nb.metadata.setdefault("kernelspec", {"display_name": "Python 3", "language": "python", "name": "python3"})
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            for output in cell.outputs:
                output.get("metadata", {}).pop("execution", None)


def execute(path: Path, *, quick: bool, timeout: int, kernel_name: str = "python3") -> float:
    """Execute one notebook in place; returns the wall time in seconds."""
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "DEFORM_ATTN_QUICK": "1" if quick else "0", "PYTHONHASHSEED": "0"}
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=timeout,
        record_timing=False,
        # one output per stream however the kernel flushed it: a busy machine splits prints
        # into many pieces, which would change the file and the rendered page for nothing
        coalesce_streams=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute(env=env)
    elapsed = time.perf_counter() - start
    strip_volatile_metadata(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return elapsed


RUN_TIMES = REPO_ROOT / "notebooks" / "run_times.json"


def record_run_time(path: Path, seconds: float, run_times_path: Path = RUN_TIMES) -> None:
    """Store one chapter's full-run wall time, with the machine it ran on, in ``run_times_path``."""
    sys.path.insert(0, str(REPO_ROOT))
    from deform_attn.provenance import environment

    env = environment()
    machine = f"{env['cpu_count']} CPU cores ({env['cpu_model']}), torch {env['torch']}"
    record = json.loads(run_times_path.read_text(encoding="utf-8")) if run_times_path.exists() else {}
    if record.get("machine") != machine:  # times from another machine are not comparable
        record = {"machine": machine, "chapters": {}}
    record.setdefault("chapters", {})[path.stem] = {"seconds": round(seconds, 1), "commit": env["git_commit"]}
    record["chapters"] = dict(sorted(record["chapters"].items()))
    run_times_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/ and book/)")
    parser.add_argument("--quick", action="store_true", help="set DEFORM_ATTN_QUICK=1 (smoke run)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default 1800)")
    args = parser.parse_args(argv)
    paths = args.notebooks or [
        *sorted((REPO_ROOT / "notebooks").glob("*.ipynb")), *sorted((REPO_ROOT / "book").glob("*.ipynb"))
    ]
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 1
    for path in paths:
        print(f"executing {path} ...", flush=True)
        seconds = execute(path.resolve(), quick=args.quick, timeout=args.timeout)
        size_kib = path.stat().st_size / 1024
        if not args.quick and path.resolve().parent == (REPO_ROOT / "notebooks").resolve():
            record_run_time(path, seconds)
        print(f"  done in {seconds:.1f} s, {size_kib:.0f} KiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
