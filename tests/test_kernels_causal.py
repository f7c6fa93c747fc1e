"""Causal mode of the kernels: keys hidden before ``visible_from``, null keys seen by every query.

Both kernels must equal a plain dense reference: the bias materialised for every (query, key)
pair, ``-inf`` where a key is hidden or padded, the null keys appended with a zero bias, one
softmax and one matmul.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gradient_errors, max_relative_error
from einops import rearrange, repeat

from deform_attn.geometry import QueryGrid, distance_coordinates
from deform_attn.kernels import piecewise_biased_attention, sdpa_biased_attention
from deform_attn.position_bias import ContinuousPositionBias, PiecewiseLinearTable, piecewise_linear_bias

pytestmark = pytest.mark.usefixtures("single_thread")

KERNELS = ["piecewise", "sdpa"]


class Problem:
    """One random problem: q, k, v (b, h, n|m, d), the coordinates, a CPB table, the causal inputs.

    Axis letters: b batch, g offset groups, o heads per group (h = g o), n queries, m keys, e null
    keys, d channels.
    """

    def __init__(self, *, dtype=torch.float64, batch=2, groups=2, outputs=2, length=23, cells=7, null_keys=1,
                 log_distance=True, seed=0):
        generator = torch.Generator().manual_seed(seed)
        heads = groups * outputs
        bias = ContinuousPositionBias(hidden_dim=6, num_outputs=outputs, log_distance=log_distance).to(dtype)
        with torch.no_grad():
            for linear in bias.linears:
                linear.weight.normal_(0, 2, generator=generator)
                linear.bias.normal_(0, 2, generator=generator)
        offsets = 3 * torch.randn(batch * groups, cells, dtype=dtype, generator=generator)
        self.length, self.log_distance, self.scale = length, log_distance, 5**-0.5
        self.query_coordinates, key_coordinates, step, origin = distance_coordinates(
            torch.arange(length), offsets, length, 3
        )
        self.query_grid = QueryGrid(step, origin)
        self.kinks, slopes, intercepts = bias.table(dtype)
        assert self.kinks.numel() > 0
        channels = 5
        q = torch.randn(batch, heads, length, channels, dtype=dtype, generator=generator)
        k = torch.randn(batch, heads, cells, channels, dtype=dtype, generator=generator)
        v = torch.randn(batch, heads, cells, channels, dtype=dtype, generator=generator)
        null_k = torch.randn(batch, heads, null_keys, channels, dtype=dtype, generator=generator)
        null_v = torch.randn(batch, heads, null_keys, channels, dtype=dtype, generator=generator)
        # the leaves whose gradients are compared: q, k, v, w, slopes, intercepts, null_k, null_v
        self.leaves = [
            t.detach().clone().requires_grad_() for t in (q, k, v, key_coordinates, slopes, intercepts, null_k, null_v)
        ]
        self.visible_from = random_visible_from(batch * groups, cells, length, generator)

    def table(self) -> PiecewiseLinearTable:
        return PiecewiseLinearTable(self.kinks, self.leaves[4], self.leaves[5])

    def run(self, kernel, *, chunk, key_padding=None, causal=True, null_keys=True, **causal_arguments):
        q, k, v, key_coordinates, _, _, null_k, null_v = self.leaves
        if causal:
            causal_arguments.setdefault("visible_from", self.visible_from)
        if null_keys:
            causal_arguments.update(null_k=null_k, null_v=null_v)
        common = dict(query_coordinates=self.query_coordinates, key_coordinates=key_coordinates, scale=self.scale,
                      chunk=chunk, key_padding=key_padding, **causal_arguments)
        if kernel == "piecewise":
            return piecewise_biased_attention(
                q, k, v, query_grid=self.query_grid, table=self.table(), log_distance=self.log_distance, **common
            )
        table, log_distance = self.table(), self.log_distance
        return sdpa_biased_attention(
            q, k, v, position_bias=lambda distance: piecewise_linear_bias(distance, table, log_distance), **common
        )

    def reference(self, *, key_padding=None, causal=True, null_keys=True):
        """Dense: softmax over [m keys (-inf where hidden or padded); e null keys (zero bias)], then matmul."""
        q, k, v, key_coordinates, _, _, null_k, null_v = self.leaves
        batch, heads = q.shape[:2]
        distances = self.query_coordinates[None, :, None] - key_coordinates[:, None, :]  # (b g, n, m)
        bias = piecewise_linear_bias(distances, self.table(), self.log_distance)  # (b g, n, m, o)
        bias = rearrange(bias, "(b g) n m o -> b (g o) n m", b=batch)
        logits = q @ k.transpose(-1, -2) * self.scale + bias
        if causal:
            hidden = self.visible_from[:, None, :] > torch.arange(self.length)[:, None]  # (b g, n, m)
            groups = self.visible_from.shape[0] // batch
            logits = logits.masked_fill(
                repeat(hidden, "(b g) n m -> b (g o) n m", b=batch, o=heads // groups), -torch.inf
            )
        if key_padding is not None:
            logits = logits.masked_fill(key_padding[:, None, None, :], -torch.inf)
        if null_keys:
            logits = torch.cat([logits, q @ null_k.transpose(-1, -2) * self.scale], dim=-1)
            v = torch.cat([v, null_v], dim=2)
        return torch.softmax(logits, dim=-1) @ v


def random_visible_from(rows: int, cells: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, m) int64 in [0, n] with every case the kernels must handle.

    Row 0: key 0 visible from query 0, key 1 never visible (= n). Row 1: no key before query 4, so
    queries 0..3 see no sampled key. Last row: no key visible at all, its queries see only the null
    keys. A value past n or below 0 means never or always.
    """
    visible_from = torch.randint(0, length + 1, (rows, cells), generator=generator)
    visible_from[0, :4] = torch.tensor([0, length, -1, length + 5])[:cells]
    visible_from[1] = visible_from[1].clamp(min=4)
    visible_from[-1] = length
    return visible_from


