"""The book's configuration: nothing measured or dated is typed by hand."""

from __future__ import annotations

import datetime
from pathlib import Path

import yaml
from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]


def _build_year_module():
    return load_script(REPO_ROOT / "book" / "_ext" / "build_year.py")


def test_the_footer_year_is_the_build_year():
    build_year = _build_year_module()
    assert build_year.copyright_line("The authors", datetime.date(2031, 5, 4)) == "2031 The authors"
    assert build_year.copyright_line("A", None).startswith(str(datetime.date.today().year))

    class Config:
        author, copyright = "The deform_attn authors", "1999"

    config = Config()
    build_year._set_copyright(None, config)
    assert config.copyright == f"{datetime.date.today().year} The deform_attn authors"


def test_config_registers_the_extension_and_types_no_year():
    config = yaml.safe_load((REPO_ROOT / "_config.yml").read_text())
    assert "copyright" not in config
    assert config["sphinx"]["local_extensions"] == {"build_year": "book/_ext", "author_year_labels": "book/_ext"}
    assert config["sphinx"]["config"]["bibtex_default_style"] == "author_year"


def test_bibliography_labels_are_the_author_year_citations():
    """The list's labels read like the text's citations (one citation style), from the .bib itself."""
    import sys

    from pybtex.database import parse_file

    sys.path.insert(0, str(REPO_ROOT / "book" / "_ext"))
    try:
        from author_year_labels import AuthorYearLabels, author_year_label
    finally:
        sys.path.pop(0)
    entries = parse_file(str(REPO_ROOT / "book" / "references.bib")).entries
    labels = {key: author_year_label(entry) for key, entry in entries.items()}
    assert labels["xia2022dat"] == "Xia et al., 2022"
    assert all(label[-4:].isdigit() for label in labels.values()), labels
    unique = list(AuthorYearLabels().format_labels(entries.values()))
    assert len(set(unique)) == len(unique)
