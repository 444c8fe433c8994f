#!/usr/bin/env bash
# The GPU kit: nemo_dft's training path carried as wheels to a lent GPU machine that has torch but
# no NeMo, megatron-core or Transformer Engine, and no package registry (docs/gpu.md).
#
#   scripts/gpu_kit.sh prepare          here: download the wheels into .gpu-wheels/ (at most 56 MiB)
#   scripts/gpu_kit.sh run [--cpu]      there: install them (--target, no index) and measure; writes
#                                       $OUT/gpu_report.json and $OUT/gpu_kit.log
#   scripts/gpu_kit.sh check            here: the emulation (make gpu-kit-check): a venv holding only
#                                       what the GPU image holds, then prepare and `run --cpu`
#   scripts/gpu_kit.sh packages         print the kit's list and the GPU image's list (for tests)
#
# Environment: GPU_KIT_PYTHON_VERSION (prepare: wheels for this Python, default 3.12; check uses the
# local python3.11 and cp311 wheels, as no CPU torch for 3.12 is on this machine), PYTHON (the
# interpreter, default python3), GPU_KIT_SITE (install target, default /tmp/gpu-kit-site),
# GPU_KIT_BUDGET_S (run's whole time limit, default 480; 1800 with --cpu).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIT_DIR=${GPU_KIT_DIR:-$REPO/.gpu-wheels}
LIMIT_MIB=56

# What the GPU image lacks for `import nemo.collections.llm` and scripts/train_dft.py, found by
# installing into the emulated image until the trainer ran (docs/gpu.md).  The versions are those of
# the CPU test environment.  Pure-Python packages published as sdists only are built into wheels here.
KIT_PACKAGES=(
    nemo_toolkit==2.7.3 megatron_core==0.15.3
    transformers==4.57.6          # NeMo's pin (~=4.57); the image's 5.x is shadowed
    huggingface_hub==0.36.2       # transformers 4.57 refuses huggingface-hub >= 1.0 at import
    tokenizers==0.22.2            # ... and tokenizers > 0.23.0 (the image has 0.23.2)
    lightning==2.4.0              # NeMo 2.7.3 pins lightning <= 2.4.0, which the tests use
    hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
    fiddle==0.3.1 libcst==1.9.0 graphviz==0.21 docstring_parser==0.18.0
    wget==3.2 text-unidecode==1.3 ruamel.yaml==0.19.1
    nv-one-logger-core==2.3.1 nv-one-logger-training-telemetry==2.3.1
    nv-one-logger-pytorch-lightning-integration==2.3.1 StrEnum==0.4.15 overrides==7.7.0 toml==0.10.2
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19
    # nemo.collections.llm imports nemo_run, which imports its executors' clients
    nemo_run==0.11.1 catalogue==2.0.10 torchx==0.7.0 fabric==3.2.3 invoke==2.2.1 paramiko==5.1.0
    cryptography==51.0.1 cffi==2.1.1 pycparser==3.12 bcrypt==5.0.0 PyNaCl==1.6.2 decorator==5.3.2
    Deprecated==1.3.1 leptonai==0.27.3 loguru==0.7.3 fastapi==0.163.2 starlette==0.52.1
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
    importlib_metadata==10.2.0 lazy-importer==0.1.0 contextlib2==21.6.0
    prometheus-fastapi-instrumentator==7.0.0 uvicorn==0.55.0 exceptiongroup==1.3.2 ledoc-ui==0.1.0
    # nemo.collections.llm.api imports NeMo's distillation code, which imports modelopt
    nvidia-modelopt==0.37.0 torchprofile==0.1.0
    # NeMo's logger sets up its checkpoint callback from nvidia-resiliency-ext
    nvidia-resiliency-ext==0.4.1 defusedxml==0.7.1 pynvml==13.0.1
)
# modelopt imports pulp at module level; PuLP's 16 MB wheel would break the size limit, so a stub
# that fails on first use is carried instead (scripts/gpu_kit_pulp_stub.py).
# Carried although the image has the package, for the version (reasons above).
CARRIED_DESPITE_IMAGE=(transformers huggingface-hub tokenizers lightning)

# The GPU image's Python packages (/work/.library/device/KINDS.md, read 2026-11-17): never carried
# unless named in CARRIED_DESPITE_IMAGE.
GPU_IMAGE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"

