"""The rendered book in a real headless browser: pages load, figures show, equations typeset.

Run ``make book`` first (``jupyter-book build . -W -n --keep-going``): this test reads
``_build/html``. Its prerequisites are the built book, a Chromium binary and a local MathJax (see
below); ``make test`` provides all three. When one is missing the tests are skipped with the
reason, except in CI (``CI=true`` in the environment, as the CI script sets it for ``make test``),
where a missing prerequisite fails them, so that CI cannot pass by silently skipping the check.

How it works, offline:

* **Browser.** Debian's ``chromium`` (``apt-get install -y chromium chromium-driver``; set
  ``DEFORM_ATTN_CHROMIUM`` to use another binary), started once per page with ``--headless
  --no-sandbox --disable-gpu --disable-background-networking --disable-component-update
  --disable-sync --no-first-run``, a fresh ``--user-data-dir``, and ``--host-resolver-rules`` that
  make every host but 127.0.0.1 unresolvable, so nothing is fetched from the internet. Each run
  uses ``--virtual-time-budget`` to let scripts finish, then ``--dump-dom`` (the DOM after the
  scripts ran) and ``--screenshot`` (a 1440x2000 PNG into ``_build/screenshots/``). A window of
  1440 pixels is the narrowest at which the theme's text column has its full width, about 790
  pixels: 88 columns of code.
* **MathJax.** The pages load MathJax 3 from its CDN, which is unreachable offline. The test serves
  ``_build/html`` from a localhost ``http.server`` that rewrites the CDN script URL to a local copy
  of the ``mathjax@3`` npm package, installed beforehand with
  ``npm install --prefix ~/.cache/deform_attn/mathjax mathjax@3`` (or point
  ``DEFORM_ATTN_MATHJAX_DIR`` at a ``node_modules/mathjax`` folder). The server also appends a small
  script to every page that waits for ``MathJax.startup.promise`` and writes a JSON report into the
  DOM: how many ``mjx-container`` elements were typeset, MathJax errors, and whether each image
  loaded (``naturalWidth > 0``). The served pages are only modified in memory; ``_build/html`` is
  left as built.

Checked for every page of _toc.yml: the page loads and its scripts run; no Python traceback is
shown; every figure output of the source notebook appears as an image that actually loaded; every
equation is typeset, without MathJax errors; every internal link and asset (``href``/``src``)
points to a file that exists, and a link's ``#fragment`` to an id on the target page.
External images (the Colab badge) cannot load offline and are not checked.

Checked for the page as a reader sees it: no code block, printed output, cell output, display
equation or table is wider than its box (``scrollWidth > clientWidth``: a scroll bar or a clipped
line); every image a cell outputs sits in a ``figure`` whose ``figcaption`` carries a number
(``Fig. N``) and a caption; every output image was drawn at 110 dpi or more and is shown at no less
than 96 of its pixels per inch, so that text of 10 pt in the figure shows at 10 pt or more.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import struct
import subprocess
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
HTML_DIR = REPO_ROOT / "_build" / "html"
SCREENSHOT_DIR = REPO_ROOT / "_build" / "screenshots"
MATHJAX_DIR = Path(
    os.environ.get("DEFORM_ATTN_MATHJAX_DIR", Path.home() / ".cache/deform_attn/mathjax/node_modules/mathjax")
)
MATHJAX_ROUTE = "/_offline_mathjax/"
CDN_MATHJAX = re.compile(r"https?://[^\"'\s]*mathjax[^\"'\s]*?/(es5/[^\"'\s]+\.js)")
REPORT_ID = "deform-attn-browser-report"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1440,2000",
    "--virtual-time-budget=30000",
]
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "ipythontb", "output traceback")

# What must fit the width of the page: code, printed output, display equations and tables. An
# element whose content is wider than its box (scrollWidth > clientWidth) shows the reader a scroll
# bar or a clipped line. Collapsed (hidden) code has no width and is checked from the sources by
# tests/test_book_form.py instead.
OVERFLOW_SELECTORS = (
    "div.highlight pre",
    "div.output",
    "div.output pre",
    ".cell_output",
    "div.math",
    'mjx-container[display="true"]',
    ".pst-scrollable-table-container",
)

# Appended to every served page: once MathJax has typeset (or at once, on pages without math),
# write what the browser sees into a hidden <pre> that --dump-dom captures.
REPORT_SCRIPT = """
<script>
window.addEventListener("load", function () {
  function report() {
    var out = document.createElement("pre");
    out.id = "%s";
    out.hidden = true;
    out.textContent = JSON.stringify({
      mathjax: !!(window.MathJax && MathJax.startup && MathJax.version),
      typeset: document.querySelectorAll("mjx-container").length,
      errors: document.querySelectorAll("mjx-merror, [data-mjx-error]").length,
      images: Array.from(document.images).map(function (img) {
        return {src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0};
      }),
      overflow: Array.from(document.querySelectorAll(%s)).filter(function (element) {
        return element.scrollWidth > element.clientWidth + 1;
      }).map(function (element) {
        return {
          element: element.tagName.toLowerCase() + "." + String(element.className).split(" ")[0],
          text: element.textContent.trim().slice(0, 80),
          content: element.scrollWidth,
          box: element.clientWidth
        };
      }),
      outputImages: Array.from(document.querySelectorAll(".cell_output img")).map(function (img) {
        var figure = img.closest("figure");
        var number = figure && figure.querySelector("figcaption .caption-number");
        var caption = figure && figure.querySelector("figcaption .caption-text");
        return {
          src: img.getAttribute("src"),
          natural: img.naturalWidth,
          shown: img.getBoundingClientRect().width,
          number: number ? number.textContent.trim() : null,
          caption: caption ? caption.textContent.trim() : ""
        };
      })
    });
    document.body.appendChild(out);
  }
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(report, report);
  } else {
    report();
  }
});
</script>
""" % (REPORT_ID, json.dumps(", ".join(OVERFLOW_SELECTORS)))


def _toc_entries() -> list[str]:
    def walk(tree):
        if isinstance(tree, dict):
            for key, value in tree.items():
                if key in ("file", "root"):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(tree, list):
            for value in tree:
                yield from walk(value)

    return list(walk(yaml.safe_load((REPO_ROOT / "_toc.yml").read_text(encoding="utf-8"))))


def _source(entry: str) -> Path | None:
    for suffix in (".ipynb", ".md", ".rst"):
        if (REPO_ROOT / f"{entry}{suffix}").is_file():
            return REPO_ROOT / f"{entry}{suffix}"
    return None


# Pages whose source is missing are reported by tests/test_notebooks.py, not here.
PAGES = [entry for entry in _toc_entries() if _source(entry) is not None]


class _Page(HTMLParser):
    """Ids, links, images, math elements and visible text of an HTML document."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str]] = []  # (tag, url)
        self.math = 0
        self.text: list[str] = []
        self.report: str | None = None
        self._in_report = False
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) and tag in ("a", "link", "img", "script", "source", "iframe"):
                self.links.append((tag, attrs[key]))
        classes = (attrs.get("class") or "").split()
        if "math" in classes and tag in ("span", "div"):
            self.math += 1
        if attrs.get("id") == REPORT_ID:
            self._in_report = True
        if tag in ("script", "style"):
            self._skip += 1
        if "ipythontb" in classes or "traceback" in classes:
            self.text.append(" ".join(classes))

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        if tag == "pre":
            self._in_report = False

    def handle_data(self, data):
        if self._in_report:
            self.report = (self.report or "") + data
        elif not self._skip:
            self.text.append(data)


