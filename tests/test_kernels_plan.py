"""The kernel choice, :func:`plan_attention`, as the pure function it is, and :class:`Implementation`.

Nothing here runs a layer, except the last test, which checks that a real layer's forward pass
runs the plan this function gives.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_layer
from hypothesis import given
from hypothesis import strategies as st

import deform_attn.attention as attention_module
from deform_attn.kernels import fused_available
from deform_attn.kernels import (
    EXPORT_QUERY_CHUNK,
    PIECEWISE_LENGTH_PER_KINK,
    PIECEWISE_MIN_LENGTH,
    Implementation,
    KernelPlan,
    default_max_bias_elements,
    plan_attention,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# a pass where "auto" takes the piecewise kernel: CPU, float32, long, few kinks, no dropout
PIECEWISE_CASE = dict(
    length=4096, batch=2, heads=4, cells=1024, num_kinks=10, device_type="cpu", floating_point="float32",
    autocast=False, dropout_in_use=False, exporting=False,
)


def plan(implementation: Implementation = Implementation(), **changes) -> KernelPlan:
    return plan_attention(implementation, **{**PIECEWISE_CASE, **changes})


# ---------------------------------------------------------------- "auto"


@pytest.mark.parametrize("floating_point", ["float32", "float64"])
def test_auto_picks_piecewise_on_cpu_for_long_sequences(floating_point):
    assert plan(floating_point=floating_point).kernel == "piecewise"


@pytest.mark.parametrize(
    "change",
    [
        dict(floating_point="bfloat16"),
        dict(floating_point="float16"),
        dict(autocast=True),
        dict(device_type="cuda"),
        dict(device_type="mps"),
        dict(dropout_in_use=True),
        dict(num_kinks=None),
    ],
    ids=["bfloat16", "float16", "autocast", "cuda", "mps", "dropout", "no-table"],
)
def test_auto_falls_back_to_sdpa(change):
    """Any one condition of the piecewise kernel missing sends "auto" to SDPA."""
    assert plan(**change).kernel == "sdpa"


@pytest.mark.parametrize(
    "num_kinks, threshold",
    [(0, 384), (1, 384), (48, 384), (49, 392), (255, 2040)],
)
def test_auto_length_rule_at_the_boundary(num_kinks, threshold):
    """Piecewise from n >= max(384, 8 kinks): one token shorter is SDPA."""
    assert threshold == max(PIECEWISE_MIN_LENGTH, PIECEWISE_LENGTH_PER_KINK * num_kinks)
    assert plan(length=threshold - 1, num_kinks=num_kinks).kernel == "sdpa"
    assert plan(length=threshold, num_kinks=num_kinks).kernel == "piecewise"


def test_auto_length_rule_named_cases():
    assert plan(length=383, num_kinks=0).kernel == "sdpa"
    assert plan(length=384, num_kinks=0).kernel == "piecewise"
    assert plan(length=2039, num_kinks=255).kernel == "sdpa"
    assert plan(length=2040, num_kinks=255).kernel == "piecewise"


@given(
    length=st.integers(1, 10_000),
    num_kinks=st.one_of(st.none(), st.integers(0, 1000)),
    floating_point=st.sampled_from(["float32", "float64", "bfloat16", "float16"]),
    device_type=st.sampled_from(["cpu", "cuda"]),
    autocast=st.booleans(),
    dropout_in_use=st.booleans(),
)
def test_auto_only_ever_picks_a_kernel_that_applies(length, num_kinks, floating_point, device_type, autocast, dropout_in_use):
    """Whatever the pass, "auto" gives piecewise exactly when its documented conditions all hold."""
    chosen = plan(
        length=length, num_kinks=num_kinks, floating_point=floating_point, device_type=device_type,
        autocast=autocast, dropout_in_use=dropout_in_use,
    ).kernel
    applies = (
        device_type == "cpu"
        and num_kinks is not None
        and floating_point in ("float32", "float64")
        and not autocast
        and not dropout_in_use
        and length >= max(384, 8 * num_kinks)
    )
    assert chosen == ("piecewise" if applies else "sdpa")


# ---------------------------------------------------------------- explicit kernels


@pytest.mark.parametrize("length", [1, 4, 383, 384, 2039, 2040, 10**6])
@pytest.mark.parametrize("kernel", ["piecewise", "sdpa"])
def test_explicit_kernel_is_kept_at_any_length(kernel, length):
    assert plan(Implementation(kernel=kernel), length=length, num_kinks=255).kernel == kernel


@pytest.mark.parametrize("change", [dict(floating_point="bfloat16"), dict(device_type="cuda"), dict(autocast=True)])
def test_explicit_sdpa_is_kept_where_piecewise_would_apply_or_not(change):
    assert plan(Implementation(kernel="sdpa")).kernel == "sdpa"
    assert plan(Implementation(kernel="sdpa"), **change).kernel == "sdpa"


def test_piecewise_with_dropout_raises():
    with pytest.raises(RuntimeError, match=r"^implementation\.kernel: 'piecewise' has no attention dropout"):
        plan(Implementation(kernel="piecewise"), dropout_in_use=True)


def test_piecewise_without_a_table_raises():
    with pytest.raises(ValueError, match=r"^implementation\.kernel: 'piecewise' needs the position bias's"):
        plan(Implementation(kernel="piecewise"), num_kinks=None)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize(
    "implementation, change",
    [
        (Implementation(), {}),
        (Implementation(), dict(length=5)),
        (Implementation(kernel="sdpa"), dict(device_type="cuda", floating_point="bfloat16")),
        (Implementation(kernel="piecewise", max_bias_elements=1), dict(dropout_in_use=True, num_kinks=None)),
        (Implementation(max_bias_elements=2**30), dict(autocast=True)),
    ],
    ids=["auto", "auto-short", "sdpa-cuda", "piecewise-without-table-and-dropout", "big-budget"],
)
def test_exporting_always_plans_the_scan(implementation, change):
    """While tracing, neither the kernel setting nor the budget matters, and nothing raises."""
    assert plan(implementation, exporting=True, **change) == KernelPlan("scan", EXPORT_QUERY_CHUNK)


# ---------------------------------------------------------------- chunk


def test_default_budgets():
    assert default_max_bias_elements("piecewise") == 2**21
    assert default_max_bias_elements("sdpa") == 2**23


@pytest.mark.parametrize(
    "implementation, change, chunk",
    [
        (Implementation(), {}, 2**21 // (2 * 4 * 1024)),
        (Implementation(), dict(length=10), 2**23 // (2 * 4 * 1024)),  # "auto" -> sdpa: sdpa's budget
        (Implementation(kernel="sdpa"), {}, 2**23 // (2 * 4 * 1024)),
        (Implementation(kernel="piecewise"), dict(length=10), 2**21 // (2 * 4 * 1024)),
        (Implementation(max_bias_elements=10**6), {}, 10**6 // (2 * 4 * 1024)),
        (Implementation(kernel="sdpa", max_bias_elements=10**6), {}, 10**6 // (2 * 4 * 1024)),
        (Implementation(max_bias_elements=100), {}, 1),
        (Implementation(max_bias_elements=1), dict(batch=1, heads=1, cells=1), 1),
        (Implementation(), dict(batch=10**4, heads=64, cells=10**4), 1),
    ],
)
def test_chunk_from_the_budget(implementation, change, chunk):
    assert plan(implementation, **change).chunk == chunk


@given(
    kernel=st.sampled_from(["auto", "piecewise", "sdpa"]),
    budget=st.one_of(st.none(), st.integers(1, 2**31)),
    batch=st.integers(1, 64),
    heads=st.integers(1, 32),
    cells=st.integers(1, 10**5),
    length=st.integers(1, 10**5),
)
def test_chunk_is_the_largest_that_fits_the_budget(kernel, budget, batch, heads, cells, length):
    """One chunk's pair tensors fit the budget, one more query would not; at least one query."""
    result = plan(Implementation(kernel=kernel, max_bias_elements=budget), batch=batch, heads=heads, cells=cells, length=length)
    budget = budget or default_max_bias_elements(result.kernel)
    pairs_per_query = batch * heads * cells
    assert result.chunk >= 1
    if result.chunk > 1:
        assert result.chunk * pairs_per_query <= budget
    assert (result.chunk + 1) * pairs_per_query > budget


