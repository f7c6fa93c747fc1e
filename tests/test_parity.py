"""Parity with the reference implementation, ``deformable_attention.DeformableAttention1D`` 0.0.20.

``from_lucidrains`` copies the reference's weights into a layer in the "lucidrains" geometry; on the
same input the two must give the same output, the same sample grid and the same gradients wrt the
input and every parameter, matched by role.
"""

from __future__ import annotations

import pytest
import torch
from conftest import max_relative_error

from deform_attn import DeformableAttention1D, from_lucidrains
from deform_attn.kernels import Implementation

pytestmark = pytest.mark.usefixtures("single_thread")

# the reference comes with the 'test' extra; without it these tests skip, saying so
Ref = pytest.importorskip(
    "deformable_attention", reason="parity needs the reference: pip install deformable-attention==0.0.20"
).DeformableAttention1D

# (reference parameter, our parameter), by role; the test checks that this covers both modules fully
PARAMETER_ROLES = [
    ("to_q.weight", "to_q.weight"),
    ("to_k.weight", "to_k.weight"),
    ("to_v.weight", "to_v.weight"),
    ("to_out.weight", "to_out.weight"),
    ("to_out.bias", "to_out.bias"),
    ("to_offsets.0.weight", "to_offsets.depthwise.weight"),
    ("to_offsets.0.bias", "to_offsets.depthwise.bias"),
    ("to_offsets.2.weight", "to_offsets.pointwise.weight"),
    ("rel_pos_bias.mlp.0.0.weight", "position_bias.linears.0.weight"),
    ("rel_pos_bias.mlp.0.0.bias", "position_bias.linears.0.bias"),
    ("rel_pos_bias.mlp.1.0.weight", "position_bias.linears.1.weight"),
    ("rel_pos_bias.mlp.1.0.bias", "position_bias.linears.1.bias"),
    ("rel_pos_bias.mlp.2.weight", "position_bias.linears.2.weight"),
    ("rel_pos_bias.mlp.2.bias", "position_bias.linears.2.bias"),
]

# the CPB's output bias adds one constant per head to a whole row of logits
ZERO_GRADIENT = "position_bias.linears.2.bias"
# with a single key its softmax weight is 1 whatever the logit: what reaches the output only
# through the logits (the keys and the position bias) has no gradient
def only_through_logits(name: str) -> bool:
    return name == "to_k.weight" or name.startswith("position_bias.")

CONFIGS = {
    "default_small": (dict(dim=64, dim_head=16, heads=4), 2, 64),
    "dim_ne_inner": (dict(dim=48, dim_head=16, heads=4), 2, 40),
    "offset_groups_lt_heads": (dict(dim=64, dim_head=8, heads=4, offset_groups=2), 2, 64),
    "one_offset_group": (dict(dim=32, dim_head=8, heads=4, offset_groups=1), 1, 32),
    "ungrouped_projections": (dict(dim=64, dim_head=16, heads=4, group_queries=False, group_key_values=False), 2, 48),
    "no_log_distance": (dict(dim=64, dim_head=16, heads=4, cpb_log_distance=False), 2, 64),
    "r3_kernel5": (dict(dim=32, dim_head=8, heads=4, downsample_factor=3, offset_kernel_size=5), 2, 61),
    "odd_length_61": (dict(dim=64, dim_head=16, heads=4), 2, 61),
    "odd_length_47": (dict(dim=64, dim_head=16, heads=4, offset_groups=2), 2, 47),
    "offset_scale_1": (dict(dim=32, dim_head=8, heads=2, offset_scale=1.0), 2, 33),
    # n < 2 r: one key; a small offset_scale keeps its sample inside the sequence so x gets gradients
    "single_cell": (dict(dim=32, dim_head=8, heads=2, offset_scale=0.25), 2, 7),
}


