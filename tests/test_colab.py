"""A Colab-like run of every notebook: the package as a built wheel, each notebook alone.

In Colab a notebook is opened on its own, with no repository around it, and the package comes from
``pip install``. This test reproduces that without a network:

1. build a wheel of the package (``pip wheel --no-deps --no-build-isolation``) from a copy of the
   repository, so that nothing is written into the working tree (conftest.package_wheel);
2. install it, non-editable, into a temporary target folder (``pip install --no-deps --target``);
3. copy each notebook **alone** into an empty temporary folder and execute it there with nbclient,
   in a kernel whose ``PYTHONPATH`` is the target folder, so the wheel's copy of ``deform_attn``
   shadows the editable install of the development environment. A cell injected after the install
   cell asserts that ``deform_attn`` was imported from the target folder.

This catches what the in-repository run cannot: a notebook that reads a file relative to the
repository, or package data missing from the wheel. Notebooks run with ``DEFORM_ATTN_QUICK=1``.
The install cell itself does nothing outside Colab; tests/test_notebooks.py checks its URL, and
tests/test_colab_bare.py runs it, in an environment holding only Colab's own packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def installed_wheel(package_wheel, tmp_path_factory) -> Path:
    """The target folder holding the wheel's ``deform_attn`` (the wheel: conftest.package_wheel)."""
    target = tmp_path_factory.mktemp("colab") / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(package_wheel)], check=True)
    assert (target / "deform_attn" / "__init__.py").is_file(), f"the wheel did not install deform_attn into {target}"
    return target


def _check_import_cell(target: Path) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(
        "import os, deform_attn\n"
        f"_target = os.path.realpath({str(target)!r})\n"
        "assert os.path.realpath(deform_attn.__file__).startswith(_target + os.sep), (\n"
        "    f'deform_attn came from {deform_attn.__file__}, not from the installed wheel in {_target}')\n"
        "assert os.listdir('.') == [], f'the notebook does not run alone: {os.listdir(\".\")}'"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_from_the_wheel_alone(path, installed_wheel, tmp_path):
    nb = nbformat.read(path, as_version=4)
    code_positions = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    assert code_positions, f"{path.name} has no code"
    # right after the install cell, before anything else imports the package
    nb.cells.insert(code_positions[0] + 1, _check_import_cell(installed_wheel))
    folder = tmp_path / "alone"
    folder.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(installed_wheel),
        "DEFORM_ATTN_QUICK": "1",
    }
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        record_timing=False,
        resources={"metadata": {"path": str(folder)}},
    )
    client.execute(env=env, cwd=str(folder))  # raises CellExecutionError, with the traceback, on failure
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
