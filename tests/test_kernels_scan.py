"""The exportable scan kernel computes what the SDPA kernel computes, run eagerly as plain functions.

The scan kernel is what ``torch.export`` traces (tests/test_export.py checks the exported program);
here it runs eagerly on CPU, in float64, against :func:`sdpa_biased_attention` with the same table
evaluated pair by pair through ``searchsorted`` (:func:`piecewise_linear_bias`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer, max_relative_error

import deform_attn.attention as attention_module
from deform_attn.geometry import distance_coordinates
from deform_attn.kernels import EXPORT_QUERY_CHUNK, scan_biased_attention, sdpa_biased_attention, table_bias_from_crossings
from deform_attn.position_bias import ContinuousPositionBias, piecewise_linear_bias

pytestmark = pytest.mark.usefixtures("single_thread")

R = 3  # tokens per cell


def kernel_case(
    *,
    length=23,
    groups=2,
    outputs=2,
    geometry="centered",
    log_distance=True,
    with_table=True,
    padded=False,
    weight_scale=1.0,
    offset_scale=3.0,
    hidden_dim=8,
    seed=0,
):
    """q, k, v, the coordinates of random offsets, a CPB table and key padding, in float64."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, channels = 2, groups * outputs, 5
    cells = max(2, length // R)
    table = None
    if with_table:
        bias = ContinuousPositionBias(hidden_dim=hidden_dim, num_outputs=outputs, log_distance=log_distance).double()
        with torch.no_grad():
            for linear in bias.linears:
                linear.weight.normal_(0, weight_scale, generator=generator)
                linear.bias.normal_(0, weight_scale, generator=generator)
        table = bias.table(torch.float64)
    offsets = offset_scale * torch.randn(batch * groups, cells, dtype=torch.float64, generator=generator)
    coordinates = distance_coordinates(torch.arange(length), offsets, length, R, geometry=geometry)
    q, k, v = (
        torch.randn(batch, heads, size, channels, dtype=torch.float64, generator=generator)
        for size in (length, cells, cells)
    )
    key_padding = None
    if padded:  # the second sequence has only its first two keys
        key_padding = torch.zeros(batch, cells, dtype=torch.bool)
        key_padding[1, 2:] = True
    return dict(q=q, k=k, v=v, coordinates=coordinates, table=table, log_distance=log_distance, key_padding=key_padding)


def scan_and_sdpa(case, chunk):
    q, k, v, coordinates, table = case["q"], case["k"], case["v"], case["coordinates"], case["table"]
    log_distance, key_padding, scale = case["log_distance"], case["key_padding"], q.shape[-1] ** -0.5
    scanned = scan_biased_attention(
        q, k, v, query_coordinates=coordinates.queries, key_coordinates=coordinates.keys, query_grid=coordinates.grid,
        table=table, log_distance=log_distance, scale=scale, chunk=chunk, key_padding=key_padding,
    )
    bias = None if table is None else (lambda d: piecewise_linear_bias(d, table, log_distance))
    reference = sdpa_biased_attention(
        q, k, v, query_coordinates=coordinates.queries, key_coordinates=coordinates.keys, position_bias=bias,
        scale=scale, chunk=q.shape[2], key_padding=key_padding,
    )
    return scanned, reference


# Eagerly, every scan call is a torch.compile of its body (about a second on one thread), so the
# cases below cover each option and each pair of options rather than their full product.

# chunk 1: every length is a multiple; 7 and 128: a length shorter than one chunk, an exact
# multiple, and neither
CHUNKINGS = [(1, 5), (7, 5), (7, 21), (7, 23), (128, 23), (128, 128), (128, 130)]


@pytest.mark.parametrize("chunk, length", CHUNKINGS)
@pytest.mark.parametrize("geometry", ["centered", "lucidrains"])
def test_scan_equals_sdpa_for_every_chunking(geometry, chunk, length):
    scanned, reference = scan_and_sdpa(kernel_case(length=length, geometry=geometry), chunk)
    assert scanned.shape == reference.shape == (2, 4, length, 5)
    assert max_relative_error(scanned, reference) < 1e-10


# every pair of (geometry, distance, heads per group, key padding) values occurs in some case
LAYOUTS = [
    ("centered", True, 1, False),
    ("lucidrains", False, 1, True),
    ("centered", False, 2, True),
    ("lucidrains", True, 2, False),
    ("centered", True, 4, True),
    ("lucidrains", False, 4, False),
]


@pytest.mark.parametrize(
    "geometry, log_distance, outputs, padded",
    LAYOUTS,
    ids=[f"{g}-{'log' if l else 'linear'}-{o}-per-group{'-padded' if p else ''}" for g, l, o, p in LAYOUTS],
)
def test_scan_equals_sdpa_for_every_layout(geometry, log_distance, outputs, padded):
    case = kernel_case(length=40, geometry=geometry, log_distance=log_distance, outputs=outputs, padded=padded)
    scanned, reference = scan_and_sdpa(case, chunk=16)
    assert max_relative_error(scanned, reference) < 1e-10


@pytest.mark.parametrize("geometry, padded", [("centered", False), ("lucidrains", True)])
def test_scan_without_a_table(geometry, padded):
    case = kernel_case(length=30, geometry=geometry, with_table=False, padded=padded)
    scanned, reference = scan_and_sdpa(case, chunk=7)
    assert max_relative_error(scanned, reference) < 1e-10


def test_the_cases_are_not_vacuous():
    """Key padding and the bias each change the reference output, so matching it checks them."""
    def reference(**options):
        case = kernel_case(length=30, **options)
        q, coordinates, table = case["q"], case["coordinates"], case["table"]
        bias = None if table is None else (lambda d: piecewise_linear_bias(d, table, case["log_distance"]))
        return sdpa_biased_attention(
            q, case["k"], case["v"], query_coordinates=coordinates.queries, key_coordinates=coordinates.keys,
            position_bias=bias, scale=0.5, chunk=30, key_padding=case["key_padding"],
        )

    plain, padded, unbiased = reference(), reference(padded=True), reference(with_table=False)
    assert torch.equal(plain[0], padded[0])
    assert (plain[1] - padded[1]).abs().max() > 1e-3
    assert (plain - unbiased).abs().max() > 1e-3


@pytest.mark.parametrize(
    "geometry, log_distance", [("centered", True), ("lucidrains", False), ("centered", False)],
    ids=["centered-log", "lucidrains-linear", "centered-linear"],
)
def test_scan_with_trained_looking_bias_and_keys_far_outside(geometry, log_distance):
    """Large CPB weights (many kinks, large biases) and offsets of tens of cells still agree."""
    case = kernel_case(
        length=150, geometry=geometry, log_distance=log_distance, weight_scale=4.0, offset_scale=40.0,
        hidden_dim=16, padded=True, seed=3,
    )
    table, coordinates = case["table"], case["coordinates"]
    key_positions = coordinates.keys * R if geometry == "centered" else (coordinates.keys + 1) / 2 * 150
    assert key_positions.min() < -50 and key_positions.max() > 200  # keys far outside the 150 tokens
    # the pairs cross many of the kinks: the bias really is piecewise here
    distances = coordinates.queries[None, :, None] - coordinates.keys[:, None, :]
    t = torch.sign(distances) * torch.log1p(distances.abs()) if log_distance else distances
    assert torch.searchsorted(table.kinks, t.contiguous()).unique().numel() > 5
    bias = piecewise_linear_bias(distances, table, log_distance)
    assert bias.max() - bias.min() > 10
    scanned, reference = scan_and_sdpa(case, chunk=7)
    assert max_relative_error(scanned, reference) < 1e-10


# ---------------------------------------------------------------- the bias from crossings


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_table_bias_from_crossings_equals_searchsorted(chunk):
    """For random crossings, the chunk's bias is the table at the interval searchsorted finds."""
    generator = torch.Generator().manual_seed(0)
    rows, keys, num_kinks, length = 3, 6, 5, 4 * chunk + 3
    # kink k at t = k, so interval i is (i - 1, i]; crossings nondecreasing in k, some before the
    # sequence (0), some never reached (beyond it), some together (two kinks at one query)
    crossings = torch.randint(0, length + 5, (rows, keys, num_kinks), generator=generator).sort(-1).values
    crossings[0, 0] = 0
    crossings[0, 1] = length + 7
    crossings[1, 0, 1:3] = crossings[1, 0, 1]
    kinks = torch.arange(num_kinks, dtype=torch.float64)
    row_table = torch.randn(rows, num_kinks + 1, 2, dtype=torch.float64, generator=generator)
    queries = torch.arange(length)
    # t of each pair: anywhere inside the interval its crossings say, (interval - 1, interval]
    interval = (crossings[:, :, None, :] <= queries[None, None, :, None]).sum(-1)  # (rows, m, n)
    t = interval - torch.rand(interval.shape, dtype=torch.float64, generator=generator) * 0.999
    assert torch.equal(torch.searchsorted(kinks, t.contiguous()), interval)
    expected = torch.gather(row_table[..., 0], 1, interval.flatten(1)).view_as(t) * t
    expected += torch.gather(row_table[..., 1], 1, interval.flatten(1)).view_as(t)
    assert interval.unique().numel() == num_kinks + 1  # every interval occurs

    padded_length = -(-length // chunk) * chunk
    t_padded = torch.nn.functional.pad(t, (0, padded_length - length))
    pieces = [
        table_bias_from_crossings(crossings, torch.tensor([start]), t_padded[..., start:start + chunk], row_table, chunk)
        for start in range(0, padded_length, chunk)
    ]
    actual = torch.cat(pieces, -1)[..., :length]
    torch.testing.assert_close(actual, expected, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------- through the layer


# padding masks exist in the centred geometry only
@pytest.mark.parametrize("geometry, masked", [("centered", False), ("centered", True), ("lucidrains", False)])
def test_layer_on_the_scan_path_equals_eager(geometry, masked, monkeypatch):
    """The layer as torch.export traces it (scan kernel, frozen table), run eagerly, equals its eager output."""
    layer = make_layer(geometry=geometry)
    with torch.no_grad():
        layer.to_offsets.pointwise.weight.mul_(10)  # offsets of several cells, near the bound
    length = 2 * EXPORT_QUERY_CHUNK + 45
    x = torch.randn(2, 16, length)
    mask = torch.arange(length)[None, :] < torch.tensor([[length], [150]]) if masked else None
    with torch.no_grad():
        expected = layer(x, mask)

    plans = []
    run = attention_module.biased_attention
    monkeypatch.setattr(attention_module, "biased_attention", lambda plan, *a, **k: plans.append(plan) or run(plan, *a, **k))
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    layer.position_bias.freeze()
    try:
        with torch.no_grad():
            actual = layer(x, mask)
    finally:
        layer.position_bias.unfreeze()
    assert [plan.kernel for plan in plans] == ["scan"]
    assert max_relative_error(actual, expected) < 1e-5
