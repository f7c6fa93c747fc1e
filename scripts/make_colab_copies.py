"""Write the Colab copy of every chapter: ``colab/NN_topic.ipynb`` from ``notebooks/NN_topic.ipynb``.

The chapters are written for the book, in MyST Markdown. Colab renders plain Markdown, so what the
book resolves would reach a Colab reader raw. The *Open in Colab* badge therefore opens a copy in
which each MyST construct is written out the way the book shows it:

- ``{cite:p}`key``` becomes "(Xia et al., 2022)" and ``{cite:t}`key``` "Xia et al. (2022)", from
  ``book/references.bib``; a copy that cites anything ends with a list of the works it cites;
- ``{doc}`03_coordinates``` becomes the chapter's title, linked to that chapter's Colab copy;
- ``{eq}`label``` becomes "(5)" and ``{numref}`fig-name``` "Fig. 2", numbered across the book in
  the order of ``_toc.yml``, as the book numbers them; a labelled equation ``$$ ... $$ (label)``
  carries its number as a ``\\tag``; ``{ref}`label``` becomes the target's title or number;
- admonitions (```` ```{note} ```` or ``:::{note}``) become a blockquote with a bold title, and
  dropdowns (``:class: dropdown``, ``{dropdown}``) a ``<details>`` block, folded as in the book;
- ``{glue}`` roles and directives become the glued value, taken from the notebook's outputs;
- a figure caption kept in a code cell's metadata (``mystnb: figure: caption``) becomes a Markdown
  cell after that code cell, "**Fig. N.** caption".

Code cells and their outputs are copied unchanged, and the badge points at the copy. A construct
this script cannot write out, or a reference to a label the book does not define (the book's build
warns about it too), stops it with exit status 2 and an error that names the chapter and the cell.

    python scripts/make_colab_copies.py            # write colab/ from notebooks/
    python scripts/make_colab_copies.py --check    # exit 1 if a copy is missing or out of date

Run it after every change to a chapter; tests/test_colab_copies.py fails until the copies agree.
"""

from __future__ import annotations

import argparse
import copy
import posixpath
import re
import sys
import textwrap
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_repository_url import BADGE_PATTERN, badge, colab_copy_relpath, colab_url, read_repository  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = "notebooks"
COLAB_DIR = "colab"
BIBLIOGRAPHY = "book/references.bib"

ROLE = re.compile(r"\{(?P<name>[A-Za-z][\w:.+-]*)\}`(?P<content>[^`]*)`")
EXPLICIT_TITLE = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$", re.DOTALL)
DIRECTIVE_OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|:{3,})\s*\{(?P<name>[^}\s]+)\}[ \t]*(?P<argument>.*)$")
CODE_FENCE = re.compile(r"^\s*(?P<fence>`{3,}|~{3,})")
LABELLED_MATH = re.compile(r"\$\$(?P<body>(?:(?!\$\$).)+?)\$\$[ \t]*\((?P<label>[^()\s]+)\)", re.DOTALL)
TARGET = re.compile(r"^\s*\((?P<label>[^()\s]+)\)=\s*$")
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")
GLUE_PREFIX = "application/papermill.record/"  # myst_nb's mime prefix of values glued with display=False

# Sphinx's titles of the admonitions MyST knows; {admonition} takes its title from the argument
ADMONITIONS = {
    "note": "Note", "tip": "Tip", "hint": "Hint", "important": "Important", "warning": "Warning",
    "caution": "Caution", "attention": "Attention", "danger": "Danger", "error": "Error",
    "seealso": "See also", "admonition": "",
}


class ConversionError(ValueError):
    """A MyST construct that has no Colab rendering here."""


# ---------------------------------------------------------------------------------------------------
# The bibliography: a small BibTeX reader, enough for book/references.bib

LATEX_ACCENTS = {
    '"': "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", "=": "\u0304", ".": "\u0307",
    "c": "\u0327", "u": "\u0306", "v": "\u030c", "H": "\u030b", "r": "\u030a", "k": "\u0328",
}
LATEX_LETTERS = {
    "L": "Ł", "l": "ł", "o": "ø", "O": "Ø", "ss": "ß", "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ",
    "aa": "å", "AA": "Å", "i": "ı", "j": "ȷ",
}
LATEX_ESCAPES = {"&": "&", "_": "_", "%": "%", "$": "$", "#": "#", "{": "{", "}": "}"}


