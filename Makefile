# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both install from requirements.lock (exact versions, hashes), never from ranges.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.khala-installed
LOCK := requirements.lock
# The kept tool that writes the lock, in a virtual environment of its own.
UV_VERSION := 0.13.8
UV_VENV := .venv-lock
UV := $(UV_VENV)/bin/uv
LOCK_FLAGS := --extra dev --universal --python-version 3.10 --generate-hashes \
	--custom-compile-command "make lock"

.PHONY: demo test lint bench gpu-check lock lock-upgrade clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/khala render jobs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check khala_cli tests

bench: $(STAMP)
	$(VENV)/bin/khala bench

$(UV):
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install -q uv==$(UV_VERSION)

# Re-resolve after a change to pyproject.toml; pins already in the lock are kept.
lock: $(UV)
	$(UV) pip compile pyproject.toml $(LOCK_FLAGS) -o $(LOCK)

# Move every pin to the newest release the ranges allow (then run `make test`).
lock-upgrade: $(UV)
	$(UV) pip compile pyproject.toml $(LOCK_FLAGS) --upgrade -o $(LOCK)

# On a machine with an NVIDIA GPU, from a stock PyTorch image (no venv: the image's Python),
# within BUDGET_S (420 s); WHEELS=.whl installs tools/gpu-wheels' folder first.
gpu-check:
	tools/gpu-check

clean:
	rm -rf $(VENV) $(UV_VENV) jobs/out
