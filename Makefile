# Every target sets itself up: the virtual environment is created when missing and refreshed
# when pyproject.toml or constraints.txt change; otherwise it is reused.

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
# Tests and CI: tiny profile, never the network, caches and figures kept inside the checkout;
# one thread per process, because pytest runs two workers on two cores (oversubscribed torch
# threads made training steps 25x slower).
TEST_ENV    := COURSE_PROFILE=smoke COURSE_OFFLINE=1 COURSE_CACHE=$(CURDIR)/.cache/test \
               OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
               COURSE_FIGURES=$(CURDIR)/.cache/test/figures MPLBACKEND=Agg
PYTEST_ARGS ?=

.PHONY: help venv test test-unit test-notebooks fullpath notebooks lab reproduce reproduce-check benchmarks readme lint clean

help:
	@echo "make reproduce   execute every solution notebook (auto profile, one torch thread) with progress,"
	@echo "                 then the benchmarks; refresh figures/, results and README"
	@echo "make reproduce-check  the smoke notebooks twice, from different thread settings: same outputs?"
	@echo "make test        unit tests + every solution and student notebook in the smoke profile"
	@echo "make fullpath    every solution notebook in the fullpath profile (full's code path, tiny counts)"
	@echo "make notebooks   regenerate notebooks/ from solutions/"
	@echo "make lab         JupyterLab on the course environment (LAB_ARGS='--port 8890' to pass options)"

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins the torch build this machine has on disk; Colab users never see it.
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# the grader's sandbox (Debian's bubblewrap); without it the grader asks for --no-sandbox
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; }; }; } || \
		echo "note: bubblewrap is not installed (apt-get install bubblewrap): the grader needs it, or --no-sandbox"
	touch $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile -p no:cacheprovider \
		tests --nbval-lax --nbval-current-env solutions notebooks $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile tests $(PYTEST_ARGS)

test-notebooks: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --nbval-lax --nbval-current-env solutions notebooks $(PYTEST_ARGS)

# full's architectures and code path on this machine's CPU, with random weights where pretrained
# ones cannot be had; writes benchmarks/results/fullpath.json with each notebook's estimated
# full-profile footprint on a T4.  Two threads: the notebooks run one at a time.
fullpath: $(STAMP)
	COURSE_OFFLINE=1 COURSE_CACHE=$(CURDIR)/.cache/fullpath COURSE_FIGURES=$(CURDIR)/.cache/fullpath/figures \
		MPLBACKEND=Agg $(PY) -m course_tools.fullpath solutions/*.ipynb

notebooks: $(STAMP)
	$(PY) -m course_tools.nbbuild

# JupyterLab on the course environment, from the repository root (so solutions/ and notebooks/
# are one click away); LAB_ARGS passes options, e.g. LAB_ARGS='--port 8890' (as root: '--allow-root').
LAB_ARGS ?=
lab: $(STAMP)
	$(PY) -m jupyter lab --ip 127.0.0.1 --no-browser $(LAB_ARGS)

# One torch thread in every kernel and benchmark (course_tools/reproduce.py says why): the
# committed numbers were made so, and a busy second core then costs no speed.
reproduce: $(STAMP)
	COURSE_FIGURES=$(CURDIR)/figures $(PY) -m course_tools.reproduce solutions/*.ipynb \
		--profile auto --threads 1 --inplace --record --headers --benchmarks
	$(PY) -m course_tools.report
	$(PY) -m course_tools.nbbuild

benchmarks: $(STAMP)
	$(PY) -m course_tools.reproduce --benchmarks --threads 1
	$(PY) -m course_tools.report

# The smoke notebooks twice, in two processes started with different thread settings and with
# separate caches; their outputs must be the same, timings and cache paths aside.
REPRO_CHECK := $(CURDIR)/.cache/reproduce-check
reproduce-check: $(STAMP)
	rm -rf $(REPRO_CHECK) && mkdir -p $(REPRO_CHECK)
	COURSE_OFFLINE=1 OMP_NUM_THREADS=2 MPLBACKEND=Agg $(PY) -m course_tools.reproduce solutions/*.ipynb \
		--profile smoke --threads 1 --out $(REPRO_CHECK)/a --heartbeat 0 > $(REPRO_CHECK).a.log 2>&1 & \
	COURSE_OFFLINE=1 OMP_NUM_THREADS=1 MPLBACKEND=Agg $(PY) -m course_tools.reproduce solutions/*.ipynb \
		--profile smoke --threads 1 --out $(REPRO_CHECK)/b --heartbeat 0 --record > $(REPRO_CHECK).b.log 2>&1; \
	b=$$?; wait $$!; a=$$?; cat $(REPRO_CHECK).a.log $(REPRO_CHECK).b.log; [ $$a = 0 ] && [ $$b = 0 ]
	$(PY) -m course_tools.reproduce --compare $(REPRO_CHECK)/a $(REPRO_CHECK)/b

readme: $(STAMP)
	$(PY) -m course_tools.report

lint: $(STAMP)
	$(PY) -m ruff check course_utils course_tools tests benchmarks tools

clean:
	rm -rf .cache .pytest_cache figures/*.png
