"""The default offset kernel size: valid for every downsample factor, and the reference's 6 where 6 is valid."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import max_relative_error

from deform_attn import DeformableAttention1D, from_lucidrains
from deform_attn.geometry import reference_points
from deform_attn.offsets import check_offset_kernel_size, default_offset_kernel_size

pytestmark = pytest.mark.usefixtures("single_thread")

EXPECTED = {1: 7, 2: 6, 3: 7, 4: 6, 5: 7, 6: 6, 7: 7, 8: 8, 9: 9, 10: 10}


def is_valid(kernel_size: int, downsample_factor: int) -> bool:
    try:
        check_offset_kernel_size(kernel_size, downsample_factor)
    except ValueError:
        return False
    return True


def test_default_table():
    assert {r: default_offset_kernel_size(r) for r in EXPECTED} == EXPECTED


@pytest.mark.parametrize("r", range(1, 25))
def test_default_is_the_valid_size_nearest_to_6_ties_upward(r):
    """Brute force over k = 1..30: nearest to 6 among the valid sizes, the larger of two equally near."""
    valid = [k for k in range(1, 31) if is_valid(k, r)]
    assert valid, f"no valid size for r = {r} below 31"
    nearest = min(valid, key=lambda k: (abs(k - 6), -k))
    assert default_offset_kernel_size(r) == nearest
    assert is_valid(default_offset_kernel_size(r), r)


@pytest.mark.parametrize("r", range(1, 10))
def test_layer_builds_and_runs_with_the_default(r):
    """Before the rule, r = 3, 5, 8 raised with the reference's fixed 6."""
    layer = DeformableAttention1D(dim=16, dim_head=8, heads=4, offset_groups=2, downsample_factor=r).eval()
    assert layer.to_offsets.depthwise.kernel_size == (default_offset_kernel_size(r),)
    length = 3 * r + 2
    x = torch.randn(2, 16, length)
    with torch.no_grad():
        out, vgrid = layer(x, return_vgrid=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert vgrid.shape == (2 * 2, length // r)


@pytest.mark.parametrize("r", range(1, 10))
def test_default_receptive_field_is_centred_on_the_reference_point(r):
    """Cell c's offset depends on exactly the k tokens of its window, whose centre is c's reference point."""
    layer = DeformableAttention1D(dim=16, dim_head=8, heads=4, offset_groups=2, downsample_factor=r).double()
    network, k = layer.to_offsets, default_offset_kernel_size(r)
    length = 4 * r + 3
    cells = length // r
    x = torch.randn(1, 16, length, dtype=torch.float64)
    padding = (k - r) // 2
    for token in range(length):
        nudged = x.clone()
        nudged[..., token] += 1.0
        changed = (network(nudged) - network(x)).abs()[0] > 0
        window = [c * r - padding <= token < c * r - padding + k for c in range(cells)]
        assert changed.tolist() == window, f"r = {r}, token {token}"
    centres = torch.tensor([c * r - padding + (k - 1) / 2 for c in range(cells)], dtype=torch.float64)
    assert torch.equal(centres, reference_points(length, r, dtype=torch.float64))


@pytest.mark.parametrize("value", [0, -4, 2.0, True, "4", None])
def test_bad_downsample_factor(value):
    with pytest.raises(ValueError, match=r"^downsample_factor: expected a positive integer"):
        default_offset_kernel_size(value)


# ---------------------------------------------------------------- the reference package


@pytest.mark.skipif(
    importlib.util.find_spec("deformable_attention") is None,
    reason="the reference package deformable-attention is not installed (pip install deformable-attention)",
)
def test_default_matches_the_reference_where_6_is_valid():
    from deformable_attention import DeformableAttention1D as Reference

    for r in (2, 4, 6):
        reference = Reference(dim=32, dim_head=8, heads=4, downsample_factor=r)
        assert reference.to_offsets[0].kernel_size == (default_offset_kernel_size(r),) == (6,)
        ours = DeformableAttention1D(dim=32, dim_head=8, heads=4, downsample_factor=r)
        assert {name: p.shape for name, p in ours.to_offsets.named_parameters()} == {
            "depthwise.weight": reference.to_offsets[0].weight.shape,
            "depthwise.bias": reference.to_offsets[0].bias.shape,
            "pointwise.weight": reference.to_offsets[2].weight.shape,
        }

    # a layer built with the default kernel size takes the reference's weights as they are
    torch.manual_seed(0)
    reference = Reference(dim=32, dim_head=8, heads=4, downsample_factor=2).eval()
    ours = DeformableAttention1D(dim=32, dim_head=8, heads=4, downsample_factor=2, geometry="lucidrains").eval()
    ours.load_state_dict(from_lucidrains(reference).state_dict(), strict=True)
    x = torch.randn(2, 32, 37)
    with torch.no_grad():
        expected, expected_vgrid = reference(x, return_vgrid=True)
        actual, vgrid = ours(x, return_vgrid=True)
    assert max_relative_error(actual, expected) < 1e-5
    assert max_relative_error(vgrid, expected_vgrid) < 1e-5
