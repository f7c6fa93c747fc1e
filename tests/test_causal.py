"""Causal deformable attention: output i depends on inputs 0..i exactly, on every kernel."""

from __future__ import annotations

import pytest
import torch
from conftest import gradient_errors, max_relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from deform_attn import DeformableAttention1D, Implementation, causal_visibility
from deform_attn.geometry import sample_positions

pytestmark = pytest.mark.usefixtures("single_thread")


def causal_layer(*, saturate: float | None = 50.0, kernel: str = "sdpa", **options) -> DeformableAttention1D:
    """A small causal layer in fp64. ``saturate`` scales the offset network's last weights so that
    tanh sits at its bounds: offsets of +-offset_scale cells, the case that exposes a leak
    (fresh offsets are near zero and would hide one)."""
    settings_ = dict(dim=8, heads=2, dim_head=4, downsample_factor=3, offset_scale=2.5, causal=True,
                     implementation=Implementation(kernel=kernel, check_finite=False))
    settings_.update(options)
    layer = DeformableAttention1D(**settings_).double().eval()
    if saturate is not None:
        with torch.no_grad():
            layer.to_offsets.pointwise.weight.mul_(saturate)
    return layer


def token_jacobian(layer: DeformableAttention1D, x: torch.Tensor, mask=None) -> torch.Tensor:
    """(n, n): |d out[..., i] / d x[..., j]| summed over batch and channels."""
    jacobian = torch.autograd.functional.jacobian(lambda inputs: layer(inputs, mask), x)  # (b, c, n, b, c, n)
    return jacobian.abs().sum(dim=(0, 1, 3, 4))


@pytest.mark.parametrize("kernel", ["sdpa", "piecewise"])
@pytest.mark.parametrize("r, length", [(2, 17), (3, 23), (4, 26), (1, 9)])
def test_jacobian_is_exactly_lower_triangular(kernel, r, length):
    torch.manual_seed(r * 100 + length)
    layer = causal_layer(kernel=kernel, downsample_factor=r)
    x = torch.randn(2, 8, length, dtype=torch.float64)
    jacobian = token_jacobian(layer, x)
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)  # j > i
    assert jacobian[future].max().item() == 0.0
    past = jacobian[~future]
    assert (past > 0).float().mean().item() > 0.5  # the past does matter
    # a query depends on its own token once it sees a sampled key (before that, only the null key)
    assert (jacobian.diagonal() > 0).float().mean().item() > 0.5


def test_saturated_offsets_push_keys_forward_by_more_than_a_cell():
    """The Jacobian test above runs where keys sit far ahead of their cells, not only near them."""
    torch.manual_seed(3)
    layer = causal_layer(downsample_factor=3)
    x = torch.randn(2, 8, 23, dtype=torch.float64)
    queries = layer.to_q(x)
    grouped = queries.reshape(2 * layer.offset_groups, -1, 23)
    offsets = layer.to_offsets(grouped)
    assert (offsets.abs() > 2.4).float().mean().item() > 0.75  # most at the bound of 2.5 cells
    assert offsets.max().item() > 1  # forward by more than one cell
    positions = sample_positions(offsets, 23, 3)
    visible = causal_visibility(positions, 3)
    cell_end = (torch.arange(positions.shape[-1]) + 1) * 3 - 1
    assert (visible > cell_end).any()  # a key moved forward becomes visible later than its cell


@pytest.mark.parametrize("kernel", ["sdpa", "piecewise"])
def test_jacobian_with_padding_mask(kernel):
    torch.manual_seed(7)
    layer = causal_layer(kernel=kernel, downsample_factor=2)
    length = 19
    x = torch.randn(2, 8, length, dtype=torch.float64)
    mask = torch.arange(length)[None, :] < torch.tensor([19, 12])[:, None]
    jacobian = torch.autograd.functional.jacobian(lambda inputs: layer(inputs, mask), x)  # (b, c, n, b, c, n)
    per_row = jacobian.abs().sum(dim=(1, 4))  # (b, n, b, n)
    for row in range(2):
        tokens = per_row[row, :, row, :]
        assert tokens[torch.triu(torch.ones(length, length, dtype=torch.bool), 1)].max().item() == 0.0
        assert per_row[row, :, 1 - row, :].max().item() == 0.0  # sequences do not mix


