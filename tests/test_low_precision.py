"""The path CUDA takes in low precision, run on CPU: bfloat16 weights or autocast go through the SDPA
kernel with the bias computed from float32 sample positions, and track the float32 layer."""

import pytest
import torch

from deform_attn import Implementation

from conftest import make_layer


def _relative_error(result, reference):
    return ((result.float() - reference).abs().max() / reference.abs().max()).item()


def _mean_relative_error(result, reference):
    return ((result.float() - reference).abs().mean() / reference.abs().mean()).item()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [64, 203, 512])
def test_bfloat16_autocast_tracks_float32(length, causal):
    torch.manual_seed(length)
    layer = make_layer(causal=causal)
    x = torch.randn(2, 16, length)
    reference = layer(x)
    plans = []
    original = layer.attention_plan

    def recording_plan(*args, **kwargs):
        plans.append(original(*args, **kwargs))
        return plans[-1]

    layer.attention_plan = recording_plan
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = layer(x)
    assert [plan.kernel for plan in plans] == ["sdpa"]
    assert result.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa: a few units of 2**-8 on average; the offsets, computed in
    # bfloat16 by the autocast convolution, move a few keys by up to 2**-8 cells (and a causal key's
    # visibility by a query), which the worst element shows
    assert _mean_relative_error(result, reference) < 0.02
    assert _relative_error(result, reference) < 0.1


def test_bfloat16_weights_track_float32_and_train():
    torch.manual_seed(0)
    layer = make_layer(implementation=Implementation(kernel="auto"))
    x = torch.randn(2, 16, 300)
    reference = layer(x)
    low = make_layer()
    low.load_state_dict(layer.state_dict())
    low = low.to(torch.bfloat16)
    result = low(x.to(torch.bfloat16))
    assert result.dtype == torch.bfloat16
    assert _relative_error(result, reference) < 0.05
    result.float().square().mean().backward()
    gradients = [p.grad for p in low.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in gradients)
    assert any(g.abs().max() > 0 for g in gradients)
