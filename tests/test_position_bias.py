"""Continuous position bias: the exact piecewise-linear path equals the plain MLP.

The fast path is only worth having if it is exact, so it is compared with the MLP in values and in
gradients wrt the distance and every parameter, on fresh, scaled-up and trained weights, and on the
edge cases where kink finding could go wrong: units with no kink, tied kinks, dead units, inputs
exactly at a kink and very large inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_layer, max_relative_error

from deform_attn import ContinuousPositionBias, piecewise_linear_table, signed_log_distance
from deform_attn.kernels import fused_available
from deform_attn import position_bias
from deform_attn.position_bias import piecewise_linear_table_tensors

pytestmark = pytest.mark.usefixtures("single_thread")

VALUE_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}

_TRAINED: dict[tuple, ContinuousPositionBias] = {}


def _fit(cpb: ContinuousPositionBias, steps: int = 300) -> ContinuousPositionBias:
    """A few hundred Adam steps towards a wiggly target: weights with many kinks in range."""
    generator = torch.Generator().manual_seed(1)
    t = torch.linspace(-4, 4, 256)[:, None]
    target = torch.sin(3 * t) + 0.3 * t**2 + 0.1 * torch.randn(256, cpb.linears[-1].out_features, generator=generator)
    optimizer = torch.optim.Adam(cpb.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (cpb.mlp(t) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
    return cpb


def make_cpb(kind: str, *, hidden_dim=16, num_outputs=1, depth=2, log_distance=True, dtype=torch.float64):
    """A fast CPB with weights of the given ``kind``: 'init', 'scaled' (many kinks) or 'trained'."""
    key = (kind, hidden_dim, num_outputs, depth, log_distance)
    if kind == "trained":
        if key not in _TRAINED:
            torch.manual_seed(2)
            cpb = ContinuousPositionBias(
                hidden_dim=hidden_dim, num_outputs=num_outputs, depth=depth, log_distance=log_distance
            )
            _TRAINED[key] = _fit(cpb)
        return copy.deepcopy(_TRAINED[key]).to(dtype)
    cpb = ContinuousPositionBias(hidden_dim=hidden_dim, num_outputs=num_outputs, depth=depth, log_distance=log_distance)
    if kind == "scaled":
        with torch.no_grad():
            for layer in cpb.linears:
                layer.weight.mul_(4.0)
                layer.bias.mul_(4.0)
    return cpb.to(dtype)


def reference_copy(cpb: ContinuousPositionBias) -> ContinuousPositionBias:
    plain = copy.deepcopy(cpb)
    plain.fast = False
    return plain


def values_and_grads(cpb, distance, cotangent):
    distance = distance.detach().clone().requires_grad_()
    out = cpb(distance)
    inputs = [distance, *cpb.parameters()]
    grads = torch.autograd.grad((out * cotangent).sum(), inputs, allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def assert_fast_equals_mlp(cpb, distance, *, check_grads=True):
    """Values to VALUE_TOL and gradients to GRAD_TOL, both relative to the reference's scale."""
    assert cpb.fast
    dtype = cpb.linears[0].weight.dtype
    plain = reference_copy(cpb)
    cotangent = torch.randn(*distance.shape, cpb.linears[-1].out_features, dtype=dtype)
    fast_out, fast_grads = values_and_grads(cpb, distance, cotangent)
    ref_out, ref_grads = values_and_grads(plain, distance, cotangent)
    assert fast_out.shape == ref_out.shape == (*distance.shape, cpb.linears[-1].out_features)
    assert max_relative_error(fast_out, ref_out) < VALUE_TOL[dtype]
    if check_grads:
        names = ["distance", *(name for name, _ in cpb.named_parameters())]
        for name, fast, ref in zip(names, fast_grads, ref_grads):
            if ref.abs().max() == 0:
                assert fast.abs().max() == 0, name
            else:
                assert max_relative_error(fast, ref) < GRAD_TOL[dtype], name


def random_distances(log_distance: bool, dtype, shape=(7, 33)):
    # log on: distances over tens of cells (t within about +-4); log off: t over the same range
    spread = 50.0 if log_distance else 4.0
    return (2 * torch.rand(*shape, dtype=dtype) - 1) * spread