# The emulated image (check): the image's torch-independent packages that the training path can
# touch, at the image's versions where KINDS.md gives them and this machine has them for Python 3.11
# (numpy 2.5.2 has no cp311 wheel here: the newest 2.x), torch replaced by the local CPU wheel.
EMULATED_IMAGE=(
    "numpy>=2.4" "huggingface_hub>=1.0" "tokenizers>=0.23.1" "transformers>=5.0" "safetensors>=0.6"
    "pytorch-lightning>=2.6" "lightning>=2.6" "accelerate>=1.10" "torchmetrics>=1.8" peft pyarrow pandas
    tensorboard pyyaml regex requests tqdm einops scipy scikit-learn matplotlib h5py sentencepiece tiktoken
    psutil jinja2 packaging wrapt cloudpickle rich tabulate xxhash sacrebleu onnx protobuf cuda-bindings
    python-dateutil setuptools typing-extensions absl-py aiohttp attrs click filelock fsspec httpx typer sympy
    networkx lxml pillow msgpack pygments urllib3 zipp multipledispatch typing-inspect pyre-extensions
    nvidia-ml-py portalocker joblib prometheus-client anyio h11 httpcore tensorstore
)
CPU_TORCH=${GPU_KIT_CPU_TORCH:-torch==2.13.0}

norm() { tr '[:upper:]' '[:lower:]' | tr '_.' '--'; }

say() { echo "gpu_kit: $*"; }  # part() appends its lines to the log too

cmd_packages() {
    echo "kit: ${KIT_PACKAGES[*]}"
    echo "image: $(echo "$GPU_IMAGE_PACKAGES" | tr '\n' ' ')"
    echo "carried despite image: ${CARRIED_DESPITE_IMAGE[*]}"
}

# Exit 1 naming any kit package the image already has (unless in CARRIED_DESPITE_IMAGE).
check_not_preserved() {
    local bad=0 spec name
    for spec in "${KIT_PACKAGES[@]}"; do
        name=$(echo "${spec%%==*}" | norm)
        if grep -qx -- "$name" <(echo "$GPU_IMAGE_PACKAGES" | tr ' ' '\n' | norm) &&
            ! grep -qx -- "$name" <(printf '%s\n' "${CARRIED_DESPITE_IMAGE[@]}" | norm); then
            say "error: $spec is in the GPU image already; drop it from KIT_PACKAGES" >&2
            bad=1
        fi
    done
    return $bad
}

