"""The book written for the page, checked on the sources (fast: nothing is executed or built).

What a reader sees must fit the text column and be readable there:

* code within 88 columns, in every notebook code cell (87 in a cell whose input the book hides
  behind a toggle, which opens a little narrower) and in every fenced code block of the notebooks'
  prose and of ``book/*.md``;
* printed output lines (stream and ``text/plain`` outputs) within 100 columns;
* code comments that say what the code does, not which label an equation has in the book's source
  (a reader of the page or of the Colab copy never sees ``(eq-axis-swap)``);
* every image a cell outputs is a numbered figure: the cell's ``mystnb.figure`` metadata gives it a
  caption and a name, and the cell outputs that one image and no other display;
* figures drawn for the page: each chapter's setup cell sets ``figure.dpi`` of 110 or more and a
  ``font.size`` of 10 or more, no code asks for a smaller font or a figure wider than 7 inches,
  and the committed images are drawn at 110 dpi or more and at most 8 inches wide.

The rendered pages are checked in a real browser by tests/test_book_html.py (nothing wider than
the page, every output image in a figure with a numbered caption, figures shown large enough).
"""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
BOOK_PAGES = sorted((REPO_ROOT / "book").glob("*.md"))

MAX_CODE_COLUMNS = 88
# a cell tagged hide-input opens in a box a few pixels narrower than the text column
MAX_HIDDEN_CODE_COLUMNS = 87
HIDING_TAGS = {"hide-input", "hide-cell"}
MAX_OUTPUT_COLUMNS = 100
MIN_FIGURE_DPI = 110
MIN_FONT_SIZE = 10
MAX_FIGURE_INCHES = 7.0  # the width a figure is drawn at (figsize)
MAX_IMAGE_INCHES = 8.0  # the saved image, which a legend outside the axes may widen a little
IMAGE_TYPES = ("image/png", "image/svg+xml", "image/jpeg")

notebook_param = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
page_param = pytest.mark.parametrize("path", BOOK_PAGES, ids=[p.name for p in BOOK_PAGES])


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _code_cells(nb) -> list[tuple[int, nbformat.NotebookNode]]:
    return [(index, cell) for index, cell in enumerate(nb.cells) if cell.cell_type == "code"]


def long_lines(text: str, limit: int) -> list[str]:
    """The lines of ``text`` longer than ``limit`` characters, with their length."""
    return [f"{len(line)}: {line}" for line in text.splitlines() if len(line) > limit]


def printed_text(output) -> str:
    """What an output prints as text: a stream, or the ``text/plain`` of a result or display."""
    if output.output_type == "stream":
        return output.get("text", "")
    if output.output_type in ("execute_result", "display_data"):
        return output.get("data", {}).get("text/plain", "")
    return ""


FENCE = re.compile(r"^(`{3,}|~{3,})\s*(\S*)")
CODE_DIRECTIVES = ("{code-block}", "{code-cell}", "{code}", "{sourcecode}")


def fenced_code(markdown: str) -> list[str]:
    """The lines inside fenced code blocks (```` ``` ```` or ``~~~``). A directive fence such as
    ```` ```{note} ```` holds prose, not code, and is left out."""
    lines, fence, is_code = [], None, False
    for line in markdown.splitlines():
        stripped = line.strip()
        opening = FENCE.match(stripped)
        if fence is None and opening:
            fence, info = opening.groups()
            is_code = not info.startswith("{") or info in CODE_DIRECTIVES
        elif fence is not None and stripped.startswith(fence) and not stripped[len(fence):].strip():
            fence = None
        elif fence is not None and is_code:
            lines.append(line)
    return lines


# Labels the book's sources define: equation labels after display math, targets, figure names.
EQUATION_LABEL = re.compile(r"\$\$\s*\(([\w-]+)\)")
TARGET = re.compile(r"^\(([\w-]+)\)=\s*$", re.MULTILINE)
DIRECTIVE_LABEL = re.compile(r"^:(?:label|name):\s*([\w-]+)\s*$", re.MULTILINE)
# A reference to a label in prose form, whatever the label: "equation (eq-x)", "eq. (x)".
LABEL_REFERENCE = re.compile(r"\b(?:equations?|eqs?\.)\s*\(\s*[\w-]+\s*\)", re.IGNORECASE)
# The usual prefixes of MyST labels: eq-, fig-, sec-, tab-.
PREFIXED_LABEL = re.compile(r"(?<![\w-])(?:eq|fig|sec|tab)-[a-z0-9]")


def defined_labels(nb) -> set[str]:
    labels = set()
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for pattern in (EQUATION_LABEL, TARGET, DIRECTIVE_LABEL):
                labels.update(pattern.findall(cell.source))
        name = cell.metadata.get("mystnb", {}).get("figure", {}).get("name")
        if name:
            labels.add(name)
    return labels