def latex_to_text(text: str) -> str:
    """Plain Unicode text of a BibTeX field: accents composed, escapes resolved, braces dropped."""
    symbol_accent = re.compile(r"\\([\"'`^~=.])\s*(?:\{\s*(\\?[A-Za-z])\s*\}|(\\?[A-Za-z]))")
    letter_accent = re.compile(r"\\([cuvHrk])(?:\s*\{\s*(\\?[A-Za-z])\s*\}|\s+(\\?[A-Za-z]))")

    def accent(match: re.Match) -> str:
        base = match[2] or match[3]
        base = {"\\i": "i", "\\j": "j"}.get(base, base)
        return unicodedata.normalize("NFC", base + LATEX_ACCENTS[match[1]])

    text = symbol_accent.sub(accent, text)
    text = letter_accent.sub(accent, text)
    text = re.sub(r"\\(ss|ae|AE|oe|OE|aa|AA|L|l|o|O|i|j)(?![A-Za-z])\s*", lambda m: LATEX_LETTERS[m[1]], text)
    text = re.sub(r"\\([&_%$#{}])", lambda m: "\0" + LATEX_ESCAPES[m[1]] + "\0", text)
    if "\\" in text:
        raise ConversionError(f"a LaTeX command in a BibTeX field that this script cannot write out: {text!r}")
    text = text.replace("---", "\u2014").replace("--", "\u2013").replace("~", "\u00a0")
    # escaped braces were fenced by NULs so that dropping the grouping braces keeps them
    parts = text.split("\0")
    text = "".join(part if index % 2 else part.replace("{", "").replace("}", "") for index, part in enumerate(parts))
    return re.sub(r"\s+", " ", text).strip()


def _split_top_level(text: str, separator: re.Pattern) -> list[str]:
    """Split ``text`` at matches of ``separator`` that lie outside braces."""
    parts, depth, start, position = [], 0, 0, 0
    while position < len(text):
        char = text[position]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif depth == 0 and (match := separator.match(text, position)):
            parts.append(text[start:position])
            start = position = match.end()
            continue
        position += 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


@dataclass(frozen=True)
class Person:
    first: str  # given names
    last: str  # surname with its particles ("van den Oord")


def parse_names(field_value: str) -> list[Person]:
    """The persons of a BibTeX ``author`` field, in "Last, First" or "First von Last" form."""
    people = []
    for name in _split_top_level(field_value, re.compile(r"\s+and\s+")):
        parts = _split_top_level(name, re.compile(r","))
        if len(parts) >= 2:  # von Last, First  or  von Last, Jr, First
            people.append(Person(first=latex_to_text(parts[-1]), last=latex_to_text(parts[0])))
            continue
        words = _split_top_level(name, re.compile(r"\s+"))
        # the surname starts at the first lower-case particle, or is the last word
        start = next((i for i, word in enumerate(words[:-1]) if word[:1].islower()), len(words) - 1)
        people.append(Person(first=latex_to_text(" ".join(words[:start])), last=latex_to_text(" ".join(words[start:]))))
    return people


