"""The results folder: ``results.csv``, ``meta.json`` and the key by which a run resumes.

``results.csv`` has one row per (case, n, mode), columns :data:`CSV_COLUMNS`, written whole
after every row (atomically, so an interrupted run leaves a readable file). A rerun into the
same folder skips a row whose :func:`row_key` (case, n, mode and every one of
:data:`SETTING_COLUMNS`) is already present; ``--force`` measures it again.

``meta.json`` holds the commands that wrote the folder, the settings, the environment, the
parity of **b** against **a** and the memory limit. Its ``environment`` has the keys of
:func:`deform_attn.provenance.environment` plus ``deformable_attention_version``, with
``threads`` the torch threads of the workers. Folders written before the provenance module
used other names for five of them (``torch_threads``, ``torch_version``, ``cuda_version``,
``python_version``, ``deform_attn_version``, see :data:`LEGACY_ENVIRONMENT_KEYS`) and a commit
suffix ``+dirty`` instead of ``-dirty``; :func:`read_meta` reads both.
"""

from __future__ import annotations

import csv
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping

from ..provenance import environment as provenance_environment
from .cases import MODES

__all__ = [
    "SETTING_COLUMNS",
    "CSV_COLUMNS",
    "LEGACY_ENVIRONMENT_KEYS",
    "row_key",
    "read_results",
    "write_results",
    "environment",
    "normalize_environment",
    "read_meta",
    "write_meta",
]

# the settings a stored row must match to be reused by a resumed run
SETTING_COLUMNS: tuple[str, ...] = (
    "device", "dtype", "dim", "heads", "dim_head", "downsample", "batch", "repeats", "warmup", "threads",
)
# timing: "interleaved" when median/min/max come from the process that alternated every case's
# calls (solo_median_s: the case's own process), "solo" or empty (older files) otherwise
CSV_COLUMNS: tuple[str, ...] = (
    "case", "label", "n", "mode", "status", "reason", "median_s", "min_s", "max_s", "peak_bytes",
    "estimated_bytes", "memory_method", *SETTING_COLUMNS, "timing", "solo_median_s",
)
# old meta.json environment key -> the provenance module's key
LEGACY_ENVIRONMENT_KEYS: dict[str, str] = {
    "torch_threads": "threads",
    "torch_version": "torch",
    "cuda_version": "cuda",
    "python_version": "python",
    "deform_attn_version": "deform_attn",
}


def row_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The identity of a row for resuming: case, n, mode and the settings, all as strings.

    Strings, so that a row read back from the CSV and a row about to be measured compare equal.
    """
    return (str(row["case"]), str(row["n"]), str(row["mode"]), *(str(row[c]) for c in SETTING_COLUMNS))


def read_results(out: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of ``out/results.csv`` as dicts of strings (an empty list if there is none)."""
    path = Path(out) / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_results(out: str | os.PathLike, rows: list[Mapping[str, Any]]) -> Path:
    """Rewrite ``out/results.csv`` atomically, so that an interrupted run leaves a whole file.

    Rows are sorted by case, n, mode (in :data:`MODES` order) and device; keys outside
    :data:`CSV_COLUMNS` are dropped. Returns the file's path.
    """
    out = Path(out)
    rows = sorted(rows, key=lambda r: (str(r["case"]), int(r["n"]), MODES.index(r["mode"]), str(r["device"])))
    temporary = out / "results.csv.tmp"
    with open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    path = out / "results.csv"
    os.replace(temporary, path)
    return path


def environment(device: str, threads: int) -> dict[str, Any]:
    """The environment record of ``meta.json``.

    Args:
        device: the benchmark's ``--device``.
        threads: torch threads the workers run with (the parent's count may differ).

    Returns:
        :func:`deform_attn.provenance.environment` with ``threads`` replaced and
        ``deformable_attention_version`` (the installed reference package's version, or None).
    """
    record = provenance_environment(device)
    record["threads"] = threads
    try:
        record["deformable_attention_version"] = version("deformable-attention")
    except PackageNotFoundError:
        record["deformable_attention_version"] = None
    return record


def normalize_environment(record: Mapping[str, Any]) -> dict[str, Any]:
    """An environment record with the current key names, whichever names it was written with.

    Old keys (:data:`LEGACY_ENVIRONMENT_KEYS`) are renamed; where a record has both, the current
    name wins. Values, including a ``+dirty`` commit, are kept as written.
    """
    normalized = dict(record)
    for old, new in LEGACY_ENVIRONMENT_KEYS.items():
        if old in normalized:
            value = normalized.pop(old)
            normalized.setdefault(new, value)
    return normalized


def read_meta(out: str | os.PathLike) -> dict[str, Any]:
    """``out/meta.json`` with its environment under the current key names ({} if there is none)."""
    path = Path(out) / "meta.json"
    if not path.exists():
        return {}
    meta = json.loads(path.read_text())
    if "environment" in meta:
        meta["environment"] = normalize_environment(meta["environment"])
    return meta


def write_meta(out: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write ``out/meta.json`` (indented, newline at the end). Returns the file's path."""
    path = Path(out) / "meta.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path
