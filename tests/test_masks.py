"""Key-padding masks: a padded row behaves exactly like the same sequence given alone.

Mask convention: (batch, n) bool, True for real tokens, padding at the end of each row.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer, max_relative_error

from deform_attn import DeformableAttention1D
from deform_attn.kernels import Implementation

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTH = 24




def length_mask(lengths: list[int], total: int = LENGTH) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


# multiples of r = 4, not multiples, the full length, and the shortest allowed row (r tokens)
LENGTH_SETS = {"multiples": [24, 16, 8], "not_multiples": [23, 13, 6], "mixed": [24, 11, 4, 17]}


@pytest.mark.parametrize("lengths", list(LENGTH_SETS.values()), ids=list(LENGTH_SETS))
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("kernel", ["piecewise", "sdpa"])
def test_padded_rows_equal_rows_alone(lengths, chunked, kernel):
    layer = make_layer(implementation=Implementation(max_bias_elements=40 if chunked else 2**26, kernel=kernel))
    x = torch.randn(len(lengths), 16, LENGTH)
    mask = length_mask(lengths)
    out = layer(x, mask)
    for row, valid in enumerate(lengths):
        alone = layer(x[row : row + 1, :, :valid])
        torch.testing.assert_close(out[row : row + 1, :, :valid], alone, rtol=1e-5, atol=1e-5)
        assert torch.all(out[row, :, valid:] == 0)  # exactly zero at padded positions


@pytest.mark.parametrize("lengths", list(LENGTH_SETS.values()), ids=list(LENGTH_SETS))
def test_padding_content_changes_nothing(lengths):
    """No query and no sampled key reads the padding: replacing it leaves the output bit-identical."""
    layer = make_layer()
    mask = length_mask(lengths)
    x = torch.randn(len(lengths), 16, LENGTH)
    junk = x.masked_fill(~mask[:, None, :], 0.0) + 1e3 * torch.randn_like(x) * (~mask[:, None, :])
    out, vgrid = layer(x, mask, return_vgrid=True)
    out_junk, vgrid_junk = layer(junk, mask, return_vgrid=True)
    assert torch.equal(out, out_junk)
    assert torch.equal(vgrid[:, : min(lengths) // 4], vgrid_junk[:, : min(lengths) // 4])


@pytest.mark.parametrize("lengths", list(LENGTH_SETS.values()), ids=list(LENGTH_SETS))
def test_gradients_wrt_padding_are_zero(lengths):
    layer = make_layer()
    mask = length_mask(lengths)
    x = torch.randn(len(lengths), 16, LENGTH, requires_grad=True)
    layer(x, mask).pow(2).sum().backward()
    assert torch.all(x.grad.masked_select(~mask[:, None, :].expand_as(x)) == 0)
    assert x.grad.masked_select(mask[:, None, :].expand_as(x)).abs().max() > 0


def test_gradients_of_padded_row_equal_row_alone():
    layer = make_layer()
    lengths = [24, 13]
    x = torch.randn(2, 16, LENGTH)
    padded = x.clone().requires_grad_()
    layer(padded, length_mask(lengths))[1].pow(2).sum().backward()
    padded_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    alone = x[1:, :, :13].clone().requires_grad_()
    layer(alone).pow(2).sum().backward()
    torch.testing.assert_close(padded.grad[1:, :, :13], alone.grad, rtol=1e-4, atol=1e-6)
    for name_param, grad in zip(layer.named_parameters(), padded_grads):
        name, param = name_param
        if param.grad.abs().max() > 1e-6:
            assert max_relative_error(grad, param.grad) < 1e-4, name


def test_all_true_mask_equals_no_mask():
    layer = make_layer()
    x = torch.randn(2, 16, 22)
    torch.testing.assert_close(layer(x, torch.ones(2, 22, dtype=torch.bool)), layer(x), rtol=0, atol=1e-6)


def test_mask_with_batch_first():
    channels_first = make_layer()
    batch_first = make_layer(batch_first=True)
    batch_first.load_state_dict(channels_first.state_dict())
    x, mask = torch.randn(3, 16, LENGTH), length_mask([24, 13, 6])
    torch.testing.assert_close(batch_first(x.transpose(1, 2), mask), channels_first(x, mask).transpose(1, 2))


def test_masked_layer_gradcheck_fp64():
    layer = DeformableAttention1D(dim=8, dim_head=4, heads=2).double().eval()
    x = torch.randn(2, 8, 12, dtype=torch.float64, requires_grad=True)
    mask = length_mask([12, 7], total=12)
    assert torch.autograd.gradcheck(lambda x: layer(x, mask), (x,), fast_mode=True)


def test_mask_with_lucidrains_geometry_raises():
    layer = make_layer(geometry="lucidrains")
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 16, LENGTH), length_mask([24, 12]))


def test_non_finite_padding_is_ignored():
    """Padding is 'neither queried nor sampled', so NaN or inf there must not reach the output.

    check_finite=False, since the check rejects non-finite values anywhere in x.
    """
    layer = make_layer(implementation=Implementation(check_finite=False))
    lengths = [24, 13]
    mask = length_mask(lengths)
    x = torch.randn(2, 16, LENGTH)
    poisoned = x.clone()
    poisoned[0, :, 13:] = 1.0  # row 0 is full length: only row 1's padding is poisoned
    poisoned[1, :8, 13:] = float("nan")
    poisoned[1, 8:, 13:] = float("inf")
    out = layer(poisoned, mask)
    reference = layer(x, mask)
    assert torch.isfinite(out[1]).all()
    torch.testing.assert_close(out[1], reference[1], rtol=0, atol=0)


# ---------------------------------------------------------------- determinism and dropout


def test_eval_mode_is_deterministic_with_mask():
    layer = make_layer(dropout=0.3)
    x, mask = torch.randn(2, 16, LENGTH), length_mask([24, 10])
    torch.testing.assert_close(layer(x, mask), layer(x, mask), rtol=0, atol=0)


def test_dropout_acts_in_train_mode_only():
    layer = make_layer(dropout=0.3)
    x, mask = torch.randn(2, 16, LENGTH), length_mask([24, 10])
    layer.train()
    first, second = layer(x, mask), layer(x, mask)
    assert (first - second).abs().max() > 1e-3
    assert torch.all(first[1, :, 10:] == 0)  # padded outputs stay zero under dropout
    layer.eval()
    torch.testing.assert_close(layer(x, mask), layer(x, mask), rtol=0, atol=0)
