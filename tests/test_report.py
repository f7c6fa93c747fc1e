"""The ablation chapter's tables (deform_attn.experiments.report): views of a pool of records by run
key, the learned-task targets, paired contrasts with Holm's correction and their verdicts, the
compute-matched table, and the summarize command that prints them."""

import dataclasses
import json
import math
import re

import pytest

from deform_attn.experiments import grid, report, schema
from deform_attn.experiments.runner import main


def _record(run, value, *, preset="p", kind="test_mse", baseline=1.0, flops=1e9):
    """A finished record of grid run ``run`` whose primary metric is ``value``."""
    return schema.Record(
        schema=schema.SCHEMA_VERSION, key=run.key, preset=preset, task=run.task,
        task_kind="regression" if kind == "test_mse" else "classification", variant=run.variant,
        attention=run.model.attention, axis=run.axis, overrides=dict(run.overrides), config_hash=run.config_hash,
        config=run.config, seed=run.seed, shard=None, primary_metric=kind, higher_is_better=kind != "test_mse",
        metrics={kind: value}, finite=True, baseline={kind: baseline}, reference={}, sequence_length=8, num_train=4,
        num_test=4, params=1, train_time_s=1.0, eval_time_s=0.1, run_wall_s=1.2, run_cpu_s=1.1, amp="none",
        device="cpu", device_name="x", threads=1, torch="x", python="3.11", git_commit="0" * 40,
        finished_at="2026-01-01T00:00:00+0000", train_cpu_s=1.0, train_flops=flops,
    ).to_dict()


def _micro_records(errors):
    """Records of the micro grid; ``errors[variant]`` lists its MSE on seeds 0, 1 (default 0.5)."""
    return [_record(run, errors.get(run.variant, [0.5, 0.5])[run.seed]) for run in grid.build_grid("micro")]


def test_a_view_finds_a_presets_runs_by_key_and_relabels_them():
    pool = _micro_records({})
    pool.append(_record(dataclasses.replace(grid.build_grid("micro")[0], seed=9), 0.1))  # not in the grid
    view = report.preset_view(pool, "micro")
    assert [r.key for r in view] == [run.key for run in grid.build_grid("micro")]
    assert {r.preset for r in view} == {"micro"}
    assert report.missing_runs(pool[:3], "micro") == [run.key for run in grid.build_grid("micro")[3:]]
    with pytest.raises(ValueError, match="two records of run"):
        report.preset_view(pool + pool[:1], "micro")


def test_targets_are_absolute_or_above_the_trivial_predictor():
    assert report.TARGETS["mnist1d"].met(0.85) and not report.TARGETS["mnist1d"].met(0.8499)
    assert report.TARGETS["adding"].met(0.01) and not report.TARGETS["adding"].met(0.0101)
    osuleaf = report.TARGETS["osuleaf"]
    assert osuleaf.threshold(0.182) == pytest.approx(0.382)
    assert osuleaf.met(0.40, 0.182) and not osuleaf.met(0.38, 0.182)
    with pytest.raises(ValueError, match="baseline"):
        osuleaf.threshold(None)


def test_learned_tasks_reads_the_frozen_recipes_best_variant():
    recipes = {
        "mnist1d": {"candidate": "c1", "candidates": {
            "c0": {"by_variant": {"full": 0.99}}, "c1": {"by_variant": {"deformable": 0.86, "full": 0.80}}}},
        "listops": {"candidate": "c0", "candidates": {"c0": {"by_variant": {"deformable": 0.30, "full": 0.35}}}},
        "adding": {"candidate": "c0", "candidates": {"c0": {"by_variant": {"deformable": 0.02, "full": 0.005}}}},
        "text": {"candidate": "c0", "candidates": {"c0": {"by_variant": {"causal_full": 2.0}}}},  # no target
    }
    rows = {row["task"]: row for row in report.learned_tasks(recipes)}
    assert set(rows) == {"mnist1d", "listops", "adding"}
    assert (rows["mnist1d"]["best_variant"], rows["mnist1d"]["learned"]) == ("deformable", True)  # chosen c1
    assert (rows["listops"]["best"], rows["listops"]["learned"]) == (0.35, False)
    assert (rows["adding"]["best_variant"], rows["adding"]["learned"]) == ("full", True)  # lower MSE is better