@dataclass(frozen=True)
class Entry:
    key: str
    kind: str
    fields: dict[str, str]

    @property
    def authors(self) -> list[Person]:
        return parse_names(self.fields.get("author") or self.fields.get("editor", ""))

    @property
    def year(self) -> str:
        return latex_to_text(self.fields.get("year", ""))

    def names(self) -> str:
        """The author part of the entry's author-year label: "Xia", "Xia and Pan" or "Xia et al."."""
        surnames = [person.last for person in self.authors]
        if not surnames:
            return self.key  # as the book does for an entry without persons
        if len(surnames) <= 2:
            return " and ".join(surnames)
        return f"{surnames[0]} et al."

    def sort_key(self) -> tuple:
        """The bibliography's order: by authors, then year, then title."""
        title = latex_to_text(self.fields.get("title", "")).lower()
        return ([person.last.lower() for person in self.authors], self.year, title)

    def reference(self, label: str) -> str:
        """One line of a reference list: **label.** Authors. Title. *Venue*."""
        names = [" ".join(filter(None, (person.first, person.last))) for person in self.authors]
        if len(names) <= 1:
            authors = "".join(names)
        else:
            authors = ", ".join(names[:-1]) + (", and " if len(names) > 2 else " and ") + names[-1]
        title = latex_to_text(self.fields.get("title", ""))
        venue = next((self.fields[name] for name in ("booktitle", "journal", "howpublished") if name in self.fields), "")
        venue = f" *{latex_to_text(venue)}*." if venue else ""
        eprint = self.fields.get("eprint")
        if eprint and self.fields.get("archiveprefix", "").lower() == "arxiv":
            venue = f" [arXiv:{eprint}](https://arxiv.org/abs/{eprint})."
        return f"**{label}.** " + (f"{authors}. " if authors else "") + f"{title}.{venue}"


def citation_labels(bibliography: dict[str, Entry]) -> dict[str, tuple[str, str]]:
    """``{key: (names, year)}``: each entry's author-year label, made as book/_ext/author_year_labels.py
    makes the book's ("Xia et al.", "2022"), with a, b, ... after the year where two would be equal."""
    entries = sorted(bibliography.values(), key=Entry.sort_key)
    plain = [(entry.names(), entry.year) for entry in entries]
    repeated = {label for label in plain if plain.count(label) > 1}
    seen: dict[tuple[str, str], int] = {}
    labels = {}
    for entry, (names, year) in zip(entries, plain):
        if (names, year) in repeated:
            seen[names, year] = seen.get((names, year), 0) + 1
            year += chr(ord("a") + seen[names, year] - 1)
        labels[entry.key] = (names, year)
    return labels


def _delimited(text: str, start: int) -> tuple[str, int]:
    """The value of a ``{braced}`` or ``"quoted"`` field starting at ``start``, and where it ends."""
    depth, position = 0, start
    quoted = text[start] == '"'
    while position < len(text):
        char = text[position]
        depth += {"{": 1, "}": -1}.get(char, 0)
        position += 1
        if depth == 0 and (not quoted or (char == '"' and position - 1 > start)):
            return text[start + 1 : position - 1], position
    raise ConversionError(f"{BIBLIOGRAPHY}: a field value opened at character {start} is not closed")


def parse_bibtex(text: str) -> dict[str, Entry]:
    """The entries of a BibTeX file, by key. Handles ``field = {braced}``, ``"quoted"`` and bare values."""
    entries = {}
    for match in re.finditer(r"^@(?P<kind>\w+)\s*\{\s*(?P<key>[^,\s]+)\s*,", text, flags=re.MULTILINE):
        if match["kind"].lower() in ("comment", "preamble", "string"):
            continue
        fields, position = {}, match.end()
        while True:
            field_match = re.compile(r"\s*(?:(?P<name>[\w-]+)\s*=\s*|(?P<end>\}))").match(text, position)
            if field_match is None:
                near = text[position : position + 40]
                raise ConversionError(f"{BIBLIOGRAPHY}: cannot read entry {match['key']} near {near!r}")
            if field_match["end"]:
                break
            position = field_match.end()
            if text[position] in "{\"":
                value, position = _delimited(text, position)
            else:
                bare = re.compile(r"[^,}\s]+").match(text, position)
                value, position = bare.group(0), bare.end()
            fields[field_match["name"].lower()] = value
            separator = re.compile(r"\s*,?").match(text, position)
            position = separator.end()
        entries[match["key"]] = Entry(key=match["key"], kind=match["kind"].lower(), fields=fields)
    return entries


# ---------------------------------------------------------------------------------------------------
# The book: titles and numbers, as Sphinx assigns them


@dataclass(frozen=True)
class Target:
    doc: str  # the toc entry it lives in, e.g. "notebooks/03_coordinates"
    kind: str  # "equation", "figure" or "section"
    number: int | None = None
    title: str = ""  # a figure's caption or a section's heading