def _parse(markup: str) -> _Page:
    page = _Page()
    page.feed(markup)
    page.close()
    return page


class _BookHandler(SimpleHTTPRequestHandler):
    """Serves _build/html, with MathJax from the local npm copy and a report script per page."""

    def __init__(self, *args, html_dir: Path, mathjax_dir: Path, **kwargs):
        self.mathjax_dir = mathjax_dir
        super().__init__(*args, directory=str(html_dir), **kwargs)

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def translate_path(self, path):
        clean = unquote(urlsplit(path).path)
        if clean.startswith(MATHJAX_ROUTE):
            return str(self.mathjax_dir / clean[len(MATHJAX_ROUTE):])
        return super().translate_path(path)

    def do_GET(self):
        local = Path(self.translate_path(self.path))
        if local.suffix != ".html" or not local.is_file():
            return super().do_GET()
        markup = local.read_text(encoding="utf-8")
        markup = CDN_MATHJAX.sub(lambda match: MATHJAX_ROUTE + match.group(1), markup)
        markup = markup.replace("</body>", REPORT_SCRIPT + "</body>", 1)
        body = markup.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _missing_prerequisite(reason: str) -> None:
    """Skip for a missing prerequisite; in CI (``CI=true``) fail instead, so CI cannot skip the check."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the rendered-book check must run in CI)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def html_dir() -> Path:
    if not (HTML_DIR / "index.html").is_file():
        _missing_prerequisite(
            f"{HTML_DIR} does not exist: run `make book` (jupyter-book build . -W -n --keep-going) first"
        )
    return HTML_DIR


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = os.environ.get("DEFORM_ATTN_CHROMIUM") or next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )
    if not binary:
        _missing_prerequisite(
            "no chromium found: `apt-get install -y chromium chromium-driver` (or set DEFORM_ATTN_CHROMIUM)"
        )
    return binary


@pytest.fixture(scope="module")
def server(html_dir):
    if not (MATHJAX_DIR / "es5" / "tex-mml-chtml.js").is_file():
        _missing_prerequisite(
            f"no local MathJax 3 in {MATHJAX_DIR}: run `npm install --prefix ~/.cache/deform_attn/mathjax mathjax@3` "
            "or set DEFORM_ATTN_MATHJAX_DIR to a node_modules/mathjax folder"
        )
    handler = functools.partial(_BookHandler, html_dir=html_dir, mathjax_dir=MATHJAX_DIR)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _expected_figures(source: Path) -> int:
    """Image outputs of a notebook's cells that the book shows."""
    if source.suffix != ".ipynb":
        return 0
    count = 0
    for cell in nbformat.read(source, as_version=4).cells:
        tags = set(cell.metadata.get("tags", []))
        if cell.cell_type != "code" or tags & {"remove-cell", "remove-output"}:
            continue
        count += sum(
            1 for out in cell.outputs if {"image/png", "image/svg+xml", "image/jpeg"} & set(out.get("data", {}))
        )
    return count


