"""The 1D sampler's convention: token ``j`` sits at position ``j``, zero outside the sequence.

deformable-attention <= 0.0.18 laid the sequence along the height axis of a width-1 image but
passed the positions as grid_sample's x (width) coordinate, so every sample was a blend of the
middle token. The content-equals-position test below fails for that layout (checked against a
copy of it, ``_sample_like_0_0_18``), and passes for both of our paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import max_relative_error

from deform_attn import linear_sample_1d, linear_sample_1d_reference, linear_sample_1d_tensors
from deform_attn.kernels import fused_available

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLERS = pytest.mark.parametrize(
    "sample", [linear_sample_1d, linear_sample_1d_tensors, linear_sample_1d_reference],
    ids=["default", "gather", "grid_sample"],
)
needs_compiled = pytest.mark.skipif(not fused_available(), reason="no C++ compiler: no compiled sampler")


def _sample_like_0_0_18(values, positions):
    """The buggy layout: positions on the x axis of a width-1 image (kept only to test the tests)."""
    length = values.shape[-1]
    x = 2.0 * positions / max(length - 1, 1) - 1.0
    grid = torch.stack([x, torch.zeros_like(x)], dim=-1)[:, :, None, :]  # (b, m, 1, 2): x first
    image = values[..., None]  # (b, c, n, 1): the sequence along the height axis
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]


def position_sequence(batch: int, channels: int, length: int, dtype=torch.float64):
    """values[b, c, j] = j: sampling it returns the sampled positions themselves."""
    return torch.arange(length, dtype=dtype).expand(batch, channels, length).contiguous()


def positions_away_from_integers(batch, count, low, high, dtype=torch.float64, margin=0.05):
    """Random positions in [low, high) whose fractional part avoids the kinks at the integers."""
    whole = torch.randint(low, high, (batch, count)).to(dtype)
    return whole + margin + (1 - 2 * margin) * torch.rand(batch, count, dtype=dtype)


@SAMPLERS
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_content_equals_position(sample, dtype, tol):
    length = 10
    values = position_sequence(2, 3, length, dtype)
    known = torch.tensor([0.0, 0.25, 1.5, 3.0, 4.75, 8.5, 9.0], dtype=dtype)
    positions = torch.stack([known, (length - 1) * torch.rand(known.shape[0], dtype=dtype)])
    out = sample(values, positions)
    assert out.shape == (2, 3, known.shape[0])
    torch.testing.assert_close(out, positions[:, None, :].expand_as(out), rtol=0, atol=tol)


def test_content_equals_position_catches_the_0_0_18_layout():
    """The same check rejects the layout that made every key a blend of the middle token."""
    values = position_sequence(1, 1, 9)
    positions = torch.tensor([[0.5, 2.0, 6.25]], dtype=torch.float64)
    buggy = _sample_like_0_0_18(values, positions)
    assert (buggy - positions[:, None]).abs().max() > 1.0
    # what it actually returns: a fraction of the middle token, whatever the position
    middle = (values.shape[-1] - 1) / 2
    assert torch.all((buggy > 0) & (buggy <= middle + 1e-12))


@SAMPLERS
def test_integer_shift_of_positions_is_exact_shift_of_sequence(sample):
    length, shift = 12, 3
    values = torch.randn(2, 4, length, dtype=torch.float64)
    # from 0 up to past the end: the zeros beyond the end shift along with the tokens
    positions = (length + 1) * torch.rand(2, 15, dtype=torch.float64)
    shifted_values = F.pad(values[..., shift:], (0, shift))  # shifted_values[j] = values[j + shift]
    torch.testing.assert_close(
        sample(values, positions + shift), sample(shifted_values, positions), rtol=0, atol=1e-12
    )


@SAMPLERS
def test_integer_positions_return_tokens_exactly(sample):
    values = torch.randn(2, 3, 8, dtype=torch.float64)
    positions = torch.arange(8, dtype=torch.float64).expand(2, 8)
    torch.testing.assert_close(sample(values, positions), values, rtol=0, atol=1e-12)


@SAMPLERS
def test_zero_outside_and_linear_fade_at_the_borders(sample):
    length = 6
    values = torch.randn(2, 3, length, dtype=torch.float64)
    far = torch.tensor([-7.0, -2.5, -1.0, float(length), length + 0.5, length + 9.0], dtype=torch.float64)
    out = sample(values, far.expand(2, -1))
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-12)

    # (-1, 0) fades token 0 in; (n - 1, n) fades token n - 1 out
    left = torch.tensor([-0.9, -0.5, -0.1], dtype=torch.float64)
    right = torch.tensor([length - 0.9, length - 0.5, length - 0.1], dtype=torch.float64)
    out_left = sample(values, left.expand(2, -1))
    out_right = sample(values, right.expand(2, -1))
    torch.testing.assert_close(out_left, (1 + left) * values[..., :1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out_right, (length - right) * values[..., -1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gather_and_grid_sample_paths_agree(dtype, tol):
    """Values and gradients wrt values and positions, for positions inside, at and beyond the borders."""
    length = 11
    values = torch.randn(3, 5, length, dtype=dtype, requires_grad=True)
    positions = positions_away_from_integers(3, 40, -3, length + 2, dtype).requires_grad_()
    cotangent = torch.randn(3, 5, 40, dtype=dtype)

    results = []
    for sample in (linear_sample_1d, linear_sample_1d_reference):
        out = sample(values, positions)
        grads = torch.autograd.grad((out * cotangent).sum(), (values, positions))
        results.append((out, *grads))
    for fast, reference in zip(*results):
        assert max_relative_error(fast, reference) < tol


def test_position_gradient_is_difference_of_neighbours():
    """d sample / d p = values[floor(p) + 1] - values[floor(p)] inside the sequence."""
    values = torch.randn(1, 2, 9, dtype=torch.float64)
    positions = positions_away_from_integers(1, 12, 0, 8).requires_grad_()
    (grad,) = torch.autograd.grad(linear_sample_1d(values, positions).sum(), positions)
    left = positions.detach().floor().long()[0]
    expected = (values[0, :, left + 1] - values[0, :, left]).sum(0)
    torch.testing.assert_close(grad[0], expected, rtol=0, atol=1e-12)


@SAMPLERS
def test_sampler_gradcheck_fp64(sample):
    values = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    positions = positions_away_from_integers(2, 9, -1, 7).requires_grad_()  # includes both fades
    assert torch.autograd.gradcheck(sample, (values, positions))


def test_positions_are_promoted_not_truncated():
    """fp32 positions on fp64 values keep their fractional part."""
    values = position_sequence(1, 1, 5)
    positions = torch.tensor([[1.25, 3.5]], dtype=torch.float32)
    torch.testing.assert_close(linear_sample_1d(values, positions)[0, 0], positions[0].double())


@needs_compiled
@pytest.mark.parametrize("dtype, tolerances", [(torch.float32, (1e-5, 1e-4)), (torch.float64, (1e-10, 1e-10))])
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_sampler_equals_the_tensor_path(monkeypatch, dtype, tolerances, threads):
    """The C++ loops against the gather path: values and both gradients, for positions at tokens,
    in the fades beyond both borders, far outside and anywhere between, on a non-contiguous input."""
    import deform_attn.sampling as sampling_module

    calls = []
    compiled = sampling_module.sample_forward
    monkeypatch.setattr(sampling_module, "sample_forward", lambda *args: calls.append(1) or compiled(*args))
    generator = torch.Generator().manual_seed(7)
    length = 23
    # (b, n, c) storage seen as (b, c, n)
    values = torch.randn(4, length, 6, dtype=dtype, generator=generator).transpose(1, 2)
    positions = torch.rand(4, 30, dtype=dtype, generator=generator) * (length + 8) - 4
    positions[0, :8] = torch.tensor([0, 3, length - 1, -1, length, -0.5, length - 0.5, 1e9], dtype=dtype)
    cotangent = torch.randn(4, 6, 30, dtype=dtype, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for sample in (linear_sample_1d, linear_sample_1d_tensors):
            inputs = [values.detach().clone().requires_grad_(), positions.detach().clone().requires_grad_()]
            out = sample(*inputs)
            results.append([out.detach(), *torch.autograd.grad(out, inputs, cotangent)])
    finally:
        torch.set_num_threads(previous)
    assert calls, "linear_sample_1d did not take the compiled path"
    output_tolerance, gradient_tolerance = tolerances
    (out, *grads), (expected, *expected_grads) = results
    assert max_relative_error(out, expected) < output_tolerance
    for grad, expected_grad in zip(grads, expected_grads):
        assert max_relative_error(grad, expected_grad) < gradient_tolerance


@needs_compiled
def test_compiled_sampler_has_a_second_derivative():
    """The compiled backward hands a second derivative to the tensor path's graph."""
    values = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    positions = positions_away_from_integers(2, 7, -1, 9).requires_grad_()
    assert torch.autograd.gradgradcheck(linear_sample_1d, (values, positions))


def test_tensor_path_takes_what_the_compiled_one_does_not(monkeypatch):
    """bfloat16 values, and positions wider than the values, run on the gather path."""
    import deform_attn.sampling as sampling_module

    calls = []
    compiled = sampling_module.sample_forward
    monkeypatch.setattr(sampling_module, "sample_forward", lambda *args: calls.append(1) or compiled(*args))
    values = position_sequence(1, 2, 6).to(torch.bfloat16)
    positions = torch.tensor([[0.5, 2.0, 4.5]])
    torch.testing.assert_close(linear_sample_1d(values, positions)[0, 0].float(), positions[0], rtol=0, atol=0)
    values = position_sequence(1, 1, 6, torch.float32)
    positions = torch.tensor([[1.25, 3.5]], dtype=torch.float64)
    out = linear_sample_1d(values, positions)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], positions[0].float(), rtol=0, atol=0)
    assert not calls
