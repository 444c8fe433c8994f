#!/usr/bin/env bash
# DFT negative generation on Slurm: one array task per shard, each running
# scripts/generate_negatives.py in the vLLM container (pyxis/enroot), then one merge job that
# starts only if every shard succeeded.  Run it on a login node, from the repository root:
#
#   NUM_SHARDS=16 bash slurm/generate_negatives.sh model.path=mistralai/Mistral-7B-v0.1 \
#       model.revision=<commit> data.input=/lustre/data/uf_sft.parquet output.dir=/lustre/runs/neg-uf
#
# The key=value arguments are passed to both scripts (see conf/generate_negatives.yaml); shard.index
# and shard.count are set here.  Preempted or failed tasks can simply be resubmitted: finished
# shards are skipped.  See docs/generation.md.
set -euo pipefail

# ---- site-specific settings: edit here or export before running -----------------------------------
: "${ACCOUNT:=}"                                 # sbatch --account (empty: the default account)
: "${PARTITION:=batch}"                          # sbatch --partition for the shard tasks
: "${MERGE_PARTITION:=${PARTITION}}"             # partition for the (CPU-only) merge job
: "${QOS:=}"                                     # sbatch --qos (empty: none)
: "${TIME_LIMIT:=04:00:00}"                      # wall time per shard task
: "${NUM_SHARDS:=16}"                            # shard.count: the input is split into this many tasks
: "${MAX_PARALLEL:=16}"                          # at most this many shard tasks run at once
: "${GPUS_PER_TASK:=1}"                          # GPUs per shard = model.tensor_parallel_size
: "${CPUS_PER_TASK:=16}"
: "${MEM_PER_TASK:=128G}"
: "${CONTAINER_IMAGE:=vllm/vllm-openai:v0.33.0}" # pyxis image: registry name or a local .sqsh file
: "${CONTAINER_MOUNTS:=/lustre:/lustre}"         # comma-separated src:dst mounts (data, outputs, HF cache)
: "${REPO_DIR:=${PWD}}"                          # this checkout, visible at the same path in the container
: "${CONFIG:=conf/generate_negatives.yaml}"      # config file, relative to REPO_DIR or absolute
: "${HF_HOME:=${HOME}/.cache/huggingface}"       # model cache; must be inside a mounted path
: "${LOG_DIR:=${REPO_DIR}/slurm-logs}"
# Packages the generator needs that a plain vLLM image lacks; set it empty (SETUP=) if the image has them.
: "${SETUP=pip install --quiet omegaconf pyarrow tqdm}"
# ----------------------------------------------------------------------------------------------------

export ACCOUNT PARTITION MERGE_PARTITION QOS TIME_LIMIT NUM_SHARDS MAX_PARALLEL GPUS_PER_TASK CPUS_PER_TASK
export MEM_PER_TASK CONTAINER_IMAGE CONTAINER_MOUNTS REPO_DIR CONFIG HF_HOME LOG_DIR SETUP

# Runs one command in the container, from the checkout, after SETUP; the arguments travel as "$@" of
# the inner shell, so overrides with spaces or quotes arrive intact.
in_container() {
    # shellcheck disable=SC2016  # expanded by the inner shell, inside the container
    srun --container-image="${CONTAINER_IMAGE}" --container-mounts="${CONTAINER_MOUNTS}" \
        --container-workdir="${REPO_DIR}" --no-container-mount-home \
        bash -c 'set -e; if [ -n "${SETUP}" ]; then eval "${SETUP}"; fi; exec "$@"' in_container "$@"
}

run_shard() {
    echo "shard ${SLURM_ARRAY_TASK_ID} of ${NUM_SHARDS} on $(hostname), job ${SLURM_JOB_ID}"
    in_container python scripts/generate_negatives.py --config "${CONFIG}" "$@" \
        "shard.index=${SLURM_ARRAY_TASK_ID}" "shard.count=${NUM_SHARDS}" \
        "model.tensor_parallel_size=${GPUS_PER_TASK}"
}

run_merge() {
    in_container python scripts/merge_negatives.py --config "${CONFIG}" "$@" "shard.count=${NUM_SHARDS}"
}

submit() {
    mkdir -p "${LOG_DIR}"
    local common=(--parsable --export=ALL)
    [[ -n "${ACCOUNT}" ]] && common+=(--account="${ACCOUNT}")
    [[ -n "${QOS}" ]] && common+=(--qos="${QOS}")
    local script="${REPO_DIR}/slurm/generate_negatives.sh"
    local array_job
    array_job=$(sbatch "${common[@]}" --job-name=dft-negatives --partition="${PARTITION}" \
        --array="0-$((NUM_SHARDS - 1))%${MAX_PARALLEL}" --nodes=1 --ntasks=1 \
        --gpus-per-task="${GPUS_PER_TASK}" --cpus-per-task="${CPUS_PER_TASK}" --mem="${MEM_PER_TASK}" \
        --time="${TIME_LIMIT}" --requeue --open-mode=append --output="${LOG_DIR}/negatives-%A_%a.log" \
        "${script}" __shard "$@")
    local merge_job
    merge_job=$(sbatch "${common[@]}" --job-name=dft-negatives-merge --partition="${MERGE_PARTITION}" \
        --dependency="afterok:${array_job}" --nodes=1 --ntasks=1 --cpus-per-task=4 --mem=64G \
        --time=01:00:00 --output="${LOG_DIR}/negatives-merge-%j.log" \
        "${script}" __merge "$@")
    echo "submitted shard array ${array_job} (${NUM_SHARDS} tasks) and merge job ${merge_job}"
    echo "logs: ${LOG_DIR}; if a shard fails, fix it and rerun this command: finished shards are skipped"
}

case "${1:-}" in
    __shard) shift; run_shard "$@" ;;
    __merge) shift; run_merge "$@" ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) submit "$@" ;;
esac
