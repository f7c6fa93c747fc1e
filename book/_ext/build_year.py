"""Sphinx extension: the footer's copyright year is the year the book is built, not a typed one."""

from __future__ import annotations

import datetime


def copyright_line(author: str, today: datetime.date | None = None) -> str:
    """``"<year> <author>"`` for the year of ``today`` (default: the build's date)."""
    year = (today or datetime.date.today()).year
    return f"{year} {author}".strip()


def _set_copyright(app, config) -> None:
    config.copyright = copyright_line(config.author or "")


def setup(app):
    app.connect("config-inited", _set_copyright)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
