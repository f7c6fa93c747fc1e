"""Bad arguments fail at the boundary with the right exception and a message naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_layer
from deform_attn import (
    ContinuousPositionBias,
    DeformableAttention1D,
    from_lucidrains,
    linear_sample_1d,
    linear_sample_1d_reference,
    query_key_distances,
    sample_positions,
)
from deform_attn.kernels import Implementation

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLERS = pytest.mark.parametrize(
    "sample", [linear_sample_1d, linear_sample_1d_reference], ids=["gather", "grid_sample"]
)




@pytest.fixture
def layer():
    return make_layer().eval()


# ---------------------------------------------------------------- forward: x


def test_x_wrong_rank(layer):
    with pytest.raises(ValueError, match=r"^x: expected a 3-d tensor"):
        layer(torch.randn(16, 20))


def test_x_wrong_rank_4d(layer):
    with pytest.raises(ValueError, match=r"^x: expected a 3-d tensor"):
        layer(torch.randn(2, 16, 20, 1))


def test_x_wrong_channel_count(layer):
    with pytest.raises(ValueError, match=r"^x: expected 16 channels \(dim\)"):
        layer(torch.randn(2, 15, 20))


def test_x_wrong_channel_count_batch_first():
    layer = make_layer(batch_first=True)
    with pytest.raises(ValueError, match=r"^x: expected 16 channels .*\(batch, n, dim\)"):
        layer(torch.randn(2, 16, 20))  # channels-first given to a batch-first layer


def test_x_shorter_than_downsample_factor(layer):
    with pytest.raises(ValueError, match=r"^x: sequence length n = 3 .*downsample_factor = 4"):
        layer(torch.randn(2, 16, 3))


def test_x_integer_dtype(layer):
    with pytest.raises(TypeError, match=r"^x: expected a floating point tensor"):
        layer(torch.ones(2, 16, 20, dtype=torch.long))


def test_x_bool_dtype(layer):
    with pytest.raises(TypeError, match=r"^x: expected a floating point tensor"):
        layer(torch.ones(2, 16, 20, dtype=torch.bool))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_x_non_finite(layer, bad):
    x = torch.randn(2, 16, 20)
    x[1, 3, 7] = bad
    with pytest.raises(ValueError, match=r"^x: contains NaN or infinity.*check_finite=False"):
        layer(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_x_non_finite_propagates_without_check(bad):
    layer = make_layer(implementation=Implementation(check_finite=False)).eval()
    x = torch.randn(2, 16, 20)
    x[1, 3, 7] = bad
    out = layer(x)
    assert not torch.isfinite(out[1]).all()
    assert torch.isfinite(out[0]).all()  # rows do not mix


@pytest.mark.parametrize("x", [[[0.0] * 20] * 16, np.zeros((2, 16, 20), dtype=np.float32), None])
def test_x_not_a_tensor(layer, x):
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor"):
        layer(x)


# ---------------------------------------------------------------- forward: mask


def test_mask_wrong_shape(layer):
    with pytest.raises(ValueError, match=r"^mask: expected shape \(batch, n\) = \(2, 20\)"):
        layer(torch.randn(2, 16, 20), torch.ones(2, 19, dtype=torch.bool))


def test_mask_wrong_dtype(layer):
    with pytest.raises(TypeError, match=r"^mask: expected a bool tensor"):
        layer(torch.randn(2, 16, 20), torch.ones(2, 20))


def test_mask_not_a_tensor(layer):
    with pytest.raises(TypeError, match=r"^mask: expected a bool tensor"):
        layer(torch.randn(2, 16, 20), [[True] * 20] * 2)


def test_mask_padding_not_at_end(layer):
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 5] = False  # a hole in the middle
    with pytest.raises(ValueError, match=r"^mask: padding must sit at the end"):
        layer(torch.randn(2, 16, 20), mask)


def test_mask_padding_at_start(layer):
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    with pytest.raises(ValueError, match=r"^mask: padding must sit at the end"):
        layer(torch.randn(2, 16, 20), mask)


def test_mask_row_shorter_than_downsample_factor(layer):
    mask = torch.arange(20)[None, :] < torch.tensor([[20], [3]])
    with pytest.raises(ValueError, match=r"^mask: every row needs at least downsample_factor = 4.*rows \[1\]"):
        layer(torch.randn(2, 16, 20), mask)


def test_mask_with_lucidrains_geometry():
    layer = make_layer(geometry="lucidrains")
    with pytest.raises(ValueError, match=r"^mask: padding masks need geometry='centered'"):
        layer(torch.randn(2, 16, 20), torch.ones(2, 20, dtype=torch.bool))


# ---------------------------------------------------------------- constructor


def test_heads_not_divisible_by_offset_groups():
    with pytest.raises(ValueError, match=r"^offset_groups: expected a divisor of heads \(4\)"):
        make_layer(heads=4, offset_groups=3, dim=24)


def test_dim_not_divisible_by_offset_groups():
    with pytest.raises(ValueError, match=r"^dim: expected a multiple of offset_groups \(4\)"):
        make_layer(dim=18, heads=4, offset_groups=4)


def test_dim_too_small_for_position_bias():
    with pytest.raises(ValueError, match=r"^dim: .*dim must be >= 4"):
        make_layer(dim=2, heads=2, offset_groups=2)


def test_dim_small_without_position_bias_is_fine():
    """The dim >= 4 rule is the CPB's: a layer built without one (deprecated keyword) takes dim 2."""
    with pytest.warns(DeprecationWarning, match="position_bias is deprecated"):
        layer = DeformableAttention1D(dim=2, heads=2, dim_head=8, offset_groups=2, position_bias="none")
    assert layer(torch.randn(1, 2, 8)).shape == (1, 2, 8)