def key_padding_of(batch: int, cells: int) -> torch.Tensor:
    padding = torch.zeros(batch, cells, dtype=torch.bool)
    padding[1, 3:] = True
    return padding


def values_and_grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return out.detach(), torch.autograd.grad((out * weights).sum(), leaves)


TOLERANCES = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-4)}


@pytest.mark.parametrize("null_keys, padded", [(1, False), (1, True), (2, True)])
@pytest.mark.parametrize("outputs", [1, 2, 4])
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_equals_dense_reference(kernel, dtype, chunk, outputs, null_keys, padded):
    problem = Problem(dtype=dtype, outputs=outputs, null_keys=null_keys, seed=chunk + 10 * outputs)
    padding = key_padding_of(2, 7) if padded else None
    out, grads = values_and_grads(problem.run(kernel, chunk=chunk, key_padding=padding), problem.leaves)
    expected, expected_grads = values_and_grads(problem.reference(key_padding=padding), problem.leaves)
    value_tolerance, gradient_tolerance = TOLERANCES[dtype]
    assert torch.isfinite(out).all()
    assert max_relative_error(out, expected) < value_tolerance
    errors = gradient_errors(grads, expected_grads)
    assert max(errors) < gradient_tolerance, errors
    # the test sees what it claims: hidden keys, queries with no sampled key, live null-key gradients
    assert (problem.visible_from > 0).all(-1).any() and (problem.visible_from == 23).any()
    assert all(g.abs().max() > 0 for g in expected_grads[6:])


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_equals_dense_reference_without_log_distance(kernel):
    problem = Problem(log_distance=False, seed=3)
    out, grads = values_and_grads(problem.run(kernel, chunk=4), problem.leaves)
    expected, expected_grads = values_and_grads(problem.reference(), problem.leaves)
    assert max_relative_error(out, expected) < 1e-10
    assert max(gradient_errors(grads, expected_grads)) < 1e-8


@pytest.mark.parametrize("kernel", KERNELS)
def test_queries_without_visible_keys_attend_to_the_null_keys_only(kernel):
    """Rows whose keys are all hidden: the output is softmax(q null_k^T * scale) null_v exactly."""
    problem = Problem(null_keys=2)
    q, *_, null_k, null_v = problem.leaves
    out = problem.run(kernel, chunk=5).detach()
    only_null = torch.softmax(q @ null_k.transpose(-1, -2) * problem.scale, dim=-1) @ null_v
    # the last row (batch 1, group 1: heads 2 and 3) hides every key; row 1 (batch 0, group 1) until query 4
    torch.testing.assert_close(out[1, 2:], only_null[1, 2:].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0, 2:, :4], only_null[0, 2:, :4].detach(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[0, 2:, 4:], only_null[0, 2:, 4:])


@pytest.mark.parametrize("kernel", KERNELS)
def test_visible_from_without_null_keys(kernel):
    """Allowed while every query sees a key: it equals the dense reference without null keys."""
    problem = Problem()
    problem.visible_from = problem.visible_from.clamp(max=22)
    problem.visible_from[:, 0] = 0
    leaves = problem.leaves[:6]
    out, grads = values_and_grads(problem.run(kernel, chunk=4, null_keys=False), leaves)
    expected, expected_grads = values_and_grads(problem.reference(null_keys=False), leaves)
    assert max_relative_error(out, expected) < 1e-10
    assert max(gradient_errors(grads, expected_grads)) < 1e-8


