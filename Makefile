# Two commands matter: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# Keep Prefect, DVC and onnxruntime from reaching the network (see DESIGN.md).
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export DVC_NO_ANALYTICS := 1
export DVC_STUDIO_OFFLINE := true
export ORT_DISABLE_TELEMETRY := 1
export AWS_EC2_METADATA_DISABLED := true
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test install demo-data serve bench clean help

help:
	@echo "make demo   - install, fetch the demo data, run the whole pipeline, print a summary"
	@echo "make test   - run the test suite (installs first if needed)"
	@echo "make serve  - serve the scheduled retrain and watch deployments (Ctrl-C stops)"
	@echo "make bench  - training throughput benchmark (CPU mode here, GPU mode on a GPU)"

install: $(STAMP)

# torch/torchvision come from pip (their wheels lie on this disk); uv then
# installs the rest quickly, pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$$(grep '^uv==' constraints.txt | cut -d= -f3)
	$(VENV)/bin/uv pip install --quiet --python $(PY) -c constraints.txt -e '.[dev]'
	@touch $@

# Fashion-MNIST from Debian's package when apt can install it; otherwise the
# demo falls back to torchvision's downloader.
demo-data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "apt could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST"; \
	fi

demo: install demo-data
	$(PY) -m flows.demo

test: install demo-data
	$(PY) -m pytest

serve: install
	$(PY) -m flows.serve

bench: install
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf artifacts data/prepared .prefect registry