def test_offset_kernel_size_smaller_than_downsample_factor():
    with pytest.raises(ValueError, match=r"^offset_kernel_size: expected an integer >= downsample_factor \(4\)"):
        make_layer(offset_kernel_size=2)


def test_offset_kernel_size_wrong_parity():
    with pytest.raises(ValueError, match=r"^offset_kernel_size: .*offset_kernel_size - downsample_factor even"):
        make_layer(offset_kernel_size=7)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.1", True, None])
def test_bad_dropout(dropout):
    with pytest.raises(ValueError, match=r"^dropout: expected a probability in \[0, 1\)"):
        make_layer(dropout=dropout)


@pytest.mark.parametrize("offset_scale", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_bad_offset_scale(offset_scale):
    with pytest.raises(ValueError, match=r"^offset_scale: expected a positive, finite number of cells"):
        make_layer(offset_scale=offset_scale)


@pytest.mark.parametrize("geometry", ["centred", "Centered", "", None])
def test_bad_geometry(geometry):
    with pytest.raises(ValueError, match=r"^geometry: expected one of \('centered', 'lucidrains'\)"):
        make_layer(geometry=geometry)


def test_bad_geometry_in_geometry_functions():
    offsets = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"^geometry: expected one of"):
        sample_positions(offsets, 20, 4, geometry="centred")
    with pytest.raises(ValueError, match=r"^geometry: expected one of"):
        query_key_distances(torch.arange(20), offsets, 20, 4, geometry="lucidrain")


@pytest.mark.parametrize("position_bias", ["CPB", "rpe", "", None])
def test_bad_position_bias(position_bias):
    """The deprecated keyword still validates its value."""
    with pytest.raises(ValueError, match=r"^position_bias: expected one of \('cpb', 'none'\)"):
        with pytest.warns(DeprecationWarning):
            DeformableAttention1D(dim=16, position_bias=position_bias)


@pytest.mark.parametrize("kernel", ["flash", "SDPA", "", None])
def test_bad_attention_kernel(kernel):
    with pytest.raises(ValueError, match=r"^implementation.kernel: expected one of \('auto', 'fused', 'piecewise', 'sdpa'\)"):
        make_layer(implementation=Implementation(kernel=kernel))


