"""The fused CPU kernel: the same function as materialising the bias and calling SDPA.

fp32 outputs within 1e-5 and gradients within 1e-4 of the largest magnitude, fp64 to 1e-10;
key padding, causal visibility with null keys, no position bias, both distance transforms,
several heads per offset group, both geometries, and trained-looking position-bias weights with
large offsets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import gradient_errors_of_largest, max_relative_error, trained_looking

from deform_attn import DeformableAttention1D
from deform_attn.geometry import QueryGrid
from deform_attn.kernels import (
    Implementation,
    fused_available,
    fused_biased_attention,
    fused_unavailable_reason,
    sdpa_biased_attention,
)
from deform_attn.position_bias import ContinuousPositionBias, table_bias_function

pytestmark = pytest.mark.skipif(
    not fused_available() and os.environ.get("CI") != "true",
    reason=f"the fused kernel is unavailable here: {fused_unavailable_reason()}",
)

TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-10)}


def test_fused_kernel_is_available_in_ci():
    """CI has a C++ compiler: there the default layer must run the fused kernel, not fall back."""
    assert fused_available(), fused_unavailable_reason()


def kernel_case(dtype, *, batch=2, groups=2, outputs=2, length=150, cells=37, channels=12, padding=False,
                causal=False, bias=True, log_distance=True, seed=0, spread=1.5):
    """Inputs for both kernels, with a table whose kinks are spread (weights scaled by ``spread``)."""
    generator = torch.Generator().manual_seed(seed)
    heads = groups * outputs

    def normal(*shape):
        return torch.randn(*shape, dtype=dtype, generator=generator)

    q, k, v = normal(batch, heads, length, channels), normal(batch, heads, cells, channels), normal(batch, heads, cells, channels)
    step, origin = 0.25, -0.375
    query_coordinates = torch.arange(length, dtype=dtype) * step + origin
    # keys anywhere in and beyond the sequence: large offsets
    key_coordinates = torch.rand(batch * groups, cells, dtype=dtype, generator=generator) * (length * step + 8) - 4
    table = None
    if bias:
        cpb = ContinuousPositionBias(hidden_dim=16, num_outputs=outputs, log_distance=log_distance).to(dtype)
        with torch.no_grad():
            for linear in cpb.linears:
                linear.weight.copy_(spread * normal(*linear.weight.shape))
                linear.bias.copy_(spread * normal(*linear.bias.shape))
        table = cpb.table(dtype)
    extra = {}
    if padding:
        extra["key_padding"] = torch.arange(cells)[None, :] >= torch.tensor([cells, cells - 5])[:, None]
    if causal:
        extra["visible_from"] = torch.randint(-5, length + 3, (batch * groups, cells), generator=generator)
        extra["null_k"], extra["null_v"] = normal(batch, heads, 2, channels), normal(batch, heads, 2, channels)
    nulls = {name: extra.pop(name) for name in ("null_k", "null_v") if name in extra}
    inputs = dict(q=q, k=k, v=v, key_coordinates=key_coordinates, **nulls)
    for tensor in inputs.values():
        tensor.requires_grad_()
    differentiable = list(inputs.values()) + ([table.slopes, table.intercepts] if bias else [])
    common = dict(query_coordinates=query_coordinates, scale=channels**-0.5, **extra)
    return inputs, differentiable, common, table, QueryGrid(step, origin), log_distance


def run_both(dtype, **options):
    inputs, differentiable, common, table, grid, log_distance = kernel_case(dtype, **options)
    reference_bias = None if table is None else table_bias_function(table, log_distance)
    expected = sdpa_biased_attention(**inputs, **common, position_bias=reference_bias, chunk=10**9)
    cotangent = torch.randn(expected.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    expected_grads = torch.autograd.grad(expected, differentiable, cotangent, allow_unused=True)
    actual = fused_biased_attention(**inputs, **common, query_grid=grid, table=table, log_distance=log_distance)
    actual_grads = torch.autograd.grad(actual, differentiable, cotangent, allow_unused=True)
    return actual, expected, actual_grads, expected_grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"padding": True},
        {"causal": True},
        {"causal": True, "padding": True},
        {"bias": False},
        {"log_distance": False},
        {"groups": 4, "outputs": 1, "channels": 32, "length": 333, "cells": 83},
        {"groups": 1, "outputs": 3, "length": 7, "cells": 1},
        {"length": 64, "cells": 16, "channels": 5},
        # a row's keys take 1.2 MB in fp32: the scratch buffers mapped from the system
        {"batch": 1, "groups": 1, "outputs": 1, "length": 40, "cells": 4700, "channels": 64},
        # two rows of 22 blocks: the forward pass deals each row out in spans of blocks
        {"batch": 1, "groups": 1, "outputs": 2, "length": 700, "cells": 175, "causal": True},
    ],
    ids=["plain", "padding", "causal", "causal-padding", "no-bias", "linear-distance", "one-head-per-group",
         "one-key", "one-block-odd-channels", "mapped-scratch", "few-long-rows"],
)
def test_fused_kernel_equals_sdpa(dtype, options):
    actual, expected, actual_grads, expected_grads = run_both(dtype, **options)
    output_tolerance, gradient_tolerance = TOLERANCE[dtype]
    assert max_relative_error(actual, expected) < output_tolerance
    present = [(a, e) for a, e in zip(actual_grads, expected_grads) if e is not None]
    assert all(a is not None for a, _ in present)
    errors = gradient_errors_of_largest([a for a, _ in present], [e for _, e in present])
    assert max(errors) < gradient_tolerance, errors


def repeated_batch(tensors: dict, copies: int) -> dict:
    """Every per-sequence tensor of ``tensors`` (all but the query coordinates) ``copies`` times
    along the batch: more rows, with the same sequences."""
    return {name: t.repeat(copies, *([1] * (t.dim() - 1))) if torch.is_tensor(t) and name != "query_coordinates"
            else t for name, t in tensors.items()}


@pytest.mark.parametrize("options", [{}, {"causal": True, "padding": True}], ids=["plain", "causal-padding"])
def test_forward_spans_change_no_bit(options):
    """With fewer than four rows per thread (batch 1, a few heads) the forward pass deals out
    spans of each row's blocks; the output must be bit for bit the one of whole rows."""
    inputs, _, common, table, grid, log_distance = kernel_case(
        torch.float32, batch=2, groups=1, outputs=1, length=700, cells=175, **options
    )
    kernel = dict(query_grid=grid, table=table, log_distance=log_distance)
    threads = torch.get_num_threads()
    try:
        outputs = {}
        for count in (1, 2):  # 2 rows: 2 spans a row on one thread, 4 on two
            torch.set_num_threads(count)
            with torch.no_grad():
                outputs[count] = fused_biased_attention(**inputs, **common, **kernel)
        torch.set_num_threads(1)
        with torch.no_grad():  # the batch four times over: eight rows, whole rows on one thread
            whole_rows = fused_biased_attention(**repeated_batch(inputs, 4), **repeated_batch(common, 4), **kernel)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[1], outputs[2])
    assert torch.equal(outputs[1], whole_rows[:2])
    assert torch.equal(whole_rows[:2], whole_rows[6:])


