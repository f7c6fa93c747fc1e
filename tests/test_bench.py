"""The benchmark command end to end at tiny sizes: files, rows, resume, skip rule, arguments;
then its parts alone: the cases' layers, the memory probe, the worker, the results store.

No timing is asserted: speed is what the benchmark measures, not what a test can promise.
"""

from __future__ import annotations

import csv
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deform_attn.kernels import fused_available
from torch import nn

from deform_attn import baselines, bench, provenance
from deform_attn.bench import cases, memory, plot, store, worker
from deform_attn.bench import cli as bench_cli
from deform_attn.kernels import Implementation
from deform_attn.offsets import default_offset_kernel_size

pytest.importorskip("deformable_attention")

TINY = ["--dim", "32", "--heads", "2", "--dim-head", "16", "--repeats", "2", "--warmup", "0"]
# case a's estimate at dim 32, heads 2: 155,648 bytes at n = 64 and 622,592 at n = 128 (forward),
# 311,296 at n = 64 (forward + backward)
LIMIT_BETWEEN_64_AND_128 = ["--memory-limit", "0.0003"]


def run_bench(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "deform_attn.bench", *args], capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def read_csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    result = run_bench("--lengths", "128,64", "--cases", "a,b,d", "--modes", "fwd", "--out", str(out),
                       *TINY, *LIMIT_BETWEEN_64_AND_128)
    return out, result


def test_csv_has_one_row_per_case_length_mode(tiny_run):
    out, _ = tiny_run
    rows = read_csv(out)
    assert tuple(rows[0].keys()) == bench.CSV_COLUMNS
    assert sorted((r["case"], int(r["n"]), r["mode"]) for r in rows) == sorted(
        (case, n, "fwd") for case in "abd" for n in (64, 128)
    )
    for row in rows:
        assert row["dim"] == "32" and row["heads"] == "2" and row["dtype"] == "float32" and row["repeats"] == "2"


def test_measured_rows_are_ordered_and_positive(tiny_run):
    out, _ = tiny_run
    for row in read_csv(out):
        if row["status"] != "ok":
            continue
        assert 0 < float(row["min_s"]) <= float(row["median_s"]) <= float(row["max_s"])
        assert int(row["peak_bytes"]) >= 0
        assert row["memory_method"] in ("vmhwm", "ru_maxrss", "cuda_max_memory_allocated")


def test_case_a_is_skipped_where_its_estimate_exceeds_the_limit(tiny_run):
    out, _ = tiny_run
    status = {(r["case"], int(r["n"])): r for r in read_csv(out)}
    assert status["a", 64]["status"] == "ok"
    assert status["a", 128]["status"] == "skipped"
    assert "exceeds the memory limit" in status["a", 128]["reason"]
    assert int(status["a", 128]["estimated_bytes"]) > 0.0003e9
    # b carries a's weights, so it still runs where a is skipped; so does d
    assert all(status[case, 128]["status"] == "ok" for case in "bd")


def test_meta_records_environment_command_and_parity(tiny_run):
    out, _ = tiny_run
    meta = json.loads((out / "meta.json").read_text())
    environment = meta["environment"]
    # the provenance module's keys, plus the reference's version
    assert set(environment) == set(provenance.environment("cpu")) | {"deformable_attention_version"}
    assert not set(environment) & set(store.LEGACY_ENVIRONMENT_KEYS)
    assert environment["threads"] == int(read_csv(out)[0]["threads"]) >= 1
    assert environment["git_commit"] is None or not environment["git_commit"].endswith("+dirty")
    assert meta["settings"]["dtype"] == "float32"
    assert meta["settings"]["lengths"] == [64, 128]
    assert meta["command"].startswith("python -m deform_attn.bench --lengths 128,64")
    parity = meta["parity"]
    assert parity["status"] == "ok" and parity["n"] == 64  # the smallest length
    assert parity["max_abs_diff"] < 1e-5 and parity["passed"]


def test_plot_and_table(tiny_run):
    out, result = tiny_run
    assert (out / "results.png").stat().st_size > 0
    assert "full attention (SDPA)" in result.stdout and "skipped" in result.stdout


