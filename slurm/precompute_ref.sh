#!/usr/bin/env bash
# Reference log-probabilities for offline DFT on Slurm: scripts/precompute_ref_logps.py scores every
# negative (and positive) the recipe's epochs will use under the frozen initial model, once, in the
# training container (pyxis/enroot), one task per GPU.  Submit from the repository root:
#
#   mkdir -p slurm-logs && sbatch slurm/precompute_ref.sh [key=value ...]
#   sbatch slurm/dft_mistral.sh dft.reference=offline dft.ref_logps=/runs/ref-logps/dft-mistral.parquet
#
# key=value arguments are training-config overrides (the same as for train_dft.py).  Account,
# partition, nodes and time: the #SBATCH lines below, sbatch options, or SBATCH_ACCOUNT /
# SBATCH_PARTITION / SBATCH_TIMELIMIT in the environment.  On preemption, or 5 minutes before the
# time limit (USR1), the script keeps its partial results and exits 75; the job requeues itself and
# the rerun continues where it stopped.  The log is slurm-logs/<job name>-<job id>.out.
# See docs/cluster.md.
#SBATCH --job-name=dft-ref-logps
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=slurm-logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@300
set -euo pipefail

: "${REPO_DIR:=${SLURM_SUBMIT_DIR:-${PWD}}}"         # this checkout on the host (slurm/site.sh, slurm/lib/)
# Site settings (image, mounts, directories, GPUs per node): slurm/site.sh.
# shellcheck source-path=SCRIPTDIR source=site.sh
source "${REPO_DIR}/slurm/site.sh"
# ---- this job: override by exporting before sbatch ----------------------------------------------------
: "${RECIPE:=conf/dft_mistral.yaml}"                 # the training config that will read the file
: "${REF_LOGPS:=/runs/ref-logps/dft-mistral.parquet}"  # output (container path); training: dft.ref_logps=
# ------------------------------------------------------------------------------------------------------

# shellcheck source-path=SCRIPTDIR source=lib/launch.sh
source "${REPO_DIR}/slurm/lib/launch.sh"
setup_rendezvous
run_with_requeue python scripts/precompute_ref_logps.py --config "${RECIPE}" "output=${REF_LOGPS}" \
    "trainer.devices=${GPUS_PER_NODE}" "trainer.num_nodes=${NUM_NODES}" "$@"