def test_backward_spans_sum_in_a_fixed_order():
    """Split rows' key, value and table gradients are sums of per-span sums, added in span order:
    the same bits on every call whichever thread ran which span, and within rounding of the sums
    over whole rows."""
    inputs, differentiable, common, table, grid, log_distance = kernel_case(
        torch.float32, batch=2, groups=1, outputs=1, length=700, cells=175, causal=True, padding=True
    )
    kernel = dict(query_grid=grid, table=table, log_distance=log_distance)
    cotangent = torch.randn(2, 1, 700, 12, generator=torch.Generator().manual_seed(3))

    def gradients(batch_copies: int):
        leaves = {name: t.detach().requires_grad_() for name, t in repeated_batch(inputs, batch_copies).items()}
        out = fused_biased_attention(**leaves, **repeated_batch(common, batch_copies), **kernel)
        grads = torch.autograd.grad(out, [*leaves.values(), table.slopes, table.intercepts],
                                    cotangent.repeat(batch_copies, 1, 1, 1))
        rows = [g[:2] for g in grads[: len(leaves)]]  # the first copy of the batch
        return rows + [g / batch_copies for g in grads[len(leaves):]]  # the table's: summed over copies

    split = [gradients(1) for _ in range(3)]  # 2 rows on 2 threads: 4 spans a row
    assert all(torch.equal(a, b) for again in split[1:] for a, b in zip(split[0], again))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = gradients(4)  # 8 rows on one thread: whole rows
    finally:
        torch.set_num_threads(threads)
    if threads >= 2:
        assert any(not torch.equal(a, b) for a, b in zip(split[0], whole))  # the sums are grouped
    assert max(gradient_errors_of_largest(split[0], whole)) < 1e-5


