"""The assembled layer: where it samples, that offsets matter, its options, gradcheck, chunking."""

from __future__ import annotations

import pytest
import torch
from conftest import gradient_errors, make_layer, max_relative_error

from deform_attn import DeformableAttention1D, reference_points, sample_positions
from deform_attn.kernels import sdpa as sdpa_kernel
from deform_attn.kernels import Implementation

pytestmark = pytest.mark.usefixtures("single_thread")




def position_input(batch: int, dim: int, length: int) -> torch.Tensor:
    """x[b, c, j] = j: a sampled key's content is its own position."""
    return torch.arange(length, dtype=torch.float32).expand(batch, dim, length).contiguous()


def capture_sampled_keys(layer: DeformableAttention1D) -> list[torch.Tensor]:
    """The input of to_k is the sampled sequence, (batch, dim, cells)."""
    captured: list[torch.Tensor] = []
    layer.to_k.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    return captured


# ---------------------------------------------------------------- where the layer samples


@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
def test_no_offsets_vgrid_is_arange(geometry):
    layer = make_layer(use_offsets=False, geometry=geometry)
    x = torch.randn(3, 16, 26)
    out, vgrid = layer(x, return_vgrid=True)
    assert out.shape == x.shape
    assert vgrid.shape == (3 * 2, 26 // 4)
    torch.testing.assert_close(vgrid, torch.arange(26 // 4, dtype=vgrid.dtype).expand_as(vgrid), rtol=0, atol=0)


@pytest.mark.parametrize("downsample_factor, kernel_size", [(4, 6), (3, 5), (2, 2), (1, 3)])
def test_zero_offsets_sample_window_centres(downsample_factor, kernel_size):
    r, n = downsample_factor, 23
    layer = make_layer(use_offsets=False, downsample_factor=r, offset_kernel_size=kernel_size)
    captured = capture_sampled_keys(layer)
    layer(position_input(2, 16, n))
    centres = torch.arange(n // r, dtype=torch.float32) * r + (r - 1) / 2
    torch.testing.assert_close(reference_points(n, r), centres, rtol=0, atol=0)
    torch.testing.assert_close(captured[0], centres.expand(2, 16, -1))


@pytest.mark.parametrize("length, downsample_factor", [(24, 4), (61, 4), (47, 3)])
def test_zero_offsets_lucidrains_geometry_lands_on_k_n_over_m_minus_1(length, downsample_factor):
    layer = make_layer(use_offsets=False, geometry="lucidrains", downsample_factor=downsample_factor,
                       offset_kernel_size=downsample_factor + 2)
    captured = capture_sampled_keys(layer)
    layer(position_input(1, 16, length))
    m = length // downsample_factor
    landing = torch.arange(m, dtype=torch.float32) * length / (m - 1) - 0.5
    torch.testing.assert_close(reference_points(length, downsample_factor, geometry="lucidrains"), landing)
    # interior cells read their position; the end cells sit half a token outside and fade to half
    torch.testing.assert_close(captured[0][0, :, 1:-1], landing[1:-1].expand(16, -1))
    torch.testing.assert_close(captured[0][0, :, -1], torch.full((16,), (length - 1) / 2))


@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
def test_sampled_keys_follow_vgrid(geometry):
    """With learned offsets the content = position keys equal the positions the vgrid implies."""
    layer = make_layer(geometry=geometry, offset_scale=0.4)  # small offsets: samples stay inside
    captured = capture_sampled_keys(layer)
    n = 32
    _, vgrid = layer(position_input(2, 16, n), return_vgrid=True)
    offsets = vgrid - torch.arange(vgrid.shape[-1])
    positions = sample_positions(offsets, n, 4, geometry=geometry)  # (b g, m) tokens
    inside = (positions >= 0) & (positions <= n - 1)
    assert inside[:, 1:-1].all()
    expected = positions.reshape(2, 2, 1, -1).expand(2, 2, 8, -1).reshape(2, 16, -1)  # group g: channels g*8..
    keep = inside.reshape(2, 2, 1, -1).expand(2, 2, 8, -1).reshape(2, 16, -1)
    torch.testing.assert_close(captured[0][keep], expected[keep])


def test_output_depends_on_offsets():
    """Changing the offset network changes the sampled keys and the output substantially (in
    deformable-attention <= 0.0.18 every key was the middle token, so offsets barely mattered)."""
    layer = make_layer()
    captured = capture_sampled_keys(layer)
    x = torch.randn(2, 16, 40)
    out_before, vgrid_before = layer(x, return_vgrid=True)
    with torch.no_grad():
        layer.to_offsets.pointwise.weight.add_(torch.randn_like(layer.to_offsets.pointwise.weight))
    out_after, vgrid_after = layer(x, return_vgrid=True)
    assert (vgrid_after - vgrid_before).abs().max() > 0.5  # offsets moved by half a cell or more
    assert max_relative_error(captured[1], captured[0]) > 0.1
    assert max_relative_error(out_after, out_before) > 0.01

    # and the offset network receives a real gradient through the sampling
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    assert layer.to_offsets.pointwise.weight.grad.abs().max() > 1e-3
    assert layer.to_offsets.depthwise.weight.grad.abs().max() > 1e-4


def test_offsets_change_output_relative_to_no_offsets():
    with_offsets = make_layer()
    without = make_layer(use_offsets=False)
    without.load_state_dict(with_offsets.state_dict(), strict=False)  # no offset network to load
    x = torch.randn(2, 16, 40)
    assert max_relative_error(with_offsets(x), without(x)) > 0.01


# ---------------------------------------------------------------- options


def test_batch_first_is_transpose():
    channels_first = make_layer()
    batch_first = make_layer(batch_first=True)
    batch_first.load_state_dict(channels_first.state_dict())
    x = torch.randn(2, 16, 20)
    out = batch_first(x.transpose(1, 2))
    assert out.shape == (2, 20, 16)
    torch.testing.assert_close(out, channels_first(x).transpose(1, 2), rtol=0, atol=0)


def test_position_bias_none():
    layer = make_layer(position_bias="none")
    assert layer.position_bias is None
    assert not any(name.startswith("position_bias") for name, _ in layer.named_parameters())
    x = torch.randn(2, 16, 20, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    with_bias = make_layer()
    with_bias.load_state_dict(layer.state_dict(), strict=False)
    assert max_relative_error(with_bias(x), out) > 1e-4


def test_offset_layer_norm_option():
    plain = make_layer()
    normed = make_layer(offset_layer_norm=True)
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".norm." in name for name in missing)
    x = torch.randn(2, 16, 20)
    out = normed(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert max_relative_error(out, plain(x)) > 1e-4


def test_unbounded_offsets_option():
    bounded = make_layer()
    unbounded = make_layer(bounded_offsets=False)
    with torch.no_grad():  # large raw offsets, where tanh matters
        bounded.to_offsets.pointwise.weight.mul_(20)
    unbounded.load_state_dict(bounded.state_dict())
    x = torch.randn(2, 16, 40)
    out, vgrid = unbounded(x, return_vgrid=True)
    _, bounded_vgrid = bounded(x, return_vgrid=True)
    cells = torch.arange(vgrid.shape[-1])
    assert (bounded_vgrid - cells).abs().max() <= 4  # offset_scale defaults to downsample_factor
    assert (vgrid - cells).abs().max() > 4
    assert torch.isfinite(out).all()
    assert max_relative_error(out, bounded(x)) > 1e-3


@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
def test_reference_paths_equal_fast_paths(geometry):
    """The plain CPB MLP and grid_sample give the same outputs and gradients as the fast paths."""
    fast = make_layer(geometry=geometry)
    slow = make_layer(geometry=geometry, implementation=Implementation(position_bias="mlp", sampling="grid_sample"))
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 16, 37)
    results = []
    for layer in (fast, slow):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        grads = torch.autograd.grad(out.pow(2).sum(), [xi, *layer.parameters()])
        results.append((out, *grads))
    (fast_out, *fast_grads), (slow_out, *slow_grads) = results
    assert max_relative_error(fast_out, slow_out) < 1e-5
    assert max(gradient_errors(fast_grads, slow_grads)) < 3e-5


# ---------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
def test_layer_gradcheck_fp64(geometry):
    """Gradients wrt x, the offset network and the position bias, at a small size in float64."""
    layer = DeformableAttention1D(dim=8, dim_head=4, heads=2, geometry=geometry).double().eval()
    names = ["to_offsets.pointwise.weight", "position_bias.linears.0.weight", "to_k.weight"]
    params = [layer.get_parameter(name).detach().clone().requires_grad_() for name in names]
    x = torch.randn(1, 8, 12, dtype=torch.float64, requires_grad=True)

    def run(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    # fast_mode checks a random projection of the Jacobian: the same test, far fewer evaluations
    assert torch.autograd.gradcheck(run, (x, *params), fast_mode=True)


# ---------------------------------------------------------------- chunked queries


def _outputs_and_grads(layer, x, mask=None):
    x = x.clone().requires_grad_()
    out = layer(x, mask) if mask is not None else layer(x)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                [x, *layer.parameters()])
    return out.detach(), grads


@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
@pytest.mark.parametrize("max_bias_elements", [1, 48, 60])
def test_sdpa_chunked_queries_equal_unchunked(geometry, max_bias_elements, monkeypatch):
    """b h m = 2*4*3 = 24 bias elements per query: chunks of 1, 2 and 2 queries over n = 13."""
    whole = make_layer(geometry=geometry, implementation=Implementation(kernel="sdpa", max_bias_elements=2**20))
    chunked = make_layer(geometry=geometry, implementation=Implementation(kernel="sdpa", max_bias_elements=max_bias_elements))
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 16, 13)

    calls = []  # queries per call of the SDPA kernel's chunk function
    attend = sdpa_kernel._attend_chunk

    def counting_attend(q, *args, **kwargs):
        calls.append(q.shape[2])
        return attend(q, *args, **kwargs)

    monkeypatch.setattr(sdpa_kernel, "_attend_chunk", counting_attend)

    out, grads = _outputs_and_grads(whole, x)
    assert calls == [13]
    calls.clear()
    chunked_out, chunked_grads = _outputs_and_grads(chunked, x)
    chunk = max(1, max_bias_elements // 24)
    chunks = -(-13 // chunk)
    # every chunk runs forward, then again in backward (activation checkpointing)
    assert len(calls) == 2 * chunks and sum(calls) == 2 * 13
    torch.testing.assert_close(chunked_out, out, rtol=1e-5, atol=1e-6)
    assert max(gradient_errors(chunked_grads, grads)) < 1e-5

    calls.clear()
    with torch.no_grad():  # no autograd: no checkpointing, each chunk once
        torch.testing.assert_close(chunked(x), out, rtol=1e-5, atol=1e-6)
    assert len(calls) == chunks


@pytest.mark.parametrize("kernel", ["sdpa", "piecewise"])
@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
@pytest.mark.parametrize("max_bias_elements", [1, 48, 60])
def test_chunked_queries_equal_unchunked(kernel, geometry, max_bias_elements):
    whole = make_layer(geometry=geometry, implementation=Implementation(kernel=kernel, max_bias_elements=2**20))
    chunked = make_layer(geometry=geometry, implementation=Implementation(kernel=kernel, max_bias_elements=max_bias_elements))
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 16, 13)
    out, grads = _outputs_and_grads(whole, x)
    chunked_out, chunked_grads = _outputs_and_grads(chunked, x)
    torch.testing.assert_close(chunked_out, out, rtol=1e-5, atol=1e-6)
    assert max(gradient_errors(chunked_grads, grads)) < 1e-5


@pytest.mark.parametrize("kernel", ["sdpa", "piecewise"])
def test_chunked_queries_with_mask(kernel):
    whole = make_layer(implementation=Implementation(kernel=kernel, max_bias_elements=2**20))
    chunked = make_layer(implementation=Implementation(kernel=kernel, max_bias_elements=50))
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 16, 20)
    mask = torch.arange(20)[None, :] < torch.tensor([[20], [11]])
    out, grads = _outputs_and_grads(whole, x, mask)
    chunked_out, chunked_grads = _outputs_and_grads(chunked, x, mask)
    torch.testing.assert_close(chunked_out, out, rtol=1e-5, atol=1e-6)
    assert max(gradient_errors(chunked_grads, grads)) < 1e-5


@pytest.mark.parametrize("kernel", ["sdpa", "piecewise"])
def test_chunked_gradcheck_fp64(kernel):
    layer = DeformableAttention1D(dim=8, dim_head=4, heads=2, implementation=Implementation(max_bias_elements=20, kernel=kernel))
    layer = layer.double().eval()
    x = torch.randn(2, 8, 12, dtype=torch.float64, requires_grad=True)  # chunks of 5 queries
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


# ---------------------------------------------------------------- determinism, dtypes


def test_eval_is_deterministic_and_dropout_only_in_training():
    layer = make_layer(dropout=0.5)
    x = torch.randn(2, 16, 20)
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert (layer(x) - layer(x)).abs().max() > 1e-3
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


def test_float64_layer_matches_float32():
    layer = make_layer()
    x = torch.randn(2, 16, 21)
    out32 = layer(x)
    out64 = layer.double()(x.double())
    assert out64.dtype == torch.float64
    assert max_relative_error(out32.double(), out64) < 1e-5


# ---------------------------------------------------------------- the 1x1 projections


@pytest.mark.parametrize("groups, bias", [(1, True), (1, False), (4, False)])
@pytest.mark.parametrize("layout", ["channels-first", "tokens-major", "unbatched"])
def test_pointwise_conv_is_the_1x1_convolution(groups, bias, layout):
    """Same values and gradients as nn.Conv1d with the same state dict, whichever product computes it:
    an ungrouped projection of a (b, n, in)-stored input is one product over the tokens and
    returns a view of (b, n, out) storage; the others keep (b, out, n) storage."""
    from deform_attn.attention import PointwiseConv1d

    torch.manual_seed(groups)
    ours = PointwiseConv1d(8, 12, groups=groups, bias=bias).double()
    conv = torch.nn.Conv1d(8, 12, 1, groups=groups, bias=bias).double()
    conv.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(conv.state_dict())
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    x = {"channels-first": x.transpose(1, 2).contiguous(), "tokens-major": x.transpose(1, 2), "unbatched": x[0].T}[layout]
    x.requires_grad_()
    out, expected = ours(x), conv(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if layout == "tokens-major" and groups == 1:
        assert out.transpose(1, 2).is_contiguous()
    cotangent = torch.randn_like(expected)
    grads = torch.autograd.grad(out, [x, *ours.parameters()], cotangent)
    expected_grads = torch.autograd.grad(expected, [x, *conv.parameters()], cotangent)
    for actual, wanted in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-12, atol=1e-12)