def label_mentions(code: str, labels: set[str]) -> list[str]:
    """Lines of ``code`` that name a label of the book's sources or refer to one."""
    # a label that is one plain word ("crossings") is also just a word, so only hyphenated
    # labels are looked for by name; the prose references below catch the rest
    named_labels = [label for label in labels if "-" in label]
    found = []
    for line in code.splitlines():
        named = [
            label for label in named_labels
            if re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", line)
        ]
        if named or LABEL_REFERENCE.search(line) or PREFIXED_LABEL.search(line):
            found.append(line.strip())
    return found


def png_size_and_dpi(data: bytes) -> tuple[int, int, float | None]:
    """Width and height in pixels, and the resolution of the pHYs chunk (None without one)."""
    width, height = struct.unpack(">II", data[16:24])  # IHDR comes first
    position, dpi = 8, None
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"pHYs":
            per_unit_x, _, unit = struct.unpack(">IIB", data[position + 8 : position + 17])
            dpi = per_unit_x * 0.0254 if unit == 1 else None
            break
        if kind == b"IDAT":
            break
        position += 12 + length
    return width, height, dpi


# ---------------------------------------------------------------------------- the checkers


def test_long_lines_finds_only_the_long_ones():
    assert long_lines("x" * 88 + "\nshort", 88) == []
    assert long_lines("ok\n" + "y" * 89, 88) == ["89: " + "y" * 89]


def test_fenced_code_reads_only_the_blocks():
    markdown = "\n".join([
        "prose " + "p" * 120,
        "```python", "print(1)", "```",
        "````{note}", "a note's prose", "```bash", "echo nested", "```", "````",
        "~~~", "plain", "~~~",
    ])
    assert fenced_code(markdown) == ["print(1)", "plain"]


def test_label_mentions_catches_labels_and_references():
    labels = {"eq-axis-swap", "cpb-log", "crossings"}
    code = "\n".join([
        "x = 1  # equation (eq-axis-swap)",
        "y = 2  # see cpb-log",
        "z = 3  # eq. (anything)",
        "w = 4  # the axis swap, equation above",
        "f = 5  # fig-reference-points",
        "q = 6  # frequency-domain, cpb-logarithm",
        "c = 7  # the crossings r_jk above",
    ])
    assert label_mentions(code, labels) == [
        "x = 1  # equation (eq-axis-swap)",
        "y = 2  # see cpb-log",
        "z = 3  # eq. (anything)",
        "f = 5  # fig-reference-points",
    ]


def test_png_size_and_dpi_reads_the_header(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(3, 1), dpi=120)
    figure.savefig(tmp_path / "f.png")
    plt.close(figure)
    width, height, dpi = png_size_and_dpi((tmp_path / "f.png").read_bytes())
    assert (width, height) == (360, 120) and dpi == pytest.approx(120, abs=0.1)


# ---------------------------------------------------------------------------- widths


@notebook_param
def test_code_fits_88_columns(path):
    wide = []
    for index, cell in enumerate(_read(path).cells):
        if cell.cell_type == "code":
            hidden = HIDING_TAGS & set(cell.metadata.get("tags", []))
            limit = MAX_HIDDEN_CODE_COLUMNS if hidden else MAX_CODE_COLUMNS
            wide += [f"cell {index} (at most {limit}), {line}"
                     for line in long_lines(cell.source, limit)]
        elif cell.cell_type == "markdown":  # code blocks in the prose
            code = "\n".join(fenced_code(cell.source))
            wide += [f"cell {index}, {line}" for line in long_lines(code, MAX_CODE_COLUMNS)]
    assert not wide, f"{path.name}: code lines too wide for the page:\n" + "\n".join(wide)


@page_param
def test_book_page_code_blocks_fit_88_columns(path):
    wide = long_lines("\n".join(fenced_code(path.read_text(encoding="utf-8"))), MAX_CODE_COLUMNS)
    assert not wide, f"{path.name}: code lines over {MAX_CODE_COLUMNS} columns:\n" + "\n".join(wide)


@notebook_param
def test_printed_output_fits_100_columns(path):
    wide = [
        f"cell {index}, {line}"
        for index, cell in _code_cells(_read(path))
        for output in cell.outputs
        for line in long_lines(printed_text(output), MAX_OUTPUT_COLUMNS)
    ]
    assert not wide, (
        f"{path.name}: printed lines over {MAX_OUTPUT_COLUMNS} columns (shorten the table or wrap the "
        f"text, then re-execute):\n" + "\n".join(wide)
    )


# ---------------------------------------------------------------------------- comments


@notebook_param
def test_code_names_no_labels_of_the_book(path):
    nb = _read(path)
    labels = defined_labels(nb)
    mentions = [
        f"cell {index}: {line}"
        for index, cell in _code_cells(nb)
        for line in label_mentions(cell.source, labels)
    ]
    assert not mentions, (
        f"{path.name}: code that names a label of the book's source; say what the code does "
        f"instead (e.g. 'the axis swap, equation above'):\n" + "\n".join(mentions)
    )


def test_labels_are_found_in_the_chapters():
    """The label check has something to look for: the chapters define their equation labels."""
    nb = _read(REPO_ROOT / "notebooks" / "02_grid_sampling.ipynb")
    assert {"eq-linear-interp", "eq-axis-swap", "fig-axis-swap"} <= defined_labels(nb)