def test_fused_float32_is_as_accurate_as_sdpa_float32_on_an_extreme_table():
    """Biases of hundreds (weights x3 in every layer): both float32 kernels round the logits; the
    fused one must stay as close to the float64 result as SDPA's float32 path does."""
    inputs, _, common, table, grid, log_distance = kernel_case(
        torch.float32, groups=4, outputs=1, channels=32, length=333, cells=83, spread=3.0
    )
    as_float64 = {name: t.detach().double() for name, t in inputs.items()}
    common64 = {name: t.double() if torch.is_tensor(t) and t.is_floating_point() else t for name, t in common.items()}
    table64 = type(table)(*(part.detach().double() for part in table))
    with torch.no_grad():
        truth = sdpa_biased_attention(**as_float64, **common64, position_bias=table_bias_function(table64, log_distance),
                                      chunk=10**9)
        sdpa = sdpa_biased_attention(**inputs, **common, position_bias=table_bias_function(table, log_distance),
                                     chunk=10**9)
        fused = fused_biased_attention(**inputs, **common, query_grid=grid, table=table, log_distance=log_distance)
    assert table.intercepts.abs().max() > 100
    assert max_relative_error(fused.double(), truth) <= 1.25 * max_relative_error(sdpa.double(), truth)


def test_a_query_that_sees_no_key_outputs_zero():
    """Every key hidden from the first queries and no null keys: zero output there, finite gradients."""
    inputs, differentiable, common, table, grid, log_distance = kernel_case(torch.float64, length=40, cells=10)
    common["visible_from"] = torch.full((4, 10), 5, dtype=torch.int64)
    out = fused_biased_attention(**inputs, **common, query_grid=grid, table=table, log_distance=log_distance)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert out[:, :, 5:].abs().amin(-1).gt(0).all()
    grads = torch.autograd.grad(out.sum(), differentiable)
    assert all(torch.isfinite(g).all() for g in grads)


def test_fused_kernel_refuses_a_second_derivative():
    inputs, differentiable, common, table, grid, log_distance = kernel_case(torch.float64, length=20, cells=5)
    out = fused_biased_attention(**inputs, **common, query_grid=grid, table=table, log_distance=log_distance)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(out.sum(), [inputs["q"]], create_graph=True)


def test_fused_kernel_names_a_bad_dtype():
    inputs, _, common, table, grid, log_distance = kernel_case(torch.float32, length=20, cells=5)
    inputs = {name: t.detach().to(torch.bfloat16) if name in ("q", "k", "v") else t for name, t in inputs.items()}
    with pytest.raises(ValueError, match=r"^q: the fused kernel runs float32 or float64 on the CPU"):
        fused_biased_attention(**inputs, **common, query_grid=grid, table=table, log_distance=log_distance)


# ---------------------------------------------------------------- the layer on the fused kernel


def layer_pair(**options):
    fused = DeformableAttention1D(dim=16, dim_head=8, heads=4, implementation=Implementation(kernel="fused"), **options)
    trained_looking(fused)
    sdpa = DeformableAttention1D(dim=16, dim_head=8, heads=4, implementation=Implementation(kernel="sdpa"), **options)
    sdpa.load_state_dict(fused.state_dict())
    return fused.eval(), sdpa.eval()


def layer_outputs_and_grads(layer, x, mask=None):
    x = x.clone().requires_grad_()
    out = layer(x) if mask is None else layer(x, mask)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return out.detach(), torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [
        {"geometry": "centered"},
        {"geometry": "lucidrains"},
        {"offset_groups": 2, "offset_scale": 12.0},
        {"causal": True},
        {"cpb_log_distance": False, "downsample_factor": 3},
    ],
    ids=["centered", "lucidrains", "groups-large-offsets", "causal", "linear-distance-r3"],
)
def test_layer_on_fused_kernel_equals_sdpa(dtype, options):
    torch.manual_seed(0)
    fused, sdpa = layer_pair(**options)
    fused, sdpa = fused.to(dtype), sdpa.to(dtype)
    x = torch.randn(2, 16, 150, dtype=dtype)
    out, grads = layer_outputs_and_grads(fused, x)
    expected, expected_grads = layer_outputs_and_grads(sdpa, x)
    output_tolerance, gradient_tolerance = TOLERANCE[dtype]
    assert max_relative_error(out, expected) < output_tolerance
    assert max(gradient_errors_of_largest(grads, expected_grads)) < gradient_tolerance


def test_layer_on_fused_kernel_with_padding_mask():
    torch.manual_seed(0)
    fused, sdpa = layer_pair()
    x = torch.randn(3, 16, 70)
    mask = torch.arange(70)[None, :] < torch.tensor([[70], [9], [33]])
    out, grads = layer_outputs_and_grads(fused, x, mask)
    expected, expected_grads = layer_outputs_and_grads(sdpa, x, mask)
    assert max_relative_error(out, expected) < 1e-5
    assert max(gradient_errors_of_largest(grads, expected_grads)) < 1e-4


