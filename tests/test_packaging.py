"""The project's metadata agrees with itself: one dependency list, one version, one URL."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

import deform_attn

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = _pyproject()["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_name(r) for r in extra}

    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = set()
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):  # the pip section
            listed |= {_name(r) for r in entry["pip"] if not r.startswith("-e")}
        elif _name(entry) not in {"python", "pip"}:
            listed.add(CONDA_NAMES.get(_name(entry), _name(entry)))
    assert listed == declared, f"only in environment.yml: {listed - declared}; only in pyproject: {declared - listed}"


def test_environment_yml_installs_the_package_itself_from_pip():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(e["pip"] for e in environment["dependencies"] if isinstance(e, dict))
    assert "-e ." in pip_section


def test_torch_is_not_pinned_in_the_package_metadata():
    torch_requirements = [r for r in _pyproject()["project"]["dependencies"] if _name(r) == "torch"]
    assert torch_requirements, "torch must be a dependency"
    assert all("==" not in r and "<" not in r for r in torch_requirements), torch_requirements


def test_versions_agree():
    version = _pyproject()["project"]["version"]
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert deform_attn.__version__ == version == str(citation["version"])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)


def test_citation_repository_matches_the_book_config():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["repository-code"] == config["repository"]["url"]
