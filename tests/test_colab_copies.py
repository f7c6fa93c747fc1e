"""The Colab copies in colab/: in sync with the chapters, and free of MyST-only syntax.

The badge of every chapter opens ``colab/NN_topic.ipynb``, which scripts/make_colab_copies.py writes
from ``notebooks/NN_topic.ipynb`` with the book's MyST constructs written out as plain Markdown
(Colab renders no roles, directives or labels). Nothing here executes a notebook.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import make_colab_copies as colab  # noqa: E402
from sync_repository_url import BADGE_PATTERN, badge, read_repository  # noqa: E402

CHAPTERS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
MAX_COPY_BYTES = 1_000_000

# What Colab would show raw: MyST syntax that plain Markdown does not have. Independent of the
# script's own patterns, so that the test is a second opinion on its output.
MYST_ONLY = {
    "role": re.compile(r"\{[A-Za-z][\w:.+-]*\}`"),
    "directive": re.compile(r"^[ \t]*(?:`{3,}|~{3,}|:{3,})[ \t]*\{[^}\s]+\}", re.MULTILINE),
    "colon fence": re.compile(r"^[ \t]*:{3,}[ \t]*$", re.MULTILINE),
    "equation label": re.compile(r"\$\$[ \t]*\([^()\s]+\)"),
    "target": re.compile(r"^[ \t]*\([^()\s]+\)=[ \t]*$", re.MULTILINE),
    "comment": re.compile(r"^%", re.MULTILINE),
    "block break": re.compile(r"^\+\+\+[ \t]*$", re.MULTILINE),
}


def myst_constructs(nb: nbformat.NotebookNode) -> dict[str, int]:
    """How many MyST-only constructs a reader of ``nb`` in Colab would see raw, by kind.

    Markdown is searched outside code blocks; a figure caption counts as hidden when it lives only
    in the metadata (``mystnb.figure.caption``) of a code cell with a displayed output, with no
    Markdown cell after it showing it.
    """
    counts = dict.fromkeys([*MYST_ONLY, "hidden caption"], 0)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            prose = colab._outside_code_fences(cell.source)
            for kind, pattern in MYST_ONLY.items():
                counts[kind] += len(pattern.findall(prose))
        elif colab.figure_options(cell).get("caption") and colab.figure_outputs(cell):
            following = nb.cells[index + 1] if index + 1 < len(nb.cells) else None
            shown = following is not None and following.cell_type == "markdown" and following.source.startswith("**Fig.")
            counts["hidden caption"] += 0 if shown else 1
    return counts


def _copy(chapter: Path) -> nbformat.NotebookNode:
    path = REPO_ROOT / "colab" / chapter.name
    if not path.is_file():
        pytest.fail(f"{path.relative_to(REPO_ROOT)} is missing: run `python scripts/make_colab_copies.py`")
    return nbformat.read(path, as_version=4)


chapter_param = pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.name for p in CHAPTERS])


def test_copies_are_in_sync_with_the_chapters():
    found = colab.out_of_date(REPO_ROOT)
    assert not found, "\n".join(found) + "\nrun `python scripts/make_colab_copies.py`"


@chapter_param
def test_copy_has_no_myst_only_syntax(chapter):
    counts = {kind: count for kind, count in myst_constructs(_copy(chapter)).items() if count}
    assert not counts, f"colab/{chapter.name} shows raw MyST to a Colab reader: {counts}"


@chapter_param
def test_copy_keeps_the_code_and_its_outputs(chapter):
    original = [cell for cell in nbformat.read(chapter, as_version=4).cells if cell.cell_type == "code"]
    copied = [cell for cell in _copy(chapter).cells if cell.cell_type == "code"]
    assert [c.source for c in copied] == [c.source for c in original]
    assert [c.outputs for c in copied] == [c.outputs for c in original]
    assert [c.execution_count for c in copied] == [c.execution_count for c in original]


@chapter_param
def test_copy_badge_opens_the_copy_itself(chapter):
    url, branch = read_repository(REPO_ROOT)
    first = _copy(chapter).cells[0].source
    owner_and_name = url.removeprefix("https://github.com/")
    expected = f"https://colab.research.google.com/github/{owner_and_name}/blob/{branch}/colab/{chapter.name}"
    assert BADGE_PATTERN.findall(first) == [badge(url, branch, f"notebooks/{chapter.name}")]
    assert first.split("\n", 1)[0].endswith(f"({expected})")


@chapter_param
def test_copy_size_cap(chapter):
    size = (REPO_ROOT / "colab" / chapter.name).stat().st_size
    assert size <= MAX_COPY_BYTES, f"colab/{chapter.name} is {size / 1e6:.2f} MB, more than {MAX_COPY_BYTES / 1e6} MB"


def test_equations_are_tagged_in_book_order():
    """Labelled equations carry \\tag{1}, \\tag{2}, ... across the chapters, as the book numbers them."""
    tags = []
    for chapter in CHAPTERS:
        for cell in _copy(chapter).cells:
            if cell.cell_type == "markdown":
                tags += [int(number) for number in re.findall(r"\\tag\{(\d+)\}", cell.source)]
    labelled = sum(len(colab.LABELLED_MATH.findall(cell.source)) for chapter in CHAPTERS
                   for cell in nbformat.read(chapter, as_version=4).cells if cell.cell_type == "markdown")
    assert tags == list(range(1, labelled + 1))


def test_colab_folder_is_not_part_of_the_book():
    config = yaml.safe_load((REPO_ROOT / "_config.yml").read_text(encoding="utf-8"))
    assert "colab" in config["exclude_patterns"]


# ---- the conversion itself, on small made-up chapters -------------------------------------------

BIB = r"""
@article{solo2020,
  author = {Hochreiter, Sepp},
  title = {One Author},
  journal = {J},
  year = {2020}
}
@misc{pair2021,
  author = "Schmidhuber, J{\"u}rgen and Kaiser, {\L}ukasz",
  title = {Two {Authors}},
  year = 2021,
  eprint = {2101.00001},
  archiveprefix = {arXiv}
}
@inproceedings{many2019,
  author = {Aäron van den Oord and R{\'e}, Christopher and Third, A.},
  title = {Three},
  booktitle = {Proc.},
  year = {2019}
}
"""


def _book_of(*docs: tuple[str, nbformat.NotebookNode]) -> colab.Book:
    book = colab.Book()
    for doc, nb in docs:
        book.scan_notebook(doc, nb)
    return book


def _convert(markdown: str, *, cells=(), other: str = "# Other chapter\n\n$$\nb\n$$ (eq-other)") -> str:
    other_nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(other)])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# This chapter"), *cells,
                                         nbformat.v4.new_markdown_cell(markdown)])
    book = _book_of(("notebooks/01_other", other_nb), ("notebooks/02_this", nb))
    url = "https://github.com/owner/name"
    copy = colab.colab_copy(nb, "notebooks/02_this.ipynb", book, colab.parse_bibtex(BIB), url, "main")
    return "\n\n".join(cell.source for cell in copy.cells if cell.cell_type == "markdown")


def test_bibtex_names_and_accents():
    entries = colab.parse_bibtex(BIB)
    assert [entries[key].names() for key in ("solo2020", "pair2021", "many2019")] == [
        "Hochreiter", "Schmidhuber and Kaiser", "van den Oord et al."]
    assert [p.first for p in entries["pair2021"].authors] == ["Jürgen", "Łukasz"]
    assert entries["many2019"].authors[1].last == "Ré"
    assert entries["pair2021"].year == "2021"
    text = colab.latex_to_text(r"{FlashAttention}: IO-Aware \& {deform\_attn} --- 1--2")
    assert text == "FlashAttention: IO-Aware & deform_attn \u2014 1\u20132"


def test_citations_are_written_out_and_listed():
    text = _convert("A {cite:p}`solo2020,pair2021` and {cite:t}`many2019`.")
    assert "A (Hochreiter, 2020; Schmidhuber and Kaiser, 2021) and van den Oord et al. (2019)." in text
    references = text.split("## References", 1)[1]
    assert references.index("**Hochreiter, 2020.** Sepp Hochreiter. One Author. *J*.") < references.index(
        "**Schmidhuber and Kaiser, 2021.** Jürgen") < references.index("**van den Oord et al., 2019.** Aäron van den Oord")
    assert "[arXiv:2101.00001](https://arxiv.org/abs/2101.00001)" in references


def test_equal_labels_get_a_letter_after_the_year():
    twins = BIB + "@misc{solo2020b,\n  author = {Hochreiter, Sepp},\n  title = {Another},\n  year = {2020}\n}\n"
    labels = colab.citation_labels(colab.parse_bibtex(twins))
    assert labels["solo2020b"] == ("Hochreiter", "2020a") and labels["solo2020"] == ("Hochreiter", "2020b")
    assert labels["pair2021"] == ("Schmidhuber and Kaiser", "2021")


def test_equations_figures_and_pages():
    figure = nbformat.v4.new_code_cell("plot()")
    figure.outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "<Figure>"})]
    figure.metadata["mystnb"] = {"figure": {"caption": "What {eq}`eq-here` looks like.", "name": "fig-here"}}
    text = _convert("$$\na\n$$ (eq-here)\n\nBy {eq}`eq-here`, {eq}`eq-other` and {numref}`fig-here`; "
                    "{numref}`Figure {number} <fig-here>`, {doc}`01_other`, {doc}`see there <01_other>`.",
                    cells=[figure])
    assert "$$\na\n\\tag{2}\n$$" in text  # equation 1 is the other chapter's
    link = "https://colab.research.google.com/github/owner/name/blob/main/colab/01_other.ipynb"
    assert f"By (2), [(1)]({link}) and Fig. 1; Figure 1, [Other chapter]({link}), [see there]({link})." in text
    assert "**Fig. 1.** What (2) looks like." in text


def test_only_shown_captioned_figures_take_a_number():
    """myst-nb makes a figure only of a cell with a displayed output, and Sphinx numbers captioned ones."""

    def figure_cell(name: str, caption: str, shown: bool) -> nbformat.NotebookNode:
        cell = nbformat.v4.new_code_cell("plot()")
        cell.metadata["mystnb"] = {"figure": {"caption": caption, "name": name}}
        if shown:
            cell.outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "<Figure>"})]
        return cell

    cells = [
        figure_cell("fig-not-run", "Not run.", False), figure_cell("fig-bare", "", True), figure_cell("fig-real", "Real.", True)
    ]
    text = _convert("See {numref}`fig-real`.", cells=cells)
    assert "See Fig. 1." in text and "**Fig. 1.** Real." in text
    assert "Not run." not in text
    with pytest.raises(colab.ConversionError, match="fig-not-run"):
        _convert("See {numref}`fig-not-run`.", cells=cells)


def test_admonitions_become_blockquotes():
    text = _convert(
        "```{note}\nFirst {cite:p}`solo2020`.\n\n    indented\n```\n\n"
        ":::{admonition} Why *this*\n:class: tip\nBody.\n:::\n\n"
        "````{warning}\n```python\nx = 1\n```\n````"
    )
    assert "> **Note**\n>\n> First (Hochreiter, 2020).\n>\n>     indented" in text
    assert "> **Why *this***\n>\n> Body." in text
    assert "> **Warning**\n>\n> ```python\n> x = 1\n> ```" in text


def test_dropdowns_stay_folded():
    text = _convert(":::{admonition} Solution to exercise 1\n:class: dropdown\n\nBy {eq}`eq-other`.\n:::")
    link = "https://colab.research.google.com/github/owner/name/blob/main/colab/01_other.ipynb"
    assert f"<details>\n<summary><b>Solution to exercise 1</b></summary>\n\nBy [(1)]({link}).\n\n</details>" in text


def test_glued_values_come_from_the_outputs():
    glued = nbformat.v4.new_code_cell("glue('loss', 0.12345, display=False)")
    glued.outputs = [nbformat.v4.new_output(
        "display_data",
        data={f"{colab.GLUE_PREFIX}text/plain": "0.12345"},
        metadata={"scrapbook": {"name": "loss", "mime_prefix": colab.GLUE_PREFIX}},
    )]
    text = _convert("Loss {glue:text}`loss:.2f`, raw {glue:}`loss`.", cells=[glued])
    assert "Loss 0.12, raw 0.12345." in text


@pytest.mark.parametrize(
    "markdown", ["{unknownrole}`x`", "```{tableofcontents}\n```", "{eq}`no-such-label`", "{cite:p}`nobody`"]
)
def test_what_cannot_be_written_out_stops_the_script(markdown):
    with pytest.raises(colab.ConversionError):
        _convert(markdown)
