# shellcheck shell=bash
# Site settings shared by the sbatch templates (dft_mistral.sh, dft2_mistral.sh, precompute_ref.sh):
# edit here once for the cluster, or export before sbatch (it passes the environment on).
: "${CONTAINER_IMAGE:=/lustre/images/nemo_dft.sqsh}"  # training image: enroot .sqsh file or registry name
: "${SITE_ROOT:=/lustre/${USER:-$(id -un)}/dft}"     # default parent of the three directories below
: "${DATA_DIR:=${SITE_ROOT}/data}"                   # host directory mounted at /data (recipe: data.path)
: "${CHECKPOINT_DIR:=${SITE_ROOT}/checkpoints}"      # mounted at /checkpoints (model.init_from, tokenizer.path)
: "${RUNS_DIR:=${SITE_ROOT}/runs}"                   # mounted at /runs (run.dir, reference log-probs)
# src:dst pairs, comma-separated; add <checkout>:/opt/nemo_dft to run a checkout instead of the image's copy.
: "${CONTAINER_MOUNTS:=${DATA_DIR}:/data,${CHECKPOINT_DIR}:/checkpoints,${RUNS_DIR}:/runs}"
: "${CODE_DIR:=/opt/nemo_dft}"                       # nemo_dft inside the container: the working directory
: "${GPUS_PER_NODE:=${SLURM_NTASKS_PER_NODE:-8}}"    # one task per GPU: follows --ntasks-per-node
