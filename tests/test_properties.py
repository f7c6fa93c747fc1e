"""Property-based tests over random valid configurations (hypothesis profile in conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import gradient_errors, make_layer, max_relative_error
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deform_attn import ContinuousPositionBias, DeformableAttention1D, linear_sample_1d, linear_sample_1d_reference
from deform_attn.kernels import Implementation

pytestmark = pytest.mark.usefixtures("single_thread")


@st.composite
def layer_configs(draw, geometries=("centered", "lucidrains")):
    """Keyword arguments of a valid layer, plus a batch size and a sequence length."""
    heads = draw(st.integers(1, 4))
    offset_groups = draw(st.sampled_from([g for g in range(1, heads + 1) if heads % g == 0]))
    position_bias = draw(st.sampled_from(["cpb", "none"]))
    min_multiple = -(-4 // offset_groups)  # the CPB (built, then removed for "none") needs dim >= 4
    dim = offset_groups * draw(st.integers(min_multiple, max(min_multiple, 12 // offset_groups)))
    r = draw(st.integers(1, 4))
    config = dict(
        dim=dim,
        dim_head=draw(st.integers(1, 6)),
        heads=heads,
        offset_groups=offset_groups,
        downsample_factor=r,
        offset_kernel_size=r + 2 * draw(st.integers(0, 2)),
        offset_scale=draw(st.sampled_from([0.5, 1.0, float(r), 3.5])),
        geometry=draw(st.sampled_from(geometries)),
        group_queries=draw(st.booleans()),
        group_key_values=draw(st.booleans()),
        position_bias=position_bias,
        cpb_log_distance=draw(st.booleans()),
        bounded_offsets=draw(st.booleans()),
        offset_layer_norm=draw(st.booleans()),
    )
    if config["heads"] * config["dim_head"] == offset_groups:
        # LayerNorm over one channel outputs its bias: offsets exactly zero, so with odd r every
        # sample sits on a token, where the two samplers pick different (valid) subgradients
        config["offset_layer_norm"] = False
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(r, 4 * r + 12))
    seed = draw(st.integers(0, 2**16))
    return config, batch, length, seed


@settings(max_examples=100)
@given(layer_configs())
def test_output_shape_and_finite(args):
    config, batch, length, seed = args
    torch.manual_seed(seed)
    layer = make_layer(**config).eval()
    x = torch.randn(batch, config["dim"], length, requires_grad=True)
    out, vgrid = layer(x, return_vgrid=True)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert vgrid.shape == (batch * config["offset_groups"], length // config["downsample_factor"])
    out.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()


def _outputs_and_grads(layer, x, mask=None):
    """The layer's output on ``x`` and the gradients of ``sum(out^2)`` wrt ``x`` and every parameter."""
    x = x.clone().requires_grad_()
    out = layer(x) if mask is None else layer(x, mask)
    return out, torch.autograd.grad(out.pow(2).sum(), [x, *layer.parameters()])


@settings(max_examples=60)
@given(layer_configs())
def test_fast_paths_equal_reference_paths(args):
    config, batch, length, seed = args
    torch.manual_seed(seed)
    fast = make_layer(**config).eval()
    slow = make_layer(**config, implementation=Implementation(position_bias="mlp", sampling="grid_sample")).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(batch, config["dim"], length, dtype=torch.float64)
    fast_out, fast_grads = _outputs_and_grads(fast.double(), x)
    slow_out, slow_grads = _outputs_and_grads(slow.double(), x)
    assert max_relative_error(fast_out, slow_out) < 1e-10
    assert max(gradient_errors(fast_grads, slow_grads)) < 1e-8


@settings(max_examples=60)
@given(layer_configs(), st.integers(1, 400), st.data())
def test_piecewise_kernel_equals_sdpa_kernel(args, max_bias_elements, data):
    """The piecewise kernel and SDPA give the same outputs and gradients, with or without padding."""
    config, batch, length, seed = args
    assume(config["position_bias"] == "cpb")
    torch.manual_seed(seed)
    piecewise = make_layer(**config, implementation=Implementation(kernel="piecewise", max_bias_elements=max_bias_elements))
    sdpa = make_layer(**config, implementation=Implementation(kernel="sdpa"))
    sdpa.load_state_dict(piecewise.state_dict())
    mask = None
    if config["geometry"] == "centered" and data.draw(st.booleans()):
        r = config["downsample_factor"]
        lengths = data.draw(st.lists(st.integers(r, length), min_size=batch, max_size=batch))
        mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(batch, config["dim"], length, dtype=torch.float64)
    piecewise_out, piecewise_grads = _outputs_and_grads(piecewise.double().eval(), x, mask)
    sdpa_out, sdpa_grads = _outputs_and_grads(sdpa.double().eval(), x, mask)
    assert max_relative_error(piecewise_out, sdpa_out) < 1e-10
    assert max(gradient_errors(piecewise_grads, sdpa_grads)) < 1e-8


