"""The SDPA kernel with the piecewise-linear table against the reference path, the CPB MLP run on
every pair (``Implementation(position_bias="mlp")``): the same outputs and gradients, float32
outputs within 1e-5 and gradients within 1e-4 of the largest magnitude, float64 within 1e-10, with
masks, both geometries, causal mode, chunking, and trained-looking bias weights with large offsets.
"""

import pytest
import torch
from conftest import gradient_errors, trained_looking

from deform_attn import DeformableAttention1D, Implementation


def table_and_reference(dtype, max_bias_elements=None, **options):
    settings = dict(dim=16, dim_head=8, heads=4, offset_groups=2, downsample_factor=4) | options
    table = DeformableAttention1D(
        implementation=Implementation(kernel="sdpa", max_bias_elements=max_bias_elements), **settings
    )
    trained_looking(table)
    reference = DeformableAttention1D(implementation=Implementation(kernel="sdpa", position_bias="mlp"), **settings)
    reference.load_state_dict(table.state_dict())
    return table.to(dtype).eval(), reference.to(dtype).eval()


def outputs_and_gradients(layer, x, mask):
    x = x.clone().requires_grad_()
    out = layer(x) if mask is None else layer(x, mask)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    gradients = torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()], allow_unused=True)
    return out.detach(), [g for g in gradients if g is not None]


def relative_to_largest(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype, out_tol, grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.float64, 1e-10, 1e-10)])
@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_bias_elements", [None, 300])
def test_table_bias_equals_the_mlp_on_every_pair(dtype, out_tol, grad_tol, geometry, causal, max_bias_elements):
    if causal and geometry == "lucidrains":
        pytest.skip("the lucidrains geometry has no causal mode")
    table, reference = table_and_reference(
        dtype, max_bias_elements=max_bias_elements, geometry=geometry, causal=causal, cpb_log_distance=True
    )
    x = torch.randn(3, 16, 53, dtype=dtype)
    mask = None
    if geometry == "centered":  # the lucidrains geometry takes no padding mask
        mask = torch.ones(3, 53, dtype=torch.bool)
        mask[1, 41:] = False
        mask[2, 17:] = False
    out, gradients = outputs_and_gradients(table, x, mask)
    expected_out, expected_gradients = outputs_and_gradients(reference, x, mask)
    assert relative_to_largest(out, expected_out) < out_tol
    # each gradient relative to its own largest magnitude; one that is zero in exact arithmetic
    # (the bias's output bias: softmax ignores a constant) relative to the largest gradient
    assert max(gradient_errors(gradients, expected_gradients)) < grad_tol