@dataclass
class Book:
    """What a reference resolves to: documents in toc order with their titles, and every label.

    Sphinx numbers labelled equations and named figures consecutively across the whole book (the
    table of contents is not numbered, so no chapter prefix) in the order of ``_toc.yml``, each kind
    with its own counter. Figures and equations without a label get no number.
    """

    titles: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # doc -> its file, "book/intro.ipynb"
    targets: dict[str, Target] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, doc: str, kind: str, title: str = "", numbers: int = 1) -> None:
        """Define ``label``; an equation or figure takes the next ``numbers`` numbers (the first is its own)."""
        if label in self.targets:
            raise ConversionError(f"{doc}: the label {label!r} is also defined in {self.targets[label].doc}")
        number = None
        if kind in ("equation", "figure") and numbers:
            number = self.counters.get(kind, 0) + 1
            self.counters[kind] = number + numbers - 1
        self.targets[label] = Target(doc=doc, kind=kind, number=number, title=title)

    def scan_markdown(self, doc: str, source: str) -> None:
        """Titles, labelled equations, named figures and section targets of one Markdown text."""
        lines = _outside_code_fences(source).split("\n")
        found = []  # (line, label, kind, title), numbered in the order they appear
        for index, line in enumerate(lines):
            if (heading := HEADING.match(line)) and doc not in self.titles and line.startswith("# "):
                self.titles[doc] = heading["title"]
            following = lines[index + 1] if index + 1 < len(lines) else ""
            if (target := TARGET.match(line)) and (heading := HEADING.match(following)):
                found.append((index, target["label"], "section", heading["title"]))
            directive = DIRECTIVE_OPEN.match(line)
            if directive and directive["name"] in ("math", "figure", "glue:figure", "glue:math"):
                for option in lines[index + 1 :]:  # a label or a name among the directive's options
                    if option_match := re.match(r"^\s*:(label|name):\s*(\S+)", option):
                        kind = "equation" if directive["name"] in ("math", "glue:math") else "figure"
                        found.append((index, option_match[2], kind, ""))
                    elif not re.match(r"^\s*:\w[\w-]*:", option):
                        break
        text = "\n".join(lines)
        for match in LABELLED_MATH.finditer(text):
            found.append((text.count("\n", 0, match.end()), match["label"], "equation", ""))
        for _, label, kind, title in sorted(found, key=lambda item: item[0]):
            self.add(label, doc, kind, title)

    def scan_notebook(self, doc: str, nb: nbformat.NotebookNode) -> None:
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                self.scan_markdown(doc, cell.source)
            elif cell.cell_type == "code" and (figure := figure_options(cell)).get("name") and figure_outputs(cell):
                # myst-nb wraps each displayed output of the cell in a figure; Sphinx numbers the captioned ones
                numbers = len(figure_outputs(cell)) if figure.get("caption") else 0
                self.add(figure["name"], doc, "figure", figure.get("caption", ""), numbers=numbers)


def _closes(line: str, fence: str) -> bool:
    """Whether ``line`` closes a fence opened with ``fence`` (the same character, at least as many)."""
    stripped = line.strip()
    return bool(stripped) and set(stripped) == {fence[0]} and len(stripped) >= len(fence)


def _outside_code_fences(source: str) -> str:
    """``source`` with the lines of plain code blocks blanked; directive fences and bodies are kept."""
    kept, directives, code = [], [], None
    for line in source.split("\n"):
        if code:
            code = None if _closes(line, code) else code
            kept.append("")
        elif directives and _closes(line, directives[-1]):
            directives.pop()
            kept.append(line)
        elif directive := DIRECTIVE_OPEN.match(line):
            directives.append(directive["fence"])
            kept.append(line)
        elif opened := CODE_FENCE.match(line):
            code = opened["fence"]
            kept.append("")
        else:
            kept.append(line)
    return "\n".join(kept)


def figure_options(cell: nbformat.NotebookNode) -> dict:
    """The figure options myst-nb reads from a code cell's metadata (caption, name)."""
    return dict(cell.get("metadata", {}).get("mystnb", {}).get("figure", {}) or {})


def figure_outputs(cell: nbformat.NotebookNode) -> list:
    """The outputs that myst-nb shows as the cell's figure: displayed ones, not streams or errors."""
    return [output for output in cell.get("outputs", []) if output.output_type in ("display_data", "execute_result")]


