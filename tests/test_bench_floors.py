"""The floors checker reads benchmark folders and says, per target, what was measured and whether it holds."""

from __future__ import annotations

import csv
from pathlib import Path

from deform_attn.bench import floors

COMMITTED = Path(floors.__file__).resolve().parents[1] / "data" / "bench" / "fused-cpu-2core"


def write_bench(folder: Path, rows: list[tuple[str, int, str, float, int]]) -> None:
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "n", "mode", "status", "median_s", "peak_bytes"])
        for case, n, mode, seconds, peak in rows:
            writer.writerow([case, n, mode, "ok", seconds, peak])


def test_a_floor_is_met_only_in_every_round(tmp_path):
    # round 1: forward 2x faster at n = 720; round 2: only 1.4x
    write_bench(tmp_path / "timeseries-r1", [("c", 720, "fwd", 1.0, 1), ("d", 720, "fwd", 2.0, 1)])
    write_bench(tmp_path / "timeseries-r2", [("c", 720, "fwd", 1.0, 1), ("d", 720, "fwd", 1.4, 1)])
    checked = {item["floor"].label: item for item in floors.check_floors(tmp_path)}
    item = checked["timeseries, n = 720: forward (full / ours) >= 1.5"]
    assert item["values"] == [2.0, 1.4] and not item["met"]
    missing = checked["timeseries, n = 96: forward (full / ours) >= 0.8"]
    assert missing["values"] == [] and not missing["met"]


def test_memory_and_steps(tmp_path):
    write_bench(tmp_path / "long", [("c", 2048, "fwd+bwd", 1.0, 90), ("d", 2048, "fwd+bwd", 1.0, 100)])
    (tmp_path / "steps").mkdir()
    with open(tmp_path / "steps" / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "candidate", "variant", "median_s"])
        writer.writerows([["adding", "c0", "deformable", 1.3], ["adding", "c0", "full", 1.0],
                          ["adding", "c1", "deformable", 1.0], ["adding", "c1", "full", 1.0]])
    checked = {item["floor"].label: item for item in floors.check_floors(tmp_path)}
    memory = checked["long, n = 2048: training peak memory (ours / full) <= 1"]
    assert memory["values"] == [0.9] and memory["met"]
    step = checked["ablation model's training step, adding (deformable / full) <= 1.25"]
    assert step["values"] == [1.3, 1.0] and not step["met"]


def test_long_rounds_are_rounds_too(tmp_path):
    """long-r1/, long-r2/: the memory floor holds only if it holds in each."""
    write_bench(tmp_path / "long-r1", [("c", 16384, "fwd+bwd", 1.0, 99), ("d", 16384, "fwd+bwd", 1.0, 100)])
    write_bench(tmp_path / "long-r2", [("c", 16384, "fwd+bwd", 1.0, 115), ("d", 16384, "fwd+bwd", 1.0, 100)])
    checked = {item["floor"].label: item for item in floors.check_floors(tmp_path)}
    memory = checked["long, n = 16384: training peak memory (ours / full) <= 1"]
    assert memory["values"] == [0.99, 1.15] and not memory["met"]


def test_the_committed_runs_measure_every_floor(capsys):
    checked = floors.check_floors(COMMITTED)
    assert len(checked) == len(floors.FLOORS)
    assert all(item["values"] for item in checked), [item["floor"].label for item in checked if not item["values"]]
    assert len(checked[0]["values"]) == 3  # three timeseries rounds
    assert floors.main([str(COMMITTED)]) == 0
    assert "floors met" in capsys.readouterr().out