def test_resume_skips_finished_rows_and_adds_new_ones(tiny_run, capsys):
    out, _ = tiny_run
    before = {(r["case"], r["n"], r["mode"]): r for r in read_csv(out)}
    assert bench.main(["--lengths", "64", "--modes", "fwd,fwd+bwd", "--cases", "a,c", "--out", str(out),
                       "--note", "resumed", *TINY, *LIMIT_BETWEEN_64_AND_128]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("already in results.csv") == 1  # a, n = 64, fwd
    after = {(r["case"], r["n"], r["mode"]): r for r in read_csv(out)}
    assert all(after[key] == row for key, row in before.items())  # measured rows untouched
    assert after["c", "64", "fwd"]["status"] == "ok"
    assert after["c", "64", "fwd+bwd"]["status"] == "ok"
    assert after["a", "64", "fwd+bwd"]["status"] == "skipped"  # 311,296 bytes > 0.0003 GB
    assert len(after) == len(before) + 3
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["commands"]) == 2 and meta["note"] == "resumed"
    assert "parity b vs a at n = 64" in stdout and meta["parity"]["passed"]  # reused, same layer


def test_interleaved_timing_replaces_the_times_of_the_cases_measured_together(tiny_run):
    out, result = tiny_run
    rows = {(r["case"], r["n"]): r for r in read_csv(out) if r["mode"] == "fwd"}
    # at n = 128 case a is skipped, so b and d are timed side by side; at 64 all three
    for key in (("b", "128"), ("d", "128"), ("a", "64"), ("b", "64"), ("d", "64")):
        row = rows[key]
        assert row["timing"] == "interleaved" and float(row["solo_median_s"]) > 0, key
        assert 0 < float(row["min_s"]) <= float(row["median_s"]) <= float(row["max_s"])
    assert rows["a", "128"]["timing"] == "" and rows["a", "128"]["status"] == "skipped"
    assert result.stdout.count("interleaved n=") == 2
    assert "calls them in turn" in json.loads((out / "meta.json").read_text())["protocol"]


def test_interleaved_worker_times_every_case_in_one_process(tmp_path):
    result_file = tmp_path / "result.json"
    spec = {**SHAPE, "case": "interleaved", "cases": ["c", "d"], "n": 32, "mode": "fwd+bwd", "device": "cpu",
            "dtype": "float32", "batch": 1, "repeats": 3, "warmup": 1, "threads": None,
            "result_file": str(result_file)}
    assert worker.run_spec(json.dumps(spec)) == 0
    result = json.loads(result_file.read_text())
    assert result["status"] == "ok" and set(result["cases"]) == {"c", "d"}
    for times in result["cases"].values():
        assert 0 < times["min_s"] <= times["median_s"] <= times["max_s"]


def test_min_time_adds_calls_until_each_case_has_been_timed_that_long(monkeypatch):
    """--min-time: more calls than --repeats while a case's timed calls add up to less, interleaved
    rounds included, and never more than MOST_CALLS; without it exactly --repeats."""
    monkeypatch.setattr(worker, "_prepare", lambda spec, case: lambda: 0.25 if case == "c" else 0.5)
    spec = {"repeats": 3, "warmup": 1, "threads": None, "cases": ["c", "d"], "device": "cpu"}
    times = worker.measure_interleaved({**spec, "min_time": 2.0})["cases"]
    assert times["c"]["median_s"] == 0.25 and times["d"]["median_s"] == 0.5
    assert worker._more_calls({"repeats": 3, "min_time": 2.0}, [0.25] * 7)  # 1.75 s so far
    assert not worker._more_calls({"repeats": 3, "min_time": 2.0}, [0.25] * 8)
    assert not worker._more_calls({"repeats": 3}, [0.25] * 3)
    assert worker._more_calls({"repeats": 3}, [0.25] * 2)
    assert not worker._more_calls({"repeats": 3, "min_time": 1e9}, [0.25] * worker.MOST_CALLS)
    calls = []
    monkeypatch.setattr(worker, "_prepare", lambda spec, case: lambda: calls.append(case) or 0.25)
    worker.measure_interleaved({**spec, "min_time": 2.0})
    assert calls.count("c") == calls.count("d") == 1 + 8  # warm-up, then rounds until both have 2 s


def test_timeseries_workload_times_each_case_for_two_seconds():
    args = bench_cli.apply_workload(bench_cli._parser().parse_args(["--workload", "timeseries", "--out", "x"]))
    assert args.min_time == 2.0 and args.repeats == 5
    args = bench_cli.apply_workload(bench_cli._parser().parse_args(["--workload", "long", "--out", "x"]))
    assert args.min_time == 0.0
    args = bench_cli.apply_workload(
        bench_cli._parser().parse_args(["--workload", "timeseries", "--min-time", "0.5", "--out", "x"]))
    assert args.min_time == 0.5