def toc_documents(root: Path) -> list[str]:
    """Every document of the book, in the order of ``_toc.yml`` (the root first)."""
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    found = []

    def walk(entries) -> None:
        if isinstance(entries, dict):
            for key, value in entries.items():
                if key in ("root", "file"):
                    found.append(str(value))
                else:
                    walk(value)
        elif isinstance(entries, list):
            for entry in entries:
                walk(entry)

    walk(toc)
    return found


def read_book(root: Path) -> Book:
    book = Book()
    for doc in toc_documents(root):
        for suffix in (".ipynb", ".md"):
            path = root / f"{doc}{suffix}"
            if path.is_file():
                book.sources[doc] = f"{doc}{suffix}"
                if suffix == ".ipynb":
                    book.scan_notebook(doc, nbformat.read(path, as_version=4))
                else:
                    book.scan_markdown(doc, path.read_text(encoding="utf-8"))
                break
    return book


# ---------------------------------------------------------------------------------------------------
# Markdown: MyST in, plain Markdown out


@dataclass
class Chapter:
    """Everything the conversion of one chapter needs to know."""

    doc: str  # its toc entry, "notebooks/02_grid_sampling"
    nb: nbformat.NotebookNode  # the chapter (for glued values)
    book: Book
    bibliography: dict[str, Entry]
    url: str
    branch: str
    cited: list[str] = field(default_factory=list)
    attachments: dict[str, dict] = field(default_factory=dict)  # of the cell being converted

    def __post_init__(self) -> None:
        self.labels = citation_labels(self.bibliography)

    def link(self, doc: str) -> str:
        """Where a reader of the Colab copy finds ``doc``: its Colab copy, or the page's source."""
        if doc.startswith(f"{NOTEBOOK_DIR}/"):
            return colab_url(self.url, self.branch, colab_copy_relpath(f"{doc}.ipynb"))
        return f"{self.url}/blob/{self.branch}/{self.book.sources.get(doc, doc + '.md')}"

    def resolve_doc(self, target: str) -> str:
        target = target.removesuffix(".ipynb").removesuffix(".md")
        if target.startswith("/"):  # from the book's root
            doc = target.lstrip("/")
        else:
            doc = posixpath.normpath(posixpath.join(posixpath.dirname(self.doc), target))
        if doc not in self.book.titles:
            raise ConversionError(f"{{doc}} points at {target!r}, which is not a page of the book")
        return doc

    def target(self, label: str, role: str) -> Target:
        if label not in self.book.targets:
            raise ConversionError(f"{{{role}}} points at {label!r}, which no page of the book defines")
        return self.book.targets[label]

    def linked(self, text: str, doc: str) -> str:
        """``text``, linked to ``doc`` when that is another page (within a page, plain text)."""
        return text if doc == self.doc else f"[{text}]({self.link(doc)})"

    def glued(self, key: str) -> dict:
        """The mime bundle glued under ``key`` in this chapter's outputs (prefixes removed)."""
        for cell in self.nb.cells:
            for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
                if output.get("metadata", {}).get("scrapbook", {}).get("name") == key:
                    return {mime.removeprefix(GLUE_PREFIX): value for mime, value in output.get("data", {}).items()}
        raise ConversionError(f"nothing is glued under {key!r} in the chapter's outputs")


def _cite(chapter: Chapter, keys: str, textual: bool) -> str:
    """``(Xia et al., 2022; Zhu et al., 2021)``, or ``Xia et al. (2022)`` for a textual citation, as the book shows them."""
    labels = []
    for key in (key.strip() for key in keys.split(",")):
        if key not in chapter.bibliography:
            raise ConversionError(f"the citation {key!r} is not in {BIBLIOGRAPHY}")
        if key not in chapter.cited:
            chapter.cited.append(key)
        labels.append(chapter.labels[key])
    if textual:
        return "; ".join(f"{names} ({year})" for names, year in labels)
    return "(" + "; ".join(f"{names}, {year}" for names, year in labels) + ")"


