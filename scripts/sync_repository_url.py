"""Rewrite every notebook's Colab badge and install cell from ``_config.yml``'s repository URL.

The repository URL lives in one place, ``repository.url`` (and ``repository.branch``) in
``_config.yml``. Each notebook repeats it twice: in the *Open in Colab* badge of its first cell and
in the install command of its first code cell. The badge opens the chapter's Colab copy,
``colab/NN_topic.ipynb``, which scripts/make_colab_copies.py writes from the chapter (Colab renders
plain Markdown, not the book's MyST). The install command also installs what the chapter needs
beyond Colab's own packages: the package extras and further requirements listed in the notebook's
metadata, ``{"deform_attn": {"colab_extras": [...], "colab_requires": [...]}}``.
After changing the URL or those lists, run

    python scripts/sync_repository_url.py            # rewrite the notebooks
    python scripts/sync_repository_url.py --check    # exit 1 if any notebook is out of date
    python scripts/make_colab_copies.py              # then bring the Colab copies up to date

``tests/test_notebooks.py`` imports the helpers below, so the test and the rewrite cannot disagree.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path, PurePosixPath

import nbformat
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = "notebooks"
COLAB_DIR = "colab"

BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_PATTERN = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
INSTALL_MARKER = "# In Colab, install the package"
INSTALL_TEMPLATE = """\
# In Colab, install the package; everywhere else this cell does nothing.
import sys
if "google.colab" in sys.modules:
    import subprocess
    packages = [
{packages}
    ]
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *packages], check=True)"""
REMOVE_TAG = "remove-cell"


def read_repository(root: Path = REPO_ROOT) -> tuple[str, str]:
    """``(url, branch)`` from ``root/_config.yml``; the URL without a trailing slash or ``.git``."""
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
    repository = config.get("repository") or {}
    url = str(repository.get("url", "")).rstrip("/")
    url = url[: -len(".git")] if url.endswith(".git") else url
    if not re.fullmatch(r"https://github\.com/[^/]+/[^/]+", url):
        raise ValueError(f"_config.yml: repository.url must be https://github.com/<owner>/<name>, got {url!r}")
    return url, str(repository.get("branch", "main"))


def colab_url(url: str, branch: str, notebook: str) -> str:
    """Colab's address for ``notebook`` (a path relative to the repository root) on ``branch``."""
    owner_and_name = url.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{owner_and_name}/blob/{branch}/{notebook}"


def colab_copy_relpath(notebook: str) -> str:
    """The Colab copy of a chapter: ``notebooks/NN_topic.ipynb`` -> ``colab/NN_topic.ipynb``."""
    return f"{COLAB_DIR}/{PurePosixPath(notebook).name}"


def badge(url: str, branch: str, notebook: str) -> str:
    """The Markdown of the *Open in Colab* badge for ``notebook``: it opens the Colab copy."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(url, branch, colab_copy_relpath(notebook))})"


def colab_requirements(nb: nbformat.NotebookNode) -> tuple[list[str], list[str]]:
    """``(extras, further requirements)`` a chapter needs in Colab, from its metadata."""
    listed = nb.metadata.get("deform_attn", {})
    return list(listed.get("colab_extras", [])), list(listed.get("colab_requires", []))


def install_source(url: str, extras: list[str] | tuple = (), requires: list[str] | tuple = ()) -> str:
    """The exact source of the install cell (the notebook's first code cell)."""
    extra = f"[{','.join(extras)}]" if extras else ""
    packages = "\n".join(f'        "{package}",' for package in [f"deform-attn{extra} @ git+{url}", *requires])
    return INSTALL_TEMPLATE.format(packages=packages)


def notebook_relpath(path: Path, root: Path = REPO_ROOT) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def problems(nb: nbformat.NotebookNode, relpath: str, url: str, branch: str) -> list[str]:
    """What is out of date in a notebook; empty when badge and install cell agree with the URL."""
    found = []
    cells = nb.cells
    if not cells or cells[0].cell_type != "markdown":
        return [f"{relpath}: the first cell must be Markdown with the Colab badge"]
    badges = BADGE_PATTERN.findall(cells[0].source)
    if badges != [badge(url, branch, relpath)]:
        found.append(f"{relpath}: first cell's Colab badge is {badges or 'missing'}, expected {badge(url, branch, relpath)}")
    code_cells = [cell for cell in cells if cell.cell_type == "code"]
    if not code_cells or not code_cells[0].source.startswith(INSTALL_MARKER):
        found.append(f"{relpath}: the first code cell must be the Colab install cell")
    else:
        install = code_cells[0]
        if install.source != install_source(url, *colab_requirements(nb)):
            found.append(f"{relpath}: the install cell does not install from {url} what the chapter needs")
        if REMOVE_TAG not in install.get("metadata", {}).get("tags", []):
            found.append(f"{relpath}: the install cell lacks the {REMOVE_TAG!r} tag")
    return found


def sync(nb: nbformat.NotebookNode, relpath: str, url: str, branch: str) -> None:
    """Rewrite the badge and the install cell in place (inserting them where missing)."""
    expected_badge = badge(url, branch, relpath)
    if nb.cells and nb.cells[0].cell_type == "markdown":
        first = nb.cells[0]
        if BADGE_PATTERN.search(first.source):
            first.source = BADGE_PATTERN.sub(lambda _: expected_badge, first.source, count=1)
        else:
            first.source = expected_badge + "\n\n" + first.source
    else:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(expected_badge))
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    if code_cells and code_cells[0].source.startswith(INSTALL_MARKER):
        install = code_cells[0]
    else:
        install = nbformat.v4.new_code_cell(execution_count=None)
        nb.cells.insert(1, install)
    install.source = install_source(url, *colab_requirements(nb))
    tags = install.metadata.setdefault("tags", [])
    if REMOVE_TAG not in tags:
        tags.append(REMOVE_TAG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report out-of-date notebooks and exit 1; write nothing")
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to process (default: notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    url, branch = read_repository()
    paths = args.notebooks or sorted((REPO_ROOT / NOTEBOOK_DIR).glob("*.ipynb"))
    stale = []
    for path in paths:
        relpath = notebook_relpath(path)
        nb = nbformat.read(path, as_version=4)
        found = problems(nb, relpath, url, branch)
        if not found:
            continue
        stale.extend(found)
        if not args.check:
            sync(nb, relpath, url, branch)
            nbformat.write(nb, path)
            print(f"updated {relpath}")
    if stale and not args.check:
        print("now run `python scripts/make_colab_copies.py` to update the Colab copies")
    if args.check:
        for line in stale:
            print(line, file=sys.stderr)
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
