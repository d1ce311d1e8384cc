# Fresh-machine entry points: each target creates the venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data run test test-fast clean-venv

setup: $(STAMP) data

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Debian's Fashion-MNIST: the real offline dataset behind the default run. Optional where apt is missing.
data:
	@if [ -d $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null \
		|| { if [ "$$CI" = true ]; then echo "error: CI=true and dataset-fashion-mnist could not be installed (apt-get install dataset-fashion-mnist): the end-to-end tests need it"; exit 1; \
		else echo "warning: could not install dataset-fashion-mnist; tests that need it will be skipped"; fi; }; \
	else echo "note: no apt-get here; install Debian's dataset-fashion-mnist to $(FASHION_MNIST) for the offline data"; fi

# The offline default: pretrain a small source model, then VPNs at four densities (about 3 minutes on 2 cores).
run: setup
	$(PY) -m vpns_jax.main --config=configs/default.py --workdir=workdir/default

# Two workers, each taking whole modules (their fixtures stay on one), slowest modules first (tests/conftest.py).
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The everyday loop: the same run without the tests marked slow (end-to-end, multi-process, isolated compiles).
test-fast: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

clean-venv:
	rm -rf $(VENV)
