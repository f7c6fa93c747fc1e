"""The piecewise attention kernel: equal to materialising the bias and calling SDPA, in values and gradients."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import gradient_errors, gradient_errors_of_largest, max_relative_error, trained_looking

from deform_attn import DeformableAttention1D
from deform_attn.geometry import distance_coordinates, query_key_distances
from deform_attn.geometry import QueryGrid
from deform_attn.kernels import Implementation, kink_crossings, piecewise_biased_attention
from deform_attn.position_bias import ContinuousPositionBias

pytestmark = pytest.mark.usefixtures("single_thread")


def make_pair(**overrides) -> tuple[DeformableAttention1D, DeformableAttention1D]:
    """The same layer twice: once on the piecewise kernel, once on SDPA."""
    options = dict(dim=16, dim_head=8, heads=4, offset_groups=2, downsample_factor=4)
    options.update(overrides)
    base = options.pop("implementation", Implementation())
    piecewise = DeformableAttention1D(implementation=replace(base, kernel="piecewise"), **options).eval()
    sdpa = DeformableAttention1D(implementation=replace(base, kernel="sdpa"), **options).eval()
    sdpa.load_state_dict(piecewise.state_dict())
    return piecewise, sdpa


def outputs_and_grads(layer, x, mask=None):
    x = x.clone().requires_grad_()
    out = layer(x) if mask is None else layer(x, mask)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()])
    return out.detach(), grads


@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
@pytest.mark.parametrize("cpb_log_distance", [True, False])
@pytest.mark.parametrize("offset_groups", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_piecewise_kernel_equals_sdpa(geometry, cpb_log_distance, offset_groups, dtype):
    piecewise, sdpa = make_pair(geometry=geometry, cpb_log_distance=cpb_log_distance, offset_groups=offset_groups)
    trained_looking(piecewise)
    sdpa.load_state_dict(piecewise.state_dict())
    piecewise, sdpa = piecewise.to(dtype), sdpa.to(dtype)
    x = torch.randn(2, 16, 45, dtype=dtype)
    out, grads = outputs_and_grads(piecewise, x)
    expected_out, expected_grads = outputs_and_grads(sdpa, x)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    assert max_relative_error(out, expected_out) < tolerance
    assert max(gradient_errors_of_largest(grads, expected_grads)) < (1e-11 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("max_bias_elements", [1, 100, 2**20])
def test_piecewise_kernel_equals_sdpa_with_mask_and_chunks(max_bias_elements):
    piecewise, sdpa = make_pair(implementation=Implementation(max_bias_elements=max_bias_elements))
    trained_looking(piecewise)
    sdpa.load_state_dict(piecewise.state_dict())
    x = torch.randn(3, 16, 30)
    mask = torch.arange(30)[None, :] < torch.tensor([[30], [9], [4]])
    out, grads = outputs_and_grads(piecewise, x, mask)
    expected_out, expected_grads = outputs_and_grads(sdpa, x, mask)
    assert max_relative_error(out, expected_out) < 2e-5
    assert max(gradient_errors(grads, expected_grads)) < 2e-4


@pytest.mark.parametrize("length, expected_calls", [(40, 0), (400, 1)])
def test_auto_calls_the_piecewise_kernel_only_for_long_sequences(length, expected_calls, monkeypatch):
    """Where the fused kernel is unavailable (no compiler), "auto" falls back on the piecewise kernel."""
    import deform_attn.attention as attention
    import deform_attn.kernels as kernels

    monkeypatch.setattr(attention, "fused_available", lambda: False)
    calls = []
    kernel = kernels.piecewise_biased_attention
    monkeypatch.setattr(kernels, "piecewise_biased_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    layer = DeformableAttention1D(dim=16, heads=2, dim_head=8)  # hidden 4: at most 24 kinks, so 384 decides
    assert layer.position_bias.table(torch.float32).kinks.numel() <= 24
    layer(torch.randn(1, 16, length))
    assert len(calls) == expected_calls


# ---------------------------------------------------------------- the kernel function itself


def kernel_inputs(dtype=torch.float64, batch=2, groups=2, outputs=2, length=23, cells=7, log_distance=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    heads = groups * outputs
    bias = ContinuousPositionBias(hidden_dim=6, num_outputs=outputs, log_distance=log_distance).to(dtype)
    with torch.no_grad():
        for linear in bias.linears:
            linear.weight.normal_(0, 2, generator=generator)
            linear.bias.normal_(0, 2, generator=generator)
    offsets = 3 * torch.randn(batch * groups, cells, dtype=dtype, generator=generator)
    q = torch.randn(batch, heads, length, 5, dtype=dtype, generator=generator)
    k = torch.randn(batch, heads, cells, 5, dtype=dtype, generator=generator)
    v = torch.randn(batch, heads, cells, 5, dtype=dtype, generator=generator)
    return bias, offsets, q, k, v


def materialised(q, k, v, bias_module, offsets, length, key_padding=None):
    """softmax(q k^T / sqrt(d) + CPB(distance)) v with the bias built pair by pair through the plain MLP."""
    batch, heads = q.shape[:2]
    distances = query_key_distances(torch.arange(length), offsets, length, 3)  # (b g, n, m)
    bias = bias_module.mlp(bias_module.transform(distances).unsqueeze(-1))  # (b g, n, m, o)
    bias = bias.reshape(batch, -1, *bias.shape[1:]).permute(0, 1, 4, 2, 3).reshape(batch, heads, length, -1)
    if key_padding is not None:
        bias = bias.masked_fill(key_padding[:, None, None, :], -torch.inf)
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, dim=-1) @ v


def run_kernel(q, k, v, bias_module, offsets, length, chunk, key_padding=None):
    u, w, step, origin = distance_coordinates(torch.arange(length), offsets, length, 3)
    return piecewise_biased_attention(
        q, k, v, key_coordinates=w, query_coordinates=u, query_grid=QueryGrid(step, origin),
        table=bias_module.table(q.dtype), log_distance=bias_module.log_distance, scale=q.shape[-1] ** -0.5,
        chunk=chunk, key_padding=key_padding,
    )


@pytest.mark.parametrize("chunk", [1, 4, 23, 100])
@pytest.mark.parametrize("log_distance", [True, False])
def test_kernel_equals_plain_mlp_bias(chunk, log_distance):
    bias, offsets, q, k, v = kernel_inputs(log_distance=log_distance)
    leaves = [q, k, v, offsets, *bias.parameters()]
    for leaf in leaves:
        leaf.requires_grad_()
    expected = materialised(q, k, v, bias, offsets, 23)
    actual = run_kernel(q, k, v, bias, offsets, 23, chunk)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, g)
    actual_grads = torch.autograd.grad(actual, leaves, g)
    assert max(gradient_errors(actual_grads, expected_grads)) < 1e-11


def test_kernel_with_key_padding():
    bias, offsets, q, k, v = kernel_inputs()
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 3:] = True
    expected = materialised(q, k, v, bias, offsets, 23, padding)
    torch.testing.assert_close(run_kernel(q, k, v, bias, offsets, 23, 5, padding), expected, rtol=1e-12, atol=1e-12)


def test_kernel_gradcheck_fp64():
    bias, offsets, q, k, v = kernel_inputs(length=9, cells=3, batch=1)
    u, w, step, origin = distance_coordinates(torch.arange(9), offsets, 9, 3)
    kinks, slopes, intercepts = bias.table(torch.float64)
    w, slopes, intercepts = (t.detach().requires_grad_() for t in (w, slopes, intercepts))

    def run(q, k, v, w, slopes, intercepts):
        return piecewise_biased_attention(
            q, k, v, key_coordinates=w, query_coordinates=u, query_grid=QueryGrid(step, origin),
            table=(kinks, slopes, intercepts), log_distance=True, scale=0.5, chunk=4,
        )

    inputs = tuple(t.detach().requires_grad_() for t in (q, k, v)) + (w, slopes, intercepts)
    assert torch.autograd.gradcheck(run, inputs)


def test_kernel_without_kinks_is_linear_bias():
    """Zero first-layer weights: the MLP is constant, no kink, no crossing."""
    bias, offsets, q, k, v = kernel_inputs()
    with torch.no_grad():
        bias.linears[0].weight.zero_()
    assert bias.table(torch.float64)[0].numel() == 0
    torch.testing.assert_close(run_kernel(q, k, v, bias, offsets, 23, 4), materialised(q, k, v, bias, offsets, 23))


def test_kernel_refuses_second_derivatives():
    bias, offsets, q, k, v = kernel_inputs()
    q.requires_grad_()
    out = run_kernel(q, k, v, bias, offsets, 23, 4)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(out.sum(), q, create_graph=True)  # a graph of the gradient is refused up front
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert grad.abs().max() > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"q": torch.zeros(2, 4, 23)}, r"^q: expected shape \(b, h, n, d\)"),
        ({"k": torch.zeros(2, 4, 7, 6)}, r"^k: expected shape \(b, h, m, d\)"),
        ({"v": torch.zeros(2, 4, 8, 5)}, r"^v: expected"),
        ({"key_coordinates": torch.zeros(3, 7)}, r"^key_coordinates: expected shape \(b g, m\)"),
        ({"key_coordinates": torch.zeros(6, 7)}, r"^key_coordinates: 3 groups per sequence do not divide the 4 heads"),
        ({"query_coordinates": torch.zeros(22)}, r"^query_coordinates: expected shape \(n,\)"),
        ({"chunk": 0}, r"^chunk: expected a positive integer"),
        ({"key_padding": torch.zeros(2, 7)}, r"^key_padding: expected a bool tensor"),
        ({"table": "wrong outputs"}, r"^table: expected kinks \(k,\), slopes and intercepts \(k \+ 1, h / g = 2\)"),
    ],
)
def test_kernel_rejects_bad_arguments(change, message):
    bias, offsets, q, k, v = kernel_inputs()
    u, w, step, origin = distance_coordinates(torch.arange(23), offsets, 23, 3)
    kinks, slopes, intercepts = bias.table(torch.float64)
    arguments = dict(q=q, k=k, v=v, key_coordinates=w, query_coordinates=u, query_grid=QueryGrid(step, origin),
                     table=(kinks, slopes, intercepts), log_distance=True, scale=1.0, chunk=4)
    if change.get("table") == "wrong outputs":
        change = {"table": (kinks, slopes[:, :1], intercepts[:, :1])}
    arguments.update({name: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                      for name, value in change.items()})
    with pytest.raises(ValueError, match=message):
        piecewise_biased_attention(**arguments)


def test_kernel_rejects_decreasing_query_coordinates():
    bias, offsets, q, k, v = kernel_inputs()
    with pytest.raises(ValueError, match=r"^query_grid: expected a positive step"):
        piecewise_biased_attention(
            q, k, v, key_coordinates=offsets, query_coordinates=torch.arange(23.0), query_grid=QueryGrid(-1.0, 0.0),
            table=bias.table(torch.float64), log_distance=True, scale=1.0, chunk=4,
        )


@pytest.mark.parametrize("log_distance", [True, False])
def test_crossings_count_the_kinks_below_each_pair(log_distance):
    """#{k : r_jk <= i} is the interval searchsorted finds for pair (i, j), away from rounding ties."""
    bias, offsets, *_ = kernel_inputs(log_distance=log_distance, cells=40, length=120)
    kinks = bias.table(torch.float64)[0]
    u, w, step, origin = distance_coordinates(torch.arange(120), offsets, 120, 3)
    crossings = kink_crossings(w, kinks, 120, QueryGrid(step, origin), log_distance)  # (b g, m, k)
    assert crossings.dtype == torch.int32 and crossings.min() >= 0 and crossings.max() <= 120
    t = bias.transform(u[None, :, None] - w[:, None, :])  # (b g, n, m)
    expected = torch.searchsorted(kinks, t.contiguous())
    counted = (crossings[:, None, :, :] <= torch.arange(120)[None, :, None, None]).sum(-1)
    assert torch.equal(counted, expected)
    assert 0 < counted.min() or counted.max() > 0  # the test sees kinks being crossed


def test_crossings_of_kinks_beyond_float_range():
    """Kinks far out in t (exp overflows) are never crossed, or always crossed, without NaN."""
    kinks = torch.tensor([-1000.0, -1.0, 0.5, 800.0], dtype=torch.float64)
    w = torch.tensor([[0.0, 5.0]], dtype=torch.float64)
    crossings = kink_crossings(w, kinks, 10, QueryGrid(1.0, 0.0), log_distance=True)
    assert torch.equal(crossings[..., 0], torch.zeros(1, 2, dtype=torch.int32))
    assert torch.equal(crossings[..., 3], torch.full((1, 2), 10, dtype=torch.int32))
    # t > -1 <=> d > -(e - 1): first i with i - w > -1.718
    assert crossings[0, :, 1].tolist() == [0, 4]
    # t > 0.5 <=> d > e^0.5 - 1 = 0.6487
    assert crossings[0, :, 2].tolist() == [1, 6]
