#!/usr/bin/env bash
# LoRA-DFT on Mistral-7B-v0.1 (conf/dft_mistral_lora.yaml) on ONE node: one task per GPU, in the
# training container (pyxis/enroot).  Checkpoints hold the adapters only (peft.checkpoint=auto with
# model.init_from); a requeued job reloads the base from model.init_from.  From the repository root:
#
#   mkdir -p slurm-logs && sbatch slurm/dft_mistral_lora.sh [key=value ...]
#   sbatch --ntasks-per-node=4 --gpus-per-node=4 slurm/dft_mistral_lora.sh   # fewer GPUs: docs/cluster.md 6c
#
# key=value arguments are config overrides applied after the recipe.  Account, partition, nodes and
# time: the #SBATCH lines below, sbatch options, or SBATCH_ACCOUNT / SBATCH_PARTITION /
# SBATCH_TIMELIMIT in the environment.  On preemption, or 10 minutes before the time limit (USR1),
# training saves a checkpoint and exits 75; the job requeues itself and resumes in the same run.dir.
# The log is slurm-logs/<job name>-<job id>.out, appended to across requeues.  See docs/cluster.md.
#SBATCH --job-name=dft-mistral-lora
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=slurm-logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@600
set -euo pipefail

: "${REPO_DIR:=${SLURM_SUBMIT_DIR:-${PWD}}}"         # this checkout on the host (slurm/site.sh, slurm/lib/)
# Site settings (image, mounts, directories, GPUs per node): slurm/site.sh.
# shellcheck source-path=SCRIPTDIR source=site.sh
source "${REPO_DIR}/slurm/site.sh"
# ---- this job: override by exporting before sbatch ----------------------------------------------------
: "${RECIPE:=conf/dft_mistral_lora.yaml}"            # training config, relative to CODE_DIR or absolute
: "${EXPERIMENT:=dft-mistral-lora}"                  # run.dir=/runs/$EXPERIMENT: same name resumes, new name starts
# ------------------------------------------------------------------------------------------------------

# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "${REPO_DIR}/slurm/lib/launch.sh"
setup_rendezvous
run_with_requeue python scripts/train_dft.py --config "${RECIPE}" "run.dir=/runs/${EXPERIMENT}" \
    "trainer.devices=${GPUS_PER_NODE}" "trainer.num_nodes=${NUM_NODES}" "$@"
