"""``torch.compile`` of the layer on CPU matches eager mode.

Kink finding in the position bias has a data-dependent size (dynamo breaks the graph at
``torch.unique`` and runs it eagerly) and the finite/mask checks are skipped while compiling, so the
compiled layer has graph breaks but must give the same numbers. The inductor test compiles C++ kernels: over a minute on a cold 2-core CPU, so it is
marked slow; the ``aot_eager`` test traces the same graphs through dynamo and AOTAutograd in seconds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gradient_errors, make_layer, max_relative_error

from deform_attn import DeformableAttention1D
from deform_attn.kernels import Implementation

pytestmark = pytest.mark.usefixtures("single_thread")




def assert_compiled_matches_eager(layer, backend: str, x: torch.Tensor, mask=None):
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend)
    results = []
    for module in (layer, compiled):
        xi = x.clone().requires_grad_()
        out = module(xi) if mask is None else module(xi, mask)
        grads = torch.autograd.grad(out.pow(2).sum(), [xi, *layer.parameters()])
        results.append((out.detach(), grads))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    assert max_relative_error(compiled_out, eager_out) < 1e-5
    assert max(gradient_errors(compiled_grads, eager_grads)) < 1e-4


@pytest.mark.parametrize("kernel", ["piecewise", "sdpa"])
@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
def test_compile_aot_eager_matches_eager(geometry, kernel):
    layer = make_layer(heads=2, offset_groups=None, geometry=geometry, implementation=Implementation(kernel=kernel))
    assert_compiled_matches_eager(layer, "aot_eager", torch.randn(2, 16, 24))


@pytest.mark.parametrize("kernel", ["piecewise", "sdpa"])
def test_compile_aot_eager_with_mask(kernel):
    mask = torch.arange(24)[None, :] < torch.tensor([[24], [13]])
    assert_compiled_matches_eager(make_layer(heads=2, offset_groups=None, implementation=Implementation(kernel=kernel)), "aot_eager", torch.randn(2, 16, 24), mask)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["piecewise", "sdpa"])
def test_compile_inductor_matches_eager(kernel):
    assert_compiled_matches_eager(make_layer(heads=2, offset_groups=None, implementation=Implementation(kernel=kernel)), "inductor", torch.randn(2, 16, 24))