def _glue_text(chapter: Chapter, content: str, kind: str) -> str:
    key, _, format_spec = content.partition(":") if kind == "text" else (content, "", "")
    if "::" in content:
        raise ConversionError(f"glue from another page ({content!r}) has no Colab rendering")
    bundle = chapter.glued(key.strip())
    if kind in ("any", "md") and "text/markdown" in bundle:
        return str(bundle["text/markdown"]).strip()
    if kind == "any" and "text/latex" in bundle:
        return str(bundle["text/latex"]).strip()
    if "text/plain" not in bundle:
        raise ConversionError(f"the value glued under {key!r} has no text to write out")
    text = str(bundle["text/plain"]).strip()
    if format_spec:
        text = format(float(text), format_spec)
    elif kind == "text" and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # a glued string shows without its repr quotes
    return text


def convert_role(match: re.Match, chapter: Chapter) -> str:
    """The plain Markdown of one MyST role."""
    name, content = match["name"], match["content"]
    explicit = EXPLICIT_TITLE.match(content)
    title, label = (explicit["title"], explicit["target"]) if explicit else (None, content.strip())
    if name in ("cite", "cite:p", "cite:ps", "cite:cp"):
        return _cite(chapter, content, textual=False)
    if name in ("cite:t", "cite:ts", "cite:ct"):
        return _cite(chapter, content, textual=True)
    if name == "doc":
        doc = chapter.resolve_doc(label)
        return chapter.linked(title or chapter.book.titles[doc], doc)
    if name == "eq":
        target = chapter.target(label, name)
        if target.kind != "equation":
            raise ConversionError(f"{{eq}} points at {label!r}, which is a {target.kind}")
        return chapter.linked(title or f"({target.number})", target.doc)
    if name == "numref":
        target = chapter.target(label, name)
        if target.number is None:
            raise ConversionError(f"{{numref}} points at {label!r}, which has no number")
        default = "Fig. %s" if target.kind == "figure" else "(%s)"
        text = (title or default).replace("%s", str(target.number)).replace("{number}", str(target.number))
        return chapter.linked(text.replace("{name}", target.title), target.doc)
    if name == "ref":
        target = chapter.target(label, name)
        text = title or (f"({target.number})" if target.kind == "equation" else target.title)
        return chapter.linked(text, target.doc)
    if name == "math":
        return f"${content}$"
    if name in ("glue", "glue:", "glue:any"):
        return _glue_text(chapter, content, "any")
    if name in ("glue:text", "glue:md"):
        return _glue_text(chapter, content, name.removeprefix("glue:"))
    raise ConversionError(f"no Colab rendering for the role {{{name}}} in {match.group(0)!r}")


def _directive_parts(body: list[str]) -> tuple[dict[str, str], list[str]]:
    """``(options, content lines)`` of a directive's body (``:key: value`` lines or a ``---`` block)."""
    options, position = {}, 0
    if body and body[0].strip() == "---":
        end = next((i for i, line in enumerate(body[1:], start=1) if line.strip() == "---"), None)
        if end is None:
            raise ConversionError("a directive's option block (---) is not closed")
        options = {str(k): str(v) for k, v in (yaml.safe_load("\n".join(body[1:end])) or {}).items()}
        position = end + 1
    else:
        while position < len(body) and (option := re.match(r"^\s*:([\w-]+):\s*(.*)$", body[position])):
            options[option[1]] = option[2].strip()
            position += 1
    return options, body[position:]


