"""Compare benchmark folders written by ``python -m deform_attn.bench`` side by side.

    python scripts/compare_bench.py BEFORE_DIR[,BEFORE_DIR2...] AFTER_DIR[,AFTER_DIR2...] [--out FILE]

Each side may be several folders (repeated rounds, run alternately); a row's time on a side is the
smallest median over its rounds, the usual way to read repeated timings on a shared machine. Prints
(and with --out writes as CSV) one row per (case, n, mode): both times, after / before, and both
peak memories.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def _read(folders: str) -> dict[tuple[str, int, str], dict[str, float]]:
    rows: dict[tuple[str, int, str], dict[str, float]] = {}
    for folder in folders.split(","):
        for row in csv.DictReader(open(Path(folder) / "results.csv")):
            if row["status"] != "ok":
                continue
            key = (row["case"], int(row["n"]), row["mode"])
            seconds, peak = float(row["median_s"]), float(row["peak_bytes"] or "nan")
            best = rows.setdefault(key, {"seconds": seconds, "peak": peak})
            best["seconds"] = min(best["seconds"], seconds)
            best["peak"] = min(best["peak"], peak)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    before, after = _read(args.before), _read(args.after)
    table = []
    for key in sorted(set(before) & set(after)):
        b, a = before[key], after[key]
        table.append({"case": key[0], "n": key[1], "mode": key[2], "before_s": b["seconds"], "after_s": a["seconds"],
                      "after_over_before": a["seconds"] / b["seconds"], "before_peak_mib": b["peak"] / 2**20,
                      "after_peak_mib": a["peak"] / 2**20})
    print(f"{'case':4s} {'n':>6s} {'mode':8s} {'before s':>10s} {'after s':>10s} {'ratio':>6s} {'MiB before':>10s} {'MiB after':>10s}")
    for row in table:
        print(f"{row['case']:4s} {row['n']:6d} {row['mode']:8s} {row['before_s']:10.4f} {row['after_s']:10.4f} "
              f"{row['after_over_before']:6.2f} {row['before_peak_mib']:10.0f} {row['after_peak_mib']:10.0f}")
    if args.out is not None:
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