@settings(max_examples=60)
@given(layer_configs(geometries=("centered",)), st.data())
def test_padding_invariance(args, data):
    """Each padded row equals the row alone, and padded outputs are zero, for random configs."""
    config, batch, length, seed = args
    r = config["downsample_factor"]
    lengths = data.draw(st.lists(st.integers(r, length), min_size=batch, max_size=batch))
    torch.manual_seed(seed)
    layer = make_layer(**config).double().eval()
    x = torch.randn(batch, config["dim"], length, dtype=torch.float64)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    out = layer(x, mask)
    for row, valid in enumerate(lengths):
        torch.testing.assert_close(out[row : row + 1, :, :valid], layer(x[row : row + 1, :, :valid]))
        assert torch.all(out[row, :, valid:] == 0)


@st.composite
def small_mlps(draw):
    hidden_dim = draw(st.integers(1, 6))
    depth = draw(st.integers(1, 3))
    num_outputs = draw(st.integers(1, 3))
    log_distance = draw(st.booleans())
    weight_scale = draw(st.sampled_from([0.5, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    cpb = ContinuousPositionBias(
        hidden_dim=hidden_dim, num_outputs=num_outputs, depth=depth, log_distance=log_distance
    ).double()
    with torch.no_grad():
        for layer in cpb.linears:
            layer.weight.normal_(0, weight_scale)
            layer.bias.normal_(0, weight_scale)
            if draw(st.booleans()):  # sometimes tie two units: tied kinks
                layer.weight[-1] = layer.weight[0]
                layer.bias[-1] = layer.bias[0]
    return cpb


def _rounding_magnitude(cpb, distance, dtype):
    """Per point, what float rounding of either path is relative to: 1 + the larger of

    * ``|slope * t| + |intercept|``, the terms the fast path's affine form adds (near a kink both
      can be large and cancel), and
    * the plain MLP's terms, ``|W| |h| + |b|`` carried through its layers (with large weights its
      hidden values are far larger than its output, and their rounding shows in the output).
    """
    with torch.no_grad():
        kinks, slopes, intercepts = cpb.table(dtype)
        t = cpb.transform(distance.detach())
        interval = torch.searchsorted(kinks, t.contiguous())
        affine = (slopes[interval] * t.unsqueeze(-1)).abs() + intercepts[interval].abs()
        mlp = t.abs().unsqueeze(-1)
        for layer in cpb.linears:
            mlp = mlp @ layer.weight.abs().T + layer.bias.abs()
        return 1 + torch.maximum(affine, mlp)


@settings(max_examples=100)
@given(small_mlps(), st.sampled_from([torch.float32, torch.float64]))
def test_fast_position_bias_equals_mlp(cpb, dtype):
    cpb = cpb.to(dtype)
    plain = copy.deepcopy(cpb)
    plain.fast = False
    distance = (torch.rand(64, dtype=torch.float64) * 40 - 20).to(dtype).requires_grad_()
    fast_out, plain_out = cpb(distance), plain(distance)
    scale = 1e-5 if dtype == torch.float32 else 1e-10
    assert ((fast_out - plain_out).abs() <= scale * _rounding_magnitude(cpb, distance, dtype)).all()

    # values are continuous across kinks, so both paths agree on them too
    kinks = cpb.table(dtype)[0]
    if cpb.log_distance:  # the distance whose log lands on the kink (kinks far out would overflow)
        kinks = kinks[kinks.abs() < 20]
        at_kinks = torch.sign(kinks) * torch.expm1(kinks.abs())
    else:
        at_kinks = kinks
    with torch.no_grad():
        fast_at, plain_at = cpb(at_kinks), plain(at_kinks)
    assert kinks.numel() == 0 or ((fast_at - plain_at).abs() <= scale * _rounding_magnitude(cpb, at_kinks, dtype)).all()

    cotangent = torch.randn_like(fast_out)
    grads = [torch.autograd.grad((out * cotangent).sum(), [distance, *m.parameters()], allow_unused=True)
             for out, m in ((fast_out, cpb), (plain_out, plain))]
    fast_grads, plain_grads = ([torch.zeros(1, dtype=dtype) if g is None else g for g in gs] for gs in grads)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-8
    for a, b in zip(fast_grads, plain_grads):
        assert (a - b).abs().max() <= tolerance * (1 + b.abs().max())


@settings(max_examples=100)
@given(
    st.integers(1, 3), st.integers(1, 4), st.integers(1, 12), st.integers(1, 30), st.integers(0, 2**16)
)
def test_samplers_agree(batch, channels, length, count, seed):
    torch.manual_seed(seed)
    values = torch.randn(batch, channels, length, dtype=torch.float64)
    positions = torch.rand(batch, count, dtype=torch.float64) * (length + 4) - 2
    torch.testing.assert_close(
        linear_sample_1d(values, positions), linear_sample_1d_reference(values, positions), rtol=0, atol=1e-12
    )
