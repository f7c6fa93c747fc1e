"""The ablation training-step benchmark: pairs, rows and files, on the smoke preset's smallest task."""

from __future__ import annotations

import csv
import json

from deform_attn.bench import steps


def test_pairs_are_the_deformable_and_full_model_of_one_recipe():
    pairs = steps._pairs("smoke", ["adding"])
    assert len(pairs) == 1
    (pair,) = pairs
    assert set(pair) == {"deformable", "full"}
    deformable, full = pair["deformable"], pair["full"]
    assert (deformable.task, deformable.seed, deformable.train) == (full.task, full.seed, full.train)
    assert deformable.model.to_dict() | {"attention": None} == full.model.to_dict() | {"attention": None}


def test_main_writes_one_row_per_model_and_the_provenance(tmp_path, capsys):
    assert steps.main(["--preset", "smoke", "--tasks", "adding", "--repeats", "1", "--warmup", "0", "--block", "2",
                       "--out", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["variant"] for row in rows] == ["deformable", "full"]
    assert all(float(row["min_s"]) <= float(row["median_s"]) <= float(row["max_s"]) for row in rows)
    assert {row["steps"] for row in rows} == {"2"} and {row["n"] for row in rows} == {"64"}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["command"].startswith("python -m deform_attn.bench.steps --preset smoke")
    assert "git_commit" in meta["environment"]
    assert "ratio" in capsys.readouterr().out
