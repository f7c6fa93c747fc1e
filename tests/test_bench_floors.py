"""The floors checker reads benchmark folders and says, per target, what was measured and whether it holds."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from deform_attn.bench import floors

COMMITTED = Path(floors.__file__).resolve().parents[1] / "data" / "bench" / "fused-cpu-2core"


def write_bench(folder: Path, rows: list[tuple[str, int, str, float, int]]) -> None:
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "n", "mode", "status", "median_s", "peak_bytes"])
        for case, n, mode, seconds, peak in rows:
            writer.writerow([case, n, mode, "ok", seconds, peak])


@pytest.mark.parametrize(
    "workload, n, mode, label",
    [
        # timeseries: forward 2x faster in round 1, only 1.4x in round 2
        ("timeseries", 720, "fwd", "timeseries, n = 720: forward (full / ours) >= 1.5"),
        # long: the memory floor holds in round 1 (0.99) and not in round 2 (1.15)
        ("long", 16384, "fwd+bwd", "long, n = 16384: training peak memory (ours / full) <= 1"),
    ],
)
def test_a_floor_is_met_only_in_every_round(tmp_path, workload, n, mode, label):
    for round_, (ours, full) in enumerate([((1.0, 99), (2.0, 100)), ((1.0, 115), (1.4, 100))], start=1):
        write_bench(tmp_path / f"{workload}-r{round_}",
                    [("c", n, mode, ours[0], ours[1]), ("d", n, mode, full[0], full[1])])
    checked = {item["floor"].label: item for item in floors.check_floors(tmp_path)}
    item = checked[label]
    assert item["values"] == ([2.0, 1.4] if workload == "timeseries" else [0.99, 1.15]) and not item["met"]
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


@pytest.mark.parametrize("folder", floors.result_folders(COMMITTED.parent), ids=lambda path: path.name)
def test_the_committed_runs_measure_every_floor(folder, capsys):
    checked = floors.check_floors(folder)
    assert len(checked) == len(floors.FLOORS)
    assert all(item["values"] for item in checked), [item["floor"].label for item in checked if not item["values"]]
    assert len(checked[0]["values"]) == 3  # three timeseries rounds
    assert floors.main([str(folder)]) == 0
    assert "floors met" in capsys.readouterr().out


def test_each_machine_has_its_folder_named_by_its_cpu(tmp_path):
    folders = floors.result_folders(COMMITTED.parent)
    assert COMMITTED in folders and len(folders) >= 2
    machines = [floors.machine(folder) for folder in folders]
    assert len(set(machines)) == len(machines) and all(", 2 cores" in name for name in machines)
    with pytest.raises(ValueError, match="no meta.json"):
        floors.machine(tmp_path)
