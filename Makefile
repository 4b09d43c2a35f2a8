# selfloop: the two commands.
#
#   make demo   the embedded default: a tiny model improving itself on CPU, offline
#   make test   the test suite (offline, CPU)
#
# Both create .venv when missing and install the pinned CPU build of torch first, so pip
# never pulls several GB of CUDA packages. GPU users keep their own torch:
#   make test TORCH_SPEC=            (skip installing torch; bring it yourself, e.g. with
#                                     VENV_FLAGS=--system-site-packages)
#   make test TORCH_SPEC="torch==2.5.1"

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.selfloop

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP)-torch: | $(BIN)/python
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q $(TORCH_SPEC); fi
	@touch $@

$(STAMP)-demo: $(STAMP)-torch pyproject.toml
	$(BIN)/pip install -q -e .
	@touch $@

$(STAMP)-test: $(STAMP)-torch pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@ $(STAMP)-demo

demo: $(STAMP)-demo
	$(BIN)/selfloop demo

test: $(STAMP)-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs/.cache
