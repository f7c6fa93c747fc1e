"""Streaming: token-by-token (or chunk-by-chunk) outputs equal the full causal pass."""

from __future__ import annotations

import pytest
import torch
from conftest import max_relative_error

from deform_attn import DeformableAttention1D, Implementation
from deform_attn.streaming import CausalStream

pytestmark = pytest.mark.usefixtures("single_thread")


def saturated_causal_layer(seed: int = 0, **options) -> DeformableAttention1D:
    torch.manual_seed(seed)
    settings_ = dict(dim=8, heads=4, dim_head=4, offset_groups=2, downsample_factor=3, offset_scale=2.5, causal=True)
    settings_.update(options)
    layer = DeformableAttention1D(**settings_).double().eval()
    with torch.no_grad():  # offsets at their bounds: keys pushed forward wait for their tokens
        layer.to_offsets.pointwise.weight.mul_(50)
    return layer


def streamed(layer: DeformableAttention1D, x: torch.Tensor, chunk: int) -> torch.Tensor:
    stream = CausalStream(layer, batch_size=x.shape[0])
    axis = 1 if layer.batch_first else 2
    with torch.no_grad():
        parts = [stream.step(part) for part in x.split(chunk, dim=axis)]
    return torch.cat(parts, dim=axis)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 40])
@pytest.mark.parametrize("r", [1, 3, 4])
def test_streaming_equals_the_full_causal_pass(chunk, r):
    layer = saturated_causal_layer(seed=r, downsample_factor=r)
    x = torch.randn(2, 8, 37, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
    assert max_relative_error(streamed(layer, x, chunk), full) < 1e-12


@pytest.mark.parametrize("implementation", [Implementation(), Implementation(position_bias="mlp")])
def test_streaming_with_batch_first_and_either_bias_evaluation(implementation):
    layer = saturated_causal_layer(seed=5, batch_first=True, implementation=implementation)
    x = torch.randn(3, 29, 8, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
    assert max_relative_error(streamed(layer, x, 4), full) < 1e-12


def test_a_key_enters_the_cache_only_when_its_tokens_have_arrived():
    layer = saturated_causal_layer(seed=2, downsample_factor=3)
    stream = CausalStream(layer, batch_size=1)
    x = torch.randn(1, 8, 30, dtype=torch.float64)
    with torch.no_grad():
        for token in range(30):
            stream.step(x[..., token : token + 1])
            ready, visible = stream.ready.data, stream.visible_from.data
            # ready exactly when every token the key reads (and its cell) has arrived
            assert torch.equal(ready, visible <= token)
            assert stream.cells == (token + 1) // 3
    # some complete cells waited for tokens after their cell had ended
    cell_end = (torch.arange(stream.cells) + 1) * 3 - 1
    assert (stream.visible_from.data > cell_end).any()


def test_stream_arguments():
    with pytest.raises(ValueError, match=r"^layer: expected a DeformableAttention1D built with causal=True"):
        CausalStream(DeformableAttention1D(dim=8, heads=2, dim_head=4).eval())
    layer = saturated_causal_layer()
    with pytest.raises(ValueError, match=r"^layer: stream a layer in eval mode"):
        CausalStream(layer.train())
    layer.eval()
    with pytest.raises(ValueError, match=r"^batch_size: expected a positive integer"):
        CausalStream(layer, batch_size=0)
    stream = CausalStream(layer, batch_size=2)
    with pytest.raises(ValueError, match=r"^x: expected a tensor of shape \(batch, dim, c\) with batch 2"):
        stream.step(torch.randn(1, 8, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^x: expected at least one new token"):
        stream.step(torch.randn(2, 8, 0, dtype=torch.float64))


def test_streaming_benchmark_writes_one_row_per_case_and_length(tmp_path):
    from deform_attn.bench.streaming import STREAMING_CASES, main

    assert main(["--lengths", "16,40", "--dim", "8", "--heads", "2", "--dim-head", "4", "--repeats", "2",
                 "--warmup", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    import csv
    import json

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(row["case"], int(row["n"])) for row in rows] == [(c, n) for n in (16, 40) for c in STREAMING_CASES]
    assert all(0 < float(row["min_s"]) <= float(row["median_s"]) <= float(row["max_s"]) for row in rows)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["command"].startswith("python -m deform_attn.bench.streaming --lengths 16,40")
    assert "git_commit" in meta["environment"]


def test_a_long_stream_keeps_bounded_memory_and_stays_exact():
    """Bounded offsets reach at most offset_scale cells back, so old tokens are dropped."""
    layer = saturated_causal_layer(seed=9, downsample_factor=2, offset_scale=1.5)
    x = torch.randn(1, 8, 600, dtype=torch.float64)
    stream = CausalStream(layer, batch_size=1)
    with torch.no_grad():
        parts = [stream.step(x[..., i : i + 7]) for i in range(0, 600, 7)]
        full = layer(x)
    assert max_relative_error(torch.cat(parts, dim=2), full) < 1e-12
    assert stream.inputs.origin > 400 and stream.inputs.storage.shape[-1] < 100  # only the recent past
    assert stream.grouped_queries.storage.shape[-1] < 100


def test_unbounded_offsets_keep_every_token():
    from deform_attn import OffsetNetwork

    layer = saturated_causal_layer(seed=4)
    old = layer.to_offsets
    layer.to_offsets = OffsetNetwork(channels=old.depthwise.in_channels, downsample_factor=3,
                                     kernel_size=old.depthwise.kernel_size[0], offset_scale=0.5, bounded=False,
                                     causal=True).double()
    x = torch.randn(1, 8, 90, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
    stream = CausalStream(layer.eval(), batch_size=1)
    with torch.no_grad():
        parts = [stream.step(x[..., i : i + 5]) for i in range(0, 90, 5)]
    assert max_relative_error(torch.cat(parts, dim=2), full) < 1e-12
    assert stream.inputs.origin == 0