@pytest.mark.parametrize("kind", ["init", "scaled", "trained"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("log_distance", [True, False], ids=["log", "linear"])
@pytest.mark.parametrize("num_outputs", [1, 3])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fast_equals_mlp(kind, dtype, log_distance, num_outputs, depth):
    cpb = make_cpb(kind, num_outputs=num_outputs, depth=depth, log_distance=log_distance, dtype=dtype)
    assert_fast_equals_mlp(cpb, random_distances(log_distance, dtype))


def test_trained_weights_have_many_kinks_in_range():
    """Guards the 'trained' cases above: they must exercise many intervals, not one or two."""
    cpb = make_cpb("trained", depth=2)
    kinks, _, _ = cpb.table(torch.float64)
    assert ((kinks > -4) & (kinks < 4)).sum() >= 10


def test_zero_first_layer_weights_give_no_kink():
    """A unit with zero input weight is a constant: it must not add a kink (no division by zero)."""
    cpb = make_cpb("init", depth=1, hidden_dim=8, log_distance=False)
    with torch.no_grad():
        cpb.linears[0].weight[::2] = 0.0
    kinks, _, _ = cpb.table(torch.float64)
    weight, bias = cpb.linears[0].weight[:, 0], cpb.linears[0].bias
    expected = torch.unique(-bias[weight != 0] / weight[weight != 0])
    torch.testing.assert_close(kinks, expected)
    assert_fast_equals_mlp(cpb, random_distances(False, torch.float64))

    deeper = make_cpb("scaled", depth=2, hidden_dim=8)
    with torch.no_grad():
        deeper.linears[0].weight[:5] = 0.0
    assert_fast_equals_mlp(deeper, random_distances(True, torch.float64))


def test_duplicated_units_give_tied_kinks():
    cpb = make_cpb("init", depth=1, hidden_dim=8, log_distance=False)
    with torch.no_grad():
        cpb.linears[0].weight[1:4] = cpb.linears[0].weight[0]
        cpb.linears[0].bias[1:4] = cpb.linears[0].bias[0]
    kinks, slopes, intercepts = cpb.table(torch.float64)
    assert kinks.numel() == 8 - 3  # four units share one kink
    assert torch.all(kinks[1:] > kinks[:-1])
    assert slopes.shape == intercepts.shape == (kinks.numel() + 1, 1)
    assert_fast_equals_mlp(cpb, random_distances(False, torch.float64))

    deeper = make_cpb("scaled", depth=2, hidden_dim=6)
    with torch.no_grad():
        deeper.linears[0].weight[3:] = deeper.linears[0].weight[:3]
        deeper.linears[0].bias[3:] = deeper.linears[0].bias[:3]
        deeper.linears[1].weight[3:] = deeper.linears[1].weight[:3]  # tied second-layer units too
        deeper.linears[1].bias[3:] = deeper.linears[1].bias[:3]
    assert_fast_equals_mlp(deeper, random_distances(True, torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dead_units(dtype):
    cpb = make_cpb("scaled", depth=2, hidden_dim=6, num_outputs=2, dtype=dtype)
    with torch.no_grad():
        cpb.linears[0].weight[:2] = 0.0  # first-layer units that never fire
        cpb.linears[0].bias[:2] = -1.0
        cpb.linears[1].weight[2:4] = 0.0  # second-layer units that never fire
        cpb.linears[1].bias[2:4] = -1.0
    assert_fast_equals_mlp(cpb, random_distances(True, dtype))

    with torch.no_grad():  # every second-layer unit dead: the bias is the output layer's bias
        cpb.linears[1].weight.zero_()
        cpb.linears[1].bias.fill_(-1.0)
    _, slopes, _ = cpb.table(dtype)
    assert slopes.abs().max() == 0
    distance = random_distances(True, dtype)
    torch.testing.assert_close(cpb(distance), cpb.linears[-1].bias.expand(*distance.shape, 2).detach())
    assert_fast_equals_mlp(cpb, distance)


@pytest.mark.parametrize("kind", ["init", "scaled", "trained"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_inputs_exactly_at_kinks(kind, dtype):
    """Values are continuous across a kink, so both paths agree there (gradients are one-sided)."""
    cpb = make_cpb(kind, depth=2, num_outputs=2, log_distance=False, dtype=dtype)
    kinks, _, _ = cpb.table(dtype)
    assert kinks.numel() > 0
    assert_fast_equals_mlp(cpb, kinks.clone(), check_grads=False)


def test_gradient_at_a_kink_is_the_left_slope():
    """Row i of the table covers (kinks[i-1], kinks[i]]: at a kink the slope of the left piece applies."""
    cpb = make_cpb("scaled", depth=2, hidden_dim=6, log_distance=False)
    kinks, slopes, _ = cpb.table(torch.float64)
    t = kinks.clone().requires_grad_()
    (grad,) = torch.autograd.grad(cpb(t).sum(), t)
    torch.testing.assert_close(grad, slopes[:-1, 0])
    step = 1e-7 * (kinks[1:] - kinks[:-1]).min().item()
    left_derivative = (cpb.mlp(kinks[:, None]) - cpb.mlp((kinks - step)[:, None]))[:, 0] / step
    torch.testing.assert_close(grad, left_derivative.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_very_large_inputs(dtype):
    linear = make_cpb("trained", depth=2, num_outputs=2, log_distance=False, dtype=dtype)
    big = torch.tensor([-1e7, -1e5, -1e3, -100.0, 100.0, 1e3, 1e5, 1e7], dtype=dtype)
    assert_fast_equals_mlp(linear, big)
    logged = make_cpb("trained", depth=2, num_outputs=2, log_distance=True, dtype=dtype)
    huge = torch.tensor([-1e30, -1e12, 1e12, 1e30], dtype=dtype)
    assert_fast_equals_mlp(logged, huge)


@pytest.mark.parametrize(
    "hidden_dim, kind",
    [(h, kind) for h in (1, 2, 3, 5, 8, 16) for kind in ("init", "scaled")] + [(16, "trained")],
)
def test_kink_count_bound_depth_2(hidden_dim, kind):
    """h kinks from the first layer; each second-layer unit is linear on h + 1 pieces, so crosses zero
    at most h + 1 times."""
    cpb = make_cpb(kind, hidden_dim=hidden_dim, depth=2)
    kinks, slopes, intercepts = cpb.table(torch.float64)
    assert kinks.numel() <= hidden_dim + hidden_dim * (hidden_dim + 1)
    assert torch.all(kinks[1:] > kinks[:-1])
    assert slopes.shape[0] == intercepts.shape[0] == kinks.numel() + 1


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("kind", ["init", "scaled", "trained"])
def test_piecewise_linear_table_reproduces_mlp(depth, kind):
    cpb = make_cpb(kind, depth=depth, num_outputs=3, log_distance=False)
    kinks, slopes, intercepts = piecewise_linear_table(list(cpb.linears), torch.float64)
    t = torch.empty(2000, dtype=torch.float64).uniform_(-6, 6)
    interval = torch.searchsorted(kinks, t)
    from_table = slopes[interval] * t[:, None] + intercepts[interval]
    assert max_relative_error(from_table, cpb.mlp(t[:, None])) < 1e-12
    # between two consecutive kinks the MLP really is one affine map: check a second point per interval
    if kinks.numel() > 1:
        inner = kinks[:-1] + 0.3 * (kinks[1:] - kinks[:-1])
        piece = torch.arange(1, kinks.numel())
        torch.testing.assert_close(
            slopes[piece] * inner[:, None] + intercepts[piece], cpb.mlp(inner[:, None]).detach()
        )


def test_table_argument_is_reused():
    cpb = make_cpb("trained", depth=2, num_outputs=3)
    distance = random_distances(True, torch.float64)
    table = cpb.table(torch.float64)
    torch.testing.assert_close(cpb(distance, table), cpb(distance), rtol=0, atol=0)


# ---------------------------------------------------------------------------- the inference table


def _update_without_version_bump(cpb: ContinuousPositionBias, how: str) -> None:
    """Change every weight the way some training code does, without bumping the tensors' versions."""
    if how == "fused_adamw":  # torch's fused update writes the parameters in place, uncounted
        optimizer = torch.optim.AdamW(cpb.parameters(), lr=0.1, fused=True)
        for parameter in cpb.parameters():
            parameter.grad = torch.ones_like(parameter)
        optimizer.step()
    else:  # an assignment through .data, as in hand-written EMA or weight surgery
        for parameter in cpb.parameters():
            parameter.data.mul_(1.5).add_(0.01)


@pytest.mark.parametrize("how", ["fused_adamw", "data"])
def test_inference_table_follows_updates_that_keep_the_version(how):
    """Without gradients the table is cached; any change of the weights' values must refresh it."""
    cpb = make_cpb("trained", depth=2, num_outputs=2, dtype=torch.float32)
    distance = random_distances(True, torch.float32)
    with torch.no_grad():
        before = cpb(distance)
        versions = [parameter._version for parameter in cpb.parameters()]
        _update_without_version_bump(cpb, how)
        # the case this guards: the update left every version where it was
        assert [parameter._version for parameter in cpb.parameters()] == versions
        after = cpb(distance)
        fresh = piecewise_linear_table(list(cpb.linears), torch.float32)
        cached = cpb.table(torch.float32)
    assert not torch.allclose(after, before)  # the update changed the bias
    torch.testing.assert_close(after, cpb.mlp(cpb.transform(distance)[..., None]).detach(), rtol=1e-5, atol=1e-5)
    for part, expected in zip(cached, fresh):
        torch.testing.assert_close(part, expected, rtol=0, atol=0)


def test_inference_table_is_reused_while_the_weights_are_unchanged():
    cpb = make_cpb("trained", depth=2)
    with torch.no_grad():
        first = cpb.table(torch.float64)
        assert cpb.table(torch.float64) is first
        assert cpb.table(torch.float32) is not first  # a table per dtype
        assert cpb.table(torch.float32) is cpb.table(torch.float32)


def test_layer_in_eval_mode_follows_a_fused_optimizer_step():
    """The user-facing case: evaluate, take a fused AdamW step, evaluate again; equals a fresh copy."""
    layer = make_layer(heads=4, offset_groups=2)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        layer(x)  # fills the cache
    layer.train()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05, fused=True)
    layer(x).pow(2).sum().backward()
    optimizer.step()
    layer.eval()
    fresh = make_layer(heads=4, offset_groups=2)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize("num_outputs", [1, 2])
def test_fast_position_bias_gradcheck_fp64(num_outputs):
    """Gradients wrt the distance and every parameter (away from kinks: the MLP is piecewise linear)."""
    cpb = make_cpb("scaled", hidden_dim=4, depth=2, num_outputs=num_outputs)
    names = [name for name, _ in cpb.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cpb.parameters()]
    distance = random_distances(True, torch.float64, shape=(3, 5)).requires_grad_()

    def bias(distance, *params):
        return torch.func.functional_call(cpb, dict(zip(names, params)), (distance,))

    assert torch.autograd.gradcheck(bias, (distance, *params))


def test_signed_log_distance():
    d = torch.tensor([-10.0, -1.0, -0.5, 0.0, 0.5, 1.0, 10.0], dtype=torch.float64)
    expected = torch.tensor([-11.0, -2.0, -1.5, 1.0, 1.5, 2.0, 11.0], dtype=torch.float64).abs().log()
    torch.testing.assert_close(signed_log_distance(d), torch.sign(d) * expected)
    torch.testing.assert_close(signed_log_distance(-d), -signed_log_distance(d))


def test_reference_path_is_the_plain_mlp():
    """fast=False runs Linear -> ReLU -> Linear -> ReLU -> Linear on every (log-scaled) distance."""
    cpb = ContinuousPositionBias(hidden_dim=5, num_outputs=2, depth=2, fast=False).double()
    d = random_distances(True, torch.float64, shape=(4, 6))
    a, b, c = cpb.linears
    t = signed_log_distance(d)[..., None]
    expected = c(torch.relu(b(torch.relu(a(t)))))
    torch.testing.assert_close(cpb(d), expected, rtol=0, atol=0)


def test_gradient_at_zero_distance_is_the_derivative_in_both_paths():
    """sign(d) log(1 + |d|) has derivative 1 at d = 0; both paths must use it (and so agree).

    Exact zeros occur in the layer: a query on a key's sample position, e.g. odd r and zero offsets.
    """
    cpb = make_cpb("scaled", depth=2, num_outputs=2, log_distance=True)
    zero = torch.zeros(1, dtype=torch.float64)
    step = 1e-6
    derivative = ((cpb.mlp(torch.full((1, 1), step, dtype=torch.float64))
                   - cpb.mlp(torch.full((1, 1), -step, dtype=torch.float64))) / (2 * step)).sum().detach()
    assert derivative.abs() > 1e-3  # otherwise the check below is vacuous
    grads = {}
    for name, module in (("fast", cpb), ("mlp", reference_copy(cpb))):
        d = zero.clone().requires_grad_()
        (grads[name],) = torch.autograd.grad(module(d).sum(), d)
    torch.testing.assert_close(grads["fast"][0], derivative, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grads["mlp"][0], derivative, rtol=1e-6, atol=1e-9)


def test_second_derivatives_are_exact_or_refused():
    """Double backward (gradient penalties, Hessian-vector products) through the fast path must
    match finite differences, or refuse loudly; silently wrong second derivatives are the failure."""
    cpb = make_cpb("scaled", hidden_dim=4, depth=2, num_outputs=2)
    names = [name for name, _ in cpb.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cpb.parameters()]
    distance = random_distances(True, torch.float64, shape=(5,)).requires_grad_()

    def bias(distance, *params):
        return torch.func.functional_call(cpb, dict(zip(names, params)), (distance,))

    try:
        exact = torch.autograd.gradgradcheck(bias, (distance, *params), raise_exception=False)
    except RuntimeError as error:
        assert "twice" in str(error)  # @once_differentiable's refusal
        return
    assert exact


# ---------------------------------------------------------------------------- the compiled table


def _table_parameters(cpb: ContinuousPositionBias) -> list[torch.Tensor]:
    return position_bias._table_parameters(list(cpb.linears))


@pytest.mark.skipif(not fused_available(), reason="compiled library unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("kind", ["init", "scaled", "trained"])
def test_compiled_table_matches_tensor_path(kind, depth, dtype):
    """The C++ table (float64 inside) against the torch operations: kinks, slopes, intercepts and
    the gradients of a weighted sum of them for every parameter."""
    from deform_attn.position_bias import _table_compiled

    cpb = make_cpb(kind, depth=depth, num_outputs=3, dtype=dtype)
    linears = list(cpb.linears)
    assert _table_compiled(linears, dtype)  # otherwise both sides below take the same path
    compiled = piecewise_linear_table(linears, dtype)
    tensors = piecewise_linear_table_tensors(linears, dtype)
    assert compiled.kinks.dtype == compiled.slopes.dtype == dtype
    torch.testing.assert_close(compiled.kinks, tensors.kinks, rtol=VALUE_TOL[dtype], atol=VALUE_TOL[dtype])
    for ours, theirs in ((compiled.slopes, tensors.slopes), (compiled.intercepts, tensors.intercepts)):
        assert max_relative_error(ours, theirs) < VALUE_TOL[dtype]
    generator = torch.Generator().manual_seed(3)
    weight_slopes = torch.randn(tensors.slopes.shape, generator=generator, dtype=dtype)
    weight_intercepts = torch.randn(tensors.slopes.shape, generator=generator, dtype=dtype)
    grads = [
        torch.autograd.grad((table.slopes * weight_slopes).sum() + (table.intercepts * weight_intercepts).sum(),
                            _table_parameters(cpb))
        for table in (compiled, tensors)
    ]
    for ours, theirs in zip(*grads):
        assert ours.dtype == dtype
        assert max_relative_error(ours, theirs) < GRAD_TOL[dtype]


@pytest.mark.skipif(not fused_available(), reason="compiled library unavailable")
def test_compiled_table_edge_cases():
    """More kinks than the first buffer holds (the call repeats), units without kinks (zero
    first-layer weight), tied kinks, a gradient for the slopes only, and a second derivative refused."""
    from deform_attn.kernels.fused import table_forward

    cpb = make_cpb("scaled", hidden_dim=12, depth=2, num_outputs=2)
    with torch.no_grad():
        cpb.linears[0].weight[:3] = 0  # three units constant in t: no kink
        cpb.linears[0].weight[3:5] = 1.0  # two units with the same kink
        cpb.linears[0].bias[3:5] = 0.5
    weights = [layer.weight.detach() for layer in cpb.linears]
    biases = [layer.bias.detach() for layer in cpb.linears]
    tensors = piecewise_linear_table_tensors(list(cpb.linears), torch.float64)
    assert tensors.kinks.numel() > 2
    kinks, slopes, intercepts = table_forward(weights, biases, capacity=1)  # too small at first
    torch.testing.assert_close(kinks, tensors.kinks, rtol=1e-12, atol=1e-12)
    assert max_relative_error(slopes, tensors.slopes) < 1e-12
    assert max_relative_error(intercepts, tensors.intercepts) < 1e-12
    compiled = piecewise_linear_table(list(cpb.linears), torch.float64)
    ours = torch.autograd.grad(compiled.slopes.sum(), _table_parameters(cpb))
    theirs = torch.autograd.grad(tensors.slopes.sum(), _table_parameters(cpb), allow_unused=True)
    for mine, reference in zip(ours, theirs):
        assert max_relative_error(mine, torch.zeros_like(mine) if reference is None else reference) < 1e-10
    compiled = piecewise_linear_table(list(cpb.linears), torch.float64)
    with pytest.raises(RuntimeError, match="twice"):
        torch.autograd.grad(compiled.intercepts.sum(), _table_parameters(cpb), create_graph=True)


def test_table_takes_tensor_path_where_the_loops_cannot():
    """bfloat16 parameters (and other devices) are built by torch operations, in the wider dtype."""
    from deform_attn.position_bias import _table_compiled

    cpb = make_cpb("init", depth=2, num_outputs=2, dtype=torch.float32).to(torch.bfloat16)
    assert not _table_compiled(list(cpb.linears), torch.float32)
    table = piecewise_linear_table(list(cpb.linears), torch.float32)
    assert table.slopes.dtype == torch.float32 and table.slopes.requires_grad