# ---------------------------------------------------------------- Implementation


@pytest.mark.parametrize(
    "field, value",
    [
        ("kernel", "scan"),  # a plan's kernel, not a setting
        ("kernel", "Piecewise"),
        ("position_bias", "cpb"),
        ("position_bias", None),
        ("position_bias", True),
        ("sampling", "linear"),
        ("sampling", False),
        ("max_bias_elements", "1024"),
        ("max_bias_elements", False),
        ("max_bias_elements", -(2**21)),
        ("check_finite", 1),
        ("check_finite", None),
        ("check_finite", "yes"),
    ],
)
def test_implementation_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^implementation\.{field}: expected"):
        Implementation(**{field: value})


def test_implementation_defaults_and_valid_values():
    default = Implementation()
    assert (default.kernel, default.max_bias_elements, default.position_bias, default.sampling, default.check_finite) == (
        "auto", None, "table", "gather", True
    )
    for kernel in ("auto", "fused", "piecewise", "sdpa"):
        assert Implementation(kernel=kernel).kernel == kernel
    assert Implementation(position_bias="mlp", sampling="grid_sample", check_finite=False, max_bias_elements=1)


def test_implementation_is_frozen():
    implementation = Implementation()
    with pytest.raises(dataclasses.FrozenInstanceError):
        implementation.kernel = "sdpa"
    # replace validates too: a frozen value cannot be changed into an invalid one
    with pytest.raises(ValueError, match=r"^implementation\.kernel"):
        dataclasses.replace(implementation, kernel="flash")
    assert implementation == Implementation()


