"""The ablation wing: the task and variant registries, the bug-variant sampler, models, the record
schema, the runner (resume, SIGKILL, shards, provenance), results and publishing."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deform_attn import provenance
from deform_attn.experiments import grid, models, records, results, schema, tasks, variants
from deform_attn.experiments import train as train_module
from deform_attn.experiments.models import ModelConfig
from deform_attn.experiments.train import TrainConfig
from deform_attn.geometry import normalize_positions
from deform_attn.offsets import ZeroOffsets, default_offset_kernel_size

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "deform_attn" / "experiments" / "data"

@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def registries():
    """Tasks and variants a test registers are unregistered after it."""
    saved_tasks, saved_variants = dict(tasks.TASKS), dict(variants.ATTENTION_VARIANTS)
    yield
    tasks.TASKS.clear()
    tasks.TASKS.update(saved_tasks)
    variants.ATTENTION_VARIANTS.clear()
    variants.ATTENTION_VARIANTS.update(saved_variants)


# ---------------------------------------------------------------------------- tasks


def test_adding_problem_shapes_markers_and_targets():
    data = tasks.adding_problem(length=50, num_train=100, num_test=20, seed=3)
    assert data.train.x.shape == (100, 50, 2) and data.test.x.shape == (20, 50, 2)
    marker = data.train.x[..., 1]
    assert torch.all(marker.sum(1) == 2)
    assert torch.all(marker[:, :25].sum(1) == 1) and torch.all(marker[:, 25:].sum(1) == 1)
    expected = (data.train.x[..., 0] * marker).sum(1)
    torch.testing.assert_close(data.train.y, expected)


def test_adding_problem_is_deterministic_per_seed():
    a, b, c = (tasks.adding_problem(length=20, num_train=10, num_test=5, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)


def test_adding_problem_trivial_mse_is_one_sixth():
    data = tasks.adding_problem(length=10, num_train=20_000, num_test=20_000, seed=0)
    assert abs(data.baseline["test_mse"] - 1 / 6) < 0.006


@pytest.mark.parametrize(
    "expression, value",
    [
        ("[MAX 2 9 ]", 9),
        ("[MIN 4 1 7 ]", 1),
        ("[MED 1 5 3 ]", 3),
        ("[MED 1 2 3 4 ]", 2),  # median 2.5, rounded down
        ("[SM 7 8 9 ]", 4),
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[SM [MAX 1 2 ] [MIN 5 6 ] [MED 9 9 0 ] ]", 6),  # 2 + 5 + 9 = 16
        ("[MIN [SM 9 9 ] [MAX [MED 3 8 5 ] 1 ] ]", 5),  # min(8, 5)
    ],
)
def test_listops_evaluator_on_hand_examples(expression, value):
    assert tasks.listops_evaluate(expression.split()) == value


@pytest.mark.parametrize("bad", ["[MAX 2 9", "2 ]", "[MAX ]", "[FOO 1 ]"])
def test_listops_evaluator_rejects_malformed_expressions(bad):
    with pytest.raises(ValueError):
        tasks.listops_evaluate(bad.split())


def test_listops_generator_follows_the_rules():
    rng = random.Random(0)
    for _ in range(200):
        tokens = tasks.listops_generate_tree(rng, max_depth=10, max_args=10)
        depth, max_depth, stack = 0, 0, []
        for token in tokens:
            assert token in tasks.LISTOPS_VOCAB
            if token in tasks.LISTOPS_OPERATORS:
                depth += 1
                max_depth = max(max_depth, depth)
                stack.append(0)
            elif token == "]":
                assert 2 <= stack.pop() <= 10
                depth -= 1
                if stack:
                    stack[-1] += 1
            else:
                stack[-1] += 1
        assert depth == 0 and max_depth <= 10
        assert 0 <= tasks.listops_evaluate(tokens) <= 9


def test_listops_task_lengths_labels_padding_and_determinism():
    a = tasks.listops(min_length=20, max_length=60, num_train=50, num_test=20, seed=1)
    b = tasks.listops(min_length=20, max_length=60, num_train=50, num_test=20, seed=1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    for split in (a.train, a.test):
        assert torch.all((split.lengths > 20) & (split.lengths < 60))
        real = torch.arange(split.x.shape[1])[None, :] < split.lengths[:, None]
        assert torch.all((split.x > 0) == real)  # padding 0 exactly after the end
        inverse = {v: k for k, v in tasks.LISTOPS_VOCAB.items()}
        for row, length, label in zip(split.x[:5], split.lengths[:5], split.y[:5]):
            assert tasks.listops_evaluate([inverse[int(t)] for t in row[:length]]) == int(label)
    train_set = {tuple(r[:n].tolist()) for r, n in zip(a.train.x, a.train.lengths)}
    assert not any(tuple(r[:n].tolist()) in train_set for r, n in zip(a.test.x, a.test.lengths))
    assert a.num_classes == 10 and a.vocab_size == 16


def test_mnist1d_generates_offline_and_restores_global_random_state(no_network):
    pytest.importorskip("mnist1d")
    state = random.getstate()
    data = tasks.mnist1d(seed=0)
    assert random.getstate() == state
    assert data.train.x.shape == (4000, 40, 1) and data.test.x.shape == (1000, 40, 1)
    assert set(data.train.y.unique().tolist()) == set(range(10))
    again = tasks.mnist1d(seed=5)
    assert torch.equal(data.train.x, again.train.x)  # the published data set, whatever the seed
    long = tasks.mnist1d(upsample=2, frame=100, seed=0)
    assert long.train.x.shape == (4000, 100, 1)
    assert not torch.equal(long.train.x, tasks.mnist1d(upsample=2, frame=100, seed=1).train.x)


def test_osuleaf_loads_the_shipped_files_offline(no_network):
    pytest.importorskip("aeon")
    data = tasks.osuleaf(seed=0)
    assert data.train.x.shape == (200, 427, 1) and data.test.x.shape == (242, 427, 1)
    assert data.num_classes == 6
    assert set(data.train.y.tolist()) == set(range(6)) == set(data.test.y.tolist())
    torch.testing.assert_close(data.train.x.mean(1), torch.zeros(200, 1), atol=1e-4, rtol=0)


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="task"):
        tasks.make_task("imagenet", {}, 0)


def _parity_task(*, length: int = 16, num_train: int = 32, num_test: int = 16, seed: int = 0) -> tasks.TaskData:
    """Parity of a bit string: a new task written as a test would write one."""
    generator = torch.Generator().manual_seed(seed)

    def draw(count: int) -> tasks.Split:
        bits = torch.randint(0, 2, (count, length), generator=generator)
        return tasks.Split(bits + 1, bits.sum(1) % 2, torch.full((count,), length))  # token ids 1, 2

    train, test = draw(num_train), draw(num_test)
    return tasks.TaskData(name="parity", kind="classification", train=train, test=test, num_classes=2, vocab_size=3)


def test_a_new_task_is_one_function_and_one_registration(registries, monkeypatch, tmp_path):
    from deform_attn.experiments.runner import run_grid

    budget = {"steps": 2, "batch_size": 8, "warmup": 1}
    assert tasks.register_task("parity", kind="classification", default_train=budget)(_parity_task) is _parity_task
    assert tasks.TASKS["parity"].default_train == budget
    # a preset that gives the task neither params nor a budget takes the registered ones
    monkeypatch.setitem(grid.PRESETS, "micro_parity", {**grid.PRESETS["micro"], "tasks": {"parity": {}}, "sweeps": {}})
    runs = grid.build_grid("micro_parity")
    assert {r.task for r in runs} == {"parity"} and len(runs) == 6  # 3 micro variants x 2 seeds
    assert all(r.train == TrainConfig(**budget) and r.task_params == () for r in runs)
    counts = run_grid("micro_parity", tmp_path / "parity.jsonl", progress=False)
    assert counts == {"grid": 6, "skipped": 0, "trained": 6, "left": 0, "non_finite": 0}
    written = [schema.Record.from_dict(r) for r in records.read_records(tmp_path / "parity.jsonl")]
    assert sorted(r.key for r in written) == sorted(r.key for r in runs)
    assert all(r.task_kind == "classification" and 0 <= r.metric() <= 1 for r in written)
    assert all(r.num_train + r.num_validation == 32 and r.num_validation == 4 for r in written)  # fold 0 of 10


def test_time_limit_starts_no_run_after_it_and_a_later_call_resumes(tmp_path, monkeypatch):
    """--time-limit: the run in progress finishes, no other starts; the next call trains the rest."""
    from deform_attn.experiments import runner

    clock = iter(range(0, 10**6, 10))  # every reading of the clock (training's too): 10 s later
    monkeypatch.setattr(runner.time, "perf_counter", lambda: float(next(clock)))
    output = tmp_path / "limited.jsonl"
    # deadline 0 + 15 s: the first check reads 10 s and starts a run, whose own readings push
    # the next check past the deadline
    first = runner.run_grid("micro", output, progress=False, time_limit=15.0)
    assert first["trained"] == 1 and first["left"] == first["grid"] - 1
    assert len(records.read_records(output)) == 1
    monkeypatch.undo()
    rest = runner.run_grid("micro", output, progress=False)
    assert rest == {"grid": first["grid"], "skipped": 1, "trained": first["grid"] - 1, "left": 0, "non_finite": 0}


def test_time_limit_must_be_positive(capsys):
    from deform_attn.experiments.runner import main

    with pytest.raises(SystemExit):
        main(["run", "--preset", "micro", "--time-limit", "0"])
    assert "--time-limit: expected a positive number of seconds, got 0.0" in capsys.readouterr().err


def test_task_registration_is_validated(registries):
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task("adding", kind="regression", default_train={})
    with pytest.raises(ValueError, match="kind"):
        tasks.register_task("parity", kind="ranking", default_train={})
    tasks.register_task("parity", kind="regression", default_train={})(_parity_task)
    with pytest.raises(RuntimeError, match="registered as regression"):
        tasks.make_task("parity", {}, 0)


def test_existing_tasks_keep_their_data_and_budgets():
    """The registry only looks tasks up: the same generator calls, the same data."""
    assert {"adding", "listops", "mnist1d", "mnist1d_long", "osuleaf", "text"} <= set(tasks.TASKS)
    direct = tasks.adding_problem(length=20, num_train=10, num_test=5, seed=4)
    looked_up = tasks.make_task("adding", {"length": 20, "num_train": 10, "num_test": 5}, 4)
    assert torch.equal(direct.train.x, looked_up.train.x) and torch.equal(direct.test.y, looked_up.test.y)
    assert tasks.TASKS["mnist1d_long"].build is tasks.TASKS["mnist1d"].build is tasks.mnist1d
    assert tasks.TASKS["adding"].default_train == {"steps": 1000, "batch_size": 16, "warmup": 100}


def test_published_records_are_consistent_with_their_own_configs():
    """Every shipped record's key is its task, variant, the hash of its stored config and its seed.

    The shipped records predate the validation protocol (schema 1), so today's presets no longer
    build their keys; each record still names exactly the settings it ran with.
    """
    for preset in results.published_presets():
        published, _ = results.load_published(preset)
        assert published, preset
        for record in published:
            parsed = schema.Record.from_dict(record)
            assert parsed.config_hash == grid.config_hash(parsed.config)
            assert parsed.key == f"{parsed.task}/{parsed.variant}/{parsed.config_hash}/{parsed.seed}"


GRID_STATE = ROOT / "grid_state"


@pytest.mark.parametrize("path", sorted(GRID_STATE.glob("*/*.pt")), ids=lambda path: path.name)
def test_kept_training_state_is_of_an_unfinished_run_and_listed(path):
    """A run's training state kept in grid_state/<preset>/ belongs to a run of that preset that is
    not published yet, under the name the runner looks for, from a clean commit, part-way through,
    and grid_state/README.md lists it with that commit."""
    from deform_attn.experiments import runner

    state = torch.load(path, map_location="cpu", weights_only=True)
    identity = state["identity"]
    runs = {run.key: run for run in grid.build_grid(path.parent.name)}
    assert identity["key"] in runs and runs[identity["key"]].config_hash == identity["config_hash"]
    assert path.name == runner.checkpoint_file(Path("results.jsonl"), identity["key"]).name
    assert not provenance.is_dirty_commit(identity["git_commit"])
    assert 0 < state["step"] < runs[identity["key"]].train.steps
    published = {record["key"] for preset in results.published_presets()
                 for record in results.load_published(preset)[0]}
    assert identity["key"] not in published, "finished and published: remove its state"
    listing = (GRID_STATE / "README.md").read_text()
    assert any(identity["key"] in line and identity["git_commit"] in line for line in listing.splitlines())


def _grid_state_script():
    from conftest import load_script

    return load_script(ROOT / "scripts" / "grid_state.py")


def test_grid_state_readme_is_written_from_the_kept_files():
    script = _grid_state_script()
    text = (GRID_STATE / "README.md").read_text()
    assert script.render(text) == text, "run python scripts/grid_state.py prune"
    assert script.main(["--check"]) == 0


def test_grid_state_keeps_only_unfinished_clean_unpublished_runs_of_the_grid(tmp_path):
    script = _grid_state_script()
    from deform_attn.experiments import runner

    run, published_run = grid.build_grid("cpu")[:2]
    clean = "0" * 40

    def save(folder, name, key, step, commit=clean, config_hash=None):
        folder.mkdir(parents=True, exist_ok=True)
        identity = {"key": key, "config_hash": config_hash or key.split("/")[2], "git_commit": commit,
                    "torch": "2.13.0+cpu", "device": "cpu"}
        torch.save({"identity": identity, "step": step}, folder / name)

    source, root = tmp_path / "checkpoints", tmp_path / "grid_state"
    name = runner.checkpoint_file(Path("r"), run.key).name
    save(source, name, run.key, 5)
    save(source, "published.pt", published_run.key, 5)
    save(source, "dirty.pt", run.key, 5, commit=clean + "-dirty")
    save(source, "not_started.pt", run.key, 0)
    save(source, "finished.pt", run.key, run.train.steps)
    save(source, "foreign.pt", "adding/full/000000000000/0", 5, config_hash="000000000000")
    done = script.keep(source, "cpu", root, published={published_run.key})
    assert sorted(path.name for path in root.glob("*/*.pt")) == [name]
    assert [line for line in done if line.startswith("kept")] == [f"kept {name} at step 5"]
    reasons = " ".join(done)
    for reason in ["published", "uncommitted", "part-way", "not a run of the 'cpu' grid"]:
        assert reason in reasons

    block = script.states_block(root)
    assert f"| cpu | `{run.key}` | 5 of {run.train.steps} | {clean} |" in block
    assert f"git worktree add --detach ../deform-attn-grid-0000000 {clean}" in block

    save(source, name, run.key, 3)  # an earlier state never replaces a later one
    script.keep(source, "cpu", root, published={published_run.key})
    assert script.read_state(root / "cpu" / name)["step"] == 5
    save(source, name, run.key, 7)
    script.keep(source, "cpu", root, published={published_run.key})
    assert script.read_state(root / "cpu" / name)["step"] == 7

    assert script.prune(root, published={run.key}) == [f"removed cpu/{name}: published"]
    assert not (root / "cpu").exists()
    assert script.states_block(root).startswith("No training state is kept")


# ---------------------------------------------------------------------------- the <= 0.0.18 bug


@pytest.mark.parametrize("length", [9, 10, 64])
def test_bug018_sampler_equals_grid_sample_on_the_wrong_axis(length):
    """The sequence as an (n, 1) image, positions in x, y = 0: exactly what the old version did."""
    values = torch.randn(3, 5, length, dtype=torch.float64)
    positions = torch.rand(3, 7, dtype=torch.float64) * (length + 6) - 3  # in and outside the sequence
    normalized = normalize_positions(positions, length, align_corners=False)
    grid_xy = torch.stack([normalized, torch.zeros_like(normalized)], dim=-1)[:, :, None, :]  # (b, m, 1, 2)
    image = values[..., None]  # (b, c, n, 1): length on the height axis
    expected = F.grid_sample(image, grid_xy, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]
    torch.testing.assert_close(models.bug018_sample(values, positions), expected, rtol=1e-12, atol=1e-12)


def test_bug018_layer_uses_the_wrong_sampler_and_still_trains():
    layer = models.Bug018DeformableAttention1D(dim=16, dim_head=8, heads=2, batch_first=True)
    x = torch.randn(2, 32, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # every key sees only the middle tokens: the gradient reaches other tokens only through queries
    grouped = torch.randn(4, 8, 32)
    samples = layer.sample_keys(grouped, torch.rand(4, 8) * 31)
    middle = 0.5 * (grouped[..., 15] + grouped[..., 16])
    ratio = samples / middle[..., None]
    assert torch.all((ratio > 0.49) & (ratio <= 1.0 + 1e-6))


# ---------------------------------------------------------------------------- models


@pytest.mark.parametrize("attention", list(variants.ATTENTION_VARIANTS))
@pytest.mark.parametrize("token_input", [True, False])
def test_every_attention_kind_runs_forward_and_backward_with_padding(attention, token_input):
    config = models.ModelConfig(attention=attention, dim=16, depth=2, heads=2, dim_head=8, window=4)
    if token_input:
        model = models.build_model(config, num_outputs=10, vocab_size=16)
        x = torch.randint(1, 16, (3, 24))
    else:
        model = models.build_model(config, num_outputs=1, in_channels=2)
        x = torch.randn(3, 24, 2)
    mask = torch.ones(3, 24, dtype=torch.bool)
    mask[1, 17:] = False
    mask[2, 9:] = False
    out = model(x, mask)
    assert out.shape == ((3, 10) if token_input else (3,))
    out.float().pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("attention", ["deformable", "downsampled", "full", "local", "mlp_only"])
def test_padding_does_not_change_the_prediction(attention):
    """A sequence padded at the end gives the same output as the sequence alone (bug018 excepted)."""
    config = models.ModelConfig(attention=attention, dim=16, depth=2, heads=2, dim_head=8, window=4)
    model = models.build_model(config, num_outputs=10, vocab_size=16).eval()
    tokens = torch.randint(1, 16, (1, 20))
    padded = torch.cat([tokens, torch.zeros(1, 12, dtype=torch.long)], dim=1)
    mask = torch.arange(32)[None, :] < 20
    torch.testing.assert_close(model(padded, mask), model(tokens), rtol=1e-4, atol=1e-5)


def test_downsampled_variant_has_zero_offsets():
    config = models.ModelConfig(attention="downsampled", dim=16, heads=2, dim_head=8)
    layer = models.build_model(config, num_outputs=2, in_channels=1).blocks[0].attention.layer
    _, vgrid = layer(torch.randn(2, 16, 16), return_vgrid=True)
    torch.testing.assert_close(vgrid, torch.arange(4.0).expand_as(vgrid))


def _seeded_layer(attention: str, **changes) -> nn.Module:
    torch.manual_seed(0)
    config = models.ModelConfig(attention=attention, dim=16, heads=2, dim_head=8, **changes)
    return variants.ATTENTION_VARIANTS[attention].build(config).layer


def test_downsampled_variant_is_the_deformable_layer_with_offsets_forced_to_zero():
    deformable, downsampled = _seeded_layer("deformable"), _seeded_layer("downsampled")
    assert isinstance(downsampled.to_offsets, ZeroOffsets) and not list(downsampled.to_offsets.parameters())
    offset_weights = sum(p.numel() for p in deformable.to_offsets.parameters())
    assert models.count_parameters(downsampled) == models.count_parameters(deformable) - offset_weights
    kept = downsampled.state_dict()
    assert all(torch.equal(value, deformable.state_dict()[name]) for name, value in kept.items())
    offset_names = {f"to_offsets.{name}" for name, _ in deformable.to_offsets.named_parameters()}
    assert set(deformable.state_dict()) - set(kept) == offset_names
    with torch.no_grad():
        deformable.to_offsets.pointwise.weight.zero_()  # pointwise has no bias: tanh(0) = 0 offsets
    x = torch.randn(3, 24, 16)
    mask = torch.arange(24)[None, :] < torch.tensor([[24], [17], [9]])
    torch.testing.assert_close(downsampled(x), deformable(x), rtol=0, atol=0)
    torch.testing.assert_close(downsampled(x, mask=mask), deformable(x, mask=mask), rtol=0, atol=0)


def test_no_position_bias_removes_the_bias_and_keeps_the_other_weights():
    biased, unbiased = _seeded_layer("deformable"), _seeded_layer("deformable", position_bias="none")
    assert biased.position_bias is not None and unbiased.position_bias is None
    bias_weights = sum(p.numel() for p in biased.position_bias.parameters())
    assert models.count_parameters(unbiased) == models.count_parameters(biased) - bias_weights
    assert all(torch.equal(value, biased.state_dict()[name]) for name, value in unbiased.state_dict().items())
    x = torch.randn(2, 24, 16)
    assert not torch.allclose(unbiased(x), biased(x))
    with pytest.raises(ValueError, match="position_bias"):
        models.ModelConfig(position_bias="alibi")


@pytest.mark.parametrize("attention", list(variants.ATTENTION_VARIANTS))
def test_variants_are_built_without_the_layers_deprecated_flags(attention):
    config = models.ModelConfig(attention=attention, dim=16, heads=2, dim_head=8, position_bias="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        module = variants.build_attention(config)
        out = module(torch.randn(2, 16, 16), torch.ones(2, 16, dtype=torch.bool))
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning) and "deform_attn" in w.filename]
    assert deprecations == [], [str(w.message) for w in deprecations]
    assert out.shape == (2, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("r", [1, 2, 3, 4, 8])
def test_offset_kernel_size_none_follows_the_package_rule(r):
    layer = _seeded_layer("deformable", downsample_factor=r)
    assert layer.to_offsets.depthwise.kernel_size == (default_offset_kernel_size(r),)
    explicit = _seeded_layer("deformable", downsample_factor=r, offset_kernel_size=r + 2)
    assert explicit.to_offsets.depthwise.kernel_size == (r + 2,)


def test_mlp_only_control_mixes_nothing_across_tokens():
    config = models.ModelConfig(attention="mlp_only", dim=16, depth=2, heads=2, dim_head=8)
    model = models.build_model(config, num_outputs=3, in_channels=2)
    assert all(not list(block.attention.parameters()) for block in model.blocks)
    deformable = models.build_model(dataclasses.replace(config, attention="deformable"), num_outputs=3, in_channels=2)
    attention_weights = sum(models.count_parameters(block.attention) for block in deformable.blocks)
    assert models.count_parameters(model) == models.count_parameters(deformable) - attention_weights
    h = torch.randn(1, 12, 16)
    changed = h.clone()
    changed[0, 5] += 1.0
    before, after = model.blocks[0](h, None), model.blocks[0](changed, None)
    others = torch.arange(12) != 5
    torch.testing.assert_close(after[0, others], before[0, others], rtol=0, atol=0)
    assert not torch.allclose(after[0, 5], before[0, 5])


class _Tokenwise(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        return self.proj(x)


def test_a_new_variant_is_one_registered_function(registries, monkeypatch):
    @variants.register_variant("tokenwise")
    def tokenwise(config):
        """A per-token linear map in place of attention."""
        return _Tokenwise(config.dim)

    assert variants.ATTENTION_VARIANTS["tokenwise"].description == "A per-token linear map in place of attention."
    config = models.ModelConfig(attention="tokenwise", dim=16, depth=2, heads=2, dim_head=8)
    model = models.build_model(config, num_outputs=3, vocab_size=10)
    assert all(isinstance(block.attention, _Tokenwise) for block in model.blocks)
    control = models.build_model(dataclasses.replace(config, attention="mlp_only"), num_outputs=3, vocab_size=10)
    assert models.count_parameters(model) == models.count_parameters(control) + 2 * (16 * 16 + 16)
    assert model(torch.randint(1, 10, (2, 8))).shape == (2, 3)
    monkeypatch.setitem(grid.PRESETS, "micro_tokenwise", {**grid.PRESETS["micro"], "variants": ["tokenwise"]})
    assert {r.variant for r in grid.build_grid("micro_tokenwise") if r.axis is None} == {"tokenwise"}
    with pytest.raises(ValueError, match="already registered"):
        variants.register_variant("tokenwise")


def test_presets_list_only_registered_variants_and_the_main_comparison_is_unchanged(monkeypatch):
    assert grid.MAIN_VARIANTS == ("deformable", "downsampled", "full", "bug018")
    assert set(grid.MAIN_VARIANTS) <= set(variants.ATTENTION_VARIANTS)
    # the attention-free control joins only the new main comparison, never the published grids
    assert [name for name, spec in grid.PRESETS.items() if "mlp_only" in spec.get("variants", ())] == ["main"]
    monkeypatch.setitem(grid.PRESETS, "micro_typo", {**grid.PRESETS["micro"], "variants": ["deformabel"]})
    with pytest.raises(ValueError, match="deformabel"):
        grid.build_grid("micro_typo")


def test_model_config_rejects_unknown_attention():
    with pytest.raises(ValueError, match="attention"):
        models.ModelConfig(attention="sparse")


# ---------------------------------------------------------------------------- grid and shards


def test_main_grid_has_six_seeds_per_variant_and_three_for_the_bug():
    runs = grid.build_grid("main")
    assert len({r.key for r in runs}) == len(runs)
    for task in grid.PRESETS["main"]["tasks"]:
        for variant in grid.PRESETS["main"]["variants"]:
            seeds = sorted(r.seed for r in runs if r.task == task and r.variant == variant)
            assert seeds == ([0, 1, 2] if variant == "bug018" else [0, 1, 2, 3, 4, 5])


def test_the_cpu_preset_is_the_union_of_its_parts_each_run_once():
    parts = grid.PRESETS["cpu"]["parts"]
    union = grid.build_grid("cpu")
    keys = [r.key for r in union]
    assert len(set(keys)) == len(keys)
    owner = {}
    for part in parts:
        for run in grid.build_grid(part):
            owner.setdefault(run.key, part)  # the first part that lists a run publishes it
    assert {r.key: r.preset for r in union} == owner
    # MNIST-1D's main deformable seeds 0-2 are also the lengths axis' and the sweeps' default point
    shared = [r for r in union if r.key in {run.key for run in grid.build_grid("sweeps")} and r.preset == "main"]
    assert {r.variant for r in shared} == {"deformable"} and sorted(r.seed for r in shared) == [0, 1, 2]
    only = grid.build_grid("cpu", tasks=["mnist1d_x16"])
    assert only and {(r.task, r.preset) for r in only} == {("mnist1d_x16", "lengths")}
    with pytest.raises(ValueError, match="--tasks"):
        grid.build_grid("cpu", tasks=["imagenet"])


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_grid_exactly(count):
    runs = grid.build_grid("main")
    shards = [grid.shard(runs, i, count) for i in range(count)]
    keys = [r.key for s in shards for r in s]
    assert sorted(keys) == sorted(r.key for r in runs) and len(set(keys)) == len(keys)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [r.key for r in grid.shard(list(reversed(runs)), 0, count)] == [r.key for r in reversed(shards[0])]


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "1/0", "a/b", "1", "1/2/3", ""])
def test_bad_shard_specs_are_rejected(bad):
    with pytest.raises(ValueError, match="--shard"):
        grid.parse_shard(bad)


def test_bad_cli_arguments_exit_with_a_clear_message(capsys):
    from deform_attn.experiments.runner import main

    for argv, expected in [
        (["run", "--preset", "huge"], "--preset: expected one of"),
        (["run", "--preset", "micro", "--shard", "5/2"], "--shard"),
        (["run", "--preset", "micro", "--jobs", "2", "--shard", "0/2"], "--jobs and --shard"),
        (["run", "--preset", "micro", "--tasks", "listops"], "--tasks"),
        (["run", "--preset", "micro", "--checkpoint-every", "0"], "--checkpoint-every: expected a positive"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert expected in capsys.readouterr().err


# ---------------------------------------------------------------------------- records and the runner


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deform_attn.experiments", *args]


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_records_are_appended_whole_and_torn_lines_are_skipped(tmp_path):
    path = tmp_path / "r.jsonl"
    records.append_record(path, {"key": "a", "x": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"key": "b", "x": ')  # a torn line, as after a crash
    records.append_record(path, {"key": "c", "x": 3})
    records.append_record(path, {"key": "a", "x": 9})  # duplicate: the first one wins
    with pytest.warns(UserWarning, match="not valid JSON"):
        read = records.read_records(path)
    assert [(r["key"], r["x"]) for r in read] == [("a", 1), ("c", 3)]


def test_runner_micro_grid_records_and_resume(tmp_path):
    from deform_attn.experiments.runner import main

    out = tmp_path / "micro.jsonl"
    assert main(["run", "--preset", "micro", "--out", str(out), "--quiet"]) == 0
    lines = out.read_text().splitlines()
    expected = grid.build_grid("micro")
    assert len(lines) == len(expected) == 8  # 3 variants + 1 sweep point, 2 seeds
    record = json.loads(lines[0])
    for field in ("task", "variant", "config", "seed", "metrics", "baseline", "params", "train_time_s",
                  "device", "torch", "git_commit", "preset", "config_hash", "key"):
        assert field in record
    assert math.isfinite(record["metrics"]["test_mse"])
    parsed = schema.Record.from_dict(record)
    assert parsed.schema == schema.SCHEMA_VERSION == 2 and parsed.to_dict() == record
    assert parsed.command == f"python -m deform_attn.experiments run --preset micro --out {out} --quiet"
    assert parsed.git_commit == provenance.git_commit() and parsed.train_flops > 0
    # the default 10 curve points, capped by the 3 steps of the micro budget
    assert [point["step"] for point in parsed.learning_curve] == [1, 2, 3]
    assert all("validation_mse" in point and point["cpu_s"] >= 0 for point in parsed.learning_curve)
    assert len(parsed.test_outcomes) == parsed.num_test and parsed.validation_metrics["validation_mse"] >= 0
    assert parsed.torch == torch.__version__ and parsed.threads == torch.get_num_threads()
    assert main(["run", "--preset", "micro", "--out", str(out), "--quiet"]) == 0  # nothing left to do
    assert out.read_text().splitlines() == lines


def test_worker_processes_share_one_output_file(tmp_path):
    """--jobs 2, the way a GPU is shared by many small runs: two worker processes, one shard and one
    thread each, append to one file; every run of the grid lands in it exactly once."""
    out = tmp_path / "jobs.jsonl"
    seeds = ["0", "1", "2"]
    subprocess.run(_cli("run", "--preset", "micro", "--jobs", "2", "--device", "cpu", "--out", str(out),
                        "--quiet", "--seeds", *seeds), env=_environment(), cwd=tmp_path, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written = [json.loads(line) for line in out.read_text().splitlines()]  # no torn or interleaved line
    expected = {run.key for run in grid.build_grid("micro", seeds=[int(seed) for seed in seeds])}
    assert sorted(r["key"] for r in written) == sorted(expected)
    assert {r["shard"] for r in written} == {"0/2", "1/2"} and {r["threads"] for r in written} == {1}
    assert {r["device"] for r in written} == {"cpu"}


def test_gpu_preset_is_the_micro_gpu_grid_scaled_up_and_runs_on_the_cpu(tmp_path):
    """'micro_gpu' is 'gpu' shrunk: the same tasks, lengths, recipes and variants; two of its tasks
    run here on the CPU (the 2560-token task's evaluation alone takes minutes on two cores),
    where bfloat16 autocast is off."""
    from deform_attn.experiments.runner import main

    gpu, micro = grid.build_grid("gpu"), grid.build_grid("micro_gpu")
    assert {(r.task, r.task_params, r.variant) for r in gpu} == {(r.task, r.task_params, r.variant) for r in micro}
    assert max(dict(r.task_params).get("upsample", 1) for r in gpu) == 64 and len(gpu) == 36
    assert {r.train.amp for r in gpu} == {r.train.amp for r in micro} == {"bf16"}
    scaled = {"steps", "warmup", "batch_size", "curve_points"}
    for big in gpu:
        small = next(r for r in micro if (r.task, r.variant) == (big.task, big.variant))
        differing = {f.name for f in dataclasses.fields(big.train) if getattr(big.train, f.name) != getattr(small.train, f.name)}
        assert differing <= scaled, differing
    out = tmp_path / "micro_gpu.jsonl"
    assert main(["run", "--preset", "micro_gpu", "--tasks", "mnist1d", "mnist1d_x4", "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0
    written = records.read_records(out)
    assert sorted(r["key"] for r in written) == sorted(r.key for r in micro if r.task in ("mnist1d", "mnist1d_x4"))
    assert {r["amp"] for r in written} == {"none"} and {r["sequence_length"] for r in written} == {40, 160}


@pytest.fixture
def worker_commands(monkeypatch):
    """The command lines of the worker processes ``run --jobs`` starts (none is started)."""
    from deform_attn.experiments import runner

    started = []

    class Worker:
        def __init__(self, command):
            started.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Worker)
    return started


def test_worker_processes_get_the_time_limit(tmp_path, worker_commands):
    from deform_attn.experiments import runner

    started = worker_commands
    assert runner.main(["run", "--preset", "micro", "--jobs", "2", "--time-limit", "240",
                        "--out", str(tmp_path / "r.jsonl")]) == 0
    assert len(started) == 2
    assert all(command[command.index("--time-limit") + 1] == "240.0" for command in started)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_script_refuses_a_machine_without_cuda(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_run.sh"), "ablations", str(tmp_path / "out")],
                            env={**_environment(), "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "torch sees no CUDA device here" in result.stderr and not (tmp_path / "out").exists()


def test_sigkill_mid_grid_loses_only_the_unfinished_run(tmp_path):
    out = tmp_path / "killed.jsonl"
    command = _cli("run", "--preset", "micro", "--out", str(out), "--quiet", "--seeds", "0", "1", "2", "3")
    total = len(grid.build_grid("micro", seeds=[0, 1, 2, 3]))
    process = subprocess.Popen(command, env=_environment(), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = [json.loads(line) for line in out.read_text().splitlines()]  # every line parses
    assert 2 <= len(before) < total, "the kill should land mid-grid"
    subprocess.run(command, env=_environment(), cwd=tmp_path, check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = [json.loads(line) for line in out.read_text().splitlines()]
    assert after[: len(before)] == before  # finished records untouched
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == total
    assert set(keys) == {r.key for r in grid.build_grid("micro", seeds=[0, 1, 2, 3])}


def test_shard_results_merge_into_the_whole_grid(tmp_path):
    from deform_attn.experiments.runner import main

    for i in range(2):
        assert main(["run", "--preset", "micro", "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}.jsonl"), "--quiet"]) == 0
    assert main(["merge", str(tmp_path / "all.jsonl"), str(tmp_path / "s0.jsonl"), str(tmp_path / "s1.jsonl"), str(tmp_path / "s0.jsonl")]) == 0
    merged = records.read_records(tmp_path / "all.jsonl")
    assert sorted(r["key"] for r in merged) == sorted(r.key for r in grid.build_grid("micro"))


class _Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


def _die_after_saves(monkeypatch, count):
    """Let the first ``count`` checkpoint saves happen, then 'kill' the run."""
    real, saves = train_module._save_checkpoint, []

    def save(path, state):
        real(path, state)
        saves.append(state["step"])
        if len(saves) == count:
            raise _Killed

    monkeypatch.setattr(train_module, "_save_checkpoint", save)
    return saves


def _spy_on_training(monkeypatch):
    """The results train_and_evaluate returns from here on, in order."""
    returned, real_train = [], train_module.train_and_evaluate

    def spy(*args, **kwargs):
        returned.append(real_train(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(train_module, "train_and_evaluate", spy)
    return returned


def _trained_alike(a, b):
    """Same metrics, validation, learning curve (less its clocks) and per-example test outcomes."""
    untimed = [[{k: v for k, v in point.items() if k not in ("cpu_s", "wall_s")} for point in r["learning_curve"]]
               for r in (a, b)]
    return (a["metrics"] == b["metrics"] and a["validation"] == b["validation"] and untimed[0] == untimed[1]
            and a["test_outcomes"] == b["test_outcomes"] and a["train_flops"] == b["train_flops"])


def _resumable_run():
    """A micro run whose every source of randomness is live: dropout, input noise, new epochs."""
    run = grid.build_grid("micro")[0]
    data = tasks.make_task(run.task, dict(run.task_params), run.seed)
    model = dataclasses.replace(run.model, dropout=0.2)
    # 64 examples less a fold of 7, batches of 8: an epoch every 7 steps
    train = dataclasses.replace(run.train, steps=17, curve_points=4, input_noise=0.1)
    return data, model, train


def test_a_run_killed_after_a_checkpoint_ends_as_if_never_interrupted(tmp_path, monkeypatch):
    data, model, train = _resumable_run()
    whole = train_module.train_and_evaluate(data, model, train, seed=3, device=torch.device("cpu"))
    checkpoint = train_module.Checkpoint(tmp_path / "run.pt", every_s=0.0, identity={"key": "k", "commit": "c"})
    saves = _die_after_saves(monkeypatch, 9)
    with pytest.raises(_Killed):
        train_module.train_and_evaluate(data, model, train, seed=3, device=torch.device("cpu"), checkpoint=checkpoint)
    assert saves == list(range(1, 10)) and checkpoint.path.is_file()  # a save after every step
    monkeypatch.undo()
    resumed = train_module.train_and_evaluate(data, model, train, seed=3, device=torch.device("cpu"),
                                              checkpoint=checkpoint)
    assert resumed["resumed_from_step"] == 9 and whole["resumed_from_step"] == 0
    assert _trained_alike(resumed, whole)
    assert resumed["earlier_cpu_s"] > 0 and resumed["train_cpu_s"] >= resumed["learning_curve"][-1]["cpu_s"]
    # the curve's clocks carry on from the earlier process: they only grow
    clocks = [point["cpu_s"] for point in resumed["learning_curve"]]
    assert clocks == sorted(clocks)


def test_a_checkpoint_of_another_run_is_ignored_with_a_message(tmp_path, monkeypatch, capsys):
    data, model, train = _resumable_run()
    whole = train_module.train_and_evaluate(data, model, train, seed=3, device=torch.device("cpu"))
    path = tmp_path / "run.pt"
    _die_after_saves(monkeypatch, 5)
    with pytest.raises(_Killed):
        train_module.train_and_evaluate(data, model, train, seed=3, device=torch.device("cpu"),
                                        checkpoint=train_module.Checkpoint(path, 0.0, {"commit": "old"}))
    monkeypatch.undo()
    fresh = train_module.train_and_evaluate(data, model, train, seed=3, device=torch.device("cpu"),
                                            checkpoint=train_module.Checkpoint(path, 0.0, {"commit": "new"}))
    assert fresh["resumed_from_step"] == 0 and fresh["earlier_cpu_s"] == 0.0 and _trained_alike(fresh, whole)
    assert "holds another run" in capsys.readouterr().err
    path.write_bytes(b"not a checkpoint")  # a torn or foreign file costs the saved steps, not the run
    again = train_module.train_and_evaluate(data, model, train, seed=3, device=torch.device("cpu"),
                                            checkpoint=train_module.Checkpoint(path, 0.0, {"commit": "new"}))
    assert again["resumed_from_step"] == 0 and _trained_alike(again, whole)
    assert "cannot be read" in capsys.readouterr().err


def test_checkpoint_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="every_s"):
        train_module.Checkpoint(tmp_path / "run.pt", every_s=-1.0)
    with pytest.raises(ValueError, match="identity: expected JSON values"):
        train_module.Checkpoint(tmp_path / "run.pt", identity={"device": torch.device("cpu")})
    # torch.__version__ is a str subclass that a weights-only load refuses: kept as a plain str
    identity = train_module.Checkpoint(tmp_path / "run.pt", identity={"torch": torch.__version__}).identity
    assert type(identity["torch"]) is str and identity == {"torch": str(torch.__version__)}


def test_the_runner_resumes_a_killed_run_from_its_checkpoint(tmp_path, monkeypatch):
    """A grid killed in its second run: the next call skips the first, resumes the second from its
    last save, and every record equals that of a grid never interrupted; no state is left behind."""
    from deform_attn.experiments import runner

    seeds = [0]
    whole = tmp_path / "whole.jsonl"
    runner.run_grid("micro", whole, seeds=seeds, progress=False, checkpoint_every=None)
    assert not runner.checkpoint_folder(whole).exists()
    out = tmp_path / "killed.jsonl"
    _die_after_saves(monkeypatch, 2 + 1)  # the micro runs take 3 steps, saved after steps 1 and 2
    with pytest.raises(_Killed):
        runner.run_grid("micro", out, seeds=seeds, progress=False, checkpoint_every=0.0)
    monkeypatch.undo()
    first = records.read_records(out)
    assert len(first) == 1
    key = grid.build_grid("micro", seeds=seeds)[1].key
    assert runner.checkpoint_file(out, key).is_file() and len(list(runner.checkpoint_folder(out).iterdir())) == 1
    trained = _spy_on_training(monkeypatch)  # what train_and_evaluate returned in the resumed call
    counts = runner.run_grid("micro", out, seeds=seeds, progress=False, checkpoint_every=0.0)
    monkeypatch.undo()
    assert counts["skipped"] == 1 and counts["trained"] == counts["grid"] - 1
    # the killed run went on from its save after step 1 (the runner's identity, torch version
    # included, reads back), the others started afresh
    assert [result["resumed_from_step"] for result in trained] == [1] + [0] * (counts["grid"] - 2)
    assert trained[0]["earlier_cpu_s"] > 0
    assert list(runner.checkpoint_folder(out).iterdir()) == []
    resumed, reference = records.read_records(out), records.read_records(whole)
    assert [r["key"] for r in resumed] == [r["key"] for r in reference]
    for a, b in zip(resumed, reference):
        assert a["config_hash"] == b["config_hash"]
        assert a["metrics"] == b["metrics"] and a["test_outcomes"] == b["test_outcomes"]
        assert [p["train_loss"] for p in a["learning_curve"]] == [p["train_loss"] for p in b["learning_curve"]]
    assert resumed[1]["run_cpu_s"] >= resumed[1]["train_cpu_s"] > 0


def test_runs_with_a_saved_state_are_trained_first(tmp_path, monkeypatch):
    from deform_attn.experiments import runner

    out = tmp_path / "r.jsonl"
    _die_after_saves(monkeypatch, 2 + 1)  # killed in the second run, after its first step
    with pytest.raises(_Killed):
        runner.run_grid("micro", out, seeds=[0], progress=False, checkpoint_every=0.0)
    monkeypatch.undo()
    out.write_text("")  # forget the first run: it is to train again, after the killed one
    trained = _spy_on_training(monkeypatch)
    runner.run_grid("micro", out, seeds=[0], progress=False, checkpoint_every=0.0)
    first_steps = [result["resumed_from_step"] for result in trained]
    order = [record["key"] for record in records.read_records(out)]
    expected = [run.key for run in grid.build_grid("micro", seeds=[0])]
    assert order == [expected[1], expected[0], *expected[2:]]
    assert first_steps == [1] + [0] * (len(expected) - 1)


def test_worker_processes_get_the_checkpoint_setting(tmp_path, worker_commands):
    from deform_attn.experiments import runner

    started = worker_commands
    out = str(tmp_path / "r.jsonl")
    assert runner.main(["run", "--preset", "micro", "--jobs", "2", "--checkpoint-every", "30", "--out", out]) == 0
    assert all(command[command.index("--checkpoint-every") + 1] == "30.0" for command in started)
    started.clear()
    assert runner.main(["run", "--preset", "micro", "--jobs", "2", "--no-checkpoints", "--out", out]) == 0
    assert len(started) == 2 and all("--no-checkpoints" in command for command in started)


def test_runner_refuses_to_resume_into_records_of_an_older_schema(tmp_path, capsys):
    from deform_attn.experiments.runner import main

    out = tmp_path / "old.jsonl"
    out.write_text((DATA / "smoke" / "results.jsonl").read_text())
    with pytest.raises(SystemExit) as stop:
        main(["run", "--preset", "micro", "--out", str(out), "--quiet"])
    assert stop.value.code == 2 and "older schema" in capsys.readouterr().err
    assert out.read_text() == (DATA / "smoke" / "results.jsonl").read_text()


# ---------------------------------------------------------------------------- aggregation


def _record(task, variant, seed, value, kind="test_accuracy", **changes):
    """A complete record (as its JSON object) with ``value`` as its primary metric."""
    record = schema.Record(
        schema=schema.SCHEMA_VERSION, key=f"{task}/{variant}/{variant}/{seed}", preset="p", task=task,
        task_kind="regression" if kind == "test_mse" else "classification", variant=variant, attention=variant,
        axis=None, overrides={}, config_hash=variant, config={}, seed=seed, shard=None, primary_metric=kind,
        higher_is_better=kind != "test_mse", metrics={kind: value}, finite=True, baseline={kind: 0.1},
        reference={}, sequence_length=8, num_train=4, num_test=4, params=1, train_time_s=1.0, eval_time_s=0.1,
        run_wall_s=1.2, run_cpu_s=1.1, amp="none", device="cpu", device_name="x", threads=1, torch="x",
        python="3.11", git_commit="0" * 40, finished_at="2026-01-01T00:00:00+0000",
    )
    return dataclasses.replace(record, **changes).to_dict()


def test_t_quantiles_match_tables():
    assert results.t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert results.t_quantile_975(2) == pytest.approx(4.3027, abs=1e-4)
    assert results.t_quantile_975(4) == pytest.approx(2.7764, abs=1e-4)
    assert results.t_quantile_975(40) == pytest.approx(2.0211, abs=2e-4)
    assert results.t_quantile_975(120) == pytest.approx(1.9799, abs=2e-4)


def test_summary_mean_and_ci_on_known_values():
    rows = results.summarize([_record("t", "full", s, v) for s, v in enumerate([0.5, 0.6, 0.7])])
    (row,) = rows
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.6)
    assert row["std"] == pytest.approx(0.1)
    assert row["ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3))
    single = results.summarize([_record("t", "full", 0, 0.5)])[0]
    assert single["n"] == 1 and math.isnan(single["ci95"])


def test_paired_differences_use_the_same_seeds():
    data = [_record("t", "full", s, v) for s, v in enumerate([0.5, 0.6, 0.7, 0.9])]
    data += [_record("t", "deformable", s, v) for s, v in enumerate([0.6, 0.8, 0.8])]  # seed 3 missing
    (row,) = results.paired_differences(data, reference="full")
    assert row["seeds"] == [0, 1, 2] and row["n"] == 3
    assert row["mean"] == pytest.approx(0.4 / 3)  # differences 0.1, 0.2, 0.1
    assert row["std"] == pytest.approx(math.sqrt(1 / 300))
    assert row["ci95"] == pytest.approx(4.302653 * math.sqrt(1 / 300) / math.sqrt(3))


def test_tables_dataframe_plots_and_published_results(tmp_path):
    data = [_record("t", v, s, 0.5 + 0.1 * s + (v == "deformable") * 0.05) for v in ("full", "deformable") for s in range(3)]
    rows = results.summarize(data)
    text = results.format_table(rows)
    assert "deformable" in text and "full" in text
    pandas = pytest.importorskip("pandas")
    frame = results.to_dataframe(rows)
    assert isinstance(frame, pandas.DataFrame) and set(frame["variant"]) == {"full", "deformable"}
    pytest.importorskip("matplotlib")
    written = results.plot_all(data, tmp_path / "plots")
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    source = tmp_path / "r.jsonl"
    for record in data:
        records.append_record(source, record)
    folder = results.publish([source], "p", command="python -m deform_attn.experiments run --preset p",
                             destination=tmp_path / "data")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["records"] == 6 and meta["seeds"] == [0, 1, 2] and meta["git_commits"] == ["0" * 40]


def test_published_results_load_through_importlib_resources():
    presets = results.published_presets()
    assert "smoke" in presets
    loaded, meta = results.load_published("smoke")
    assert loaded and meta["preset"] == "smoke" and meta["records"] == len(loaded)
    assert {r["task"] for r in loaded} == set(grid.PRESETS["smoke"]["tasks"])
    with pytest.raises(FileNotFoundError, match="no published results"):
        results.load_published("no-such-preset")


# ---------------------------------------------------------------------------- the record schema


def test_record_round_trips_through_json():
    record = schema.Record.from_dict(_record("t", "full", 3, 0.75, learning_curve=[{"step": 10, "test_accuracy": 0.5}],
                                             command="python -m deform_attn.experiments run --preset p",
                                             train_flops=1.5e12))
    again = schema.Record.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and again.metric() == 0.75 and again.learning_curve[0]["step"] == 10


@pytest.mark.parametrize("preset", ["smoke"])
def test_record_reads_the_committed_schema_1_results(preset):
    lines = (DATA / preset / "results.jsonl").read_text().splitlines()
    for line in lines:
        raw = json.loads(line)
        record = schema.Record.from_dict(raw)
        assert record.schema == 1 and record.command is None
        assert record.learning_curve == [] and record.train_flops is None
        converted = record.to_dict()
        assert {name: converted[name] for name in raw} == raw  # every stored value kept as it was
    assert results.summarize([json.loads(line) for line in lines])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw | {"schema": 3}, "schema expected one of"),
        (lambda raw: raw | {"colour": "red"}, r"unknown fields \['colour'\]"),
        (lambda raw: {k: v for k, v in raw.items() if k != "metrics"}, r"missing fields \['metrics'\]"),
    ],
)
def test_record_rejects_unknown_schemas_and_fields(edit, message):
    with pytest.raises(ValueError, match=message):
        schema.Record.from_dict(edit(_record("t", "full", 0, 0.5)))


def test_publish_refuses_records_from_a_dirty_checkout(tmp_path, capsys):
    from deform_attn.experiments.runner import main

    source = tmp_path / "r.jsonl"
    records.append_record(source, _record("t", "full", 0, 0.5, preset="micro"))
    records.append_record(source, _record("t", "full", 1, 0.6, preset="micro", git_commit="a" * 40 + "-dirty"))
    records.append_record(source, _record("t", "full", 2, 0.7, preset="micro", git_commit=None))
    with pytest.raises(ValueError, match="2 of 3 records come from a modified or unknown checkout"):
        results.publish([source], "micro", command="c", destination=tmp_path / "data")
    assert not (tmp_path / "data").exists()
    argv = ["publish", "--preset", "micro", "--command", "c", "--destination", str(tmp_path / "data"), str(source)]
    assert main(argv) == 2 and "--allow-dirty" in capsys.readouterr().err
    assert main([*argv, "--allow-dirty"]) == 0
    meta = json.loads((tmp_path / "data" / "micro" / "meta.json").read_text())
    assert meta["records"] == 3 and meta["git_commits"] == sorted(["0" * 40, "a" * 40 + "-dirty", "None"])


# ---------------------------------------------------------------------------- the CI preset


def test_smoke_preset_runs_end_to_end_and_summarizes(tmp_path):
    """The `smoke` preset is the CI run of the whole pipeline: every task and main variant trains,
    each run leaves one finite record, and the records aggregate into a table with CIs."""
    out = tmp_path / "smoke.jsonl"
    subprocess.run(_cli("run", "--preset", "smoke", "--out", str(out), "--quiet"), env=_environment(),
                   cwd=tmp_path, check=True, timeout=900)
    runs = grid.build_grid("smoke")
    written = records.read_records(out)
    assert sorted(r["key"] for r in written) == sorted(r.key for r in runs)
    assert {r["task"] for r in written} == {"adding", "listops", "mnist1d", "mnist1d_long", "osuleaf"}
    assert all(math.isfinite(value) for r in written for value in r["metrics"].values())
    table = results.summarize(written)
    assert {(row["task"], row["variant"]) for row in table} >= {
        (task, variant) for task in ("adding", "mnist1d") for variant in grid.MAIN_VARIANTS
    }


# ---------------------------------------------------------------------------- the validation protocol


def test_validation_folds_partition_the_training_split_the_same_way_for_every_seed():
    data = tasks.make_task("adding", {"length": 16, "num_train": 53, "num_test": 8}, seed=0)
    other_seed = tasks.make_task("adding", {"length": 16, "num_train": 53, "num_test": 8}, seed=1)
    held_out = []
    for fold in range(5):
        kept, validation = train_module.validation_split(data.train, 5, fold)
        assert len(kept) + len(validation) == 53
        # the fold holds the same example positions whatever the data
        _, other = train_module.validation_split(other_seed.train, 5, fold)
        assert len(other) == len(validation)
        rows = {tuple(row.flatten().tolist()) for row in validation.x}
        assert not rows & {tuple(row.flatten().tolist()) for row in kept.x}
        held_out.append(rows)
    assert sum(len(rows) for rows in held_out) == 53  # the folds partition the split
    kept, none = train_module.validation_split(data.train, 0, 0)
    assert none is None and kept is data.train


@pytest.mark.parametrize(
    "options, message",
    [
        ({"validation_folds": 1}, r"^validation_folds: expected 0"),
        ({"validation_folds": 4, "validation_fold": 4}, r"^validation_fold: expected 0 <= fold < validation_folds \(4\)"),
        ({"curve_points": -1}, r"^curve_points: expected a non-negative integer"),
        ({"input_noise": -0.1}, r"^input_noise: expected a non-negative"),
        ({"steps": 0}, r"^steps: expected a positive integer"),
    ],
)
def test_train_config_rejects_bad_protocol_settings(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_a_run_records_its_curve_outcomes_and_cost_reproducibly():
    data = tasks.make_task("adding", {"length": 32, "num_train": 96, "num_test": 24}, seed=0)
    model = ModelConfig(dim=16, depth=1, heads=2, dim_head=8, mlp_ratio=1)
    train = TrainConfig(steps=6, batch_size=8, warmup=1, curve_points=3, input_noise=0.05)
    first = train_module.train_and_evaluate(data, model, train, seed=3, device=torch.device("cpu"))
    again = train_module.train_and_evaluate(data, model, train, seed=3, device=torch.device("cpu"))
    assert first["metrics"] == again["metrics"] and first["test_outcomes"] == again["test_outcomes"]
    assert [point["step"] for point in first["learning_curve"]] == [2, 4, 6]
    cpu = [point["cpu_s"] for point in first["learning_curve"]]
    assert cpu == sorted(cpu) and cpu[-1] <= first["train_cpu_s"] + 1e-9
    # the outcomes are the per-example squared errors whose mean is the metric
    assert len(first["test_outcomes"]) == 24
    assert sum(first["test_outcomes"]) / 24 == pytest.approx(first["metrics"]["test_mse"], rel=1e-9)
    assert first["validation"] == {k: v for k, v in first["learning_curve"][-1].items() if k.startswith("validation_")}
    assert first["num_train"] + first["num_validation"] == 96
    assert first["train_flops"] > 0


def test_training_flops_grow_with_steps_and_full_attention_costs_more_on_long_sequences():
    data = tasks.make_task("adding", {"length": 256, "num_train": 32, "num_test": 8}, seed=0)
    cpu = torch.device("cpu")
    config = TrainConfig(steps=2, batch_size=4, warmup=1, curve_points=0)
    flops = {}
    for attention in ("deformable", "full"):
        model = ModelConfig(attention=attention, dim=16, depth=1, heads=2, dim_head=8, mlp_ratio=1)
        flops[attention] = train_module.train_and_evaluate(data, model, config, seed=0, device=cpu)["train_flops"]
    doubled = train_module.train_and_evaluate(
        data, ModelConfig(dim=16, depth=1, heads=2, dim_head=8, mlp_ratio=1), TrainConfig(steps=4, batch_size=4, warmup=1, curve_points=0),
        seed=0, device=cpu,
    )["train_flops"]
    assert doubled == pytest.approx(2 * flops["deformable"])
    assert flops["full"] > flops["deformable"]


# ---------------------------------------------------------------------------- recipe search


def test_tune_grids_cross_candidates_folds_and_the_scored_variants():
    runs = grid.build_grid("micro_tune")
    # adding: 2 candidates x 3 variants; osuleaf: 2 candidates x 2 folds x 3 variants
    assert len(runs) == 2 * 3 + 2 * 2 * 3
    assert {r.candidate for r in runs} == {"c0", "c1"}
    assert {r.model.attention for r in runs} == set(grid.TUNED_VARIANTS)
    folds = {(r.train.validation_folds, r.train.validation_fold) for r in runs if r.task == "osuleaf"}
    assert folds == {(2, 0), (2, 1)}
    c1 = next(r for r in runs if r.candidate == "c1" and r.task == "adding")
    assert c1.train.lr == 3e-3 and c1.model.dropout == 0.0 and "candidate=c1" in c1.variant
    full_tune = grid.build_grid("tune")
    per_task = {task: sum(r.task == task for r in full_tune) for task in {r.task for r in full_tune}}
    assert per_task["osuleaf"] == 4 * len(grid.CANDIDATES) * 3
    assert all(per_task[t] == len(grid.CANDIDATES) * 3 for t in per_task if t != "osuleaf")


def _tuning_record(task, candidate, attention, value, *, kind="classification", fold=0, commit="a" * 40):
    metric = "validation_mse" if kind == "regression" else "validation_accuracy"
    return {
        "task": task, "task_kind": kind, "candidate": candidate, "attention": attention, "git_commit": commit,
        "validation_metrics": {metric: value},
        "config": {"task_params": {}, "model": {"attention": attention, "dropout": 0.1},
                   "train": {"lr": 1e-3, "validation_folds": 4, "validation_fold": fold}},
    }


def test_recipes_score_by_the_mean_over_variants_and_never_by_one():
    from deform_attn.experiments import recipes

    variants = ("deformable", "downsampled", "full")
    records = []
    # c0 has the single best variant (full 0.99) but the worse mean; c1 wins on the mean
    for attention, c0, c1 in (("deformable", 0.50, 0.80), ("downsampled", 0.50, 0.78), ("full", 0.99, 0.80)):
        for fold in range(2):
            records += [_tuning_record("mnist1d", "c0", attention, c0, fold=fold),
                        _tuning_record("mnist1d", "c1", attention, c1, fold=fold)]
    # regression: lower is better
    for attention in variants:
        records += [_tuning_record("adding", "c0", attention, 0.05, kind="regression"),
                    _tuning_record("adding", "c1", attention, 0.01, kind="regression")]
    # an incomplete candidate never wins
    records.append(_tuning_record("adding", "c2", "deformable", 0.0001, kind="regression"))
    parsed = [schema.as_record(_full_record(r)) for r in records]
    chosen = recipes.choose_recipes(parsed, variants=variants, candidates=("c0", "c1"))
    assert chosen["mnist1d"]["candidate"] == "c1"
    assert chosen["mnist1d"]["score"] == pytest.approx((0.80 + 0.78 + 0.80) / 3)
    assert chosen["adding"]["candidate"] == "c1"
    assert chosen["adding"]["candidates"]["c2"]["complete"] is False
    # a task whose search has not finished every candidate is not decided on part of it
    with pytest.raises(ValueError, match=r"^records: no task has every candidate finished"):
        recipes.choose_recipes(parsed, variants=variants, candidates=("c0", "c1", "c2"))
    assert "validation_fold" not in chosen["mnist1d"]["train"] and chosen["mnist1d"]["model"] == {"dropout": 0.1}


def _full_record(partial):
    """A schema-2 record with every required field, overridden by ``partial``."""
    base = {
        "schema": 2, "key": "k", "preset": "tune", "task": "t", "task_kind": "classification", "variant": "v",
        "attention": "deformable", "axis": None, "overrides": {}, "config_hash": "h", "config": {}, "seed": 0,
        "shard": None, "primary_metric": "test_accuracy", "higher_is_better": True, "metrics": {}, "finite": True,
        "baseline": {}, "reference": {}, "sequence_length": 1, "num_train": 1, "num_test": 1, "params": 1,
        "train_time_s": 0.0, "eval_time_s": 0.0, "run_wall_s": 0.0, "run_cpu_s": 0.0, "amp": "none",
        "device": "cpu", "device_name": None, "threads": 1, "torch": "x", "python": "x", "git_commit": "a" * 40,
        "finished_at": "now",
    }
    return {**base, **partial}


def test_recipes_refuse_dirty_records_and_round_trip_through_json(tmp_path):
    from deform_attn.experiments import recipes

    variants = ("deformable", "downsampled", "full")
    records = [schema.as_record(_full_record(_tuning_record("mnist1d", "c0", a, 0.9, commit="b" * 40 + "-dirty")))
               for a in variants]
    with pytest.raises(ValueError, match=r"^records: 1 commit\(s\) are modified or unknown"):
        recipes.choose_recipes(records, variants=variants, candidates=("c0",))
    chosen = recipes.choose_recipes(records, variants=variants, candidates=("c0",), allow_dirty=True)
    path = recipes.write_recipes(chosen, tmp_path / "recipes.json", command="python -m deform_attn.experiments recipes x")
    assert recipes.load_recipes(path) == json.loads(json.dumps(chosen))
    assert recipes.load_recipes(tmp_path / "missing.json") == {}


def test_recipes_command_on_a_micro_tuning_run(tmp_path, capsys):
    from deform_attn.experiments import recipes
    from deform_attn.experiments.runner import main

    out = tmp_path / "tune.jsonl"
    assert main(["run", "--preset", "micro_tune", "--out", str(out), "--quiet", "--tasks", "adding"]) == 0
    assert main(["recipes", str(out), "--allow-dirty", "--write", str(tmp_path / "recipes.json")]) == 0
    frozen = recipes.load_recipes(tmp_path / "recipes.json")
    assert set(frozen) == {"adding"} and frozen["adding"]["candidate"] in {"c0", "c1"}
    assert set(frozen["adding"]["candidates"]) == {"c0", "c1"}
    assert "adding:" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the autoregressive task


def test_text_task_targets_are_the_next_characters_and_the_test_windows_do_not_depend_on_the_seed():
    first = tasks.make_task("text", {"length": 32, "num_train": 50, "num_test": 10}, seed=0)
    second = tasks.make_task("text", {"length": 32, "num_train": 50, "num_test": 10}, seed=1)
    assert first.kind == "language_model" and first.train.x.shape == first.train.y.shape == (50, 32)
    assert torch.equal(first.train.x[:, 1:], first.train.y[:, :-1])  # y is x shifted by one
    assert torch.equal(first.test.x, second.test.x) and not torch.equal(first.train.x, second.train.x)
    assert first.vocab_size == first.num_classes == len(tasks.TEXT_ALPHABET) + 2
    assert 3.0 < first.baseline["test_bits_per_char"] < 6.0  # a unigram model of English text


@pytest.mark.parametrize("attention", grid.CAUSAL_VARIANTS)
def test_causal_language_models_never_see_the_future(attention):
    torch.manual_seed(0)
    config = ModelConfig(attention=attention, dim=16, depth=2, heads=2, dim_head=8, window=3)
    model = models.build_model(config, num_outputs=11, vocab_size=11, per_token=True).double().eval()
    x = torch.randint(1, 11, (2, 29))
    changed = x.clone()
    changed[:, 17:] = torch.randint(1, 11, (2, 12))
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert before.shape == (2, 29, 11)
    assert (before[:, :17] - after[:, :17]).abs().max().item() <= 1e-12
    assert (before[:, 17:] - after[:, 17:]).abs().max().item() > 1e-6


def test_causal_full_attention_equals_an_explicit_lower_triangular_mask():
    from deform_attn.baselines import FullAttention1D

    torch.manual_seed(0)
    causal = FullAttention1D(dim=8, dim_head=4, heads=2, batch_first=True, causal=True)
    x = torch.randn(2, 9, 8)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    q, k, v = causal.to_qkv(x).view(2, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
    allowed = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None, None] & mask[:, None, None, :]
    expected = causal.to_out(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2).reshape(2, 9, 8))
    torch.testing.assert_close(causal(x, mask), expected * mask[..., None])
    torch.testing.assert_close(causal(x)[0], causal(x, mask)[0])


def test_language_model_runs_record_bits_per_character(tmp_path):
    from deform_attn.experiments.runner import main

    out = tmp_path / "causal.jsonl"
    assert main(["run", "--preset", "micro_causal", "--out", str(out), "--quiet"]) == 0
    written = [schema.Record.from_dict(r) for r in records.read_records(out)]
    assert {r.attention for r in written} == set(grid.CAUSAL_VARIANTS) and len(written) == 8
    for record in written:
        assert record.primary_metric == "test_bits_per_char" and record.higher_is_better is False
        assert record.metric() == pytest.approx(sum(record.test_outcomes) / len(record.test_outcomes))
        assert "validation_bits_per_char" in record.validation_metrics


def _fake_recipes(*tasks_):
    recipe = {"candidate": "c1", "train": {"steps": 7, "batch_size": 4, "warmup": 1, "lr": 3e-3},
              "model": {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "dropout": 0.1}, "task_params": {}}
    return {task: dict(recipe) for task in tasks_}


def test_main_presets_train_on_the_frozen_recipes():
    recipes_ = _fake_recipes("mnist1d", "mnist1d_long", "adding", "listops", "osuleaf", "text")
    runs = grid.build_grid("main", recipes=recipes_)
    per_task = [r for r in runs if r.task == "adding"]
    assert len(per_task) == 5 * 6 + 3  # five variants with 6 seeds, the bug with 3
    assert {r.seed for r in per_task if r.model.attention == "bug018"} == {0, 1, 2}
    assert all(r.train.steps == 7 and r.train.lr == 3e-3 and r.model.dropout == 0.1 and r.model.dim == 16 for r in runs)
    assert all(r.train.validation_folds == 10 and r.train.validation_fold == 0 for r in runs)
    lengths = grid.build_grid("lengths", recipes=recipes_)
    assert {r.task for r in lengths} == {"mnist1d", "mnist1d_x4", "mnist1d_x16"}
    assert dict(next(r for r in lengths if r.task == "mnist1d_x16").task_params) == {"upsample": 16, "frame": 640}
    assert len(grid.build_grid("causal", recipes=recipes_)) == 4 * 6


def test_a_preset_without_its_frozen_recipe_says_how_to_choose_one():
    with pytest.raises(ValueError, match=r"^preset 'main': no frozen recipe for task 'mnist1d_long'.*--preset tune"):
        grid.build_grid("main", recipes=_fake_recipes("mnist1d"))


def test_compute_matched_runs_spend_equal_flops(monkeypatch):
    """Each variant's steps are the budget over its own FLOPs per step, so budgets match."""
    recipe = {"candidate": "c0", "task_params": {"length": 96, "num_train": 64, "num_test": 8},
              "train": {"steps": 40, "batch_size": 4, "warmup": 8},
              "model": {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8}}
    monkeypatch.setitem(grid.PRESETS, "micro_compute", {
        **grid.PRESETS["compute"], "tasks": {"adding": {}}, "seeds": [0], "compute_budgets": [0.5, 1.0]})
    runs = grid.build_grid("micro_compute", recipes={"adding": recipe})
    assert len(runs) == 3 * 2 and {r.axis for r in runs} == {"compute"}
    data = tasks.make_task("adding", recipe["task_params"], 0)
    spent = {}
    for run in runs:
        per_step = train_module.step_flops(data, run.model, run.train)
        spent[(run.model.attention, run.variant.split("budget=")[1].split("]")[0])] = per_step * run.train.steps
    full = next(r for r in runs if r.model.attention == "full" and "budget=1.0" in r.variant)
    assert full.train.steps == 40 and full.train.warmup == 8  # the reference spends its recipe
    for (attention, budget), flops in spent.items():
        target = float(budget) * spent[("full", "1.0")]
        assert abs(flops - target) / target < 0.05, (attention, budget)
    deformable = {r.train.steps for r in runs if r.model.attention == "deformable"}
    assert max(deformable) > 40  # cheaper per step than full attention at n = 96: more steps


def test_clip_gradients_is_torchs_clip_grad_norm():
    """The runner's clip: the same norm and the same scaled gradients as clip_grad_norm_, and no
    change where the norm is below the bound."""
    from deform_attn.experiments.train import clip_gradients

    generator = torch.Generator().manual_seed(0)
    for max_norm in (0.5, 1e6):
        ours = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((3, 4), (5,), (2, 2, 2))]
        theirs = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((3, 4), (5,), (2, 2, 2))]
        for mine, reference in zip(ours, theirs):
            mine.grad = torch.randn(mine.shape, generator=generator)
            reference.grad = mine.grad.clone()
        norm = clip_gradients(ours, max_norm)
        expected_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        torch.testing.assert_close(norm, expected_norm)
        for mine, reference in zip(ours, theirs):
            torch.testing.assert_close(mine.grad, reference.grad)
        if max_norm > 1:
            assert all(torch.equal(mine.grad, reference.grad) for mine, reference in zip(ours, theirs))


def test_make_optimizer_is_adamw_with_the_recipes_settings():
    """The runner's update is AdamW's per-parameter loop, bit for bit, with the recipe's lr and weight
    decay (the update of every published record; the fused one is not bitwise the same)."""
    from deform_attn.experiments.train import make_optimizer

    config = TrainConfig(lr=3e-3, weight_decay=0.05)
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    theirs.load_state_dict(ours.state_dict())
    optimizer = make_optimizer(ours, config)
    reference = torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=0.05, foreach=False)
    assert optimizer.defaults["lr"] == 3e-3 and optimizer.defaults["weight_decay"] == 0.05
    assert not optimizer.defaults["fused"]
    for step in range(4):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            opt.step()
    for mine, expected in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(mine, expected)
