#!/usr/bin/env bash
# DFT on Mistral-7B-v0.1 (conf/dft_mistral.yaml) on Slurm: one task per GPU on every node, in the
# training container (pyxis/enroot).  Submit from the repository root:
#
#   mkdir -p slurm-logs && sbatch slurm/dft_mistral.sh [key=value ...]
#   sbatch --nodes=4 slurm/dft_mistral.sh optim.lr=1e-6
#   RECIPE=conf/dft_metamath.yaml EXPERIMENT=dft-metamath sbatch slurm/dft_mistral.sh
#
# key=value arguments are config overrides applied after the recipe.  Account, partition, nodes and
# time: the #SBATCH lines below, sbatch options, or SBATCH_ACCOUNT / SBATCH_PARTITION /
# SBATCH_TIMELIMIT in the environment.  On preemption, or 10 minutes before the time limit (USR1),
# training saves a checkpoint and exits 75; the job requeues itself and resumes in the same run.dir.
# The log is slurm-logs/<job name>-<job id>.out, appended to across requeues.  See docs/cluster.md.
#SBATCH --job-name=dft-mistral
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=slurm-logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@600
set -euo pipefail

# ---- site-specific settings: edit here or export before sbatch (it passes the environment on) -------
: "${CONTAINER_IMAGE:=/lustre/images/nemo_dft.sqsh}"  # training image: enroot .sqsh file or registry name
: "${SITE_ROOT:=/lustre/${USER:-$(id -un)}/dft}"     # default parent of the three directories below
: "${DATA_DIR:=${SITE_ROOT}/data}"                   # host directory mounted at /data (recipe: data.path)
: "${CHECKPOINT_DIR:=${SITE_ROOT}/checkpoints}"      # mounted at /checkpoints (model.init_from, tokenizer.path)
: "${RUNS_DIR:=${SITE_ROOT}/runs}"                   # mounted at /runs (run.dir)
# src:dst pairs, comma-separated; add <checkout>:/opt/nemo_dft to run a checkout instead of the image's copy.
: "${CONTAINER_MOUNTS:=${DATA_DIR}:/data,${CHECKPOINT_DIR}:/checkpoints,${RUNS_DIR}:/runs}"
: "${CODE_DIR:=/opt/nemo_dft}"                       # nemo_dft inside the container: the working directory
: "${RECIPE:=conf/dft_mistral.yaml}"                 # training config, relative to CODE_DIR or absolute
: "${EXPERIMENT:=dft-mistral}"                       # run.dir=/runs/$EXPERIMENT: same name resumes, new name starts
: "${GPUS_PER_NODE:=${SLURM_NTASKS_PER_NODE:-8}}"    # one task per GPU: follows --ntasks-per-node
: "${REPO_DIR:=${SLURM_SUBMIT_DIR:-${PWD}}}"         # this checkout on the host (for slurm/lib/launch.sh)
# ------------------------------------------------------------------------------------------------------

# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "${REPO_DIR}/slurm/lib/launch.sh"
setup_rendezvous
run_with_requeue python scripts/train_dft.py --config "${RECIPE}" "run.dir=/runs/${EXPERIMENT}" \
    "trainer.devices=${GPUS_PER_NODE}" "trainer.num_nodes=${NUM_NODES}" "$@"