@pytest.mark.parametrize("chunk", [4, 100])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_no_causal_arguments_is_unchanged_bit_for_bit(kernel, padded, chunk):
    """``visible_from=None`` and no null keys take exactly the path of a call without them."""
    problem = Problem(dtype=torch.float32)
    padding = key_padding_of(2, 7) if padded else None
    leaves = problem.leaves[:6]
    before, before_grads = values_and_grads(
        problem.run(kernel, chunk=chunk, key_padding=padding, causal=False, null_keys=False), leaves
    )
    after, after_grads = values_and_grads(
        problem.run(kernel, chunk=chunk, key_padding=padding, causal=False, null_keys=False,
                    visible_from=None, null_k=None, null_v=None),
        leaves,
    )
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(before_grads, after_grads, strict=True))


@pytest.mark.parametrize("kernel", KERNELS)
def test_everything_visible_equals_no_visible_from(kernel):
    """visible_from <= 0 hides nothing: the causal mask is then an exact no-op."""
    problem = Problem()
    leaves = problem.leaves
    plain, plain_grads = values_and_grads(problem.run(kernel, chunk=6, causal=False), leaves)
    problem.visible_from = torch.zeros_like(problem.visible_from)
    masked, masked_grads = values_and_grads(problem.run(kernel, chunk=6), leaves)
    assert max_relative_error(masked, plain) < 1e-15
    assert max(gradient_errors(masked_grads, plain_grads)) < 1e-14


def test_piecewise_gradcheck_fp64_with_visible_from_and_null_keys():
    problem = Problem(batch=1, length=9, cells=3, null_keys=2, seed=1)
    problem.visible_from = torch.tensor([[0, 4, 9], [2, 9, 6]])  # row 1: queries 0 and 1 see only null keys

    def run(q, k, v, key_coordinates, slopes, intercepts, null_k, null_v):
        return piecewise_biased_attention(
            q, k, v, query_coordinates=problem.query_coordinates, key_coordinates=key_coordinates,
            query_grid=problem.query_grid, table=PiecewiseLinearTable(problem.kinks, slopes, intercepts),
            log_distance=True, scale=0.5, chunk=4, visible_from=problem.visible_from, null_k=null_k, null_v=null_v,
        )

    assert torch.autograd.gradcheck(run, tuple(problem.leaves))


def test_sdpa_chunks_recompute_under_checkpointing():
    """The chunked SDPA kernel (checkpointed) equals its one-call version in values and gradients."""
    problem = Problem()
    out, grads = values_and_grads(problem.run("sdpa", chunk=4), problem.leaves)
    whole, whole_grads = values_and_grads(problem.run("sdpa", chunk=100), problem.leaves)
    assert max_relative_error(out, whole) < 1e-14
    assert max(gradient_errors(grads, whole_grads)) < 1e-13


F64 = torch.float64


@pytest.mark.parametrize(
    "change, message",
    [
        ({"visible_from": torch.zeros(4, 7, dtype=torch.int32)}, r"^visible_from: expected an int64 tensor"),
        ({"visible_from": torch.zeros(4, 7)}, r"^visible_from: expected an int64 tensor"),
        ({"visible_from": torch.zeros(2, 7, dtype=torch.int64)}, r"^visible_from: expected .* \(4, 7\)"),
        ({"visible_from": torch.zeros(4, 6, dtype=torch.int64)}, r"^visible_from: expected .* \(4, 7\)"),
        ({"null_v": None}, r"^null_v: expected a tensor, since null_k and null_v come together"),
        ({"null_k": None}, r"^null_k: expected a tensor, since null_k and null_v come together"),
        ({"null_k": torch.zeros(2, 4, 5, dtype=F64)}, r"^null_k: expected shape \(b, h, e, d\)"),
        ({"null_k": torch.zeros(2, 2, 1, 5, dtype=F64)}, r"^null_k: expected shape \(b, h, e, d\)"),
        ({"null_k": torch.zeros(2, 4, 0, 5, dtype=F64)}, r"^null_k: expected shape \(b, h, e, d\)"),
        ({"null_v": torch.zeros(2, 4, 1, 6, dtype=F64)}, r"^null_v: expected shape \(b, h, e, d\)"),
        ({"null_v": torch.zeros(2, 4, 2, 5, dtype=F64)}, r"^null_v: expected the shape of null_k"),
        ({"null_v": torch.zeros(2, 4, 1, 5, dtype=torch.float32)}, r"^null_v: expected the dtype of q"),
    ],
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_rejects_bad_causal_arguments(kernel, change, message):
    problem = Problem()
    null_k, null_v = (t.detach() for t in problem.leaves[6:])
    arguments = dict(visible_from=problem.visible_from, null_k=null_k, null_v=null_v)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        problem.run(kernel, chunk=4, causal=False, null_keys=False, **arguments)
