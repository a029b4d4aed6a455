# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.khala-installed

.PHONY: demo test lint bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/khala render jobs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check khala_cli tests

bench: $(STAMP)
	$(VENV)/bin/khala bench

# On a machine with an NVIDIA GPU, from a stock PyTorch image (no venv: the image's Python).
gpu-check:
	tools/gpu-check

clean:
	rm -rf $(VENV) jobs/out