def test_auto_picks_the_fused_kernel_on_cpu_float32():
    layer = DeformableAttention1D(dim=16, dim_head=8, heads=4)
    q = torch.zeros(2, 4, 40, 8)
    bias = layer.bias_for_kernels(torch.float32)
    assert layer.attention_plan(q, cells=10, bias=bias).kernel == "fused"
    layer.train()
    layer.dropout = 0.1  # attention dropout: only SDPA has it
    assert layer.attention_plan(q, cells=10, bias=bias).kernel == "sdpa"


@pytest.mark.parametrize(
    "implementation, match",
    [
        (Implementation(kernel="fused", position_bias="mlp"), "needs position_bias='table'"),
    ],
)
def test_explicit_fused_kernel_names_what_it_cannot_do(implementation, match):
    layer = DeformableAttention1D(dim=16, dim_head=8, heads=4, implementation=implementation)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(1, 16, 32))
    dropout_layer = DeformableAttention1D(dim=16, dim_head=8, heads=4, dropout=0.1,
                                          implementation=Implementation(kernel="fused")).train()
    with pytest.raises(RuntimeError, match="'fused' has no attention dropout"):
        dropout_layer(torch.randn(1, 16, 32))
    with pytest.raises(ValueError, match="'fused' computes on the CPU in float32 or float64"):
        replace_layer = DeformableAttention1D(dim=16, dim_head=8, heads=4, implementation=replace(implementation, position_bias="table"))
        replace_layer.to(torch.bfloat16)(torch.randn(1, 16, 32, dtype=torch.bfloat16))


def run_python(code: str, **environment) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, **environment},
    )


def test_without_the_fused_kernel_auto_falls_back(tmp_path):
    """DEFORM_ATTN_FUSED=0 (as where no compiler exists): unavailable with a reason, "auto" still runs."""
    result = run_python(
        "import torch; from deform_attn import DeformableAttention1D; from deform_attn import kernels\n"
        "assert not kernels.fused_available()\n"
        "print(kernels.fused_unavailable_reason())\n"
        "layer = DeformableAttention1D(dim=16, dim_head=8, heads=4)\n"
        "q = torch.zeros(1, 4, 40, 8)\n"
        "print(layer.attention_plan(q, cells=10, bias=layer.bias_for_kernels(torch.float32)).kernel)\n"
        "print(tuple(layer(torch.randn(1, 16, 40)).shape))",
        DEFORM_ATTN_FUSED="0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["disabled by DEFORM_ATTN_FUSED=0", "sdpa", "(1, 16, 40)"]


def test_the_library_compiles_into_an_empty_cache(tmp_path):
    result = run_python(
        "from deform_attn.kernels import fused_available, fused_unavailable_reason\n"
        "assert fused_available(), fused_unavailable_reason()",
        DEFORM_ATTN_CACHE=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("kernels/*/libdeform_attn_fused.so"))) == 1


def test_overwrite_q_writes_the_same_output_into_q():
    inputs, _, common, table, grid, log_distance = kernel_case(torch.float32, causal=True, padding=True)
    arguments = dict(**common, query_grid=grid, table=table, log_distance=log_distance)
    with torch.no_grad():
        detached = {name: t.detach() for name, t in inputs.items()}
        expected = fused_biased_attention(**detached, **arguments)
        q = detached.pop("q").clone()
        out = fused_biased_attention(q, **{n: t for n, t in detached.items()}, **arguments, overwrite_q=True)
    assert out.data_ptr() == q.data_ptr()
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="^overwrite_q: only without gradients"):
        fused_biased_attention(**inputs, **arguments, overwrite_q=True)


@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_inference_equals_the_training_path(batch_first):
    """In inference the layer lets the kernel overwrite its queries and takes the (b, h, d, n)
    layout of its projections; the output is the one autograd's path computes."""
    torch.manual_seed(0)
    layer, _ = layer_pair(batch_first=batch_first)
    x = torch.randn(2, 150, 16) if batch_first else torch.randn(2, 16, 150)
    with torch.no_grad():
        inference = layer(x)
    training = layer(x.clone().requires_grad_())
    assert torch.equal(inference, training.detach())


