"""Sphinx extension: one citation style. The text cites in round brackets, ``(Xia et al., 2022)``
and ``Xia et al. (2022)`` (the ``author_year_round`` referencing style), and the bibliography lists
its entries under the same labels, ``Xia et al., 2022``, sorted by author and year, instead of
pybtex's alphabetic labels (``[XPS+22]``). Selected in ``_config.yml`` by
``bibtex_reference_style`` and ``bibtex_default_style``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sphinxcontrib.bibtex.plugin
from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsortedStyle
from pybtex.style.labels import BaseLabelStyle
from sphinxcontrib.bibtex.style.referencing import BracketStyle
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle

STYLE_NAME = "author_year"
REFERENCE_STYLE_NAME = "author_year_round"


def _surname(person) -> str:
    return " ".join(person.prelast_names + person.last_names)


def author_year_label(entry) -> str:
    """``"Surname, Year"``, ``"Surname and Other, Year"`` or ``"Surname et al., Year"``; a software or
    organisation entry without persons uses its key."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    year = entry.fields.get("year", "")
    if not persons:
        return f"{entry.key} {year}".strip()
    if len(persons) == 1:
        names = _surname(persons[0])
    elif len(persons) == 2:
        names = f"{_surname(persons[0])} and {_surname(persons[1])}"
    else:
        names = f"{_surname(persons[0])} et al."
    return f"{names}, {year}".strip(", ").replace("{", "").replace("}", "")


class AuthorYearLabels(BaseLabelStyle):
    """Author-year labels, with ``a``, ``b`` appended where two entries would share one."""

    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        labels = [author_year_label(entry) for entry in entries]
        repeated = {label for label in labels if labels.count(label) > 1}
        seen: dict[str, int] = {}
        for label in labels:
            if label in repeated:
                seen[label] = seen.get(label, 0) + 1
                yield f"{label}{chr(ord('a') + seen[label] - 1)}"
            else:
                yield label


class AuthorYearStyle(UnsortedStyle):
    default_label_style = AuthorYearLabels
    default_sorting_style = "author_year_title"


def _round_brackets() -> BracketStyle:
    return BracketStyle(left="(", right=")")


@dataclass
class RoundAuthorYearReferences(AuthorYearReferenceStyle):
    """``(Xia et al., 2022)`` and ``Xia et al. (2022)``: the author-year style in round brackets."""

    bracket_parenthetical: BracketStyle = field(default_factory=_round_brackets)
    bracket_textual: BracketStyle = field(default_factory=_round_brackets)
    bracket_author: BracketStyle = field(default_factory=_round_brackets)
    bracket_label: BracketStyle = field(default_factory=_round_brackets)
    bracket_year: BracketStyle = field(default_factory=_round_brackets)


def setup(app):
    register_plugin("pybtex.style.formatting", STYLE_NAME, AuthorYearStyle)
    sphinxcontrib.bibtex.plugin.register_plugin(
        "sphinxcontrib.bibtex.style.referencing", REFERENCE_STYLE_NAME, RoundAuthorYearReferences
    )
    return {"parallel_read_safe": True, "parallel_write_safe": True}
