"""Coordinate geometry: reference points, sample positions and normalization conventions.

Three units appear in this package:

* **tokens**: index units of the input sequence; token ``j`` sits at ``j``.
* **cells**: units of the downsampled grid; one cell is ``downsample_factor`` tokens in the
  centred geometry. Offsets are always in cells, so ``offset_scale`` is a number of cells.
* **normalized**: ``grid_sample``'s ``[-1, 1]``. With ``align_corners=True`` the first and last
  tokens sit at -1 and +1; with ``align_corners=False`` the outer *edges* of the first and last
  tokens do (token centres at ``-1 + 1/n`` and ``1 - 1/n``).

Two geometries place the downsampled keys:

``"centered"`` (this package's default)
    Cell ``k`` is the window of tokens ``[k r, (k + 1) r)`` and its reference point is the window's
    centre, ``k r + (r - 1) / 2`` tokens, which is also the centre of the strided offset
    convolution's receptive field. An offset of ``o`` cells moves it by ``o r`` tokens. Zero
    offsets sample exactly the window centres. The position bias sees distances in cells, which
    do not depend on the sequence length.

``"lucidrains"`` (what ``deformable-attention`` 0.0.20 computes)
    Cell positions ``k + o`` are normalized over the ``m`` cells as if ``align_corners=True``
    (``2 (k + o) / (m - 1) - 1``) but sampled with ``align_corners=False``, so cell ``k`` lands on
    token ``k n / (m - 1) - 1/2``: the first and last reference points sit half a token outside the
    sequence and one cell is ``n / (m - 1)`` tokens, not ``r``. The position bias sees the query
    normalized over ``n`` and the key normalized over ``m``, both in ``[-1, 1]``, so its distances
    change with the sequence length.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GEOMETRIES",
    "Geometry",
    "normalize_positions",
    "unnormalize_positions",
    "num_cells",
    "reference_points",
    "sample_positions",
    "query_key_distances",
    "distance_coordinates",
    "DistanceCoordinates",
    "QueryGrid",
    "causal_visibility",
]

Geometry = Literal["centered", "lucidrains"]
GEOMETRIES: tuple[str, ...] = ("centered", "lucidrains")


class QueryGrid(NamedTuple):
    """Query coordinates on a regular grid: ``u_i = step * i + origin``, with ``step > 0``."""

    step: float
    origin: float


class DistanceCoordinates(NamedTuple):
    """Coordinates whose differences are the position bias's distances: ``d[b, i, j] = u[i] - w[b, j]``.

    Attributes:
        queries: (queries,) ``u``.
        keys: (batch, cells) ``w``.
        step, origin: ``u[i] = step * query_positions[i] + origin`` up to rounding, ``step > 0``.
    """

    queries: Tensor
    keys: Tensor
    step: float
    origin: float

    @property
    def grid(self) -> QueryGrid:
        return QueryGrid(self.step, self.origin)


def normalize_positions(positions: Tensor, length: int, *, align_corners: bool) -> Tensor:
    """Token index positions -> ``grid_sample``'s normalized ``[-1, 1]`` coordinates."""
    if align_corners:
        return 2.0 * positions / max(length - 1, 1) - 1.0
    return (2.0 * positions + 1.0) / length - 1.0


def unnormalize_positions(coordinates: Tensor, length: int, *, align_corners: bool) -> Tensor:
    """Normalized ``[-1, 1]`` coordinates -> token index positions (``grid_sample``'s rule)."""
    if align_corners:
        return (coordinates + 1.0) / 2.0 * (length - 1)
    return ((coordinates + 1.0) * length - 1.0) / 2.0


def num_cells(length: int, downsample_factor: int) -> int:
    """Number of downsampled cells (keys) for ``length`` tokens.

    Equal to the output length of the offset network's strided convolution (kernel ``k``,
    stride ``r``, padding ``(w - r) / 2``): ``floor(length / r)``.
    """
    return length // downsample_factor


def reference_points(
    length: int, downsample_factor: int, *, geometry: Geometry = "centered", device=None, dtype=None
) -> Tensor:
    """Where each cell samples when its offset is zero, in **tokens**; shape (cells,)."""
    zero_offsets = torch.zeros(num_cells(length, downsample_factor), device=device, dtype=dtype or torch.float32)
    return sample_positions(zero_offsets, length, downsample_factor, geometry=geometry)


