"""Coordinate conventions: normalization, where the cells sit, and what distances the bias sees."""

from __future__ import annotations

import pytest
import torch

from deform_attn import (
    OffsetNetwork,
    linear_sample_1d,
    normalize_positions,
    num_cells,
    query_key_distances,
    reference_points,
    sample_positions,
    unnormalize_positions,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("length", [2, 7, 64])
def test_normalize_unnormalize_round_trip(align_corners, length):
    positions = torch.empty(100, dtype=torch.float64).uniform_(-3, length + 3)
    there = normalize_positions(positions, length, align_corners=align_corners)
    back = unnormalize_positions(there, length, align_corners=align_corners)
    torch.testing.assert_close(back, positions, rtol=0, atol=1e-12)
    coordinates = torch.empty(100, dtype=torch.float64).uniform_(-1.5, 1.5)
    again = normalize_positions(
        unnormalize_positions(coordinates, length, align_corners=align_corners), length, align_corners=align_corners
    )
    torch.testing.assert_close(again, coordinates, rtol=0, atol=1e-12)


def test_normalization_endpoints():
    """align_corners=True: token centres 0 and n-1 at -1 and 1; False: the outer token edges are."""
    n = 10
    ends = torch.tensor([0.0, n - 1.0], dtype=torch.float64)
    edges = torch.tensor([-0.5, n - 0.5], dtype=torch.float64)
    expected = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(normalize_positions(ends, n, align_corners=True), expected)
    torch.testing.assert_close(normalize_positions(edges, n, align_corners=False), expected)


@pytest.mark.parametrize("downsample_factor", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("extra", [0, 2, 4])
def test_num_cells_equals_offset_conv_output_length(downsample_factor, extra):
    network = OffsetNetwork(
        channels=2, downsample_factor=downsample_factor, kernel_size=downsample_factor + extra, offset_scale=1.0
    )
    for length in range(downsample_factor, 4 * downsample_factor + 7):
        out = network(torch.randn(3, 2, length))
        assert out.shape == (3, num_cells(length, downsample_factor)), (length, downsample_factor, extra)


@pytest.mark.parametrize("downsample_factor", [1, 2, 3, 4])
def test_centered_reference_points_are_window_centres(downsample_factor):
    r, n = downsample_factor, 23
    points = reference_points(n, r, dtype=torch.float64)
    k = torch.arange(n // r, dtype=torch.float64)
    torch.testing.assert_close(points, k * r + (r - 1) / 2, rtol=0, atol=0)
    # sampling the content = position sequence there returns the centres, all inside the sequence
    values = torch.arange(n, dtype=torch.float64)[None, None]
    torch.testing.assert_close(linear_sample_1d(values, points[None])[0, 0], points)


@pytest.mark.parametrize("downsample_factor, kernel_size", [(2, 2), (2, 4), (3, 5), (4, 6), (4, 8)])
def test_centered_reference_point_is_centre_of_conv_receptive_field(downsample_factor, kernel_size):
    """A mean filter of the offset conv over positions j returns each interior cell's reference point."""
    r, n = downsample_factor, 40
    network = OffsetNetwork(channels=1, downsample_factor=r, kernel_size=kernel_size, offset_scale=1.0).double()
    with torch.no_grad():
        network.depthwise.weight.fill_(1.0 / kernel_size)
        network.depthwise.bias.zero_()
        mean_position = network.depthwise(torch.arange(n, dtype=torch.float64)[None, None])[0, 0]
    points = reference_points(n, r, dtype=torch.float64)
    interior = slice(kernel_size // r + 1, -(kernel_size // r + 1))  # cells whose window skips the zero padding
    assert points[interior].numel() >= 3
    torch.testing.assert_close(mean_position[interior], points[interior])


def test_centered_offsets_move_by_whole_windows():
    r, n = 3, 20
    offsets = torch.randn(2, n // r, dtype=torch.float64)
    moved = sample_positions(offsets, n, r) - sample_positions(torch.zeros_like(offsets), n, r)
    torch.testing.assert_close(moved, offsets * r)


@pytest.mark.parametrize("length, downsample_factor", [(16, 4), (61, 4), (47, 3), (9, 2)])
def test_lucidrains_cell_lands_on_k_n_over_m_minus_1_minus_half(length, downsample_factor):
    m = length // downsample_factor
    points = reference_points(length, downsample_factor, geometry="lucidrains", dtype=torch.float64)
    k = torch.arange(m, dtype=torch.float64)
    torch.testing.assert_close(points, k * length / (m - 1) - 0.5)
    # first and last sit half a token outside the sequence
    assert points[0] == -0.5 and points[-1] == length - 0.5


def test_centered_distances_do_not_depend_on_length():
    r, m = 4, 6
    offsets = torch.randn(2, m, dtype=torch.float64)
    queries = torch.arange(3, 17)
    short = query_key_distances(queries, offsets, m * r, r)
    long = query_key_distances(queries, offsets, m * r + r - 1, r)
    torch.testing.assert_close(short, long, rtol=0, atol=0)
    # and they are (query token - key token) / r, in cells
    keys = sample_positions(offsets, m * r, r)
    torch.testing.assert_close(short, (queries.double()[None, :, None] - keys[:, None, :]) / r)
    assert short.shape == (2, queries.shape[0], m)


def test_lucidrains_distances_depend_on_length():
    r, m = 4, 6
    offsets = torch.randn(2, m, dtype=torch.float64)
    queries = torch.arange(3, 17)
    short = query_key_distances(queries, offsets, m * r, r, geometry="lucidrains")
    long = query_key_distances(queries, offsets, m * r + r - 1, r, geometry="lucidrains")
    assert (short - long).abs().max() > 1e-3
    # query normalized over n, key cell normalized over m, both align_corners=True
    k = torch.arange(m, dtype=torch.float64)
    expected = 2 * queries.double()[None, :, None] / (m * r - 1) - 2 * (k + offsets)[:, None, :] / (m - 1)
    torch.testing.assert_close(short, expected)