def convert_directive(name: str, argument: str, body: list[str], chapter: Chapter) -> str:
    """The plain Markdown of one MyST directive."""
    options, content = _directive_parts(body)
    text = textwrap.dedent("\n".join(content)).strip("\n")
    if name in ADMONITIONS or name == "dropdown":
        title = ADMONITIONS.get(name) or convert_inline(argument.strip(), chapter)
        if not title:
            raise ConversionError(f"an {{{name}}} needs a title")
        inner = convert_markdown(text, chapter)
        if name == "dropdown" or "dropdown" in options.get("class", "").split():
            # folded until clicked, as in the book (a solution should not show at a glance)
            return f"<details>\n<summary><b>{title}</b></summary>\n\n{inner}\n\n</details>"
        quoted = "\n".join(f"> {line}" if line.strip() else ">" for line in inner.splitlines())
        return f"> **{title}**\n>\n{quoted}" if inner.strip() else f"> **{title}**"
    if name == "math":
        label = options.get("label")
        tag = f"\n\\tag{{{chapter.target(label, 'math').number}}}" if label else ""
        return f"$$\n{text}{tag}\n$$"
    if name in ("glue", "glue:", "glue:any", "glue:md", "glue:math", "glue:figure"):
        key = argument.strip()
        bundle = chapter.glued(key)
        if name == "glue:math":
            latex = str(bundle.get("text/latex", "")).strip().strip("$").strip()
            if not latex:
                raise ConversionError(f"the value glued under {key!r} has no LaTeX")
            label = options.get("label")
            tag = f"\n\\tag{{{chapter.target(label, 'glue:math').number}}}" if label else ""
            return f"$$\n{latex}{tag}\n$$"
        image = next((mime for mime in ("image/png", "image/jpeg", "image/svg+xml") if mime in bundle), None)
        if image is None:
            return _glue_text(chapter, key, "md" if name == "glue:md" else "any")
        attachment = f"{key}.{image.split('/')[1].split('+')[0]}"
        chapter.attachments[attachment] = {image: bundle[image]}
        shown = f"![{key}](attachment:{attachment})"
        if name == "glue:figure" and text:
            number = chapter.target(options["name"], name).number if "name" in options else None
            caption = convert_markdown(text, chapter).strip()
            shown += f"\n\n**Fig. {number}.** {caption}" if number else f"\n\n{caption}"
        return shown
    raise ConversionError(f"no Colab rendering for the directive {{{name}}}")


def convert_inline(text: str, chapter: Chapter) -> str:
    """Roles and labelled equations of text that holds no fences."""

    def tag(match: re.Match) -> str:
        number = chapter.target(match["label"], "eq").number
        return f"$${match['body'].rstrip()}\n\\tag{{{number}}}\n$$"

    text = LABELLED_MATH.sub(tag, text)
    return ROLE.sub(lambda match: convert_role(match, chapter), text)


def convert_markdown(source: str, chapter: Chapter) -> str:
    """Plain Markdown for Colab of one MyST Markdown text (a cell's source, or a directive's body)."""
    lines = source.split("\n")
    out: list[str] = []
    prose: list[str] = []

    def flush() -> None:
        if prose:
            out.append(convert_inline("\n".join(prose), chapter))
            prose.clear()

    index = 0
    while index < len(lines):
        line = lines[index]
        if directive := DIRECTIVE_OPEN.match(line):
            fence = directive["fence"]
            end = next((i for i in range(index + 1, len(lines)) if _closes(lines[i], fence)), None)
            if end is None:
                raise ConversionError(f"the directive {{{directive['name']}}} is not closed")
            flush()
            converted = convert_directive(directive["name"], directive["argument"], lines[index + 1 : end], chapter)
            out.append("\n".join(directive["indent"] + row if row else row for row in converted.split("\n")))
            index = end + 1
            continue
        if opened := CODE_FENCE.match(line):  # a plain code block: copied as it is
            fence = opened["fence"]
            end = next((i for i in range(index + 1, len(lines)) if _closes(lines[i], fence)), len(lines) - 1)
            flush()
            out.append("\n".join(lines[index : end + 1]))
            index = end + 1
            continue
        if TARGET.match(line) or re.match(r"^%", line) or line.strip() == "+++":
            index += 1  # a target, a MyST comment or a block break: nothing to show
            continue
        prose.append(line)
        index += 1
    flush()
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# Notebooks


def references_cell(chapter: Chapter, cell_id: str) -> nbformat.NotebookNode:
    """The works a chapter cites, under their author-year labels, for the end of its Colab copy."""
    entries = sorted((chapter.bibliography[key] for key in chapter.cited), key=Entry.sort_key)
    lines = ["## References", ""]
    lines += [f"- {entry.reference(', '.join(chapter.labels[entry.key]))}" for entry in entries]
    cell = nbformat.v4.new_markdown_cell("\n".join(lines))
    cell.id = cell_id
    return cell