@settings(max_examples=30)
@given(
    r=st.integers(1, 4),
    length=st.integers(4, 30),
    cut=st.floats(0.0, 1.0),
    groups=st.sampled_from([1, 2]),
    saturate=st.sampled_from([None, 50.0]),
    kernel=st.sampled_from(["sdpa", "piecewise"]),
    seed=st.integers(0, 2**16),
)
def test_perturbing_the_future_never_changes_the_past(r, length, cut, groups, saturate, kernel, seed):
    length = max(length, r)
    torch.manual_seed(seed)
    layer = causal_layer(downsample_factor=r, offset_groups=groups, saturate=saturate, kernel=kernel)
    x = torch.randn(2, 8, length, dtype=torch.float64)
    last_past = int(cut * (length - 1))  # tokens 0..last_past stay, the rest change
    changed = x.clone()
    changed[..., last_past + 1 :] = torch.randn_like(changed[..., last_past + 1 :]) * 10
    with torch.no_grad():
        before, after = layer(x), layer(changed)
    assert (before[..., : last_past + 1] - after[..., : last_past + 1]).abs().max().item() <= 1e-12


def test_first_queries_see_only_the_null_key():
    """Before its first cell is complete a query attends to the null key alone: output = to_out(null_value)."""
    torch.manual_seed(0)
    layer = causal_layer(downsample_factor=4, saturate=None)
    with torch.no_grad():
        layer.null_value.normal_()
        out = layer(torch.randn(1, 8, 12, dtype=torch.float64))
        expected = layer.to_out(layer.null_value.reshape(-1, 1).to(torch.float64))  # (dim, 1)
    # queries 0, 1, 2 precede the end of cell 0 (token 3), so no sampled key is visible to them
    torch.testing.assert_close(out[0, :, :3], expected.expand(-1, 3))
    assert not torch.allclose(out[0, :, 3], expected[:, 0])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, (1e-10, 1e-8)), (torch.float32, (1e-5, 1e-4))])
def test_piecewise_kernel_equals_sdpa_kernel_causally(dtype, tolerance):
    torch.manual_seed(11)
    piecewise = causal_layer(kernel="piecewise", downsample_factor=2, heads=4, offset_groups=2).to(dtype)
    sdpa = causal_layer(kernel="sdpa", downsample_factor=2, heads=4, offset_groups=2, saturate=None).to(dtype)
    sdpa.load_state_dict(piecewise.state_dict())
    x = torch.randn(3, 8, 41, dtype=dtype)
    mask = torch.arange(41)[None, :] < torch.tensor([41, 30, 7])[:, None]
    outputs, grads = [], []
    for layer in (piecewise, sdpa):
        inputs = x.clone().requires_grad_()
        out = layer(inputs, mask)
        outputs.append(out)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [inputs, *layer.parameters()]))
    assert max_relative_error(outputs[0], outputs[1]) < tolerance[0]
    assert max(gradient_errors(list(grads[0]), list(grads[1]))) < tolerance[1]


def test_null_key_and_value_learn():
    layer = causal_layer(saturate=None)
    out = layer(torch.randn(2, 8, 20, dtype=torch.float64))
    out.pow(2).sum().backward()
    assert layer.null_key.grad.abs().max() > 0 and layer.null_value.grad.abs().max() > 0


def test_causal_needs_the_centred_geometry():
    with pytest.raises(ValueError, match=r"^causal: needs geometry='centered'"):
        DeformableAttention1D(dim=8, heads=2, dim_head=4, causal=True, geometry="lucidrains")
    with pytest.raises(ValueError, match=r"^causal: expected a bool"):
        DeformableAttention1D(dim=8, heads=2, dim_head=4, causal="yes")


def test_non_causal_layers_are_unchanged():
    """No null parameters, the centred offset windows, and the same state dict keys as before."""
    layer = DeformableAttention1D(dim=8, heads=2, dim_head=4)
    assert layer.null_key is None and layer.null_value is None
    assert layer.to_offsets.padding == (1, 1)  # k = 6, r = 4: one token each side
    assert not any("null" in name for name in layer.state_dict())
    causal = DeformableAttention1D(dim=8, heads=2, dim_head=4, causal=True)
    assert causal.to_offsets.padding == (2, 0)


def test_causal_layers_refuse_the_grid_sample_reference_sampler():
    """grid_sample's round trip through normalized coordinates gives the token after a whole
    sample position a weight of ~1e-16 instead of 0: a leak from the future, so it is refused."""
    layer = causal_layer(implementation=Implementation(sampling="grid_sample"))
    with pytest.raises(ValueError, match=r"^implementation.sampling: a causal layer samples with 'gather'"):
        layer(torch.randn(1, 8, 12, dtype=torch.float64))