def test_plot_only_redraws_from_the_csv(tiny_run, tmp_path):
    out, _ = tiny_run
    (tmp_path / "results.csv").write_text((out / "results.csv").read_text())
    assert bench.main(["--plot-only", str(tmp_path)]) == 0
    assert (tmp_path / "results.png").exists()


def test_a_timeout_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    assert bench.main(["--lengths", "64", "--cases", "c,d", "--modes", "fwd", "--timeout", "0.05",
                       "--out", str(tmp_path), *TINY]) == 0
    rows = read_csv(tmp_path)
    assert [r["status"] for r in rows] == ["timeout", "timeout"]
    assert json.loads((tmp_path / "meta.json").read_text())["parity"]["status"] == "timeout"
    assert "--timeout" in rows[0]["reason"]
    assert "timeout" in capsys.readouterr().out


def test_estimate_matches_the_measured_reference_peak():
    """17.3 GB measured at n = 2048, fwd+bwd, defaults; n >= 4096 does not fit in 24 GB."""
    defaults = dict(dim=512, heads=8, downsample=4)
    estimate = bench.lucidrains_peak_bytes(length=2048, mode="fwd+bwd", **defaults)
    assert abs(estimate - 17.3e9) < 0.05 * 17.3e9
    assert bench.lucidrains_peak_bytes(length=2048, mode="fwd", **defaults) < estimate
    assert bench.lucidrains_peak_bytes(length=4096, mode="fwd", **defaults) > 24e9
    # quadratic in n: doubling n quadruples the pair tensors
    ratio = bench.lucidrains_peak_bytes(length=4096, **defaults) / estimate
    assert ratio == pytest.approx(4.0)
    with pytest.raises(ValueError, match="mode"):
        bench.lucidrains_peak_bytes(length=64, mode="backward", **defaults)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lengths", "512,abc"], "--lengths: expected comma-separated positive integers"),
        (["--lengths", "0"], "--lengths: expected comma-separated positive integers"),
        (["--lengths", "2", "--downsample", "4"], "--lengths: every n must be at least --downsample"),
        (["--cases", "a,x"], "--cases: expected a comma-separated subset"),
        (["--modes", "bwd"], "--modes: expected a comma-separated subset"),
        (["--dim", "30", "--heads", "8"], "--dim: expected a multiple of --heads"),
        (["--repeats", "0"], "--repeats: expected a int >= 1"),
        (["--dtype", "float16"], "invalid choice"),
        (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
        (["--plot-only", "/nonexistent/folder"], "--plot-only: no results.csv"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_lengths_sorts_and_deduplicates():
    assert bench.parse_lengths("1024, 512,512") == [512, 1024]


SHAPE = {"dim": 16, "dim_head": 4, "heads": 4, "downsample": 4}
DATA = Path(__file__).resolve().parents[1] / "deform_attn" / "data" / "bench"
COMMITTED_RUNS = sorted(p for p in DATA.iterdir() if (p / "meta.json").is_file())


# ---------------------------------------------------------------------------------------------
# the package's surface


def test_console_script_and_module_reach_the_same_main():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    module, name = re.search(r'^deform-attn-bench\s*=\s*"([^"]+)"', pyproject, re.MULTILINE).group(1).split(":")
    assert getattr(importlib.import_module(module), name) is bench.main
    result = run_bench("--help")
    assert "--plot-only" in result.stdout and "--worker" not in result.stdout


def test_public_names_are_exported():
    for name in bench.__all__:
        assert getattr(bench, name) is not None, name
    assert bench.FullAttention1D is baselines.FullAttention1D


# ---------------------------------------------------------------------------------------------
# cases


def test_case_d_is_the_shared_baseline_and_matches_explicit_softmax():
    layer = cases.build_layer("d", **SHAPE)
    assert type(layer) is baselines.FullAttention1D
    x = torch.randn(2, 16, 10)  # (b, dim, n)
    # shape: (b, n, 3 h d) -> 3 x (b, h, n, d)
    q, k, v = layer.to_qkv(x.transpose(1, 2)).view(2, 10, 3, 4, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # scale 1 / sqrt(dim_head)
    expected = layer.to_out((weights @ v).transpose(1, 2).reshape(2, 10, 16)).transpose(1, 2)
    torch.testing.assert_close(layer(x), expected)


def test_every_case_is_built_from_the_same_seed():
    x = torch.randn(1, 16, 32)
    for case in "bcde":
        first, second = cases.build_layer(case, **SHAPE), cases.build_layer(case, **SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(first(x), second(x), rtol=0, atol=0)


@pytest.mark.parametrize("downsample", [3, 4, 8])
def test_deformable_cases_use_the_default_offset_kernel_size(downsample):
    shape = {**SHAPE, "downsample": downsample}
    for case in "abce":
        layer = cases.build_layer(case, **shape)
        # the offset network's depthwise convolution is the one with stride r
        kernels = [m.kernel_size[0] for m in layer.modules() if isinstance(m, nn.Conv1d) and m.stride[0] == downsample]
        assert kernels == [default_offset_kernel_size(downsample)], case
    assert default_offset_kernel_size(3) == 7  # the reference's own default 6 is invalid for r = 3


def test_case_b_carries_the_weights_of_case_a():
    result = cases.parity(**SHAPE, batch=1, length=32, device="cpu")
    assert result["status"] == "ok" and result["passed"] and result["n"] == 32
    assert result["max_abs_diff"] <= cases.PARITY_TOLERANCE < result["max_abs_output"]


def test_unknown_case_is_rejected():
    with pytest.raises(ValueError, match="case: expected one of"):
        cases.build_layer("x", **SHAPE)


def test_cases_c_and_e_are_the_same_layer_on_two_kernels():
    default, sdpa = cases.build_layer("c", **SHAPE), cases.build_layer("e", **SHAPE)
    assert default.implementation == Implementation() and sdpa.implementation == Implementation(kernel="sdpa")
    x = torch.randn(1, 16, 400)
    q = torch.zeros(1, SHAPE["heads"], 400, SHAPE["dim_head"])  # (b, h, n, d)
    cells = 400 // SHAPE["downsample"]
    plans = [layer.attention_plan(q, cells=cells, bias=layer.bias_for_kernels(torch.float32))
             for layer in (default, sdpa)]
    assert [plan.kernel for plan in plans] == ["fused" if fused_available() else "piecewise", "sdpa"]
    torch.testing.assert_close(default(x), sdpa(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# memory and worker


def test_peak_memory_sees_an_allocation_after_the_baseline():
    probe = memory.PeakMemory(torch.device("cpu"))
    assert probe.method in memory.MEMORY_METHODS
    probe.start()
    block = torch.ones(16 * 2**20)  # 64 MiB, written, so resident
    assert probe.peak() >= 60 * 2**20
    del block


def test_worker_body_writes_its_measurement(tmp_path):
    result_file = tmp_path / "result.json"
    spec = {**SHAPE, "case": "d", "n": 16, "mode": "fwd+bwd", "device": "cpu", "dtype": "float32", "batch": 1,
            "repeats": 3, "warmup": 1, "threads": None, "result_file": str(result_file)}
    assert worker.run_spec(json.dumps(spec)) == 0
    result = json.loads(result_file.read_text())
    assert result["status"] == "ok"
    assert 0 < result["min_s"] <= result["median_s"] <= result["max_s"]
    assert result["threads"] == torch.get_num_threads()


# ---------------------------------------------------------------------------------------------
# store


def _row(**changes):
    row = {"case": "c", "label": bench.CASES["c"], "n": 128, "mode": "fwd", "status": "ok", "reason": "",
           "median_s": 0.5, "min_s": 0.25, "max_s": 1.0, "peak_bytes": 1024, "estimated_bytes": "",
           "memory_method": "vmhwm", "device": "cpu", "dtype": "float32", "dim": 32, "heads": 2, "dim_head": 16,
           "downsample": 4, "batch": 1, "repeats": 2, "warmup": 0, "threads": 2}
    return {**row, **changes}


def test_csv_round_trip_keeps_the_resume_key_and_sorts_rows(tmp_path):
    rows = [_row(n=1024, mode="fwd+bwd"), _row(n=1024), _row(n=128, extra="dropped"), _row(case="a", n=1024)]
    store.write_results(tmp_path, rows)
    back = store.read_results(tmp_path)
    assert list(back[0]) == list(bench.CSV_COLUMNS)
    # sorted by case, then n as a number (128 before 1024), then mode in MODES order
    assert [(r["case"], r["n"], r["mode"]) for r in back] == [
        ("a", "1024", "fwd"), ("c", "128", "fwd"), ("c", "1024", "fwd"), ("c", "1024", "fwd+bwd")
    ]
    assert {store.row_key(r) for r in back} == {store.row_key(r) for r in rows}
    assert not (tmp_path / "results.csv.tmp").exists()


def test_resume_key_changes_with_every_setting():
    key = store.row_key(_row())
    assert store.row_key(_row(median_s=9.0, status="failed")) == key  # results are not settings
    for column in bench.SETTING_COLUMNS:
        assert store.row_key(_row(**{column: "other"})) != key, column
    for column in ("case", "n", "mode"):
        assert store.row_key(_row(**{column: "other"})) != key, column


def test_bench_environment_is_the_provenance_record_with_the_bench_threads():
    record = store.environment("cpu", threads=7)
    expected = provenance.environment("cpu")
    assert record["threads"] == 7
    assert record["deformable_attention_version"] == "0.0.20"
    for key in set(expected) - {"threads", "git_commit"}:
        assert record[key] == expected[key], key


def test_old_and_new_meta_keys_read_the_same(tmp_path):
    settings = {"dtype": "float32", "dim": 512, "heads": 8, "dim_head": 64, "downsample": 4, "batch": 1}
    old = {"device_name": "AMD EPYC", "torch_threads": 2, "torch_version": "2.13.0", "cuda_version": None,
           "python_version": "3.11.7", "deform_attn_version": "0.1.0", "git_commit": "abc+dirty"}
    new = {"device_name": "AMD EPYC", "threads": 2, "torch": "2.13.0", "cuda": None, "python": "3.11.7",
           "deform_attn": "0.1.0", "git_commit": "abc+dirty"}
    for name, environment in (("old", old), ("new", new)):
        (tmp_path / name).mkdir()
        store.write_meta(tmp_path / name, {"environment": environment, "settings": settings})
    old_meta, new_meta = store.read_meta(tmp_path / "old"), store.read_meta(tmp_path / "new")
    assert old_meta == new_meta
    assert old_meta["environment"]["git_commit"] == "abc+dirty" and provenance.is_dirty_commit("abc+dirty")
    title = plot.plot_title(json.loads((tmp_path / "old" / "meta.json").read_text()))  # raw, old keys
    assert title == plot.plot_title(new_meta)
    assert title.startswith("AMD EPYC (2 threads), torch 2.13.0, float32, dim 512, heads 8 x 64")
    # both names present: the current one wins
    assert store.normalize_environment({"threads": 4, "torch_threads": 2})["threads"] == 4
    assert store.read_meta(tmp_path / "missing") == {} and plot.plot_title({}) is None


@pytest.mark.parametrize("folder", COMMITTED_RUNS, ids=[p.name for p in COMMITTED_RUNS])
def test_committed_runs_still_read(folder):
    meta = bench.read_meta(folder)
    environment = meta["environment"]
    for key in ("device", "device_name", "threads", "torch", "python", "deform_attn", "git_commit"):
        assert environment.get(key) is not None, key
    assert "None" not in plot.plot_title(meta)
    rows = bench.read_results(folder)
    # files written before interleaved timing lack its two columns
    assert rows and set(bench.CSV_COLUMNS) - {"timing", "solo_median_s"} <= set(rows[0]) <= set(bench.CSV_COLUMNS)
    assert len(bench.format_table(rows).splitlines()) > 2


def test_workloads_fill_only_the_sizes_left_unset():
    from deform_attn.bench import cli

    timeseries = cli.apply_workload(cli._parser().parse_args(["--workload", "timeseries", "--batch", "8"]))
    assert (timeseries.lengths, timeseries.dim, timeseries.heads, timeseries.dim_head) == ("96,192,336,720,1440", 128, 4, 32)
    assert timeseries.batch == 8  # the flag wins
    long = cli.apply_workload(cli._parser().parse_args([]))
    assert (long.dim, long.heads, long.dim_head, long.batch) == (512, 8, 64, 1)
    assert long.lengths == ",".join(map(str, cli.DEFAULT_LENGTHS))
    assert (long.cases, long.dtype) == ("a,b,c,d", "float32")
    gpu = cli.apply_workload(cli._parser().parse_args(["--workload", "gpu", "--device", "cpu"]))
    assert (gpu.dtype, gpu.cases, gpu.lengths.split(",")[-1]) == ("bfloat16", "c,d,e", "65536")
