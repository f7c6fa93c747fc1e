"""The offset network: shapes, the bound on the offsets, and the DAT++ options."""

from __future__ import annotations

import pytest
import torch

from conftest import max_relative_error

from deform_attn import DeformableAttention1D, OffsetNetwork

pytestmark = pytest.mark.usefixtures("single_thread")


def make_network(**overrides) -> OffsetNetwork:
    options = dict(channels=6, downsample_factor=4, kernel_size=6, offset_scale=2.5)
    options.update(overrides)
    return OffsetNetwork(**options)


@pytest.mark.parametrize(
    "batch_groups, length, downsample_factor, kernel_size",
    [(1, 16, 4, 6), (6, 17, 4, 4), (4, 9, 3, 5), (2, 5, 1, 3), (3, 31, 2, 8)],
)
def test_output_shape_is_one_offset_per_cell(batch_groups, length, downsample_factor, kernel_size):
    network = make_network(downsample_factor=downsample_factor, kernel_size=kernel_size)
    out = network(torch.randn(batch_groups, 6, length))
    assert out.shape == (batch_groups, length // downsample_factor)


def _scale_up(network: OffsetNetwork, factor: float) -> OffsetNetwork:
    with torch.no_grad():
        network.pointwise.weight.mul_(factor)
    return network


def test_bounded_offsets_stay_within_offset_scale():
    network = _scale_up(make_network(), 1e4)  # tanh saturates
    out = network(torch.randn(8, 6, 32))
    assert out.abs().max() <= 2.5
    assert out.abs().max() > 2.4  # saturation reached: the bound is the scale, not something smaller


def test_bounded_offsets_are_tanh_times_scale():
    bounded = make_network()
    unbounded = make_network(bounded=False)
    unbounded.load_state_dict(bounded.state_dict())
    x = torch.randn(3, 6, 20)
    torch.testing.assert_close(bounded(x), torch.tanh(unbounded(x) / 2.5) * 2.5)


def test_unbounded_offsets_exceed_offset_scale_for_large_weights():
    network = _scale_up(make_network(bounded=False), 1e3)
    out = network(torch.randn(8, 6, 32))
    assert out.abs().max() > 2.5 * 10


def test_layer_norm_option():
    plain = make_network()
    normed = make_network(layer_norm=True)
    assert isinstance(normed.norm.norm, torch.nn.LayerNorm) and normed.norm.norm.normalized_shape == (6,)
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("norm.") for name in missing)
    x = torch.randn(3, 6, 20)
    out = normed(x)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    assert (out - plain(x)).abs().max() > 1e-4  # the norm is really applied

    # LayerNorm over channels makes the offsets invariant to a positive scale of the depthwise conv
    with torch.no_grad():
        normed.depthwise.weight.mul_(7.0)
        normed.depthwise.bias.mul_(7.0)
    torch.testing.assert_close(normed(x), out, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kernel_size", [2, 3, 5, 7])
def test_bad_kernel_size_raises(kernel_size):
    """Smaller than the stride, or an odd difference (the padding (k - r) / 2 would not be whole)."""
    with pytest.raises(ValueError, match="offset_kernel_size"):
        make_network(downsample_factor=4, kernel_size=kernel_size)


@pytest.mark.parametrize("layer_norm, bounded", [(False, True), (True, False)])
def test_offset_network_gradcheck_fp64(layer_norm, bounded):
    network = make_network(channels=3, layer_norm=layer_norm, bounded=bounded).double()
    x = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    weight = network.pointwise.weight.detach().clone().requires_grad_()

    def offsets(x, weight):
        return torch.func.functional_call(network, {"pointwise.weight": weight}, (x,))

    assert torch.autograd.gradcheck(offsets, (x, weight))


@pytest.mark.parametrize("layer_norm, bounded", [(False, True), (True, False)])
@pytest.mark.parametrize("downsample_factor, kernel_size", [(4, 6), (3, 3), (2, 6)])
def test_offset_network_equals_its_definition(layer_norm, bounded, downsample_factor, kernel_size):
    """depthwise strided conv (padding (k - r) / 2) -> [LayerNorm] -> GELU -> pointwise -> [tanh] * scale."""
    network = make_network(
        downsample_factor=downsample_factor, kernel_size=kernel_size, layer_norm=layer_norm, bounded=bounded
    ).double()
    x = torch.randn(3, 6, 23, dtype=torch.float64)
    conv = network.depthwise
    hidden = torch.nn.functional.conv1d(
        x, conv.weight, conv.bias, stride=downsample_factor, padding=(kernel_size - downsample_factor) // 2, groups=6
    )
    if layer_norm:
        hidden = torch.nn.functional.layer_norm(
            hidden.transpose(1, 2), (6,), network.norm.norm.weight, network.norm.norm.bias
        ).transpose(1, 2)
    raw = torch.einsum("bdm,d->bm", torch.nn.functional.gelu(hidden), network.pointwise.weight[0, :, 0])
    expected = (torch.tanh(raw) if bounded else raw) * 2.5
    torch.testing.assert_close(network(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "length, kernel_size, stride, left, right",
    [(23, 6, 4, 1, 1), (40, 7, 3, 2, 2), (17, 6, 4, 2, 0), (9, 6, 4, 0, 0), (1, 1, 1, 0, 0)],
)
def test_strided_depthwise_conv_is_the_padded_convolution(length, kernel_size, stride, left, right):
    """Values, gradients and second derivatives equal conv1d over the zero-padded input."""
    import deform_attn.offsets as offsets_module
    from deform_attn.offsets import strided_depthwise_conv

    generator = torch.Generator().manual_seed(length)
    x = torch.randn(3, 5, length, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(5, kernel_size, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    expected = torch.nn.functional.conv1d(
        torch.nn.functional.pad(x, (left, right)), weight[:, None], bias, stride=stride, groups=5
    )
    torch.testing.assert_close(strided_depthwise_conv(x, weight, bias, stride, left, right), expected)
    with torch.no_grad():
        torch.testing.assert_close(strided_depthwise_conv(x, weight, bias, stride, left, right), expected)
    conv = lambda *args: strided_depthwise_conv(*args, stride, left, right)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, weight, bias))
    assert torch.autograd.gradgradcheck(conv, (x, weight, bias))
    # the same gradients as autograd's own backward of the strided slices, also where only some
    # inputs need one (the backward skips the others)
    grad_out = torch.randn_like(expected)
    for needs in ((True, True, True), (False, True, False), (True, False, False)):
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, weight, bias), needs)]
        reference = [t.detach().requires_grad_(need) for t, need in zip((x, weight, bias), needs)]
        ours = torch.autograd.grad(conv(*inputs), [t for t in inputs if t.requires_grad], grad_out)
        theirs = torch.autograd.grad(
            offsets_module._depthwise_forward(*reference, stride, left, right),
            [t for t in reference if t.requires_grad], grad_out,
        )
        for mine, expected_grad in zip(ours, theirs):
            torch.testing.assert_close(mine, expected_grad)


