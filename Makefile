# Quick start: `make chat` or `make test`. Both set everything up first and are idempotent:
# the venv is rebuilt only when pyproject.toml changes, the patched runtime only when patches or flags change.
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
DLLM_HOME ?= $(HOME)/.cache/dllm
BACKEND  ?= auto
export DLLM_HOME

.PHONY: setup runtime test chat clean cuda-wheels cuda-check cuda-check-llada2 cuda-check-smoke \
        vulkan-deps vulkan-runtime vulkan-test op-check gpu-check
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

# CUDA compile check without a GPU or a system toolkit (ggml_patch/cuda_check.py): the [cuda] extra's wheels go to
# .cuda-wheels/ (pip --target, ~1.1 GB) rather than into the venv, and the patched runtime is compiled for
# CUDA_ARCH in $(DLLM_HOME)/build/cuda-check-<key>/. Interrupted runs resume. Hours on 2 cores: see ggml_patch/README.md.
CUDA_WHEELS ?= .cuda-wheels
CUDA_ARCH   ?= 80-real;90-real
CUDA_JOBS   ?= $(shell nproc 2>/dev/null || echo 2)
CUDA_CHECK  = DLLM_CUDA_WHEELS=$(abspath $(CUDA_WHEELS)) $(BIN)/python -m ggml_patch.cuda_check --toolkit pip \
              --arch '$(CUDA_ARCH)' -j $(CUDA_JOBS)
# the objects the llada2 graph runs, most important first (backend and confidence-head ops, matmul and attention
# kernels, then the Q4_K/Q6_K/Q8_0 mmq and f16/q8_0 flash-attention instances, the mma attention, mmf, and
# last the tile attention, which sm_80/sm_90 use only for head sizes 40 and 72)
LLADA2_CUDA_OBJECTS = \
  --only 'dir/(ggml-cuda|softmax|getrows|top-k|argsort|norm|rope|unary|binbcast|fattn|mmq|mmvq|mmf|mmvf|mmid|cpy|set-rows|fill|topk-moe|convert|quantize|scale|sumrows|sum|concat|diagmask|fattn-tile|moe-weighted-reduction)\.cu\.o$$' \
  --only 'mmq-instance-(q4_k|q8_0|q6_k)\.cu|fattn-vec-instance-(f16-f16|q8_0-q8_0)\.cu|fattn-tile-instance-dkq128-dv128\.cu' \
  --only 'fattn-mma-f16-instance' --only 'mmf-instance' --only 'fattn-tile-instance'

$(CUDA_WHEELS)/.installed: pyproject.toml | $(VENV)/.installed
	$(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['cuda']))" > $(CUDA_WHEELS).txt
	$(BIN)/python -m pip install -q --upgrade --target $(CUDA_WHEELS) -r $(CUDA_WHEELS).txt
	rm -f $(CUDA_WHEELS).txt
	touch $@

cuda-wheels: $(CUDA_WHEELS)/.installed

cuda-check: cuda-wheels          # everything: libggml-cuda and libllama for CUDA_ARCH
	$(CUDA_CHECK) $(CUDA_CHECK_ARGS)

cuda-check-llada2: cuda-wheels   # only the ggml-cuda objects the llada2 graph needs, in priority order
	$(CUDA_CHECK) $(LLADA2_CUDA_OBJECTS) $(CUDA_CHECK_ARGS)

cuda-check-smoke: cuda-wheels    # CI: toolkit discovery, configure, link probe, the confidence-head ops' kernels
	$(CUDA_CHECK) --only '/(top-k|softmax|getrows)\.cu\.o$$' $(CUDA_CHECK_ARGS)

# Vulkan (ggml_patch/backends/vulkan.py, ggml_patch/README.md "GPU check"). vulkan-deps installs the toolchain
# from Debian/Ubuntu packages (mesa-vulkan-drivers brings the libraries lavapipe needs) and unpacks Mesa 25's
# lavapipe from bookworm-backports under $(DLLM_HOME)/lavapipe (Debian 12's own corrupts its heap in long runs);
# tests select it with VK_ICD_FILENAMES. vulkan-runtime builds the Vulkan library beside the CPU one (cached).
VULKAN_PACKAGES := glslc libvulkan-dev spirv-headers mesa-vulkan-drivers
vulkan-deps: $(VENV)/.installed
	@missing=$$(for p in $(VULKAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing $$missing" >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	$(BIN)/python -m ggml_patch.lavapipe install

vulkan-runtime: $(VENV)/.installed
	nice -n 10 $(BIN)/dllm runtime build --backend vulkan

vulkan-test: vulkan-runtime
	DLLM_TEST_BACKEND=vulkan $(BIN)/python -m pytest -q -rs tests/test_vulkan_backend.py tests/test_backend_exact.py

# ggml's test-backend-ops against the CPU backend for the ops and types of the llada2 graph (ggml_patch/op_check.py)
OP_CHECK_ARGS ?=
op-check: $(VENV)/.installed
	$(BIN)/python -m ggml_patch.op_check --backend $(BACKEND) $(OP_CHECK_ARGS)

# One command for whoever gets a GPU: build, op check, the exactness tests, a short bench.
# make gpu-check BACKEND=cuda (or vulkan). CUDA: --cuda-arch native by default (the visible GPU).
GPU_BENCH_ARGS ?= --synthetic llada2-mini --layers 2 --quant q4_k_m --modes speed --tests pp,step,gen --reps 2
gpu-check: $(VENV)/.installed
	@case "$(BACKEND)" in cuda|vulkan) ;; *) echo "usage: make gpu-check BACKEND=cuda|vulkan" >&2; exit 2;; esac
	$(BIN)/dllm runtime build --backend $(BACKEND)
	DLLM_BACKEND=$(BACKEND) $(BIN)/dllm runtime info
	$(BIN)/python -m ggml_patch.op_check --backend $(BACKEND) $(OP_CHECK_ARGS)
	DLLM_TEST_BACKEND=$(BACKEND) $(BIN)/python -m pytest -q -rs tests/test_backend_exact.py
	DLLM_BACKEND=$(BACKEND) $(BIN)/dllm bench $(GPU_BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
