"""Structural checks of the notebooks in notebooks/ (fast: nothing is executed here).

Executing the notebooks is a separate pytest run (nbval):

    pytest --nbval-lax --nbval-current-env --sanitize-with tests/nbval_sanitize.cfg notebooks/

which re-runs every notebook and compares the outputs of the cells tagged ``nbval-check-output``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from sync_repository_url import colab_requirements, problems, read_repository  # noqa: E402

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_NOTEBOOK_BYTES = 1_500_000
ISO_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")
VOLATILE_METADATA_KEYS = {"execution", "ExecuteTime", "papermill", "widgets", "timestamp"}


def _toc_files(entries) -> list[str]:
    """Every ``file:`` in a (nested) _toc.yml structure, in order."""
    found = []
    if isinstance(entries, dict):
        for key, value in entries.items():
            if key in ("file", "root"):
                found.append(value)
            else:
                found.extend(_toc_files(value))
    elif isinstance(entries, list):
        for entry in entries:
            found.extend(_toc_files(entry))
    return found


def _toc() -> list[str]:
    return _toc_files(yaml.safe_load((REPO_ROOT / "_toc.yml").read_text(encoding="utf-8")))


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _walk_keys(tree):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield key
            yield from _walk_keys(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _walk_keys(value)


notebook_param = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
# the heading, in a markdown cell of its own, of the worked solutions after the exercises
SOLUTIONS_HEADING = "### Solutions"


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


def test_every_toc_entry_exists():
    missing = [
        entry
        for entry in _toc()
        if not any((REPO_ROOT / f"{entry}{suffix}").is_file() for suffix in ("", ".md", ".ipynb", ".rst"))
    ]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"


@notebook_param
def test_notebook_is_in_toc(path):
    entry = path.relative_to(REPO_ROOT).with_suffix("").as_posix()
    assert entry in _toc(), f"{path.name} is not listed in _toc.yml (expected an entry `file: {entry}`)"


@notebook_param
def test_notebook_name_is_numbered(path):
    assert re.fullmatch(r"\d{2}_[a-z0-9_]+\.ipynb", path.name), f"{path.name}: expected NN_topic.ipynb"


@notebook_param
def test_size_cap(path):
    size = path.stat().st_size
    assert size <= MAX_NOTEBOOK_BYTES, f"{path.name} is {size / 1e6:.2f} MB, more than {MAX_NOTEBOOK_BYTES / 1e6} MB"


@notebook_param
def test_executed_in_order(path):
    counts = [cell.execution_count for cell in _code_cells(_read(path))]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..{len(counts)}; "
        f"re-run it top to bottom with `python scripts/execute_notebooks.py {path.relative_to(REPO_ROOT)}`"
    )


@notebook_param
def test_no_error_outputs(path):
    for index, cell in enumerate(_read(path).cells):
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"{path.name}, cell {index}: {output.ename}: {output.evalue}"
            text = output.get("text", "") if output.output_type == "stream" else ""
            assert "Traceback (most recent call last)" not in text, f"{path.name}, cell {index}: traceback in output"


@notebook_param
def test_no_timestamps_in_metadata(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    metadata = [nb.get("metadata", {})] + [cell.get("metadata", {}) for cell in nb["cells"]]
    metadata += [out.get("metadata", {}) for cell in nb["cells"] for out in cell.get("outputs", [])]
    for tree in metadata:
        volatile = VOLATILE_METADATA_KEYS & set(_walk_keys(tree))
        assert not volatile, f"{path.name}: volatile metadata {sorted(volatile)}; run scripts/execute_notebooks.py"
        assert not ISO_TIMESTAMP.search(json.dumps(tree)), f"{path.name}: a timestamp in metadata {tree}"


@notebook_param
def test_kernel_is_python3(path):
    assert _read(path).metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"


@notebook_param
def test_badge_and_install_cell_match_repository_url(path):
    url, branch = read_repository(REPO_ROOT)
    found = problems(_read(path), path.relative_to(REPO_ROOT).as_posix(), url, branch)
    assert not found, "\n".join(found) + "\nrun `python scripts/sync_repository_url.py`"


@notebook_param
def test_starts_with_badge_then_title(path):
    first = _read(path).cells[0]
    lines = [line for line in first.source.splitlines() if line.strip()]
    assert lines[0].startswith("[![Open In Colab]"), f"{path.name}: the first line must be the Colab badge"
    assert len(lines) > 1 and re.match(r"# \S", lines[1]), f"{path.name}: the badge must be followed by the `# Title`"


@notebook_param
def test_install_cell_is_second_and_hidden(path):
    second = _read(path).cells[1]
    assert second.cell_type == "code" and second.source.startswith("# In Colab, install the package")
    assert "remove-cell" in second.metadata.get("tags", [])


@notebook_param
def test_ends_with_summary_and_exercises(path):
    cells = _read(path).cells
    headings = [
        (index, line.strip())
        for index, cell in enumerate(cells)
        if cell.cell_type == "markdown"
        for line in cell.source.splitlines()
        if line.startswith("## ")
    ]
    names = [heading for _, heading in headings]
    assert names[-2:] == ["## Summary", "## Exercises"], f"{path.name}: the last sections must be Summary, Exercises; got {names[-2:]}"
    summary_cell = headings[-2][0]
    solutions = next(
        (index for index, cell in enumerate(cells)
         if cell.cell_type == "markdown" and cell.source.strip() == SOLUTIONS_HEADING),
        len(cells),
    )
    assert solutions > headings[-1][0], f"{path.name}: the solutions come after the exercises"
    assert all(cell.cell_type == "markdown" for cell in cells[summary_cell:solutions]), f"{path.name}: code after the Summary"
    exercises = "\n".join(cell.source for cell in cells[headings[-1][0]:solutions]).split("## Exercises", 1)[1]
    count = len(re.findall(r"^(?:\d+\.|[-*]) ", exercises, flags=re.MULTILINE))
    assert 2 <= count <= 4, f"{path.name}: {count} exercises; expected 2 to 4 top-level list items"


@notebook_param
def test_every_exercise_has_a_hidden_solution(path):
    """After the exercises, ``### Solutions``: one dropdown per exercise, in order, and code
    cells (the worked computations) hidden behind a toggle in the book."""
    cells = _read(path).cells
    start = next(
        (index for index, cell in enumerate(cells)
         if cell.cell_type == "markdown" and cell.source.strip() == SOLUTIONS_HEADING),
        None,
    )
    assert start is not None, f"{path.name}: no `{SOLUTIONS_HEADING}` cell after the exercises"
    exercises = "\n".join(cell.source for cell in cells[:start]).rsplit("## Exercises", 1)[1]
    count = len(re.findall(r"^\d+\. ", exercises, flags=re.MULTILINE))
    titles = [
        match
        for cell in cells[start + 1:]
        if cell.cell_type == "markdown"
        for match in re.findall(r"^:::\{admonition\} Solution to exercise (\d+)$", cell.source, flags=re.MULTILINE)
    ]
    assert titles == [str(k) for k in range(1, count + 1)], f"{path.name}: solutions {titles} for {count} exercises"
    for cell in cells[start + 1:]:
        if cell.cell_type == "markdown":
            assert ":class: dropdown" in cell.source, f"{path.name}: a solution that is not a dropdown"
        else:
            assert "hide-cell" in cell.metadata.get("tags", []), f"{path.name}: a solution's code cell without hide-cell"


@notebook_param
def test_imports_the_package(path):
    sources = "\n".join(cell.source for cell in _code_cells(_read(path)))
    assert re.search(r"^\s*(from deform_attn\b|import deform_attn\b)", sources, flags=re.MULTILINE), (
        f"{path.name}: the chapter must import its piece from deform_attn and compare"
    )


@notebook_param
def test_has_a_figure(path):
    outputs = [output for cell in _code_cells(_read(path)) for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) or "image/svg+xml" in output.get("data", {}) for output in outputs), (
        f"{path.name}: no figure among the outputs"
    )


@notebook_param
def test_some_outputs_are_checked_by_nbval(path):
    tags = [tag for cell in _code_cells(_read(path)) for tag in cell.metadata.get("tags", [])]
    assert "nbval-check-output" in tags, f"{path.name}: no cell tagged nbval-check-output, so nbval compares nothing"


# what a chapter may import only if its Colab install cell installs it: (module, extra, requirement)
COLAB_NEEDS = (
    (r"^\s*(import|from) deformable_attention\b", None, "deformable-attention==0.0.20"),
    (r"deform_attn\.experiments|from deform_attn import experiments", "experiments", None),
)


@notebook_param
def test_colab_install_cell_installs_what_the_chapter_imports(path):
    """A chapter opened alone in Colab has only Colab's packages and what its install cell adds."""
    nb = _read(path)
    extras, requires = colab_requirements(nb)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    for pattern, extra, requirement in COLAB_NEEDS:
        if re.search(pattern, code, flags=re.M):
            assert extra is None or extra in extras, f"{path.name}: imports it but its install cell lacks [{extra}]"
            assert requirement is None or requirement in requires, f"{path.name}: needs {requirement} in Colab"


@notebook_param
def test_markdown_has_no_control_characters(path):
    """A tab or other control character in prose is almost always an escape gone wrong
    (``"\\times"`` written in a Python string becomes a tab and ``imes``)."""
    for index, cell in enumerate(_read(path).cells):
        if cell.cell_type == "markdown":
            found = re.findall(r"[\x00-\x09\x0b-\x1f\x7f]", cell.source)
            assert not found, f"{path.name}, cell {index}: control characters {sorted({hex(ord(c)) for c in found})}"


def test_chapter_headers_come_from_the_data():
    """Each chapter opens with its place in the layer, its prerequisites and its measured run time,
    written by scripts/chapter_headers.py from deform_attn.diagram and notebooks/run_times.json."""
    from conftest import load_script

    headers = load_script(REPO_ROOT / "scripts" / "chapter_headers.py")
    run_times = headers.load_run_times()
    stems = sorted(path.stem for path in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(headers.PREREQUISITES) == stems
    assert sorted(run_times["chapters"]) == stems
    problems = []
    for stem in stems:
        nb = nbformat.read(REPO_ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
        problems += headers.header_problems(nb, stem, run_times)
    assert not problems, problems
