# vfnb — common tasks. `make help` lists them; override e.g. `make book PROFILE=smoke`.
VENV    ?= .venv
PYTHON  ?= python3
PROFILE ?= cpu
OUT     ?= _build
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.vfnb-installed

.DEFAULT_GOAL := help
.PHONY: help venv book screenshots test test-fast bench census clean distclean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILE) (smoke|cpu|paper)  OUT=$(OUT)  VENV=$(VENV)"

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e .
	touch $@

venv: $(STAMP)  ## create the virtualenv and install requirements.txt + vfnb (editable)

book: $(STAMP)  ## execute every chapter at PROFILE and build the HTML book into OUT/html
	$(PY) -m vfnb book --profile $(PROFILE) --out $(OUT)

screenshots: $(STAMP)  ## full-page screenshots of every page of the built book (OUT/html) at 1280 px, with the browser test's checks
	$(PY) tests/screenshots.py $(OUT)/html $(OUT)/screenshots

test: $(STAMP)  ## all tests: unit, smoke run of every chapter, smoke book in headless chromium
	$(PY) -m pytest -q --durations=12

test-fast: $(STAMP)  ## tests without notebook runs, book builds or browser
	$(PY) -m pytest -q -m "not slow and not browser"

bench: $(STAMP)  ## wall times against their goals (smoke chapters 30 s each; §4 cpu 180 s cold, 30 s warm; WM 2 s and 5x the plain Git Re-Basin descent, AM 1.5x forward; REPAIR α sweep <= 2 passes per α; sweep of 4 smoke points on 2 workers >= 1.5x serial; cpu book <= 45 min cold on a fresh zoo, <= 5 min warm: over an hour)
	$(PY) benchmarks/bench_smoke_chapters.py
	$(PY) benchmarks/bench_chapter4.py
	$(PY) benchmarks/bench_matching.py
	$(PY) benchmarks/bench_repair_sweep.py
	$(PY) benchmarks/bench_wm_reference.py --quick
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_book.py --profile cpu

census: $(STAMP)  ## the alignment engine over torchvision's 80 classification models (slow; writes benchmarks/results/census.json)
	$(PY) benchmarks/bench_census.py --json benchmarks/results/census.json

clean:  ## remove build outputs (keeps the virtualenv and the trained-model cache)
	rm -rf $(OUT) .pytest_cache

distclean: clean  ## also remove the virtualenv
	rm -rf $(VENV)
