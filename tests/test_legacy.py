"""Deprecated constructor keywords: each warns, and builds the layer the new API builds.

The implementation switches map onto :class:`Implementation`; the ablation switches onto a
replaced part, the way :func:`conftest.make_layer` (and the experiments) build the variants.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_layer

from deform_attn import DeformableAttention1D, OffsetNetwork, ZeroOffsets
from deform_attn.kernels import Implementation

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(dim=16, dim_head=8, heads=4, offset_groups=2, downsample_factor=4)


def built_with_warning(keyword: str, **options) -> DeformableAttention1D:
    """The small layer from a deprecated keyword, which must warn naming it."""
    torch.manual_seed(1)
    with pytest.warns(DeprecationWarning, match=rf"^{keyword} is deprecated") as records:
        layer = DeformableAttention1D(**SMALL, **options).eval()
    assert all(issubclass(r.category, DeprecationWarning) for r in records)
    return layer


def outputs(layer: DeformableAttention1D, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x)


# ---------------------------------------------------------------- implementation switches

IMPLEMENTATION_KEYWORDS = [
    ("attention_kernel", "sdpa", Implementation(kernel="sdpa")),
    ("attention_kernel", "piecewise", Implementation(kernel="piecewise")),
    ("attention_kernel", "auto", Implementation(kernel="auto")),
    ("max_bias_elements", 64, Implementation(max_bias_elements=64)),
    ("check_finite", False, Implementation(check_finite=False)),
    ("fast_position_bias", False, Implementation(position_bias="mlp")),
    ("fast_position_bias", True, Implementation(position_bias="table")),
    ("fast_sampling", False, Implementation(sampling="grid_sample")),
    ("fast_sampling", True, Implementation(sampling="gather")),
]


@pytest.mark.parametrize(
    "keyword, value, implementation", IMPLEMENTATION_KEYWORDS, ids=[f"{k}={v}" for k, v, _ in IMPLEMENTATION_KEYWORDS]
)
def test_implementation_keyword_builds_the_new_layer(keyword, value, implementation):
    old = built_with_warning(keyword, **{keyword: value})
    torch.manual_seed(1)
    new = DeformableAttention1D(**SMALL, implementation=implementation).eval()
    assert old.implementation == implementation
    assert old.position_bias.fast == new.position_bias.fast == (implementation.position_bias == "table")
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 16, 400)  # long enough for "auto" to take the piecewise kernel
    assert torch.equal(outputs(old, x), outputs(new, x))


def test_check_finite_keyword_lets_nan_through():
    old = built_with_warning("check_finite", check_finite=False)
    torch.manual_seed(1)
    new = DeformableAttention1D(**SMALL, implementation=Implementation(check_finite=False)).eval()
    x = torch.randn(2, 16, 24)
    x[1, 3, 5] = torch.nan
    old_out, new_out = outputs(old, x), outputs(new, x)
    assert old_out[1].isnan().any() and not old_out[0].isnan().any()
    torch.testing.assert_close(old_out, new_out, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match=r"^x: contains NaN"):
        make_layer()(x)  # the default still checks


def test_deprecated_keyword_refines_a_given_implementation():
    """A deprecated keyword changes its own field of implementation= and keeps the others."""
    with pytest.warns(DeprecationWarning, match="attention_kernel"):
        layer = DeformableAttention1D(
            **SMALL, implementation=Implementation(max_bias_elements=100, sampling="grid_sample"), attention_kernel="sdpa"
        )
    assert layer.implementation == Implementation(kernel="sdpa", max_bias_elements=100, sampling="grid_sample")


def test_every_deprecated_keyword_warns_once():
    keywords = dict(
        attention_kernel="sdpa", max_bias_elements=64, check_finite=True, fast_position_bias=True, fast_sampling=True,
        use_offsets=True, position_bias="cpb", offset_layer_norm=False, bounded_offsets=True,
    )
    with pytest.warns(DeprecationWarning) as records:
        DeformableAttention1D(**SMALL, **keywords)
    named = sorted(str(record.message).split(" ", 1)[0] for record in records)
    assert named == sorted(keywords)


def test_deprecation_warning_points_at_the_caller():
    """Attributed to the caller's line, so a script calling the layer at top level shows it."""
    with pytest.warns(DeprecationWarning, match="attention_kernel") as records:
        DeformableAttention1D(**SMALL, attention_kernel="sdpa")
    assert records[0].filename == __file__


# ---------------------------------------------------------------- ablation switches


def test_use_offsets_false_is_zero_offsets():
    old = built_with_warning("use_offsets", use_offsets=False)
    assert isinstance(old.to_offsets, ZeroOffsets) and old.to_offsets.downsample_factor == 4
    assert not [name for name, _ in old.named_parameters() if name.startswith("to_offsets")]
    torch.manual_seed(1)
    new = make_layer(use_offsets=False)
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 16, 40)
    with torch.no_grad():
        out, vgrid = old(x, return_vgrid=True)
    assert torch.equal(vgrid, torch.arange(10.0).expand(4, -1))  # every cell samples its reference point
    assert torch.equal(out, outputs(new, x))