def _render(entry: str, chromium: str, server: str, workdir: Path) -> tuple[dict, _Page, Path]:
    """Load one page in headless Chromium: the script's report, the DOM after the scripts ran, and
    the screenshot."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    screenshot = SCREENSHOT_DIR / f"{entry.replace('/', '__')}.png"
    screenshot.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={workdir / 'profile'}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            f"{server}/{entry}.html",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=workdir,
    )
    assert run.returncode == 0, f"chromium failed on {entry}: {run.stderr[-2000:]}"
    dom = _parse(run.stdout)
    assert dom.report, f"{entry}: the page's scripts did not finish (no report in the DOM)"
    return json.loads(dom.report), dom, screenshot


@pytest.fixture(scope="module")
def rendered(chromium, server, tmp_path_factory):
    """``rendered(entry)``: the page as the browser shows it, loaded once for all checks."""
    pages: dict[str, tuple[dict, _Page, Path]] = {}

    def render(entry: str) -> tuple[dict, _Page, Path]:
        if entry not in pages:
            workdir = tmp_path_factory.mktemp(entry.replace("/", "__"))
            pages[entry] = _render(entry, chromium, server, workdir)
        return pages[entry]

    return render


@pytest.mark.parametrize("entry", PAGES)
def test_page_in_browser(entry, rendered, html_dir):
    page_file = html_dir / f"{entry}.html"
    assert page_file.is_file(), f"{entry} is in _toc.yml but {page_file} was not built"
    built = _parse(page_file.read_text(encoding="utf-8"))
    report, dom, screenshot = rendered(entry)

    text = html.unescape(" ".join(dom.text))
    for marker in TRACEBACK_MARKERS:
        assert marker not in text, f"{entry}: the page shows a Python traceback ({marker!r})"

    local_images = [img for img in report["images"] if not re.match(r"[a-z]+:", img["src"] or "")]
    broken = [img["src"] for img in local_images if not img["loaded"]]
    assert not broken, f"{entry}: images that did not load: {broken}"
    figures = [img for img in local_images if "_images/" in img["src"]]
    expected = _expected_figures(_source(entry))
    assert len(figures) >= expected, f"{entry}: {expected} figure outputs in the notebook, {len(figures)} on the page"

    if built.math:
        assert report["mathjax"], f"{entry}: {built.math} equations but MathJax did not start"
        assert report["typeset"] >= built.math, f"{entry}: {built.math} equations, {report['typeset']} typeset"
        assert report["errors"] == 0, f"{entry}: {report['errors']} MathJax errors"

    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, f"{entry}: no screenshot in {screenshot}"


@pytest.mark.parametrize("entry", PAGES)
def test_nothing_is_wider_than_the_page(entry, rendered):
    """Code, output, equations and tables fit the text column at the 1440-pixel window: nothing
    scrolls sideways or is clipped."""
    report, _, _ = rendered(entry)
    wide = [
        f"{item['element']} ({item['content']} px in {item['box']} px): {item['text']!r}"
        for item in report["overflow"]
    ]
    assert not wide, f"{entry}: wider than the page:\n" + "\n".join(wide)


@pytest.mark.parametrize("entry", PAGES)
def test_output_images_are_numbered_figures(entry, rendered):
    """Every image a cell outputs sits in a figure whose caption has a number (``Fig. N``) and
    says something (the cell's ``mystnb.figure`` metadata)."""
    report, _, _ = rendered(entry)
    loose = [
        img["src"]
        for img in report["outputImages"]
        if not (img["number"] and re.fullmatch(r"Fig\. \d+", img["number"]) and len(img["caption"]) > 20)
    ]
    assert not loose, f"{entry}: output images without a numbered, captioned figure: {loose}"


def png_dpi(path: Path) -> float | None:
    """The resolution a PNG records in its pHYs chunk (matplotlib writes the figure's dpi), or None."""
    data = path.read_bytes()
    position = 8  # after the signature
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"pHYs":
            per_unit_x, _, unit = struct.unpack(">IIB", data[position + 8 : position + 17])
            return per_unit_x * 0.0254 if unit == 1 else None  # unit 1: pixels per metre
        if kind == b"IDAT":
            return None  # pHYs must come before the image data
        position += 12 + length
    return None


# A figure is drawn at MIN_FIGURE_DPI or more, and shown at no less than CSS_DPI pixels per inch
# of the figure: a CSS pixel is 1/96 inch, so a font of 10 pt in the figure then shows at 10 pt or
# more. A figure wider than the text column is scaled down and fails the second bound.
MIN_FIGURE_DPI = 110
CSS_DPI = 96


@pytest.mark.parametrize("entry", PAGES)
def test_figures_are_readable_at_page_width(entry, rendered, html_dir):
    report, _, _ = rendered(entry)
    unreadable = []
    for img in report["outputImages"]:
        path = (html_dir / entry).parent / unquote(img["src"])
        if path.suffix != ".png" or not img["natural"]:
            continue
        dpi = png_dpi(path)
        if dpi is None or dpi < MIN_FIGURE_DPI - 0.5:
            unreadable.append(f"{img['src']}: drawn at {dpi} dpi, fewer than {MIN_FIGURE_DPI}")
            continue
        shown_dpi = dpi * img["shown"] / img["natural"]
        if shown_dpi < CSS_DPI - 0.5:
            unreadable.append(
                f"{img['src']}: {img['natural']} px wide, shown at {img['shown']:.0f} px, so its text "
                f"shows at {shown_dpi / CSS_DPI:.0%} of its size; make the figure narrower"
            )
    assert not unreadable, f"{entry}: figures too small to read:\n" + "\n".join(unreadable)


def test_png_dpi_reads_the_resolution(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(2, 1), dpi=120)
    figure.savefig(tmp_path / "f.png")
    plt.close(figure)
    assert png_dpi(tmp_path / "f.png") == pytest.approx(120, abs=0.1)
    (tmp_path / "none.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I4s", 0, b"IDAT"))
    assert png_dpi(tmp_path / "none.png") is None