def test_contrasts_pair_seeds_correct_over_the_family_and_give_verdicts():
    # deformable's MSE is 0.1 below downsampled's on both seeds (a constant difference: p = 0);
    # full's is within noise of deformable's
    errors = {"deformable": [0.30, 0.40], "downsampled": [0.40, 0.50], "full": [0.29, 0.43]}
    view = report.preset_view(_micro_records(errors), "micro")
    rows = report.contrast_table(view, [("deformable", "downsampled"), ("deformable", "full")], resamples=200)
    by = {(row["variant"], row["reference"]): row for row in rows}
    better = by["deformable", "downsampled"]
    assert better["mean"] == pytest.approx(-0.1) and better["n"] == 2
    assert better["p"] < 1e-6 and better["significant"] and better["verdict"] == "better"
    unclear = by["deformable", "full"]
    assert unclear["mean"] == pytest.approx(-0.01) and unclear["verdict"] == "no significant difference"
    assert unclear["p_holm"] >= unclear["p"]
    assert report.contrast_table(view, [("deformable", "local")]) == []  # no local runs
    outside = report.contrast_table(view, [("deformable", "downsampled")], family=[], resamples=200)
    assert outside[0]["verdict"] == "not learned" and math.isnan(outside[0]["p_holm"])
    one_seed = [r for r in view if r.seed == 0]
    assert report.contrast_table(one_seed, [("deformable", "full")])[0]["verdict"] == "too few seeds"


def test_a_worse_variant_is_called_worse_for_either_direction():
    row = {"in_family": True, "n": 6, "p": 0.001, "significant": True}
    assert report.verdict({**row, "mean": 0.05, "higher_is_better": True}) == "better"
    assert report.verdict({**row, "mean": 0.05, "higher_is_better": False}) == "worse"
    assert report.verdict({**row, "mean": -0.05, "higher_is_better": True}) == "worse"


def test_tally_counts_wins_losses_and_means_in_the_first_variants_favour():
    rows = [
        {"verdict": "better", "mean": 0.1, "higher_is_better": True},
        {"verdict": "no significant difference", "mean": 0.02, "higher_is_better": True},
        {"verdict": "worse", "mean": 0.01, "higher_is_better": False},  # an MSE that grew
        {"verdict": "no significant difference", "mean": -0.03, "higher_is_better": True},
    ]
    assert report.tally(rows) == {"n": 4, "wins": 1, "losses": 1, "ahead": 2}
    assert report.tally([]) == {"n": 0, "wins": 0, "losses": 0, "ahead": 0}


def test_variant_table_takes_each_seeds_own_baseline():
    runs = [run for run in grid.build_grid("micro") if run.variant == "full"]
    records = [_record(run, 0.2, baseline=b) for run, b in zip(runs, (0.6, 0.4))]
    (row,) = report.variant_table(records)
    assert row["n"] == 2 and row["mean"] == pytest.approx(0.2)
    assert row["baseline"] == pytest.approx(0.5) and row["margin"] == pytest.approx(-0.3)
    assert row["margin_low"] < -0.3 < row["margin_high"]  # the two seeds' margins differ: -0.4, -0.2


def test_compute_table_groups_runs_by_budget():
    base = grid.build_grid("micro")[0]
    records = []
    for budget, flops, values in ((0.5, 1e9, (0.4, 0.5)), (1.0, 2e9, (0.3, 0.3))):
        for seed, value in enumerate(values):
            run = dataclasses.replace(base, variant=f"deformable[budget={budget}]", seed=seed)
            records.append(_record(run, value, flops=flops))
    rows = report.compute_table(records)
    assert [(row["budget"], row["n"], row["train_flops"]) for row in rows] == [(0.5, 2, 1e9), (1.0, 2, 2e9)]
    assert rows[0]["mean"] == pytest.approx(0.45) and rows[1]["low"] == rows[1]["high"] == pytest.approx(0.3)


def test_compute_contrasts_pair_variants_at_the_same_budget():
    # deformable's gain over the other variants, per budget and seed: none at a quarter and a half,
    # 20 points at the whole budget
    gains = {0.25: (0.01, -0.01, 0.0), 0.5: (0.02, -0.02, 0.0), 1.0: (0.20, 0.21, 0.19)}
    records = []
    for run in grid.build_grid("compute"):
        budget = float(run.variant.split("=")[1].rstrip("]"))
        # every variant gains with the budget, so a pair across budgets would not show these gains
        value = 0.4 + 0.2 * budget + (gains[budget][run.seed] if run.model.attention == "deformable" else 0.0)
        records.append(_record(run, value, kind="test_accuracy"))
    rows = report.compute_contrasts(records, resamples=200)
    tasks = sorted(grid.PRESETS["compute"]["tasks"])
    assert [(row["task"], row["reference"], row["budget"]) for row in rows] == [
        (task, reference, budget) for task in tasks for reference in ("full", "downsampled") for budget in gains]
    assert all(row["variant"] == "deformable" and row["n"] == 3 for row in rows)
    whole = [row for row in rows if row["budget"] == 1.0]
    assert all(row["mean"] == pytest.approx(0.2) and row["verdict"] == "better" for row in whole)
    assert all(row["verdict"] == "no significant difference" for row in rows if row["budget"] < 1.0)
    # one Holm family over the twelve contrasts: each adjusted p is at least its own
    assert all(row["p_holm"] >= row["p"] for row in rows)
    tables = report.preset_tables(records, "compute", resamples=200)
    assert [row["budget"] for row in tables["compute_contrasts"]] == [row["budget"] for row in rows]
    # a group with a seed still to come is left out, with the contrasts it takes part in
    dropped = (tasks[0], "full[budget=0.5]", 2)
    lacking = [r for r in records if (r["task"], r["variant"], r["seed"]) != dropped]
    partial = report.compute_contrasts(lacking, resamples=200)
    assert [(row["task"], row["reference"], row["budget"]) for row in partial] == [
        (row["task"], row["reference"], row["budget"]) for row in rows
        if (row["task"], row["reference"], row["budget"]) != (tasks[0], "full", 0.5)]


