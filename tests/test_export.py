"""Export: one torch.export program serves every length, and ONNX runs it within 1e-4 of eager."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import make_layer, max_relative_error

from deform_attn import DeformableAttention1D
from deform_attn.export import dynamic_shapes, export_layer, export_onnx, frozen_position_bias
from deform_attn.kernels import PIECEWISE_MIN_LENGTH, Implementation, plan_attention

# below and above one scan chunk (128), both sides of "auto"'s length rule (384), lengths not
# divisible by r = 4, and the longest the issue asks for
LENGTHS = (16, 61, 127, 128, 129, 383, 384, 385, 1000, 4099, 16384)


@pytest.fixture(scope="module")
def default_layer() -> DeformableAttention1D:
    torch.manual_seed(0)
    return DeformableAttention1D(dim=16, heads=2, dim_head=8).eval()


@pytest.fixture(scope="module")
def exported(default_layer):
    return export_layer(default_layer, min_length=16, max_length=16384)


def test_the_lengths_straddle_the_kernel_choice(default_layer):
    """Eager runs both kernels over these lengths: the program must match each of them."""
    kinks = default_layer.position_bias.table(torch.float32).kinks.numel()
    kernels = {
        plan_attention(Implementation(), length=n, batch=1, heads=2, cells=n // 4, num_kinks=kinks).kernel
        for n in LENGTHS
    }
    assert kernels == {"sdpa", "piecewise"}
    assert min(LENGTHS) < PIECEWISE_MIN_LENGTH < max(LENGTHS)


@pytest.mark.parametrize("length", LENGTHS)
def test_exported_once_correct_at_every_length(default_layer, exported, length):
    batch = 1 + length % 3  # the batch is dynamic too
    x = torch.randn(batch, 16, length)
    with torch.no_grad():
        expected = default_layer(x)
        actual = exported.module()(x)
    assert actual.shape == expected.shape
    assert max_relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize(
    "options",
    [
        dict(geometry="lucidrains"),
        dict(heads=4, offset_groups=2, batch_first=True),
        dict(downsample_factor=3, offset_scale=2.0),
    ],
    ids=["lucidrains", "two-heads-per-group-batch-first", "r3"],
)
def test_export_other_configurations(options):
    torch.manual_seed(1)
    layer = make_layer(**{"heads": 2, "offset_groups": None, **options})
    program = export_layer(layer, min_length=16, max_length=2048)
    for length in (16, 97, 700):
        x = torch.randn(2, length, 16) if layer.batch_first else torch.randn(2, 16, length)
        with torch.no_grad():
            assert max_relative_error(program.module()(x), layer(x)) < 1e-5


def test_export_causal_layer_with_keys_pushed_forward():
    """The exported scan takes the visibility mask and the null key too."""
    torch.manual_seed(2)
    layer = make_layer(heads=2, offset_groups=None, causal=True)
    with torch.no_grad():  # offsets at their bounds, so keys wait for later tokens
        layer.to_offsets.pointwise.weight.mul_(50)
    program = export_layer(layer, min_length=16, max_length=2048)
    # offsets at x50 amplify float32 rounding: the exported program and the eager layer each stay
    # within 2e-5 of the layer in float64 (measured: up to 1.1e-5 and 0.8e-5 at n = 700)
    reference = copy.deepcopy(layer).double()
    for length in (16, 97, 700):
        x = torch.randn(2, 16, length)
        with torch.no_grad():
            exact = reference(x.double())
            assert max_relative_error(program.module()(x).double(), exact) < 2e-5
            assert max_relative_error(layer(x).double(), exact) < 2e-5


def test_export_without_position_bias():
    layer = make_layer(heads=2, offset_groups=None, position_bias="none")
    program = export_layer(layer, min_length=16, max_length=1024)
    x = torch.randn(2, 16, 300)
    with torch.no_grad():
        assert max_relative_error(program.module()(x), layer(x)) < 1e-5


def test_export_restores_the_live_table(default_layer):
    """Freezing is for the trace only; a table frozen before stays frozen after."""
    bias = default_layer.position_bias
    assert bias.frozen_table is None
    with frozen_position_bias(default_layer):
        frozen = bias.frozen_table
        live = bias.table(torch.float64)
        assert frozen is not None and frozen.kinks.dtype == torch.float64
        assert not frozen.slopes.requires_grad
    assert bias.frozen_table is None
    with torch.no_grad():
        fresh = bias.table(torch.float64)
    for part_frozen, part_live in zip(frozen, fresh):
        assert torch.equal(part_frozen, part_live)
    assert live.kinks.numel() == frozen.kinks.numel()
    bias.freeze()
    try:
        with frozen_position_bias(default_layer):
            pass
        assert bias.frozen_table is not None
    finally:
        bias.unfreeze()


def test_export_errors(default_layer):
    with pytest.raises(ValueError, match=r"^layer: export a layer in eval mode"):
        export_layer(make_layer(train=True))
    with pytest.raises(TypeError, match=r"^layer: expected a deform_attn.DeformableAttention1D"):
        export_layer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"^min_length: expected an integer >= downsample_factor \(4\)"):
        dynamic_shapes(default_layer, min_length=2)
    with pytest.raises(ValueError, match=r"^max_length: expected an integer >= min_length \(16\)"):
        dynamic_shapes(default_layer, min_length=16, max_length=8)
    with pytest.raises(TypeError, match=r"^example: expected None or a tensor"):
        export_layer(default_layer, example=[1, 2])


def test_tracing_without_a_frozen_table_is_refused(default_layer):
    with pytest.raises(RuntimeError, match=r"freeze\(\) first"):
        torch.export.export(default_layer, (torch.randn(2, 16, 400),))


@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="ONNX export needs onnx, onnxscript and onnxruntime: pip install 'deform-attn[export]'",
)
def test_onnx_runs_in_onnxruntime_within_1e4(default_layer, tmp_path):
    import onnxruntime

    path = tmp_path / "layer.onnx"
    export_onnx(default_layer, path=path, min_length=16, max_length=16384)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch, length in ((1, 61), (3, 1000)):
        x = torch.randn(batch, 16, length)
        (actual,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            expected = default_layer(x)
        assert actual.shape == tuple(expected.shape)
        assert (torch.from_numpy(actual) - expected).abs().max().item() < 1e-4