def test_piecewise_kernel_needs_the_table():
    with pytest.raises(ValueError, match=r"^implementation.kernel: 'piecewise' evaluates the piecewise-linear table"):
        Implementation(kernel="piecewise", position_bias="mlp")
    layer = make_layer(position_bias="none", implementation=Implementation(kernel="piecewise"))
    with pytest.raises(ValueError, match=r"^implementation.kernel: 'piecewise' needs the position bias"):
        layer(torch.randn(2, 16, 24))


@pytest.mark.parametrize("value", [0, -2, 2.0, True])
def test_bad_max_bias_elements(value):
    with pytest.raises(ValueError, match=r"^implementation.max_bias_elements: expected a positive integer or None"):
        Implementation(max_bias_elements=value)


def test_piecewise_kernel_refuses_attention_dropout_in_training():
    layer = make_layer(implementation=Implementation(kernel="piecewise"), dropout=0.1).train()
    with pytest.raises(RuntimeError, match=r"^implementation.kernel: 'piecewise' has no attention dropout"):
        layer(torch.randn(2, 16, 24))
    layer.eval()
    assert layer(torch.randn(2, 16, 24)).shape == (2, 16, 24)


@pytest.mark.parametrize(
    "name", ["dim", "heads", "dim_head", "downsample_factor", "offset_groups"]
)
@pytest.mark.parametrize("value", [0, -2, 2.0, True])
def test_non_positive_or_non_integer_sizes(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: expected a positive integer"):
        make_layer(**{name: value})


def test_offset_kernel_size_not_positive_integer():
    with pytest.raises(ValueError, match=r"^offset_kernel_size: expected a positive integer"):
        make_layer(offset_kernel_size=0)


def test_constructor_is_keyword_only():
    with pytest.raises(TypeError):
        DeformableAttention1D(16)


# ---------------------------------------------------------------- from_lucidrains


@pytest.mark.parametrize("module", [nn.Linear(4, 4), nn.Conv1d(4, 4, 1), nn.Identity()])
def test_from_lucidrains_rejects_other_modules(module):
    with pytest.raises(TypeError, match=r"^module: expected a deformable_attention.DeformableAttention1D"):
        from_lucidrains(module)


def test_from_lucidrains_rejects_our_own_layer():
    with pytest.raises(TypeError, match=r"^module: .*without \["):
        from_lucidrains(make_layer())


# ---------------------------------------------------------------- sampler


@SAMPLERS
def test_sampler_values_wrong_rank(sample):
    with pytest.raises(ValueError, match=r"^values: expected a tensor of shape \(batch, channels, length\)"):
        sample(torch.randn(3, 10), torch.rand(3, 4))


@SAMPLERS
def test_sampler_positions_wrong_rank(sample):
    with pytest.raises(ValueError, match=r"^positions: expected a tensor of shape \(batch, num_samples\)"):
        sample(torch.randn(2, 3, 10), torch.rand(2, 4, 1))


@SAMPLERS
def test_sampler_values_not_a_tensor(sample):
    with pytest.raises(ValueError, match=r"^values: expected a tensor"):
        sample([[[0.0] * 10] * 3] * 2, torch.rand(2, 4))


@SAMPLERS
def test_sampler_integer_positions(sample):
    with pytest.raises(TypeError, match=r"^positions: expected a floating point tensor"):
        sample(torch.randn(2, 3, 10), torch.randint(0, 10, (2, 4)))


@SAMPLERS
def test_sampler_integer_values(sample):
    with pytest.raises(TypeError, match=r"^values: expected a floating point tensor"):
        sample(torch.randint(0, 5, (2, 3, 10)), torch.rand(2, 4))


@SAMPLERS
def test_sampler_mismatched_batch(sample):
    with pytest.raises(ValueError, match=r"^positions: batch size 3 does not match values' batch size 2"):
        sample(torch.randn(2, 3, 10), torch.rand(3, 4))


# ---------------------------------------------------------------- position bias


@pytest.mark.parametrize("name", ["hidden_dim", "depth"])
def test_position_bias_bad_sizes(name):
    options = dict(hidden_dim=4, num_outputs=2, depth=2)
    options[name] = 0
    with pytest.raises(ValueError, match=rf"^{name}: expected a positive integer"):
        ContinuousPositionBias(**options)
