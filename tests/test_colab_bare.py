"""Every chapter's Colab copy in an environment that holds only what Colab preinstalls.

tests/test_colab.py runs the chapters from the built wheel, but in the development environment, where
every optional dependency is already installed. A chapter whose install cell forgets a requirement
passes there and fails for a reader. This test goes one step closer to Colab:

1. build the package's wheel (conftest.package_wheel);
2. create one virtual environment for the whole session holding only the packages Colab preinstalls
   that the chapters touch: torch, numpy, matplotlib, pandas and tqdm, plus ipykernel to run them;
3. for each chapter, execute its Colab copy (``colab/NN_topic.ipynb``, what the badge opens) alone
   in an empty folder, in a kernel of that environment driven by nbclient from this one. A cell
   injected first puts a stand-in ``google.colab`` module into ``sys.modules``, so the install cell
   acts as in Colab; its ``git+`` requirement is rewritten to the wheel, extras kept, so it installs
   the package and whatever the chapter's metadata lists from the package index, as Colab would.

torch is pinned to the version of the development environment (in CI, ``PIP_CONSTRAINT`` selects the
local CPU wheel), so nothing large is downloaded. Chapters run with ``DEFORM_ATTN_QUICK=1``.

Without a package index the environment cannot be built: the test is then skipped with the reason,
except in CI (``CI=true``), where it fails, so that CI cannot pass by skipping it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
COLAB_DIR = REPO_ROOT / "colab"
# what Colab brings that the chapters use; everything else must come from the install cell
COLAB_PREINSTALLED = ("torch", "numpy", "matplotlib", "pandas", "tqdm", "ipykernel")
PACKAGE_REQUIREMENT = re.compile(r'"deform-attn(?P<extras>\[[^\]]*\])? @ git\+[^"]+"')
KERNEL_NAME = "colab-bare"
CELL_TIMEOUT_S = 600

FAKE_COLAB = """\
# (test only) make this kernel look like Colab to the install cell
import sys, types
sys.modules["google.colab"] = types.ModuleType("google.colab")"""


def _missing_prerequisite(reason: str) -> None:
    """Skip for a missing prerequisite; in CI (``CI=true``) fail instead, so CI cannot skip the check."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the bare-Colab check must run in CI)", pytrace=False)
    pytest.skip(reason)


def _pip(python: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def _remove_in_background(folder: Path) -> None:
    """Delete ``folder`` in a process of its own: a venv is over a gigabyte in tens of thousands of
    files, and deleting it took up to three minutes on a busy disk."""
    subprocess.Popen(["rm", "-rf", str(folder)], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _bare_env(venv: Path, constraints: Path) -> dict[str, str]:
    """The environment variables of processes of the bare venv: no trace of the outer one."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    # ours pins torch; CI's own (PIP_CONSTRAINT, whitespace-separated) stays in force
    env["PIP_CONSTRAINT"] = " ".join(filter(None, [os.environ.get("PIP_CONSTRAINT", ""), str(constraints)]))
    return env


@pytest.fixture(scope="session")
def bare_colab(package_wheel, tmp_path_factory):
    """``(python, env, kernel_dirs, wheel)``: a virtual environment with only Colab's packages."""
    work = tmp_path_factory.mktemp("colab_bare")
    venv, constraints, kernels = work / "venv", work / "constraints.txt", work / "kernels"
    # the torch of this environment: a wheel pip finds locally (or in its cache), never a download
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = _bare_env(venv, constraints)
    installed = _pip(python, "install", "-q", *COLAB_PREINSTALLED, env=env)
    if installed.returncode != 0:
        _remove_in_background(work)
        _missing_prerequisite(f"cannot build the bare Colab environment (no package index?):\n{installed.stderr[-2000:]}")
    # the install cells fetch from the index too; check that it answers before blaming a chapter
    probe = _pip(python, "download", "-q", "--no-deps", "-d", str(work / "probe"), "einops", env=env)
    if probe.returncode != 0:
        _remove_in_background(work)
        _missing_prerequisite(f"the package index does not answer, so no install cell can run:\n{probe.stderr[-2000:]}")
    spec = kernels / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "bare Colab", "language": "python"}))
    yield python, env, kernels, package_wheel
    _remove_in_background(work)  # nothing to look at afterwards


def colab_run(nb: nbformat.NotebookNode, wheel: Path, venv_prefix: Path) -> nbformat.NotebookNode:
    """The notebook as this test executes it: Colab faked, the package from ``wheel``, a check."""
    nb = copy.deepcopy(nb)
    code_positions = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    assert code_positions, "the chapter has no code"
    install = nb.cells[code_positions[0]]
    install.source, count = PACKAGE_REQUIREMENT.subn(
        lambda match: f'"deform-attn{match["extras"] or ""} @ {wheel.as_uri()}"', install.source
    )
    assert count == 1, f"the first code cell does not install deform-attn from git+:\n{install.source}"
    check = (
        "import os, sys, deform_attn\n"
        f"_prefix = os.path.realpath({str(venv_prefix)!r})\n"
        "assert os.path.realpath(sys.prefix) == _prefix, f'the kernel runs in {sys.prefix}, not {_prefix}'\n"
        "assert os.path.realpath(deform_attn.__file__).startswith(_prefix + os.sep), deform_attn.__file__\n"
        "assert os.listdir('.') == [], f'the notebook does not run alone: {os.listdir(\".\")}'"
    )
    nb.cells.insert(code_positions[0] + 1, nbformat.v4.new_code_cell(check))
    nb.cells.insert(code_positions[0], nbformat.v4.new_code_cell(FAKE_COLAB))
    return nb


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_colab_copy_runs_with_only_colabs_packages(chapter, bare_colab, tmp_path):
    python, env, kernels, wheel = bare_colab
    copy_path = COLAB_DIR / chapter.name
    assert copy_path.is_file(), f"{copy_path.relative_to(REPO_ROOT)} is missing: run `python scripts/make_colab_copies.py`"
    nb = colab_run(nbformat.read(copy_path, as_version=4), wheel, python.parent.parent)
    folder = tmp_path / "alone"
    folder.mkdir()
    km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, record_timing=False)
    # raises CellExecutionError, with the cell's traceback, on the first failing cell; shuts the
    # kernel down either way (with a kernel manager passed in, nbclient would leave it running)
    client.execute(env={**env, "DEFORM_ATTN_QUICK": "1"}, cwd=str(folder), cleanup_kc=True)
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors, f"{copy_path.name}: {errors[0].ename}: {errors[0].evalue}"


@pytest.mark.parametrize("ci", [None, "false", "true"])
def test_without_a_package_index_it_skips_except_in_ci(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci == "true" else pytest.skip.Exception
    with pytest.raises(expected, match="no package index"):
        _missing_prerequisite("no package index")
