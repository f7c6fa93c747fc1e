"""The layer as one picture: the introduction's diagram, and the chapters that build each part.

:func:`draw_layer` draws the data flow of ``DeformableAttention1D`` from the input to the output;
``highlight`` picks out the stages one chapter builds. :data:`STAGES` names the stages in the
order the data passes them and :data:`CHAPTER_STAGES` says which chapter builds which, so the
diagram and the chapters' "you are here" lines cannot disagree. Matplotlib is imported only
when drawing (it is not a dependency of the layer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Stage", "STAGES", "CHAPTER_STAGES", "stage_names", "draw_layer"]


class Stage(NamedTuple):
    """One box of the diagram: its key, its title, the formula it computes, its grid cell."""

    key: str
    title: str
    formula: str
    row: int
    column: int


# the notation page (book/notation.md) defines every symbol used here
STAGES: tuple[Stage, ...] = (
    Stage("input", "input", r"$x_0, \dots, x_{n-1}$", 0, 0),
    Stage("queries", "queries", r"$\mathbf{q}_i = W_q x_i$", 0, 1),
    Stage("offsets", "offsets", r"$\Delta_j = s \tanh(\cdots)$", 0, 2),
    Stage("positions", "positions", r"$s_j = p_j + r \Delta_j$", 0, 3),
    Stage("sampling", "sampling", r"$\tilde x_j = x(s_j)$", 1, 3),
    Stage("keys", "keys, values", r"$\mathbf{k}_j, \mathbf{v}_j = W_{k,v} \tilde x_j$", 1, 2),
    Stage("bias", "position bias", r"$B(d_{ij})$, $d_{ij} = \frac{i - s_j}{r}$", 2, 3),
    Stage("attention", "attention", r"$a_{ij} = \mathrm{softmax}_j(\cdot)$", 1, 1),
    Stage("output", "output", r"$y_i = W_o \Sigma_j\, a_{ij} \mathbf{v}_j$", 1, 0),
)

_COLUMN, _ROW = 2.35, 1.4  # distance between box centres, in data units

# (from, to): the arrows, in the direction the data flows. The sampled keys carry their positions
# s_j, so the position bias takes its distances from the sampling stage.
_EDGES: tuple[tuple[str, str], ...] = (
    ("input", "queries"),
    ("queries", "offsets"),
    ("offsets", "positions"),
    ("positions", "sampling"),
    ("input", "sampling"),
    ("sampling", "keys"),
    ("keys", "attention"),
    ("queries", "attention"),
    ("sampling", "bias"),
    ("bias", "attention"),
    ("attention", "output"),
)

# chapter file stem -> the stages it builds; chapters about the whole layer highlight none
CHAPTER_STAGES: dict[str, tuple[str, ...]] = {
    "02_grid_sampling": ("sampling",),
    "03_coordinates": ("positions",),
    "04_offsets": ("offsets",),
    "05_position_bias": ("bias",),
    "06_attention": ("queries", "keys", "attention", "output"),
    "07_piecewise_kernel": ("bias", "attention"),
    "08_performance": (),
    "09_ablations": (),
    "10_what_offsets_learn": ("offsets", "positions"),
    "11_causal": ("offsets", "sampling", "attention"),
}


def stage_names() -> list[str]:
    """The stage keys in the order the data passes them."""
    return [stage.key for stage in STAGES]


def draw_layer(highlight: tuple[str, ...] | list[str] = (), ax: Any = None) -> Any:
    """Draw the layer's data flow; stages in ``highlight`` are filled, the rest outlined.

    Args:
        highlight: stage keys (see :func:`stage_names`) to emphasise.
        ax: a Matplotlib axes to draw into; ``None``: a new 7 x 4.2 inch figure.

    Returns:
        The Matplotlib figure.
    """
    unknown = sorted(set(highlight) - set(stage_names()))
    if unknown:
        raise ValueError(f"highlight: expected stage keys from {stage_names()}, got unknown {unknown}")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(8.0, 4.6))
    width, height = 1.95, 0.85  # one box, in grid units (columns 2.35 apart, rows 1.4 apart)
    centres = {stage.key: (_COLUMN * stage.column, -_ROW * stage.row) for stage in STAGES}
    for stage in STAGES:
        x, y = centres[stage.key]
        emphasised = stage.key in highlight
        ax.add_patch(FancyBboxPatch(
            (x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor="#cfe3f6" if emphasised else "white", edgecolor="#1f4e79" if emphasised else "0.45",
            linewidth=2.0 if emphasised else 1.0,
        ))
        ax.text(x, y + 0.17, stage.title, ha="center", va="center", fontsize=11, fontweight="bold")
        ax.text(x, y - 0.18, stage.formula, ha="center", va="center", fontsize=10.5)
    for start, stop in _EDGES:
        route = _route(centres[start], centres[stop], width, height)
        xs, ys = zip(*route)
        ax.plot(xs[:-1], ys[:-1], color="0.3", linewidth=1.0, solid_capstyle="butt")
        ax.add_patch(FancyArrowPatch(
            route[-2], route[-1], arrowstyle="-|>", mutation_scale=12, color="0.3", linewidth=1.0,
            shrinkA=0, shrinkB=0,
        ))
    columns = max(stage.column for stage in STAGES)
    rows = max(stage.row for stage in STAGES)
    ax.set_xlim(-width / 2 - 0.1, _COLUMN * columns + width / 2 + 0.55)
    ax.set_ylim(-_ROW * rows - height / 2 - 0.1, height / 2 + 0.45)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax.figure


def _route(start: tuple[float, float], stop: tuple[float, float], width: float, height: float) -> list:
    """Waypoints of an arrow from box centre ``start`` to box centre ``stop``, edge to edge.

    Neighbours in a row or a column are joined straight. The input's arrow to the sampling stage
    runs over the top row and down the right side, so it crosses no box; any other pair is joined
    from the side of ``start`` to the bottom edge of ``stop``.
    """
    (x0, y0), (x1, y1) = start, stop
    if y0 == y1:
        sign = 1 if x1 > x0 else -1
        return [(x0 + sign * width / 2, y0), (x1 - sign * width / 2, y1)]
    if x0 == x1:
        sign = 1 if y1 > y0 else -1
        return [(x0, y0 + sign * height / 2), (x1, y1 - sign * height / 2)]
    if y0 > y1 and x0 < x1:  # top-left to bottom-right: over the top, down the right side
        top, right = y0 + height / 2 + 0.25, x1 + width / 2 + 0.3
        return [(x0, y0 + height / 2), (x0, top), (right, top), (right, y1), (x1 + width / 2, y1)]
    sign = 1 if x1 > x0 else -1
    return [(x0 + sign * width / 2, y0), (x1, y1 + height / 2 if y1 < y0 else y1 - height / 2)]
