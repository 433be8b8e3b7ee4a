# tierserve: every target sets itself up (a .venv with the pinned CPU torch, the model), and is
# quick when repeated.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-install
MODEL_STAMP := $(VENV)/.stamp-model
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: help setup model browser test test-all test-fast demo serve lint clean

help:
	@echo "make serve      set up, then serve SmolLM2 on http://127.0.0.1:8000 (OpenAI API)"
	@echo "make demo       set up, then generate answers for a few chat prompts"
	@echo "make test       set up, then run the test suite (all but tests marked heavy)"
	@echo "make test-all   the same, heavy tests included"
	@echo "make test-fast  tests that do not need the real model or transformers"
	@echo "make lint       ruff"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(STAMP)

$(MODEL_STAMP): $(STAMP)
	$(PY) -m tierserve.cli fetch-model smollm2
	touch $@

model: $(MODEL_STAMP)

# tierintel's web page is tested in a real headless Chromium: Debian's, installed here when this
# runs as root with apt-get (as CI does); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null || ! [ "$$(id -u)" = 0 ] || ! command -v apt-get >/dev/null || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || true
	@command -v chromium >/dev/null || echo "chromium not installed: the tierintel browser test will skip"

test: $(STAMP) $(MODEL_STAMP) browser
	$(PY) -m pytest -q -m "not heavy"

test-all: $(STAMP) $(MODEL_STAMP) browser
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP) $(MODEL_STAMP)
	$(PY) examples/demo.py

SERVE_ARGS ?= --dtype auto

serve: $(STAMP) $(MODEL_STAMP)
	$(PY) -m tierserve.cli serve --model smollm2 $(SERVE_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check tierserve tiergnn tierintel tieradv tests

clean:
	rm -rf $(VENV) .pytest_cache
