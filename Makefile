# Two entry points for a fresh clone:
#   make book   set everything up and build the rendered book into _build/html
#   make test   set everything up, build the book, and run every test
# Everything installs into a project-local virtual environment (.venv).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps book test notebooks colab clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e ".[test,book,bench,experiments,export]"
	touch $(STAMP)

setup: $(STAMP)

MATHJAX := $(CURDIR)/.cache/mathjax
export DEFORM_ATTN_MATHJAX_DIR := $(MATHJAX)/node_modules/mathjax

# The rendered-book check drives a real headless Chromium and typesets equations with a local
# MathJax 3 (the book itself loads MathJax from a CDN, which the check cannot reach).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "Please install Chromium (Debian: apt-get install chromium) for the rendered-book tests"; exit 1; fi; }
	@test -f $(DEFORM_ATTN_MATHJAX_DIR)/es5/tex-mml-chtml.js || \
	  npm install --silent --no-audit --no-fund --prefix $(MATHJAX) mathjax@3

book: setup
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

test: book system-deps
	$(BIN)/python -m pytest tests
	DEFORM_ATTN_QUICK=1 $(BIN)/python -m pytest --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks book/intro.ipynb

# Re-execute every notebook after a package change (outputs are committed), then rewrite the
# Colab copies from them.
notebooks: setup
	$(BIN)/python scripts/execute_notebooks.py
	$(BIN)/python scripts/make_colab_copies.py

# The Colab copies (colab/, what the badges open) after a change to a chapter's text.
colab: setup
	$(BIN)/python scripts/make_colab_copies.py

clean:
	rm -rf _build
