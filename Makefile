# The two commands of the README.  Each does its own set-up on a fresh machine:
# a virtual environment in .venv with every backend (NumPy, JAX, PyTorch CPU) installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check -c requirements/constraints.txt

.PHONY: demo test bench bench-mamba2 bench-generate bench-packing bench-context bench-versions bench-pytest lint clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e ".[all,test]"
	touch $(STAMP)

$(VENV)/.bench-stamp: $(STAMP)
	$(PIP_INSTALL) -e ".[all,test,bench]"
	touch $@

## demo: the seed usage on the default backend, and every installed backend against NumPy
demo: $(STAMP)
	$(BIN)/python -m mamba_core.demo

## test: lint, then the whole test suite
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

## bench: the benchmark runner (JSON, markdown table, PNG plot under bench/results/)
bench: $(VENV)/.bench-stamp
	$(BIN)/python -m bench

## bench-mamba2: the Mamba-2 layer against HF Mamba2Mixer (bench/results/mamba2.{json,md})
bench-mamba2: $(VENV)/.bench-stamp
	$(BIN)/python -m bench.mamba2

## bench-packing: one packed row against the same sequences padded to a batch
bench-packing: $(VENV)/.bench-stamp
	$(BIN)/python -m bench.packing

## bench-context: context parallelism on 8 forced host devices (time, bytes per collective)
bench-context: $(VENV)/.bench-stamp
	$(BIN)/python -m bench.context

## bench-versions: Mamba-1, -2, -3 (SISO, MIMO) layers side by side: forward, training, decode
bench-versions: $(VENV)/.bench-stamp
	$(BIN)/python -m bench.versions

## bench-generate: 130m-shaped language models, prefill and decode, against HF generate
bench-generate: $(VENV)/.bench-stamp
	$(BIN)/python -m bench.generate

## bench-pytest: the pytest-benchmark suite (not part of `make test`)
bench-pytest: $(VENV)/.bench-stamp
	$(BIN)/python -m pytest bench -p no:cacheprovider --benchmark-only

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