@pytest.mark.parametrize("entry", PAGES)
def test_internal_links_resolve(entry, html_dir):
    page_file = html_dir / f"{entry}.html"
    assert page_file.is_file(), f"{entry} is in _toc.yml but {page_file} was not built"
    page = _parse(page_file.read_text(encoding="utf-8"))
    ids_of: dict[Path, set[str]] = {page_file: page.ids}
    broken = []
    for tag, url in page.links:
        parts = urlsplit(url)
        if parts.scheme or parts.netloc or url.startswith(("mailto:", "javascript:", "data:")):
            continue
        target = (page_file.parent / unquote(parts.path)).resolve() if parts.path else page_file
        if parts.path.endswith("/") or target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(f"<{tag}> {url}: no file {target}")
            continue
        if tag == "a" and parts.fragment and target.suffix == ".html":
            if target not in ids_of:
                ids_of[target] = _parse(target.read_text(encoding="utf-8")).ids
            if unquote(parts.fragment) not in ids_of[target]:
                broken.append(f"<a> {url}: no id {parts.fragment!r} in {target.name}")
    assert not broken, f"{entry}: broken internal links:\n" + "\n".join(broken)


@pytest.mark.parametrize("ci", [None, "false", "1"])
def test_missing_prerequisite_skips_outside_ci(ci, monkeypatch):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        _missing_prerequisite("no chromium found")


def test_missing_prerequisite_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no chromium found \(CI=true"):
        _missing_prerequisite("no chromium found")
