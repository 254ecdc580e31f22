# Two commands matter: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# Prefect's own settings (database in .prefect/, no telemetry) are in prefect.toml, read
# by every command run from the project root. These keep the other tools off the network.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export DVC_STUDIO_OFFLINE := true
export ORT_DISABLE_TELEMETRY := 1
export AWS_EC2_METADATA_DISABLED := true
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# pip's index here lists locations that do not exist; its warnings about them say nothing useful.
QUIET_PIP := { grep --line-buffered -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test test-fast mutate install demo-data serve repro exp bench bench-data quality clean clean-registry help

help:
	@echo "make demo   - install, fetch the demo data, run the whole pipeline, print a summary"
	@echo "make test   - run the test suite (installs first if needed)"
	@echo "make test-fast - the suite without the tests marked slow (pipelines, servers)"
	@echo "make mutate - mutation score of the modules where a silent bug costs most (hours; MODULES=tasks/handoff/gate.py for one)"
	@echo "make serve  - Prefect server + UI on 127.0.0.1 (port: prefect.toml, or PORT=N), scheduled retrain and data watch (Ctrl-C stops)"
	@echo "make repro  - dvc repro with the project's interpreter (ARGS=... for dvc's options)"
	@echo "make exp    - dvc exp run --temp, e.g. make exp ARGS='-S train.head.epochs=10'"
	@echo "make bench  - training throughput benchmark (CPU mode here, GPU mode on a GPU)"
	@echo "make bench-data - data steps from scratch and after adding 1% images (N=2000; ARGS='--n 200000')"
	@echo "make quality - the model against pixel baselines and the tutorial recipe (ARGS='--dataset digits')"
	@echo "make clean  - deletes what a run rebuilds: artifacts/, data/prepared/, .prefect/ (never the registry or data/raw)"
	@echo "make clean-registry - deletes registry/, every published model and the production record (asks first; CONFIRM=yes)"
	@echo "make install TORCH=cpu - PyTorch's CPU-only wheels from download.pytorch.org (no CUDA libraries, ~6 GB less)"

install: $(STAMP)

# torch/torchvision come from pip (their wheels lie on this disk); uv then
# installs the rest quickly, pinned by constraints.txt. PyPI's torch wheels bring
# the CUDA libraries (about 6 GB) even where there is no GPU: TORCH=cpu takes the
# same versions from PyTorch's CPU-only index instead (it needs that index reachable).
TORCH ?= default
TORCH_INDEX = $(if $(filter cpu,$(TORCH)),--index-url https://download.pytorch.org/whl/cpu,)
$(STAMP): pyproject.toml constraints.txt
	@echo "[install 1/3] creating $(VENV) and installing torch + torchvision (the largest part: 1-3 minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --disable-pip-version-check --progress-bar off $(TORCH_INDEX) torch==2.14.1 torchvision==0.29.1 2>&1 \
	  | { grep --line-buffered -E "^(Collecting|Installing|Successfully|Requirement|ERROR)" || true; }
	@echo "[install 2/3] installing uv"
	@$(PY) -m pip install --quiet --disable-pip-version-check uv==$$(grep '^uv==' constraints.txt | cut -d= -f3) 2>&1 \
	  | $(QUIET_PIP)
	@echo "[install 3/3] installing the project and its pinned dependencies (constraints.txt)"
	@$(VENV)/bin/uv pip install --python $(PY) -c constraints.txt -e '.[dev]' 2>&1 | $(QUIET_PIP)
	@touch $@
	@echo "[install] done: $(VENV)"

# Fashion-MNIST from Debian's package when apt can install it; otherwise the
# demo falls back to torchvision's downloader. In CI (CI=true) a failed install
# stops the run: the tests that need the files would otherwise be skipped.
demo-data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  { echo "apt could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST"; \
	    if [ "$$CI" = true ]; then echo "CI=true: the Fashion-MNIST tests need the package; stopping" >&2; exit 1; fi; }; \
	fi

demo: install demo-data
	$(PY) -m flows.demo

# The suite runs on TEST_WORKERS processes (pytest-xdist), one more than the cores: much of it waits on
# servers and subprocesses. One test at a time per worker, the longest first (tests/conftest.py),
# so no long test is left running alone at the end. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
PYTEST_WORKERS = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist load --maxschedchunk 1)

test: install demo-data
	$(PY) -m pytest $(PYTEST_WORKERS)

# Daily work: everything but the tests marked slow (whole pipelines, real servers); CI runs them all.
test-fast: install demo-data
	$(PY) -m pytest $(PYTEST_WORKERS) -m "not slow"

# Mutation testing (tests/mutate.py): one-line bugs planted one at a time in the modules where a silent bug
# costs the most (the gate, its statistics, evaluate, export, predict, the caches' keys, the training loop, the
# flow's stage runner), and the share the tests catch, per module. Hours on 2 cores, so never part of `make test`:
# run it when those modules or their tests change. MODULES=... picks modules, MUTATE_JOBS=N mutants at once,
# ARGS=--fresh forgets remembered results (mutants/ keeps them between runs), ARGS='--sample 40' tests a seeded
# sample of 40 mutants a module and prints the score's 95% interval (an estimate, not a full run).
MODULES ?=
MUTATE_JOBS ?= $(shell nproc)
mutate: install
	$(PY) -m tests.mutate --jobs $(MUTATE_JOBS) $(ARGS) $(MODULES)

# The port is prefect.toml's server.api.port (or PREFECT_SERVER_API_PORT), as for every Prefect command,
# unless PORT=N is given.
serve: install
	$(PY) -m flows.serve $(if $(PORT),--port $(PORT))

# DVC runs each stage's `python` from the PATH: these put the project's venv first.
repro: install
	$(VENV)/bin/dvc repro $(ARGS)

exp: install
	$(VENV)/bin/dvc exp run --temp $(ARGS)

bench: install
	$(PY) benchmarks/train_throughput.py

bench-data: install
	$(PY) benchmarks/data_scale.py $(ARGS)

quality: install demo-data
	$(PY) benchmarks/quality.py $(ARGS)

# What a run rebuilds. The registry is not: it holds every published model and
# which one is production, so it has its own target that asks first.
clean:
	rm -rf artifacts data/prepared .prefect

clean-registry:
	@if [ "$(CONFIRM)" != yes ]; then \
	  if [ -t 0 ]; then read -r -p "Delete registry/ (every published model and the production record)? Type yes: " answer; \
	  else answer=; fi; \
	  if [ "$$answer" != yes ]; then echo "registry/ kept (make clean-registry CONFIRM=yes deletes it without asking)"; exit 1; fi; \
	fi
	rm -rf registry
