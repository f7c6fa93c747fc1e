"""The SDPA kernel's bias on a query grid: each pair's interval counted from kink crossings.

The reference path evaluates the CPB MLP on every pair (``Implementation(position_bias="mlp")``);
the grid path must give the same outputs and gradients: float32 outputs within 1e-5 and
gradients within 1e-4 of the largest magnitude, float64 within 1e-10, with masks, both geometries,
causal mode, chunking, and trained-looking bias weights with large offsets.
"""

import pytest
import torch
from conftest import gradient_errors

from deform_attn import DeformableAttention1D, Implementation
from deform_attn.geometry import QueryGrid
from deform_attn.kernels import intervals_on_grid, kink_crossings
from deform_attn.position_bias import transform_distance


def trained_looking(layer: DeformableAttention1D, scale: float = 3.0) -> DeformableAttention1D:
    """Large, irregular CPB weights (many kinks inside the distances) and offsets near their bound."""
    with torch.no_grad():
        for linear in layer.position_bias.linears:
            linear.weight.mul_(scale)
            linear.bias.normal_(0, scale)
        layer.to_offsets.pointwise.weight.mul_(10)
    return layer


def grid_and_reference(dtype, max_bias_elements=None, **options):
    settings = dict(dim=16, dim_head=8, heads=4, offset_groups=2, downsample_factor=4) | options
    grid = DeformableAttention1D(
        implementation=Implementation(kernel="sdpa", max_bias_elements=max_bias_elements), **settings
    )
    trained_looking(grid)
    reference = DeformableAttention1D(implementation=Implementation(kernel="sdpa", position_bias="mlp"), **settings)
    reference.load_state_dict(grid.state_dict())
    return grid.to(dtype).eval(), reference.to(dtype).eval()


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
def test_grid_bias_equals_the_mlp_on_every_pair(dtype, out_tol, grad_tol, geometry, causal, max_bias_elements):
    if causal and geometry == "lucidrains":
        pytest.skip("the lucidrains geometry has no causal mode")
    grid, reference = grid_and_reference(
        dtype, max_bias_elements=max_bias_elements, geometry=geometry, causal=causal, cpb_log_distance=True
    )
    x = torch.randn(3, 16, 53, dtype=dtype)
    mask = None
    if geometry == "centered":  # the lucidrains geometry takes no padding mask
        mask = torch.ones(3, 53, dtype=torch.bool)
        mask[1, 41:] = False
        mask[2, 17:] = False
    out, gradients = outputs_and_gradients(grid, x, mask)
    expected_out, expected_gradients = outputs_and_gradients(reference, x, mask)
    assert relative_to_largest(out, expected_out) < out_tol
    # each gradient relative to its own largest magnitude; one that is zero in exact arithmetic
    # (the bias's output bias: softmax ignores a constant) relative to the largest gradient
    assert max(gradient_errors(gradients, expected_gradients)) < grad_tol


@pytest.mark.parametrize("log_distance", [True, False])
@pytest.mark.parametrize("start, width", [(0, 37), (0, 10), (10, 10), (30, 7)])
def test_intervals_on_grid_count_the_kinks_below_each_pair(log_distance, start, width):
    torch.manual_seed(start + width)
    length, grid = 37, QueryGrid(0.25, -0.375)
    keys = torch.rand(6, 9, dtype=torch.float64) * 12 - 2  # (rows, m), some beyond the queries
    kinks = torch.sort(torch.randn(23, dtype=torch.float64) * 2).values
    crossings = kink_crossings(keys, kinks, length, grid, log_distance)
    counted = intervals_on_grid(crossings, start, width)  # (rows, m, width)
    queries = torch.arange(start, start + width, dtype=torch.float64) * grid.step + grid.origin
    t = transform_distance(queries[None, None, :] - keys[:, :, None], log_distance)
    searched = torch.searchsorted(kinks, t.contiguous(), out_int32=True)
    # equal except where a pair lies within rounding of a kink (none at these random values)
    assert counted.dtype == torch.int32
    assert torch.equal(counted, searched)