def test_position_bias_none_has_no_bias():
    old = built_with_warning("position_bias", position_bias="none")
    assert old.position_bias is None
    assert not [name for name, _ in old.named_parameters() if name.startswith("position_bias")]
    torch.manual_seed(1)
    new = make_layer(position_bias="none")
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 16, 40)
    assert torch.equal(outputs(old, x), outputs(new, x))


def test_position_bias_cpb_is_the_default_layer():
    old = built_with_warning("position_bias", position_bias="cpb")
    torch.manual_seed(1)
    new = DeformableAttention1D(**SMALL).eval()
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 16, 40)
    assert torch.equal(outputs(old, x), outputs(new, x))


@pytest.mark.parametrize(
    "keyword, value", [("offset_layer_norm", True), ("bounded_offsets", False)], ids=["layer-norm", "unbounded"]
)
def test_offset_network_options(keyword, value):
    old = built_with_warning(keyword, **{keyword: value})
    network = old.to_offsets
    assert isinstance(network, OffsetNetwork)
    assert network.bounded == (keyword != "bounded_offsets")
    assert isinstance(network.norm, torch.nn.Identity) == (keyword != "offset_layer_norm")
    torch.manual_seed(1)
    new = make_layer(**{keyword: value})
    new.load_state_dict(old.state_dict(), strict=True)
    with torch.no_grad():  # large offsets, so that the bound matters
        for layer in (old, new):
            layer.to_offsets.pointwise.weight.mul_(20)
    x = torch.randn(2, 16, 40)
    assert torch.equal(outputs(old, x), outputs(new, x))
    with torch.no_grad():
        _, vgrid = old(x, return_vgrid=True)
    offsets = vgrid - torch.arange(10.0)
    if keyword == "bounded_offsets":
        assert offsets.abs().max() > 4  # beyond offset_scale = r = 4 cells
    else:
        assert offsets.abs().max() <= 4


# ---------------------------------------------------------------- errors


def test_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"unexpected keyword argument.*'fast_kernel'"):
        DeformableAttention1D(dim=16, fast_kernel=True)


@pytest.mark.parametrize("implementation", ["sdpa", {"kernel": "sdpa"}, ("sdpa",)])
def test_implementation_of_another_type_is_a_type_error(implementation):
    with pytest.raises(TypeError, match=r"^implementation: expected a deform_attn\.kernels\.Implementation"):
        DeformableAttention1D(dim=16, implementation=implementation)


@pytest.mark.parametrize(
    "keyword, value, message",
    [
        ("attention_kernel", "flash", r"^attention_kernel: expected one of \('auto', 'fused', 'piecewise', 'sdpa'\)"),
        ("attention_kernel", None, r"^attention_kernel: expected one of"),
        ("max_bias_elements", 0, r"^max_bias_elements: expected a positive integer or None"),
        ("check_finite", "yes", r"^check_finite: expected a bool"),
        ("fast_position_bias", "yes", r"^fast_position_bias: expected a bool"),
        ("fast_sampling", 1, r"^fast_sampling: expected a bool"),
        ("position_bias", "rpe", r"^position_bias: expected one of \('cpb', 'none'\)"),
    ],
)
def test_bad_deprecated_value_names_the_keyword(keyword, value, message):
    with pytest.raises(ValueError, match=message), pytest.warns(DeprecationWarning, match=keyword):
        DeformableAttention1D(dim=16, **{keyword: value})


def test_conflict_between_deprecated_keywords_names_one_of_them():
    """'piecewise' needs the table, which fast_position_bias=False turns off."""
    with pytest.raises(ValueError, match=r"^attention_kernel: 'piecewise' evaluates the piecewise-linear table"):
        with pytest.warns(DeprecationWarning):
            DeformableAttention1D(dim=16, attention_kernel="piecewise", fast_position_bias=False)


# ---------------------------------------------------------------- the new API is silent


@pytest.mark.parametrize(
    "implementation",
    [None, Implementation(kernel="piecewise", max_bias_elements=4096, position_bias="table", sampling="grid_sample",
                          check_finite=False)],
    ids=["default", "full-implementation"],
)
def test_new_api_emits_no_deprecation_warning(implementation):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        layer = DeformableAttention1D(**SMALL, implementation=implementation)
        x = torch.randn(2, 16, 40, requires_grad=True)
        layer(x, torch.ones(2, 40, dtype=torch.bool)).sum().backward()
        layer.eval()(x.detach())
    assert x.grad is not None and x.grad.abs().max() > 0
