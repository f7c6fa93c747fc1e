"""Result records: one JSON object per line, appended atomically, read back tolerantly.

Why one ``os.write`` on an ``O_APPEND`` descriptor (and not a temp file renamed per record): the
results stay one file that is easy to ship, merge and load, and on a local POSIX file system an
``O_APPEND`` write positions and writes in one step, so concurrent workers on the machine never
interleave their lines, and a process killed with SIGKILL either wrote its whole line (the kernel
completes a regular-file write it has started) or nothing. ``fsync`` makes the line survive a crash of
the machine. What can still happen is a torn last line after a power loss or on a network file
system; the reader skips lines that do not parse, and the writer first ends an unterminated last
line so that a new record never glues onto a torn one. On a cluster, give every shard its own file
(the default name includes the shard) and merge them afterwards: ``O_APPEND`` is not atomic on NFS.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

__all__ = ["append_record", "read_records", "finished_keys", "merge_records"]


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line with a single ``os.write`` on an ``O_APPEND`` fd, then fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if not _ends_with_newline(path):  # a torn line from a crash: keep it on a line of its own
            line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"{path}: short write ({written} of {len(line)} bytes); the record may be torn")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(paths: str | os.PathLike | Iterable[str | os.PathLike], *, warn: bool = True) -> list[dict[str, Any]]:
    """All records in ``paths`` (files, or directories whose ``*.jsonl`` files are read), in order.

    Lines that do not parse (a torn line) are skipped with a warning; records with a key already
    seen are dropped (the first one wins), so reading overlapping files merges them.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        entry = Path(entry)
        files += sorted(entry.glob("*.jsonl")) if entry.is_dir() else [entry]
    records, seen = [], set()
    for file in files:
        if not file.exists():
            continue
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if warn:
                    warnings.warn(f"{file}:{number}: skipping a line that is not valid JSON (a torn write?)", stacklevel=2)
                continue
            key = record.get("key")
            if key in seen:
                continue
            seen.add(key)
            records.append(record)
    return records


def finished_keys(path: str | os.PathLike) -> set[str]:
    """Keys of the runs already recorded in ``path``."""
    return {r["key"] for r in read_records(path, warn=False) if "key" in r}


def merge_records(inputs: Iterable[str | os.PathLike], output: str | os.PathLike) -> int:
    """Write the deduplicated records of ``inputs`` to ``output`` (replaced atomically); returns the count."""
    records = read_records(list(inputs))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    with open(temporary, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, output)
    return len(records)