def _stored_as(tensor, layout):
    """``tensor`` (b, h, len, d) with the same values, stored in ``layout``."""
    b, h, length, d = tensor.shape
    if layout == "rows":  # (b, h, len, d)
        return tensor.contiguous()
    if layout == "channels-first":  # (b, h, d, len), the layer's projections
        return tensor.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "tokens-major":  # (b, len, h, d), a projection over tokens
        return tensor.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "packed":  # one slice of a (b, len, 3, h, d) q-k-v projection, no dense layout
        packed = torch.zeros(b, length, 3, h, d, dtype=tensor.dtype)
        packed[:, :, 1] = tensor.transpose(1, 2)
        return packed[:, :, 1].transpose(1, 2)
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["rows", "channels-first", "tokens-major", "packed"])
@pytest.mark.parametrize("tokens_major_output", [False, True])
def test_kernel_reads_any_layout_and_writes_the_one_asked(layout, tokens_major_output):
    """q, k, v and the output's gradient are read in place in any layout (the strides go to the
    kernel); the output takes q's layout, or (b, n, h, d) storage when asked; the values and
    gradients are those of the contiguous inputs."""
    inputs, differentiable, common, table, grid, log_distance = kernel_case(torch.float64, causal=True, padding=True)
    arguments = dict(**common, query_grid=grid, table=table, log_distance=log_distance)
    expected = fused_biased_attention(**inputs, **arguments)
    cotangent = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected_grads = torch.autograd.grad(expected, differentiable, cotangent)

    stored = {
        name: _stored_as(t.detach(), layout).requires_grad_() if name in ("q", "k", "v") else t
        for name, t in inputs.items()
    }
    assert layout == "rows" or not stored["q"].is_contiguous()
    out = fused_biased_attention(**stored, **arguments, tokens_major_output=tokens_major_output)
    if tokens_major_output:
        assert out.transpose(1, 2).is_contiguous()
    elif layout != "packed":  # a dense q's layout; the packed slice is not dense, so (b, h, n, d)
        assert out.stride() == stored["q"].stride()
    grads = torch.autograd.grad(
        out, [stored.get(name, t) for name, t in zip(inputs, differentiable)] + differentiable[len(inputs):],
        _stored_as(cotangent, layout),
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for actual, wanted in zip(grads, expected_grads):
        torch.testing.assert_close(actual, wanted, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["rows", "channels-first", "tokens-major"])
def test_overwrite_q_in_each_layout_the_layer_makes(layout):
    inputs, _, common, table, grid, log_distance = kernel_case(torch.float32, causal=True)
    arguments = dict(**common, query_grid=grid, table=table, log_distance=log_distance)
    with torch.no_grad():
        detached = {name: t.detach() for name, t in inputs.items()}
        expected = fused_biased_attention(**detached, **arguments)
        q = _stored_as(detached.pop("q"), layout)
        out = fused_biased_attention(q, **detached, **arguments, overwrite_q=True,
                                     tokens_major_output=layout == "tokens-major")
    assert out.data_ptr() == q.data_ptr() and out.stride() == q.stride()
    assert torch.equal(out, expected)


def test_overwrite_q_refuses_layouts_it_cannot_write():
    inputs, _, common, table, grid, log_distance = kernel_case(torch.float32)
    arguments = dict(**common, query_grid=grid, table=table, log_distance=log_distance)
    with torch.no_grad():
        detached = {name: t.detach() for name, t in inputs.items()}
        q = detached.pop("q")
        with pytest.raises(ValueError, match="^overwrite_q: with tokens_major_output, q must be stored as"):
            fused_biased_attention(q.clone(), **detached, **arguments, overwrite_q=True, tokens_major_output=True)
        with pytest.raises(ValueError, match=r"^overwrite_q: q must be stored as \(b, h, n, d\)"):
            fused_biased_attention(_stored_as(q, "packed"), **detached, **arguments, overwrite_q=True)


def test_an_unwritable_cache_means_unavailable_with_a_reason(tmp_path):
    """A cache path that cannot hold a folder: the kernel is unavailable, says why, and "auto" runs."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = run_python(
        "import torch; from deform_attn import DeformableAttention1D, kernels\n"
        "assert not kernels.fused_available()\n"
        "print(kernels.fused_unavailable_reason())\n"
        "print(tuple(DeformableAttention1D(dim=16, dim_head=8, heads=4)(torch.randn(1, 16, 40)).shape))",
        DEFORM_ATTN_CACHE=str(blocker),
    )
    assert result.returncode == 0, result.stderr
    reason, shape = result.stdout.split("\n")[:2]
    assert reason.startswith("cannot write the compiled kernel to") and "DEFORM_ATTN_CACHE" in reason
    assert shape == "(1, 16, 40)"
