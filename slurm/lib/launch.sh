# shellcheck shell=bash
# Sourced by the sbatch templates in slurm/ (dft_mistral.sh, dft2_mistral.sh, precompute_ref.sh): the
# rendezvous, the launch of one task per GPU in the container, and the requeue decision.
#
# Lightning (inside NeMo) reads each process's rank from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS,
# so srun starts the ranks itself; no torchrun.  The scripts stop on SIGTERM (preemption) or SIGUSR1
# (sbatch --signal, before the time limit) after a complete checkpoint and exit with EXIT_PREEMPTED;
# the job then requeues itself and the next start resumes.  Any other non-zero exit is a failure and
# is not requeued, so a broken run does not loop.
#
# Needs, set by the template: CONTAINER_IMAGE, CONTAINER_MOUNTS, CODE_DIR, GPUS_PER_NODE.

EXIT_PREEMPTED=75  # nemo_dft/platform/signals.py: checkpoint saved, run me again (EX_TEMPFAIL)

# MASTER_ADDR = the allocation's first host, MASTER_PORT from the job id (a requeued job keeps its
# id, hence its port); NUM_NODES from the allocation.
setup_rendezvous() {
    : "${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch}"
    : "${SLURM_JOB_NODELIST:?not inside a Slurm job: submit with sbatch}"
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
    [[ ${#hosts[@]} -gt 0 && -n "${hosts[0]}" ]] || {
        echo "scontrol show hostnames ${SLURM_JOB_NODELIST} printed no host" >&2
        exit 1
    }
    MASTER_ADDR="${hosts[0]}"
    MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    NUM_NODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#hosts[@]}}}"
    export MASTER_ADDR MASTER_PORT
}

# Runs "$@" as GPUS_PER_NODE tasks on each of NUM_NODES nodes, in the container, from CODE_DIR.
# --kill-on-bad-exit: one failing rank ends the others instead of leaving them hung in a collective.
launch() {
    srun --nodes="${NUM_NODES}" --ntasks-per-node="${GPUS_PER_NODE}" --kill-on-bad-exit=1 \
        --container-image="${CONTAINER_IMAGE}" --container-mounts="${CONTAINER_MOUNTS}" \
        --container-workdir="${CODE_DIR}" --no-container-mount-home \
        "$@"
}

# Launches "$@" and ends the batch script by its exit status: 0 done; EXIT_PREEMPTED requeue the job
# (same job id, same arguments, same run.dir) and exit 0; anything else exit with it.
run_with_requeue() {
    echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${NUM_NODES} node(s) x ${GPUS_PER_NODE} task(s)," \
        "rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
    # Slurm also sends SIGTERM to this shell on preemption and at the time limit; with a handler
    # (not an ignore, which srun would inherit) bash waits for srun to finish before running it.
    trap 'echo "batch script: SIGTERM, waiting for the tasks to checkpoint and exit"' TERM
    local status=0
    launch "$@" || status=$?
    case "${status}" in
        0)
            echo "finished"
            exit 0
            ;;
        "${EXIT_PREEMPTED}")
            echo "stopped with a checkpoint (exit ${status}): requeueing job ${SLURM_JOB_ID}"
            scontrol requeue "${SLURM_JOB_ID}" || {
                echo "scontrol requeue ${SLURM_JOB_ID} failed; resubmit the same command to resume" >&2
                exit "${status}"
            }
            exit 0
            ;;
        *)
            echo "failed with exit status ${status}; not requeued" >&2
            exit "${status}"
            ;;
    esac
}
