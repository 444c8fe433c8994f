#!/usr/bin/env bash
# The paper's lm-eval-harness benchmarks (conf/lm_eval_paper.yaml: MMLU, TruthfulQA, HellaSwag,
# Winogrande, GSM8K, ARC-Challenge, IFEval) on an exported HF checkpoint, with scripts/lm_eval.py in
# the training container (pyxis/enroot), on one GPU.  Export first (scripts/convert_hf.py export),
# then submit from the repository root:
#
#   mkdir -p slurm-logs && sbatch slurm/lm_eval.sh /runs/dft-mistral/hf [key=value ...]
#
# The first argument is the HF directory as the container sees it (/runs is RUNS_DIR); key=value
# arguments are scripts/lm_eval.py settings (model=vllm, limit=N, output_path=DIR, ...).  Results:
# <HF_DIR>/lm_eval/summary.json unless output_path says otherwise.  lm_eval is installed into the
# container by SETUP (set it empty, SETUP=, for an image that has it).  See docs/cluster.md.
#SBATCH --job-name=dft-lm-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=08:00:00
#SBATCH --output=slurm-logs/%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail

: "${REPO_DIR:=${SLURM_SUBMIT_DIR:-${PWD}}}"         # this checkout on the host (slurm/site.sh)
# Site settings (image, mounts, directories): slurm/site.sh.
# shellcheck source-path=SCRIPTDIR source=site.sh
source "${REPO_DIR}/slurm/site.sh"
# ---- this job: override by exporting before sbatch ----------------------------------------------------
: "${LM_EVAL_CONFIG:=conf/lm_eval_paper.yaml}"       # task list and shots (inside the container's CODE_DIR)
: "${SETUP=pip install --quiet lm-eval==0.4.13}"     # run in the container first; empty: nothing
# ------------------------------------------------------------------------------------------------------
export SETUP

MODEL_DIR="${1:?usage: sbatch slurm/lm_eval.sh HF_DIR [key=value ...] (HF_DIR as the container sees it)}"
shift
echo "job ${SLURM_JOB_ID:-?}: lm-eval on ${MODEL_DIR} (${LM_EVAL_CONFIG})"
# shellcheck disable=SC2016  # expanded by the inner shell, inside the container
srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 \
    --container-image="${CONTAINER_IMAGE}" --container-mounts="${CONTAINER_MOUNTS}" \
    --container-workdir="${CODE_DIR}" --no-container-mount-home \
    bash -c 'set -e; if [ -n "${SETUP}" ]; then eval "${SETUP}"; fi; exec "$@"' lm_eval_job \
    python scripts/lm_eval.py --config "${LM_EVAL_CONFIG}" --model "${MODEL_DIR}" "$@"
