"""The layer diagram: its stages, the chapters it names, and the drawing."""

from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from deform_attn.diagram import CHAPTER_STAGES, STAGES, draw_layer, stage_names  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_every_chapter_is_mapped_to_known_stages():
    chapters = sorted(path.stem for path in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert sorted(CHAPTER_STAGES) == chapters
    for chapter, stages in CHAPTER_STAGES.items():
        assert set(stages) <= set(stage_names()), chapter


def test_stages_occupy_distinct_cells():
    cells = [(stage.row, stage.column) for stage in STAGES]
    assert len(set(cells)) == len(cells)


def test_draw_layer_fills_exactly_the_highlighted_boxes():
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    figure = draw_layer(("offsets", "positions"))
    boxes = [patch for patch in figure.axes[0].patches if isinstance(patch, FancyBboxPatch)]
    assert len(boxes) == len(STAGES)
    filled = [box for box in boxes if box.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
    assert len(filled) == 2
    titles = {text.get_text() for text in figure.axes[0].texts}
    assert {stage.title for stage in STAGES} <= titles
    plt.close(figure)


def test_unknown_stage_names_the_argument():
    with pytest.raises(ValueError, match="highlight: expected stage keys"):
        draw_layer(("attenton",))