def sample_positions(
    offsets_in_cells: Tensor, length: int, downsample_factor: int, *, geometry: Geometry = "centered", first_cell: int = 0
) -> Tensor:
    """Sample positions in **tokens** for offsets given in cells.

    Args:
        offsets_in_cells: (..., cells) offset of each cell, in cells.
        length: number of tokens ``n`` of the sequence being sampled.
        downsample_factor: ``r``, tokens per cell in the centred geometry.
        geometry: ``"centered"`` or ``"lucidrains"`` (see the module docstring).
        first_cell: index of the first cell given (centred geometry; streaming computes a few
            cells at a time).

    Returns:
        (..., cells) positions in token index units, ready for :func:`linear_sample_1d`.
    """
    cells = offsets_in_cells.shape[-1]
    if first_cell and geometry != "centered":
        raise ValueError("first_cell: only the centred geometry places a cell independently of the others")
    k = torch.arange(first_cell, first_cell + cells, device=offsets_in_cells.device, dtype=offsets_in_cells.dtype)
    shifted_cells = k + offsets_in_cells
    if geometry == "centered":
        return shifted_cells * downsample_factor + (downsample_factor - 1) / 2
    if geometry == "lucidrains":
        normalized = normalize_positions(shifted_cells, cells, align_corners=True)
        return unnormalize_positions(normalized, length, align_corners=False)
    raise ValueError(f"geometry: expected one of {GEOMETRIES}, got {geometry!r}")


def query_key_distances(
    query_positions: Tensor,
    offsets_in_cells: Tensor,
    length: int,
    downsample_factor: int,
    *,
    geometry: Geometry = "centered",
) -> Tensor:
    """Signed distance from each query to each sampled key, as the position bias sees it.

    Args:
        query_positions: (queries,) query token indices (a contiguous chunk of ``arange(n)``).
        offsets_in_cells: (batch, cells) offsets of the keys, in cells.
        length: number of tokens ``n``.
        downsample_factor: ``r``.
        geometry: ``"centered"``: (query token - key token) / r, in cells. ``"lucidrains"``:
            query normalized over ``n`` minus key cell normalized over ``m``, both with
            ``align_corners=True``.

    Returns:
        (batch, queries, cells) distances.
    """
    queries, keys, _, _ = distance_coordinates(
        query_positions, offsets_in_cells, length, downsample_factor, geometry=geometry
    )
    # subtract coordinates computed per vector, not per pair: one pass over the pairs
    return queries[None, :, None] - keys[:, None, :]


def distance_coordinates(
    query_positions: Tensor,
    offsets_in_cells: Tensor,
    length: int,
    downsample_factor: int,
    *,
    geometry: Geometry = "centered",
) -> DistanceCoordinates:
    """Coordinates whose differences are :func:`query_key_distances`: ``d[b, i, j] = u[i] - w[b, j]``.

    Queries sit on a regular grid, so ``u[i] = step * query_positions[i] + origin`` (up to
    rounding) with ``step > 0``; the piecewise attention kernel relies on that.

    Returns:
        :class:`DistanceCoordinates` ``(u (queries,), w (batch, cells), step, origin)``.
    """
    query_positions = query_positions.to(offsets_in_cells.dtype)
    if geometry == "centered":
        keys = sample_positions(offsets_in_cells, length, downsample_factor, geometry="centered")
        return DistanceCoordinates(query_positions / downsample_factor, keys / downsample_factor, 1.0 / downsample_factor, 0.0)
    if geometry == "lucidrains":
        cells = offsets_in_cells.shape[-1]
        k = torch.arange(cells, device=offsets_in_cells.device, dtype=offsets_in_cells.dtype)
        keys = normalize_positions(k + offsets_in_cells, cells, align_corners=True)
        queries = normalize_positions(query_positions, length, align_corners=True)
        return DistanceCoordinates(queries, keys, 2.0 / max(length - 1, 1), -1.0)
    raise ValueError(f"geometry: expected one of {GEOMETRIES}, got {geometry!r}")


def causal_visibility(sample_positions_in_tokens: Tensor, downsample_factor: int, *, first_cell: int = 0) -> Tensor:
    """The first query that may see each sampled key in causal attention (centred geometry).

    A key may be seen by query ``i`` only when everything it was computed from lies at or before
    token ``i``: its offset comes from its cell's window, which ends at the cell's last token
    ``(j + 1) r - 1`` (:class:`deform_attn.OffsetNetwork` with ``causal=True``), and its linear
    interpolation reads tokens ``floor(s_j)`` and ``floor(s_j) + 1``, of which the second has weight
    zero when ``s_j`` is whole, so the last token it reads is ``ceil(s_j)``. Hence

    ``visible_from[j] = max((j + 1) r - 1, ceil(s_j))``,

    and a key whose offset moves it forward becomes visible later. Being a comparison of
    integers, the mask carries no gradient.

    Args:
        sample_positions_in_tokens: (..., cells) sample positions ``s_j`` in tokens.
        downsample_factor: ``r``.
        first_cell: index of the first cell given.

    Returns:
        (..., cells) int64 query indices.
    """
    cells = sample_positions_in_tokens.shape[-1]
    cell = torch.arange(first_cell, first_cell + cells, device=sample_positions_in_tokens.device)
    cell_end = (cell + 1) * downsample_factor - 1
    last_token_read = sample_positions_in_tokens.detach().ceil().clamp(-1, 2.0**40).to(torch.int64)
    return torch.maximum(last_token_read, cell_end)