def test_implementation_is_hashable_by_value():
    a, b = Implementation(kernel="sdpa", max_bias_elements=100), Implementation(kernel="sdpa", max_bias_elements=100)
    assert a is not b and a == b and hash(a) == hash(b)
    assert len({a, b, Implementation(), Implementation(kernel="sdpa")}) == 3
    assert {a: "cached"}[b] == "cached"
    assert hash(KernelPlan("sdpa", 3)) == hash(KernelPlan("sdpa", 3))


# ---------------------------------------------------------------- the layer runs the plan


@pytest.mark.parametrize("train, dropout", [(False, 0.1), (True, 0.0), (True, 0.1)])
def test_layer_runs_the_plan_that_plan_attention_gives(train, dropout, monkeypatch):
    """At a short and a long length the forward pass's plan is plan_attention's (dropout only counts in training)."""
    layer = make_layer(train=train, dropout=dropout)
    kinks = layer.position_bias.table(torch.float32).kinks.numel()
    long = max(PIECEWISE_MIN_LENGTH, PIECEWISE_LENGTH_PER_KINK * kinks)
    seen = []
    run = attention_module.biased_attention
    monkeypatch.setattr(attention_module, "biased_attention", lambda plan, *a, **k: seen.append(plan) or run(plan, *a, **k))
    for length in (40, long):
        layer(torch.randn(2, 16, length))
        expected = plan_attention(
            Implementation(), length=length, batch=2, heads=4, cells=length // 4, num_kinks=kinks,
            dropout_in_use=train and dropout > 0, fused_kernel_available=fused_available(),
        )
        assert seen[-1] == expected
    dropout_in_use = train and dropout > 0
    no_dropout = ["fused", "fused"] if fused_available() else ["sdpa", "piecewise"]
    assert [p.kernel for p in seen] == (["sdpa", "sdpa"] if dropout_in_use else no_dropout)


@pytest.mark.parametrize("floating_point, autocast", [("bfloat16", False), ("float16", False), ("float32", True)])
def test_explicit_piecewise_refuses_low_precision(floating_point, autocast):
    """An explicit piecewise kernel names itself instead of failing deep inside on bf16/fp16/autocast."""
    with pytest.raises(ValueError, match=r"^implementation.kernel: 'piecewise' computes in float32 or float64"):
        plan_attention(
            Implementation(kernel="piecewise"), length=64, batch=1, heads=2, cells=16, num_kinks=3,
            floating_point=floating_point, autocast=autocast,
        )
