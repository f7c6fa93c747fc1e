"""The benchmark command end to end at tiny sizes: files, rows, resume, skip rule, arguments.

No timing is asserted: speed is what the benchmark measures, not what a test can promise.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deform_attn import bench

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
    for field in ("device", "device_name", "cpu_model", "torch_threads", "torch_version", "git_commit"):
        assert field in environment
    assert environment["torch_threads"] >= 1
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


def test_full_attention_matches_explicit_softmax():
    import torch

    torch.manual_seed(0)
    layer = bench.FullAttention1D(dim=8, dim_head=4, heads=2)
    x = torch.randn(2, 8, 10)
    q, k, v = (f(x).view(2, 2, 4, 10).transpose(2, 3) for f in (layer.to_q, layer.to_k, layer.to_v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # scale 1 / sqrt(dim_head)
    expected = layer.to_out((weights @ v).transpose(2, 3).reshape(2, 8, 10))
    torch.testing.assert_close(layer(x), expected)


def test_cases_c_and_e_are_the_same_layer_on_two_kernels():
    import torch

    spec = {"dim": 16, "dim_head": 4, "heads": 4, "downsample": 4}
    default, sdpa = bench._build_layer("c", spec), bench._build_layer("e", spec)
    x = torch.randn(1, 16, 400)  # long enough for "auto" to pick the piecewise kernel
    kinks = default.position_bias.table(torch.float32)[0].numel()
    assert default.resolved_attention_kernel(x, length=400, num_kinks=kinks) == "piecewise"
    assert sdpa.resolved_attention_kernel(x) == "sdpa"
    torch.testing.assert_close(default(x), sdpa(x), rtol=1e-5, atol=1e-6)
