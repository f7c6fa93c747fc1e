"""Shared test configuration: the ``slow`` marker, the hypothesis profile, seeds, error measures,
the one small layer the tests build (:func:`make_layer`), the package's wheel that the Colab-like
tests install (``package_wheel``), and :func:`load_script` for the repository's scripts.

Tests marked ``slow`` (cold ``torch.compile`` with inductor takes over a minute on a 2-core CPU)
are skipped unless ``--runslow`` is given or ``DEFORM_ATTN_RUN_SLOW=1`` is set.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from deform_attn import DeformableAttention1D, OffsetNetwork, ZeroOffsets

# One profile for every property test: no per-example deadline (the first call of a layer pays for
# lazy initialisation) and few enough examples to keep the suite within a few minutes on 2 cores.
# Derandomized, so every run of the suite draws the same examples and a red run reproduces; pass
# --hypothesis-seed=N to explore other examples.
settings.register_profile("deform_attn", deadline=None, max_examples=25, print_blob=True, derandomize=True)
settings.load_profile("deform_attn")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over a minute on CPU; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("DEFORM_ATTN_RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow (or set DEFORM_ATTN_RUN_SLOW=1) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


REPO_ROOT = Path(__file__).resolve().parents[1]
# what a wheel build leaves out of its copy of the repository: everything that is not the package
NOT_PART_OF_THE_PACKAGE = (
    ".git", ".venv", "venv", "_build", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".hypothesis", ".ipynb_checkpoints", "notebooks", "colab", "bench-out", ".cache", "results",
)


@pytest.fixture(scope="session")
def package_wheel(tmp_path_factory) -> Path:
    """The package's wheel, as ``pip wheel --no-deps --no-build-isolation`` builds it.

    Built from a copy of the repository, so that nothing is written into the working tree, and
    without build isolation, so that it needs no network. Shared by the Colab-like tests.
    """
    work = tmp_path_factory.mktemp("wheel")
    source, wheels = work / "source", work / "wheels"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*NOT_PART_OF_THE_PACKAGE))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("deform_attn-*.whl")
    return wheel


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread.

    The package's tests use tensors of a few thousand elements, where a second OpenMP thread saves
    nothing and, when other processes keep the cores busy, costs spin-waits that made single tests
    take tens of seconds. Modules opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(path: Path):
    """Import a file of the repository that is not part of the package (scripts/, book/_ext/)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: an error relative to the tensor's scale."""
    scale = expected.detach().abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return ((actual.detach() - expected.detach()).abs().max() / scale).item()


def gradient_errors_of_largest(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> list[float]:
    """Per-tensor max absolute errors of a list of gradients over the largest expected gradient.

    The measure of the kernels' contract (gradients within 1e-4 of the largest magnitude in
    float32): the position bias's parameter gradients sum over every pair, in an order that
    differs between kernels, so relative to their own (small) scale they carry more rounding.
    """
    largest = max(g.detach().abs().max().item() for g in expected)
    return [(a.detach() - e.detach()).abs().max().item() / largest for a, e in zip(actual, expected, strict=True)]


def gradient_errors(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> list[float]:
    """Per-tensor max relative errors of a list of gradients.

    Some gradients are zero in exact arithmetic (the position bias's output bias: softmax ignores a
    constant added to a whole row) and come out as rounding noise. A gradient below 1e-6 of the
    largest in the list is measured relative to that largest gradient instead of its own noise.
    Every other gradient is compared relative to its own scale.
    """
    largest = max(g.detach().abs().max().item() for g in expected)
    errors = []
    for a, e in zip(actual, expected, strict=True):
        a, e = a.detach(), e.detach()
        scale = e.abs().max().item()
        if scale < 1e-6 * largest:
            scale = largest
        errors.append((a - e).abs().max().item() / scale if scale > 0 else a.abs().max().item())
    return errors


def make_layer(
    *,
    train: bool = False,
    use_offsets: bool = True,
    position_bias: str = "cpb",
    offset_layer_norm: bool = False,
    bounded_offsets: bool = True,
    **options,
) -> DeformableAttention1D:
    """A small layer (dim 16, 4 heads of 8 channels in 2 offset groups, r = 4) in eval mode.

    ``options`` override the constructor's arguments. The ablation options are applied the way
    the experiments build their variants, by replacing the layer's parts: ``use_offsets=False``
    puts :class:`ZeroOffsets` in place of the offset network, ``position_bias="none"`` removes
    the bias, and ``offset_layer_norm``/``bounded_offsets`` rebuild the offset network with DAT++'s
    options.
    """
    settings_ = dict(dim=16, dim_head=8, heads=4, offset_groups=2, downsample_factor=4)
    settings_.update(options)
    layer = DeformableAttention1D(**settings_)
    if offset_layer_norm or not bounded_offsets:
        network = layer.to_offsets
        layer.to_offsets = OffsetNetwork(
            channels=network.depthwise.in_channels,
            downsample_factor=layer.downsample_factor,
            kernel_size=network.depthwise.kernel_size[0],
            offset_scale=network.offset_scale,
            layer_norm=offset_layer_norm,
            bounded=bounded_offsets,
        )
    if not use_offsets:
        layer.to_offsets = ZeroOffsets(layer.downsample_factor)
    if position_bias == "none":
        layer.position_bias = None
    elif position_bias != "cpb":
        raise ValueError(f"position_bias: expected 'cpb' or 'none', got {position_bias!r}")
    return layer.train(train)


def trained_looking(layer: DeformableAttention1D, scale: float = 3.0) -> DeformableAttention1D:
    """Larger, less regular CPB weights and large offsets: many kinks inside the distance range."""
    with torch.no_grad():
        for linear in layer.position_bias.linears:
            linear.weight.mul_(scale)
            linear.bias.normal_(0, scale)
        layer.to_offsets.pointwise.weight.mul_(10)
    return layer