def colab_copy(
    nb: nbformat.NotebookNode, relpath: str, book: Book, bibliography: dict[str, Entry], url: str, branch: str
) -> nbformat.NotebookNode:
    """The Colab copy of the chapter ``nb`` (at ``relpath``, e.g. ``notebooks/02_grid_sampling.ipynb``)."""
    doc = relpath.removesuffix(".ipynb")
    chapter = Chapter(doc=doc, nb=nb, book=book, bibliography=bibliography, url=url, branch=branch)
    result = copy.deepcopy(nb)
    cells = []
    for index, cell in enumerate(result.cells):
        where = f"{relpath}, cell {index}"
        if cell.cell_type == "markdown":
            chapter.attachments = {}
            try:
                cell.source = convert_markdown(cell.source, chapter)
            except ConversionError as error:
                raise ConversionError(f"{where}: {error}") from None
            if chapter.attachments:
                cell.attachments = {**cell.get("attachments", {}), **chapter.attachments}
            if index == 0:
                cell.source = BADGE_PATTERN.sub(lambda _: badge(url, branch, relpath), cell.source, count=1)
        cells.append(cell)
        caption = figure_options(cell).get("caption") if cell.cell_type == "code" else None
        if caption and figure_outputs(cell):  # without an output, the book shows no figure either
            try:
                text = convert_markdown(caption, chapter).strip()
            except ConversionError as error:
                raise ConversionError(f"{where} (figure caption): {error}") from None
            name = figure_options(cell).get("name")
            number = book.targets[name].number if name in book.targets else None
            caption_cell = nbformat.v4.new_markdown_cell(f"**Fig. {number}.** {text}" if number else f"**Figure.** {text}")
            caption_cell.id = f"{cell.get('id', index)}-caption"
            cells.append(caption_cell)
    if chapter.cited:
        cells.append(references_cell(chapter, f"{Path(relpath).stem.split('_')[0]}-references"))
    result.cells = cells
    return result


def serialize(nb: nbformat.NotebookNode) -> str:
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def chapters(root: Path = REPO_ROOT) -> list[Path]:
    return sorted((root / NOTEBOOK_DIR).glob("*.ipynb"))


def expected_copies(root: Path = REPO_ROOT) -> dict[Path, str]:
    """``{path of the copy: its text}`` for every chapter in ``root/notebooks``."""
    url, branch = read_repository(root)
    book = read_book(root)
    bibliography = parse_bibtex((root / BIBLIOGRAPHY).read_text(encoding="utf-8"))
    copies = {}
    for path in chapters(root):
        relpath = path.relative_to(root).as_posix()
        nb = nbformat.read(path, as_version=4)
        copies[root / colab_copy_relpath(relpath)] = serialize(colab_copy(nb, relpath, book, bibliography, url, branch))
    return copies


def out_of_date(root: Path = REPO_ROOT) -> list[str]:
    """What differs between ``root/colab`` and the copies the chapters give; empty when in sync."""
    copies = expected_copies(root)
    found = []
    for path, text in copies.items():
        relpath = path.relative_to(root).as_posix()
        if not path.is_file():
            found.append(f"{relpath} is missing")
        elif path.read_text(encoding="utf-8") != text:
            found.append(f"{relpath} is out of date")
    for path in sorted((root / COLAB_DIR).glob("*.ipynb")):
        if path not in copies:
            found.append(f"{path.relative_to(root).as_posix()} has no chapter in {NOTEBOOK_DIR}/")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="report missing or out-of-date copies and exit 1; write nothing"
    )
    args = parser.parse_args(argv)
    try:
        return _check() if args.check else _write()
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _check() -> int:
    found = out_of_date()
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print("run `python scripts/make_colab_copies.py`", file=sys.stderr)
    return 1 if found else 0


def _write() -> int:
    copies = expected_copies()
    (REPO_ROOT / COLAB_DIR).mkdir(exist_ok=True)
    for path, text in copies.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(REPO_ROOT).as_posix()}")
    for path in sorted((REPO_ROOT / COLAB_DIR).glob("*.ipynb")):
        if path not in copies:
            path.unlink()
            print(f"removed {path.relative_to(REPO_ROOT).as_posix()} (no such chapter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
