#!/usr/bin/env bash
# Entry point of the nemo_dft images: maps a command to its script, or runs any other command as is.
#
#   docker run nemo_dft train --config conf/dft_mistral.yaml dft.tau=1.0
#   docker run nemo_dft bash
set -euo pipefail

APP_DIR="${NEMO_DFT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"  # the checkout in the image
# The generation image sets PYTHON=python3; outside an image, the checkout's .venv/ (make env).
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${APP_DIR}/.venv/bin/python" ]]; then PYTHON="${APP_DIR}/.venv/bin/python"; else PYTHON=python; fi
fi

usage() {
    cat <<HELP
nemo_dft: Discriminative Fine-Tuning (DFT/DFT2) of LLMs on NeMo 2 / Megatron-core.

usage: docker run [docker options] IMAGE COMMAND [arguments]

commands (each takes --help):
  train            scripts/train_dft.py             DFT / DFT2 training: [--config FILE] [key=value ...]
  precompute-ref   scripts/precompute_ref_logps.py  reference log-probs for dft.reference=offline
  convert          scripts/convert_hf.py            HF <-> NeMo 2 checkpoints: import | export | verify
  generate         scripts/generate_negatives.py    self-play negatives with vLLM (generation image)
  merge            scripts/merge_negatives.py       check and merge the generated shards
  help             this text
Anything else runs as a command in the container, e.g. bash or python.
Working directory: ${APP_DIR} (conf/ holds the recipes).  Docs: docs/cluster.md.
HELP
}

run_script() {
    local script="$1"
    shift
    exec "${PYTHON}" "${APP_DIR}/scripts/${script}" "$@"
}

command="${1:-help}"
[[ $# -gt 0 ]] && shift
case "${command}" in
    train) run_script train_dft.py "$@" ;;
    precompute-ref) run_script precompute_ref_logps.py "$@" ;;
    convert) run_script convert_hf.py "$@" ;;
    generate) run_script generate_negatives.py "$@" ;;
    merge) run_script merge_negatives.py "$@" ;;
    help | -h | --help) usage ;;
    *) exec "${command}" "$@" ;;
esac