def test_a_length_or_sweep_contrast_waits_for_all_its_seeds():
    records = [_record(run, 0.5 + 0.1 * run.seed + (run.variant == "deformable") * 0.05, kind="test_accuracy")
               for run in grid.build_grid("lengths")]
    whole = report.preset_tables(records, "lengths", resamples=200)["contrasts"]
    pairs = {(row["task"], row["reference"]) for row in whole}
    tasks = grid.PRESETS["lengths"]["tasks"]
    assert pairs == {(task, reference) for task in tasks for reference in ("downsampled", "full")}
    last = next(r for r in reversed(records) if r["variant"] == "full")
    partial = report.preset_tables([r for r in records if r is not last], "lengths", resamples=200)["contrasts"]
    assert {(row["task"], row["reference"]) for row in partial} == pairs - {(last["task"], "full")}
    # the table of each variant's own metric still shows what is in
    assert any(row["task"] == last["task"] and row["variant"] == "full" and row["n"] == 2
               for row in report.preset_tables([r for r in records if r is not last], "lengths")["variants"])


def test_summarize_prints_a_union_presets_tables_per_part(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(grid.PRESETS, "micro_both", {"parts": ["micro", "micro_tune"]})
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(record) + "\n" for record in _micro_records({})))
    assert main(["summarize", "--preset", "micro_both", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "== micro/variants" in printed and "== micro_tune/missing" in printed
    tuning = printed[printed.index("== micro_tune/missing"):]
    for task in ("adding", "osuleaf"):  # none of micro_tune's runs is in the pool
        count = sum(run.task == task for run in grid.build_grid("micro_tune"))
        assert re.search(rf"^{task}\s+{count}\s*$", tuning, re.MULTILINE)


def test_a_union_presets_runs_are_recorded_under_their_part(tmp_path, monkeypatch):
    monkeypatch.setitem(grid.PRESETS, "micro_both", {"threads": 1, "parts": ["micro", "micro_causal"]})
    out = tmp_path / "both.jsonl"
    assert main(["run", "--preset", "micro_both", "--out", str(out), "--quiet", "--seeds", "0"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    expected = {run.key: run.preset for run in grid.build_grid("micro_both", seeds=[0])}
    assert {r["key"]: r["preset"] for r in written} == expected
    assert {r["preset"] for r in written} == {"micro", "micro_causal"}


def test_main_contrasts_compare_only_complete_tasks_and_holm_over_the_learned_ones():
    """A task with part of its seeds published gets no contrast (a verdict must not rest on some of
    its seeds), and Holm's family is the complete tasks that were learned; summarize's tables are
    the same rows."""
    runs = grid.build_grid("main")
    accuracy = {"deformable": 0.8, "downsampled": 0.7, "full": 0.75, "local": 0.72, "mlp_only": 0.5}
    pool = [_record(run, accuracy.get(run.variant, 0.6) + 0.01 * run.seed, kind="test_accuracy", baseline=0.1)
            for run in runs if run.task in ("mnist1d", "mnist1d_long")]
    adding = [run for run in runs if run.task == "adding"]
    pool += [_record(run, 0.05) for run in adding[: len(adding) // 2]]
    recipes = {task: {"candidate": "c0", "candidates": {"c0": {"by_variant": {"deformable": best}}}}
               for task, best in (("mnist1d", 0.9), ("mnist1d_long", 0.5), ("adding", 0.001))}
    assert report.complete_tasks(pool, "main") == ["mnist1d", "mnist1d_long"]
    rows = report.main_contrasts(pool, recipes=recipes, resamples=200)
    assert {row["task"] for row in rows} == {"mnist1d", "mnist1d_long"}
    # mnist1d_long missed its 80% target: compared, but outside the family
    assert {row["task"] for row in rows if row["in_family"]} == {"mnist1d"}
    assert all(math.isnan(row["p_holm"]) for row in rows if row["task"] == "mnist1d_long")
    tables = report.preset_tables(pool, "main", recipes=recipes, resamples=200)
    assert tables["contrasts"] == rows
    assert {row["task"]: row["missing"] for row in tables["missing"]} == {
        task: sum(run.task == task for run in runs) - (len(adding) // 2 if task == "adding" else 0)
        for task in ("adding", "listops", "osuleaf")
    }