# check_size DIR: print the total and fail above LIMIT_MIB.
check_size() {
    local bytes mib
    bytes=$(find "$1" -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
    say "$(find "$1" -name '*.whl' | wc -l) wheels, $mib MiB in $1 (limit $LIMIT_MIB MiB)"
    if awk -v b="$bytes" -v l="$LIMIT_MIB" 'BEGIN {exit !(b > l * 1048576)}'; then
        say "error: the kit is $mib MiB, over the $LIMIT_MIB MiB limit (the working tree that travels is 64 MiB)" >&2
        return 1
    fi
}

cmd_prepare() {
    local pyver=${GPU_KIT_PYTHON_VERSION:-3.12} py=${PYTHON:-python3} spec tmp
    check_not_preserved
    rm -rf "$KIT_DIR" && mkdir -p "$KIT_DIR"
    local platforms=(--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    tmp=$(mktemp -d)
    for spec in "${KIT_PACKAGES[@]}"; do
        if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
            "${platforms[@]}" -d "$KIT_DIR" "$spec" 2>"$tmp/err"; then
            # sdist only (antlr4-python3-runtime, wget): pure Python, built into a wheel here
            "$py" -m pip wheel -q --no-deps -w "$KIT_DIR" "$spec" 2>"$tmp/err" ||
                { grep -v 'is ignored' "$tmp/err" >&2; say "error: no wheel for $spec" >&2; exit 1; }
            say "built $spec from its sdist"
        fi
    done
    (cd "$REPO" && "$py" -m pip wheel -q --no-deps -w "$tmp/self" . 2>"$tmp/err") ||
        { cat "$tmp/err" >&2; exit 1; }
    mv "$tmp"/self/nemo_dft-*.whl "$KIT_DIR"/
    "$py" "$REPO/scripts/gpu_kit_pulp_stub.py" "$KIT_DIR" >/dev/null
    rm -rf "$tmp" "$REPO/build/lib" "$REPO/build/bdist.linux-x86_64"
    find "$KIT_DIR" -name '*.whl' -printf '  %8k K  %f\n' | sort -n -r
    check_size "$KIT_DIR"
}

# ---- run -----------------------------------------------------------------------------------------
part() {  # part NAME TIMEOUT_S CMD...: run with a time limit, record rc and seconds
    local name=$1 limit=$2 t0 rc left
    shift 2
    left=$((DEADLINE - $(date +%s)))
    if ((left < 20)); then
        say "part $name skipped: ${left}s left of the budget" | tee -a "$STATUS_LOG"
        echo "{\"part\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": true}" >>"$STATUS"
        return 0
    fi
    ((limit > left)) && limit=$left
    say "part $name (limit ${limit}s): $*"
    t0=$(date +%s)
    set +e
    timeout --kill-after=10 "$limit" "$@" >>"$STATUS_LOG" 2>&1
    rc=$?
    set -e
    say "part $name: rc=$rc in $(($(date +%s) - t0)) s"
    echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"limit_s\": $limit}" >>"$STATUS"
}

# packed_and_padded PART TIMEOUT_S STEPS OVERRIDES...: the same training run packed, then padded, as
# parts PART_packed and PART_padded; called from cmd_run, whose py, runs and common it reads.
packed_and_padded() {
    local name=$1 limit=$2 steps=$3 mode
    shift 3
    for mode in packed padded; do
        local packing=false
        [[ $mode == packed ]] && packing=true
        part "${name}_$mode" "$limit" "$py" "$REPO/scripts/train_dft.py" "run.dir=$runs/${name}_$mode" \
            "trainer.max_steps=$steps" "data.packing=$packing" "${common[@]}" "$@"
    done
}

cmd_run() {
    local cpu=0
    [[ ${1:-} == --cpu || ${DEVICE:-} == cpu ]] && cpu=1
    local py=${PYTHON:-python3} site=${GPU_KIT_SITE:-/tmp/gpu-kit-site}
    OUT=${OUT:-$REPO/runs/gpu-kit-out}
    local runs=${GPU_KIT_RUNS:-/tmp/gpu-kit-runs} budget
    budget=${GPU_KIT_BUDGET_S:-$((cpu ? 1800 : 480))}
    DEADLINE=$(($(date +%s) + budget))
    mkdir -p "$OUT"
    rm -rf "$runs" && mkdir -p "$runs"
    STATUS=$runs/status.jsonl STATUS_LOG=$OUT/gpu_kit.log
    : >"$STATUS"
    : >"$STATUS_LOG"
    export PYTHONUNBUFFERED=1
    ls "$KIT_DIR"/*.whl >/dev/null || { say "error: no wheels in $KIT_DIR (run prepare, carry .gpu-wheels)"; exit 1; }
    local t0
    t0=$(date +%s)
    rm -rf "$site"
    local rc=0
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$KIT_DIR"/*.whl >"$runs/install.log" 2>&1 || rc=$?
    grep -v 'is neither a file nor a directory' "$runs/install.log" | tee -a "$STATUS_LOG" || true
    ((rc == 0)) || { say "error: pip install of the kit failed (rc=$rc)" | tee -a "$STATUS_LOG"; exit 1; }
    export PYTHONPATH=$site
    echo "{\"part\": \"install\", \"rc\": 0, \"seconds\": $(($(date +%s) - t0))}" >>"$STATUS"
    say "installed $(find "$KIT_DIR" -name '*.whl' | wc -l) wheels into $site in $(($(date +%s) - t0)) s"
    "$py" -c "import torch, megatron.core, nemo, transformers, lightning; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-',
'| megatron-core', megatron.core.__version__, '| nemo', nemo.__version__, '| transformers', transformers.__version__,
'| lightning', lightning.__version__)" 2>&1 | tee -a "$STATUS_LOG"

    # The fusions that need Transformer Engine or apex kernels, off (neither is carried).
    local common=(trainer.progress_bar=false log.tensorboard=false data.eval_path=null
        model.config.apply_rope_fusion=false model.config.gradient_accumulation_fusion=false)
    local a b steps_a
    if ((cpu)); then  # emulation: the tiny demo shape in fp32 on CPU
        a=(trainer.accelerator=cpu model.precision=fp32 model.micro_batch_size=4 model.global_batch_size=8)
        b=(trainer.accelerator=cpu model.precision=fp32 model.micro_batch_size=4 model.global_batch_size=8)
        steps_a=2
    else  # a Mistral-shaped model of about 1.0B parameters (GQA 16/8 heads, SwiGLU), random init
        a=(trainer.accelerator=gpu model.precision=bf16 model.micro_batch_size=16 model.global_batch_size=64
            model.config.num_layers=18 model.config.hidden_size=2048 model.config.ffn_hidden_size=7168
            model.config.num_attention_heads=16 model.config.num_query_groups=8 model.config.kv_channels=128)
        b=(trainer.accelerator=gpu model.precision=fp32 model.micro_batch_size=4 model.global_batch_size=8)
        steps_a=20
    fi
    local limit_a=$((cpu ? 600 : 120)) limit_b=$((cpu ? 300 : 50))
    packed_and_padded a "$limit_a" "$steps_a" "${a[@]}"
    "$py" "$REPO/scripts/memory_plan.py" "${common[@]}" "${a[@]}" --gpu-gb "$( ((cpu)) && echo 80 || "$py" -c \
        'import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 1e9))' 2>/dev/null || echo 80)" \
        >"$runs/memory_plan.txt" 2>&1 || true
    packed_and_padded b "$limit_b" 3 "${b[@]}"
    if ((cpu)) && [[ -z ${GPU_KIT_WITH_BENCHMARK:-} ]]; then
        say "part c (benchmark --quick) not run under --cpu (set GPU_KIT_WITH_BENCHMARK=1)"
    else
        part c_benchmark_quick $((DEADLINE - $(date +%s) - 15)) "$py" "$REPO/benchmarks/dft_vs_sft.py" --quick \
            --out "$runs/c_benchmark" --fresh --threads 4
    fi
    "$py" "$REPO/scripts/gpu_kit_report.py" --runs "$runs" --out "$OUT/gpu_report.json" --mode "$( ((cpu)) && echo cpu || echo gpu)" \
        2>&1 | tee -a "$STATUS_LOG"
}

# ---- check (emulation) ---------------------------------------------------------------------------
cmd_check() {
    local t0 venv=$REPO/build/gpu-kit-emu base=${GPU_KIT_EMU_PYTHON:-python3.11} pyver
    t0=$(date +%s)
    pyver=$("$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    if [[ ! -f $venv/.ready ]]; then
        rm -rf "$venv"
        "$base" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --only-binary=:all: "$CPU_TORCH" "${EMULATED_IMAGE[@]}" 2>&1 |
            grep -v 'is neither a file nor a directory' || true
        touch "$venv/.ready"
    fi
    say "emulated image: $venv (Python $pyver, $("$venv/bin/python" -m pip list 2>/dev/null | wc -l) packages)"
    KIT_DIR=$REPO/build/gpu-kit-wheels-cp${pyver/./}  # .gpu-wheels/ keeps the cp312 kit for the GPU
    GPU_KIT_PYTHON_VERSION=$pyver PYTHON=${PREPARE_PYTHON:-python3} cmd_prepare
    PYTHON=$venv/bin/python GPU_KIT_SITE=$REPO/build/gpu-kit-site OUT=${OUT:-$REPO/runs/gpu-kit-check} cmd_run --cpu
    "$venv/bin/python" - "${OUT:-$REPO/runs/gpu-kit-check}/gpu_report.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
failed = [p["part"] for p in report["parts"] if p.get("rc") not in (0,)]
print("gpu_kit: emulation", "FAILED: " + ", ".join(failed) if failed else "passed", "| parts:",
      ", ".join(f"{p['part']} rc={p['rc']} {p['seconds']}s" for p in report["parts"]))
sys.exit(1 if failed else 0)
EOF
    say "check took $(($(date +%s) - t0)) s"
}

case ${1:-} in
prepare) cmd_prepare ;;
run) shift; cmd_run "$@" ;;
check) cmd_check ;;
packages) cmd_packages ;;
check-size) check_size "${2:?directory}" ;;
check-preserved) check_not_preserved ;;
*) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