def make_pair(config: dict, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    ref = Ref(**config).eval()
    ours = from_lucidrains(ref, **overrides).eval()
    return ref, ours


def forward_and_grads(module, x, cotangent, names):
    x = x.detach().clone().requires_grad_()
    out, vgrid = module(x, return_vgrid=True)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad((out * cotangent).sum(), [x, *(params[name] for name in names)])
    return out.detach(), vgrid.detach(), grads


def parity_errors(config, batch, length, dtype=torch.float32, **overrides):
    """Largest relative errors of our layer against the reference: output, vgrid, each gradient."""
    ref, ours = make_pair(config, **overrides)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(batch, config["dim"], length, dtype=dtype)
    cotangent = torch.randn(batch, config["dim"], length, dtype=dtype)
    ref_out, ref_vgrid, ref_grads = forward_and_grads(ref, x, cotangent, [a for a, _ in PARAMETER_ROLES])
    out, vgrid, grads = forward_and_grads(ours, x, cotangent, [b for _, b in PARAMETER_ROLES])
    errors = {"output": max_relative_error(out, ref_out), "vgrid": max_relative_error(vgrid, ref_vgrid)}
    # Gradients that are zero in exact arithmetic (everything but the values' path when there is a
    # single key) are measured against a floor of 1e-4 of the largest gradient, not their own noise.
    largest = max(g.abs().max().item() for g in ref_grads)
    single_key = length // ours.downsample_factor == 1
    for name, grad, ref_grad in zip(["x", *(b for _, b in PARAMETER_ROLES)], grads, ref_grads):
        if name == ZERO_GRADIENT or (single_key and only_through_logits(name)):
            # softmax ignores a per-head constant: both gradients must be rounding noise
            noise = max(grad.abs().max().item(), ref_grad.abs().max().item())
            errors[f"grad {name} (noise / largest)"] = noise / largest
            continue
        scale = max(ref_grad.abs().max().item(), 1e-4 * largest)
        errors[f"grad {name}"] = (grad - ref_grad).abs().max().item() / scale
    return errors


def tolerance(key: str) -> float:
    """1e-5 relative; the CPB's parameter gradients sum over every (query, key) pair, in a different
    order on the fast path (observed up to about 7e-6), so they get 3e-5."""
    return 3e-5 if key.startswith("grad position_bias") else 1e-5


def test_parameter_roles_cover_every_parameter():
    ref, ours = make_pair(CONFIGS["default_small"][0])
    assert {a for a, _ in PARAMETER_ROLES} == {name for name, _ in ref.named_parameters()}
    assert {b for _, b in PARAMETER_ROLES} == {name for name, _ in ours.named_parameters()}
    for a, b in PARAMETER_ROLES:
        torch.testing.assert_close(ours.get_parameter(b), ref.get_parameter(a), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_reference(name):
    config, batch, length = CONFIGS[name]
    errors = parity_errors(config, batch, length)
    bad = {key: value for key, value in errors.items() if value > tolerance(key)}
    assert not bad, bad


def test_parity_gradients_are_not_vacuous():
    """In the default config every gradient but the CPB's output bias (zero: softmax ignores a
    per-head constant) is far from zero, so the comparisons above test something."""
    config, batch, length = CONFIGS["default_small"]
    ref, _ = make_pair(config)
    x = torch.randn(batch, config["dim"], length)
    names = [a for a, _ in PARAMETER_ROLES]
    _, _, grads = forward_and_grads(ref, x, torch.randn_like(x), names)
    for name, grad in zip(["x", *names], grads):
        if name == "rel_pos_bias.mlp.2.bias":
            assert grad.abs().max() < 1e-5, name
        else:
            assert grad.abs().max() > 1e-2, name


@pytest.mark.parametrize("name", ["default_small", "offset_groups_lt_heads", "r3_kernel5", "single_cell"])
def test_parity_with_reference_paths(name):
    """Our reference paths (plain CPB MLP, grid_sample) match too."""
    config, batch, length = CONFIGS[name]
    errors = parity_errors(config, batch, length, implementation=Implementation(position_bias="mlp", sampling="grid_sample"))
    bad = {key: value for key, value in errors.items() if value > tolerance(key)}
    assert not bad, bad


@pytest.mark.parametrize("name", ["default_small", "odd_length_47"])
def test_parity_fp64_is_rounding_level(name):
    """In double precision the remaining difference is rounding, far below the fp32 tolerance."""
    config, batch, length = CONFIGS[name]
    # the reference builds its query grid in the default dtype: make that float64 as well
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        errors = parity_errors(config, batch, length, dtype=torch.float64)
    finally:
        torch.set_default_dtype(default_dtype)
    bad = {key: value for key, value in errors.items() if value > 1e-10}
    assert not bad, bad


def test_reference_samples_where_the_lucidrains_geometry_says():
    """With content = position, the reference's sampled keys sit at k n / (m - 1) - 1/2 for zero offsets.

    deformable-attention <= 0.0.18 returned a blend of the middle token here instead.
    """
    torch.manual_seed(0)
    dim, length, r = 8, 24, 4
    ref = Ref(dim=dim, dim_head=4, heads=2, downsample_factor=r).eval()
    with torch.no_grad():
        ref.to_offsets[2].weight.zero_()  # zero offsets
    captured = []
    ref.to_k.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    x = torch.arange(length, dtype=torch.float32).expand(1, dim, length)
    ref(x)
    m = length // r
    k = torch.arange(1, m - 1, dtype=torch.float32)  # interior cells; the two end cells fade half out
    torch.testing.assert_close(captured[0][0, :, 1:-1], (k * length / (m - 1) - 0.5).expand(dim, -1))


def test_from_lucidrains_copies_configuration():
    torch.manual_seed(0)
    ref = Ref(dim=48, dim_head=8, heads=6, offset_groups=3, downsample_factor=3, offset_kernel_size=7,
              offset_scale=1.5, cpb_log_distance=False, group_key_values=False, dropout=0.1)
    ours = from_lucidrains(ref)
    assert isinstance(ours, DeformableAttention1D)
    assert (ours.dim, ours.dim_head, ours.heads, ours.offset_groups, ours.downsample_factor) == (48, 8, 6, 3, 3)
    assert ours.geometry == "lucidrains" and ours.dropout == 0.1
    assert ours.to_offsets.offset_scale == 1.5 and ours.to_offsets.depthwise.kernel_size == (7,)
    assert ours.position_bias.log_distance is False
    assert ours.to_q.groups == 3 and ours.to_k.groups == 1 and ours.to_v.groups == 1


def test_from_lucidrains_follows_dtype():
    ref = Ref(dim=16, dim_head=4, heads=2).double()
    ours = from_lucidrains(ref)
    assert all(p.dtype == torch.float64 for p in ours.parameters())