def test_forward_passes_leave_the_parameters_unchanged():
    """A single-channel, single-cell layer once wrote into its own depthwise bias (an expanded view
    that .contiguous() returned as is): every forward must leave every parameter as it was."""
    torch.manual_seed(0)
    layer = DeformableAttention1D(dim=4, dim_head=1, heads=1, downsample_factor=1, offset_kernel_size=1).double()
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    x = torch.randn(1, 4, 1, dtype=torch.float64)
    outputs = [layer(x), layer(x, torch.ones(1, 1, dtype=torch.bool))]
    with torch.no_grad():
        outputs.append(layer(x))
    for name, p in layer.named_parameters():
        assert torch.equal(p, before[name]), name
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


@pytest.mark.skipif(not __import__("deform_attn.kernels", fromlist=["fused_available"]).fused_available(),
                    reason="no C++ compiler: the convolution runs on tensor operations only")
def test_compiled_depthwise_conv_matches_the_tensor_path_and_any_thread_count(monkeypatch):
    """The C++ loops (fused_cpu.cpp) and the tap-by-tap tensor path give the same values and
    gradients in fp32, for a non-contiguous input too; the weight's gradient is the same bits on
    one thread and on two (a fixed summation order)."""
    import deform_attn.offsets as offsets_module
    from deform_attn.offsets import strided_depthwise_conv

    generator = torch.Generator().manual_seed(3)
    # (b, n, c) storage seen as (b, c, n): the layer's batch-first input before .contiguous()
    x = torch.randn(4, 43, 8, generator=generator).transpose(1, 2)
    weight = torch.randn(8, 6, generator=generator)
    bias = torch.randn(8, generator=generator)
    grad_out = torch.randn(4, 8, 10, generator=generator)  # (1 + 43 + 1 - 6) // 4 + 1 cells
    calls = []
    compiled = offsets_module.depthwise_forward
    monkeypatch.setattr(offsets_module, "depthwise_forward", lambda *args: calls.append(1) or compiled(*args))

    def run(use_compiled: bool, threads: int):
        monkeypatch.setattr(offsets_module, "_compiled_depthwise", lambda *args: use_compiled)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
            out = strided_depthwise_conv(*inputs, 4, 1, 1)
            return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]
        finally:
            torch.set_num_threads(previous)

    tensors = run(False, 2)
    assert not calls
    for value, expected in zip(run(True, 2), tensors):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    assert calls
    one, two = run(True, 1), run(True, 2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


needs_compiled = pytest.mark.skipif(
    not __import__("deform_attn.kernels", fromlist=["fused_available"]).fused_available(),
    reason="no C++ compiler: the offset network runs on tensor operations only",
)


def _offsets_by_modules(network, x, padding):
    """The offset network through its modules, one tensor operation at a time (the reference)."""
    hidden = network.activation(network.norm(network.depthwise_conv(x, padding)))
    raw = torch.matmul(network.pointwise.weight[:, :, 0], hidden).squeeze(1)
    return (torch.tanh(raw) if network.bounded else raw) * network.offset_scale


@needs_compiled
@pytest.mark.parametrize("dtype, tolerances", [(torch.float32, (1e-5, 1e-4)), (torch.float64, (1e-10, 1e-10))])
@pytest.mark.parametrize(
    "settings",
    [
        dict(channels=16, downsample_factor=4, kernel_size=6, bounded=True, causal=False),
        dict(channels=8, downsample_factor=3, kernel_size=7, bounded=False, causal=False),
        dict(channels=12, downsample_factor=4, kernel_size=6, bounded=True, causal=True),
        dict(channels=5, downsample_factor=1, kernel_size=1, bounded=True, causal=False),
    ],
    ids=["centred", "unbounded-odd", "causal", "one-tap"],
)
def test_compiled_offset_network_equals_its_modules(monkeypatch, dtype, tolerances, settings):
    """The whole network in one compiled call against its modules, values and every gradient, on
    weights scaled up so that the GELU's tails and tanh's saturation are reached, with the layer's
    padding and streaming's (0, 0); the parameters' gradients are the same bits on one thread and
    on two."""
    import deform_attn.offsets as offsets_module

    torch.manual_seed(0)
    network = OffsetNetwork(offset_scale=4.0, **settings).to(dtype)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(3)
    x = torch.randn(6, settings["channels"], 45, dtype=dtype, requires_grad=True)
    inputs = [x, *network.parameters()]
    calls = []
    compiled = offsets_module.offsets_forward
    monkeypatch.setattr(offsets_module, "offsets_forward", lambda *args: calls.append(1) or compiled(*args))

    def values_and_grads(function, threads=2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = function()
            cotangent = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
            return [out.detach(), *torch.autograd.grad(out, inputs, cotangent)]
        finally:
            torch.set_num_threads(previous)

    output_tolerance, gradient_tolerance = tolerances
    for padding in (None, (0, 0)):
        ours = values_and_grads(lambda: network(x, padding))
        one_thread = values_and_grads(lambda: network(x, padding), threads=1)
        expected = values_and_grads(lambda: _offsets_by_modules(network, x, padding))
        assert max_relative_error(ours[0], expected[0]) < output_tolerance
        for mine, reference in zip(ours[1:], expected[1:]):
            assert max_relative_error(mine, reference) < gradient_tolerance
        for mine, reference in zip(ours[2:], one_thread[2:]):  # the parameters' sums: a fixed order
            assert torch.equal(mine, reference)
    assert len(calls) == 4


@needs_compiled
def test_compiled_offset_network_has_a_second_derivative_and_steps_aside():
    """A second derivative goes through the modules; a LayerNorm or another GELU takes the modules."""
    network = OffsetNetwork(channels=4, downsample_factor=4, kernel_size=6, offset_scale=4.0).double()
    x = torch.randn(3, 4, 17, dtype=torch.float64, requires_grad=True)
    assert network._compiled(x, network.depthwise.weight)
    assert torch.autograd.gradgradcheck(lambda x: network(x), (x,))
    normed = OffsetNetwork(channels=4, downsample_factor=4, kernel_size=6, offset_scale=4.0, layer_norm=True)
    assert not normed._compiled(x.float(), normed.depthwise.weight)
    network.activation = torch.nn.GELU(approximate="tanh")
    assert not network._compiled(x, network.depthwise.weight)
    torch.testing.assert_close(network(x), _offsets_by_modules(network, x, None))
