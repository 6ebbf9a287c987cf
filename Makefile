# Quick start: `make chat` or `make test`. Both set everything up first and are idempotent:
# the venv is rebuilt only when pyproject.toml changes, the patched runtime only when patches or flags change.
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
DLLM_HOME ?= $(HOME)/.cache/dllm
BACKEND  ?= auto
export DLLM_HOME

.PHONY: setup runtime test chat clean
setup: runtime

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# llama-cpp-python is installed from the pinned sdist with LLAMA_BUILD=OFF: only its Python bindings,
# the library itself is our patched build (no second compile of llama.cpp).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m ggml_patch.build fetch
	CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(BIN)/python -m pip install -q \
	  "$$($(BIN)/python -m ggml_patch.build sdist-path)" -e '.[test]'
	touch $@

runtime: $(VENV)/.installed
	$(BIN)/dllm runtime build --backend $(BACKEND)

test: setup
	$(BIN)/python -m pytest -q

chat: setup
	$(BIN)/dllm chat

clean:
	rm -rf $(VENV) build dist *.egg-info