# ---------------------------------------------------------------------------- figures


def _image_outputs(cell) -> list:
    return [output for output in cell.outputs if set(IMAGE_TYPES) & set(output.get("data", {}))]


@notebook_param
def test_every_image_is_a_captioned_figure(path):
    nb = _read(path)
    problems, names = [], []
    for index, cell in _code_cells(nb):
        figure = cell.metadata.get("mystnb", {}).get("figure")
        images = _image_outputs(cell)
        displays = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]
        if images and not figure:
            problems.append(f"cell {index}: an image without mystnb.figure metadata")
        if figure:
            names.append(figure.get("name"))
            if len(str(figure.get("caption", "")).split()) < 8:
                problems.append(f"cell {index}: the caption must say what to see: {figure.get('caption')!r}")
            if not re.fullmatch(r"fig-[a-z0-9-]+", str(figure.get("name"))):
                problems.append(f"cell {index}: figure name {figure.get('name')!r} is not fig-...")
            # myst-nb wraps every display output of the cell in the figure: exactly one, the image
            if cell.outputs and (len(displays) != 1 or len(images) != 1):
                problems.append(
                    f"cell {index}: {len(displays)} displays and {len(images)} images under one caption"
                )
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
    assert len(names) == len(set(names)), f"{path.name}: figure names used twice: {names}"


def test_figure_names_are_unique_across_the_book():
    names = [
        cell.metadata["mystnb"]["figure"]["name"]
        for path in NOTEBOOKS
        for cell in _read(path).cells
        if cell.metadata.get("mystnb", {}).get("figure", {}).get("name")
    ]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)


RC_SETTING = re.compile(r"""["'](figure\.dpi|font\.size)["']\s*[:\]]\s*=?\s*([0-9.]+)""")
FIGSIZE = re.compile(r"figsize\s*=\s*\(\s*([0-9.]+)\s*,")
# a font size given in code, as a keyword (fontsize=8) or an rcParams key ("legend.fontsize": 8)
SMALL_FONT = re.compile(
    r"""(?:\b(?:fontsize|labelsize|titlesize)\s*=|["'][\w.]*(?:fontsize|labelsize|titlesize)["']\s*:)"""
    r"""\s*(?:([0-9.]+)\b|["'](?:xx-small|x-small|small|smaller)["'])"""
)


def small_fonts(code: str) -> list[str]:
    """Font sizes below MIN_FONT_SIZE (or named smaller than the default) asked for in ``code``."""
    return [
        match.group(0)
        for match in SMALL_FONT.finditer(code)
        if match.group(1) is None or float(match.group(1)) < MIN_FONT_SIZE
    ]


def test_small_fonts_finds_keywords_and_rc_keys():
    code = 'ax.legend(fontsize=8)\nplt.rcParams["legend.fontsize"] = 12\nbatch_size=4\n'
    code += 'rc = {"xtick.labelsize": 9, "axes.titlesize": 10}\nax.set_title(t, fontsize="small")'
    assert small_fonts(code) == ["fontsize=8", '"xtick.labelsize": 9', 'fontsize="small"']


@notebook_param
def test_figures_are_drawn_for_the_page(path):
    nb = _read(path)
    code = "\n".join(cell.source for _, cell in _code_cells(nb))
    settings = dict(RC_SETTING.findall(code))
    if not any(_image_outputs(cell) for _, cell in _code_cells(nb)) and "plt." not in code:
        pytest.skip(f"{path.name} draws no figure")
    assert float(settings.get("figure.dpi", 0)) >= MIN_FIGURE_DPI, (
        f"{path.name}: set plt.rcParams 'figure.dpi' to {MIN_FIGURE_DPI} or more in the setup cell"
    )
    assert float(settings.get("font.size", 0)) >= MIN_FONT_SIZE, (
        f"{path.name}: set plt.rcParams 'font.size' to {MIN_FONT_SIZE} or more in the setup cell"
    )
    wide = [width for width in FIGSIZE.findall(code) if float(width) > MAX_FIGURE_INCHES]
    assert not wide, f"{path.name}: figures wider than {MAX_FIGURE_INCHES} in: figsize widths {wide}"
    small = small_fonts(code)
    assert not small, f"{path.name}: text smaller than {MIN_FONT_SIZE} pt: {small}"


@notebook_param
def test_committed_images_are_sharp_and_fit_the_page(path):
    problems = []
    for index, cell in _code_cells(_read(path)):
        for output in _image_outputs(cell):
            data = output["data"].get("image/png")
            if data is None:
                continue
            width, _, dpi = png_size_and_dpi(base64.b64decode(data))
            if dpi is None or dpi < MIN_FIGURE_DPI - 0.5:
                problems.append(f"cell {index}: drawn at {dpi} dpi")
            elif width / dpi > MAX_IMAGE_INCHES:
                problems.append(f"cell {index}: {width / dpi:.1f} inches wide")
    assert not problems, (
        f"{path.name}: images that will not read at page width (re-execute after fixing the "
        f"figure):\n" + "\n".join(problems)
    )
