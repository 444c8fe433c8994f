"""The paper recipes in conf/: they load and validate, carry the paper's hyper-parameters, and their
parallel layout is valid and fits on nodes of 8 x 80 GB GPUs.

The expected values are the paper's, copied from the shared reference dft-algorithm.md ("Reference
paper recipes"), not read from the YAML files under test.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from nemo_dft.config.training import load_config
from nemo_dft.demo.tiny_task import ASSET_DIR

from .tools import REPO

# dft-algorithm.md: Mistral-7B-v0.1 base, 2 epochs, lr 2e-6 cosine, warmup 0.1, global batch 128
# prompts, m = 2, bf16; u starts at 0; per-epoch negatives ("sample" mode) on by default.
PAPER_COMMON = {
    "model.arch": "mistral",
    "model.preset": None,
    "optim.lr": 2e-6,
    "optim.warmup_ratio": 0.1,
    "data.num_epochs": 2,
    "model.global_batch_size": 128,
    "dft.num_negatives": 2,
    "model.precision": "bf16",
    "dft.u_init": 0.0,
    "dft.per_epoch_negatives": True,
}
PAPER_DFT = {"dft.tau": 1.0, "dft.gamma": 0.85, "dft.ref_free": False, "dft.reference": "frozen"}
PAPER_DFT2 = {"dft.tau": 0.3, "dft.gamma": 0.9, "dft.ref_free": True}
# UltraFeedback: max_length 1024, max_prompt_length 512, the zephyr-style training template.
PAPER_ULTRAFEEDBACK = {"data.max_length": 1024, "data.max_prompt_length": 512, "tokenizer.chat_template": "zephyr"}
# MetaMath: Alpaca-style prompt, 256-token negatives.
PAPER_METAMATH = {"tokenizer.chat_template": "alpaca"}
METAMATH_NEGATIVE_TOKENS = 256

RECIPES = {
    "dft_mistral.yaml": {**PAPER_COMMON, **PAPER_DFT, **PAPER_ULTRAFEEDBACK},
    "dft2_mistral.yaml": {**PAPER_COMMON, **PAPER_DFT2, **PAPER_ULTRAFEEDBACK},
    "dft_metamath.yaml": {**PAPER_COMMON, **PAPER_DFT, **PAPER_METAMATH},
}
# The negatives each recipe trains on come from this generation config.
GENERATION_CONFIGS = {
    "dft_mistral.yaml": ["generate_negatives.yaml"],
    "dft2_mistral.yaml": ["generate_negatives.yaml"],
    "dft_metamath.yaml": ["generate_negatives.yaml", "generate_negatives_metamath.yaml"],
}

# Mistral-7B-v0.1 as published (its HF config.json): the shape NeMo's MistralConfig7B stands for.
MISTRAL_7B = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "ffn": 14336, "vocab": 32000}
GPUS_PER_NODE = 8
GPU_MEMORY_BYTES = 80e9
# Megatron mixed precision: bf16 weights 2 and fp32 gradient buffer 4 bytes per parameter on every
# rank; fp32 main weights 4 and Adam moments 8, divided over data-parallel ranks by the distributed
# optimizer; a frozen bf16 reference adds 2.
REPLICATED_BYTES_PER_PARAMETER = 6
OPTIMIZER_BYTES_PER_PARAMETER = 12
REFERENCE_BYTES_PER_PARAMETER = 2
# Share of a GPU the static state may take, so that activations of a micro-batch still fit.
STATIC_MEMORY_SHARE = 0.6


def site_overrides() -> list[str]:
    """Only the site-specific paths change: the embedded tiny task stands in for the real data."""
    return [f"data.path={ASSET_DIR / 'train.jsonl'}", f"data.eval_path={ASSET_DIR / 'heldout.jsonl'}"]


def load_recipe(name: str, extra: list[str] | None = None) -> DictConfig:
    # the recipes' model and tokenizer paths are the cluster's: files are not checked here
    return load_config(REPO / "conf" / name, site_overrides() + (extra or []), check_files=False)


def uses_frozen_reference(cfg: DictConfig) -> bool:
    return not cfg.dft.ref_free and cfg.dft.reference == "frozen"


def mistral_7b_parameters() -> int:
    shape = MISTRAL_7B
    head_dim = shape["hidden"] // shape["heads"]
    attention = shape["hidden"] * (shape["hidden"] + 2 * shape["kv_heads"] * head_dim) + shape["hidden"] ** 2
    mlp = 3 * shape["hidden"] * shape["ffn"]  # SwiGLU: gate, up, down
    per_layer = attention + mlp + 2 * shape["hidden"]  # two RMSNorms
    return shape["layers"] * per_layer + 2 * shape["vocab"] * shape["hidden"] + shape["hidden"]  # untied


def test_parameter_count_matches_the_published_size() -> None:
    assert mistral_7b_parameters() == pytest.approx(7.24e9, rel=0.005)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_and_has_the_paper_values(name: str) -> None:
    cfg = load_recipe(name)
    for key, expected in RECIPES[name].items():
        actual = OmegaConf.select(cfg, key)
        assert actual == (pytest.approx(expected) if isinstance(expected, float) else expected), (
            f"{name}: {key} is {actual!r}, the paper's value is {expected!r}"
        )


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cosine_schedule_decays_below_the_peak(name: str) -> None:
    cfg = load_recipe(name)
    assert 0.0 <= cfg.optim.min_lr < cfg.optim.lr


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cluster_settings(name: str) -> None:
    """Checkpoints during the run, preemption signals on, GPU-only model paths set."""
    cfg = load_recipe(name)
    assert cfg.checkpoint.every_n_steps > 0
    assert {"SIGTERM", "SIGUSR1"} <= set(cfg.trainer.preemption_signals)
    assert cfg.trainer.devices == GPUS_PER_NODE
    assert cfg.model.init_from and cfg.tokenizer.path
    assert cfg.model.fp8 is None  # the paper trained in bf16


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("nodes", [1, 2, 4, 8, 16])
def test_layout_is_valid_on_8_gpu_nodes(name: str, nodes: int) -> None:
    cfg = load_recipe(name, [f"trainer.devices={GPUS_PER_NODE}", f"trainer.num_nodes={nodes}"])
    m = cfg.model
    model_parallel = m.tensor_model_parallel_size * m.pipeline_model_parallel_size
    assert (GPUS_PER_NODE * nodes) % model_parallel == 0, "world size not divisible by TP x PP"
    data_parallel = GPUS_PER_NODE * nodes // model_parallel
    assert m.global_batch_size % (m.micro_batch_size * data_parallel) == 0, (
        f"{nodes} node(s): {m.global_batch_size} prompts do not split into micro-batches of "
        f"{m.micro_batch_size} x DP {data_parallel}"
    )


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_layout_shards_the_7b_model_evenly_and_fits_in_memory(name: str) -> None:
    """On a single node (the smallest data-parallel size the recipe runs at)."""
    cfg = load_recipe(name, ["trainer.num_nodes=1"])
    tp, pp = cfg.model.tensor_model_parallel_size, cfg.model.pipeline_model_parallel_size
    assert MISTRAL_7B["heads"] % tp == 0 and MISTRAL_7B["kv_heads"] % tp == 0
    assert MISTRAL_7B["layers"] % pp == 0
    data_parallel = GPUS_PER_NODE // (tp * pp)
    bytes_per_parameter = REPLICATED_BYTES_PER_PARAMETER + OPTIMIZER_BYTES_PER_PARAMETER / (
        data_parallel if cfg.model.use_distributed_optimizer else 1)
    if uses_frozen_reference(cfg):
        bytes_per_parameter += REFERENCE_BYTES_PER_PARAMETER
    static = mistral_7b_parameters() * bytes_per_parameter / (tp * pp)
    assert static <= STATIC_MEMORY_SHARE * GPU_MEMORY_BYTES, f"{static / 1e9:.0f} GB of static state per GPU"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_use_the_memory_features(name: str) -> None:
    """Fewest GPUs per replica: TP=2 fits only because the optimizer state is sharded."""
    cfg = load_recipe(name)
    m = cfg.model
    assert m.use_distributed_optimizer and m.overlap_grad_reduce and m.overlap_param_gather
    assert m.tensor_model_parallel_size == 2 and m.sequence_parallel


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_frozen_reference_may_use_pipeline_parallelism(name: str) -> None:
    cfg = load_recipe(name, ["model.pipeline_model_parallel_size=2"])
    assert cfg.model.pipeline_model_parallel_size == 2


# Per-GPU memory of Mistral-7B, bf16, micro-batch of 2 prompts x 3 sequences x 1024 tokens, flash
# attention, as computed independently when these features were planned (GB, static state +
# frozen reference; and with activations): the planner must reproduce them.
PLANNED = [
    # TP, DP, distributed optimizer, sequence parallel, recompute, static GB, total GB
    (4, 4, False, False, None, 36.2, 48.2),
    (2, 8, False, False, None, 72.4, 89.9),
    (2, 8, True, False, None, 34.4, 51.9),
    (2, 8, True, True, None, 34.4, 48.7),
    (1, 16, True, False, None, 63.4, 92.0),
    (1, 16, True, False, "full", 63.4, 67.1),
]


@pytest.mark.parametrize(("tp", "dp", "distopt", "sp", "recompute", "static_gb", "total_gb"), PLANNED)
def test_memory_plan_reproduces_the_planned_numbers(tp, dp, distopt, sp, recompute, static_gb, total_gb) -> None:
    from nemo_dft.training.memory_plan import Layout, ModelShape, memory_per_gpu

    shape = ModelShape(parameters=mistral_7b_parameters(), layers=MISTRAL_7B["layers"], hidden=MISTRAL_7B["hidden"],
                       vocab=MISTRAL_7B["vocab"])
    layout = Layout(tensor_parallel=tp, pipeline_parallel=1, data_parallel=dp, micro_batch_prompts=2,
                    sequences_per_prompt=3, sequence_length=1024, micro_batches_per_step=128 // (2 * dp),
                    distributed_optimizer=distopt, frozen_reference=True, recompute=recompute, sequence_parallel=sp)
    parts = memory_per_gpu(shape, layout)
    static = sum(parts[k] for k in ("weights", "gradients", "main_weights", "optimizer_moments", "reference"))
    assert static / 1e9 == pytest.approx(static_gb, abs=0.1)
    # activation estimates differ in their small terms (norms, dropout masks, logits): within 1.5 GB
    assert parts["total"] / 1e9 == pytest.approx(total_gb, abs=1.5)


@pytest.mark.parametrize(("recipe", "quoted"), [("dft_mistral.yaml", "48.7 GB of 80 GB: fits"),
                                               ("dft_mistral_lora.yaml", "54.2 GB of 80 GB: fits")])
def test_memory_plan_script_prints_every_component(recipe: str, quoted: str) -> None:
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    result = subprocess.run([sys.executable, "scripts/memory_plan.py", "--config", f"conf/{recipe}"],
                            cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for part in ("weights", "gradients", "main_weights", "optimizer_moments", "reference", "activations", "total"):
        assert part in result.stdout
    assert ("adapter_activations" in result.stdout) == ("lora" in recipe)
    assert quoted in result.stdout  # the number docs/cluster.md quotes


def test_memory_plan_of_packed_rows_counts_one_row_of_the_pack_length() -> None:
    """data.pack_length under PP: a micro-batch is one row of pack_length positions, planned as
    the module plans a micro-batch of one 4096-token sequence."""
    import re
    import subprocess
    import sys

    from nemo_dft.training.memory_plan import Layout, ModelShape, memory_per_gpu
    from tests.conftest import subprocess_env

    command = [sys.executable, "scripts/memory_plan.py", "--config", "conf/dft_mistral.yaml", "data.packing=true",
               "data.pack_length=4096", "model.pipeline_model_parallel_size=2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "one packed row of 4096 positions (data.pack_length) per micro-batch" in result.stdout
    printed = float(re.search(r"activations\s+([\d.]+) GB", result.stdout).group(1))
    shape = ModelShape(parameters=mistral_7b_parameters(), layers=MISTRAL_7B["layers"], hidden=MISTRAL_7B["hidden"],
                       vocab=MISTRAL_7B["vocab"])
    m = load_recipe("dft_mistral.yaml").model
    row = Layout(tensor_parallel=2, pipeline_parallel=2, data_parallel=4, micro_batch_prompts=1, sequences_per_prompt=1,
                 sequence_length=4096, micro_batches_per_step=32, frozen_reference=True, precision=m.precision,
                 recompute=m.recompute_granularity, sequence_parallel=m.sequence_parallel)
    assert printed == pytest.approx(memory_per_gpu(shape, row)["activations"] / 1e9, abs=0.05)


def test_metamath_lengths_keep_256_token_negatives_whole() -> None:
    cfg = load_recipe("dft_metamath.yaml")
    # The Alpaca response is " " + sample + eos: up to two tokens beyond the sample.
    assert cfg.data.max_length - cfg.data.max_prompt_length >= METAMATH_NEGATIVE_TOKENS + 2
    assert cfg.data.max_prompt_length > 0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_generation_config_gives_enough_negatives_that_fit(name: str) -> None:
    """The negatives the recipe reads: enough columns for m x epochs, and not cut by truncation."""
    cfg = load_recipe(name)
    generation = OmegaConf.create()
    for file in GENERATION_CONFIGS[name]:
        generation = OmegaConf.merge(generation, OmegaConf.load(REPO / "conf" / file))
    assert generation.sampling.n >= cfg.dft.num_negatives * cfg.data.num_epochs
    assert generation.sampling.max_new_tokens + 2 <= cfg.data.max_length - cfg.data.max_prompt_length
    if name == "dft_metamath.yaml":
        assert generation.sampling.max_new_tokens == METAMATH_NEGATIVE_TOKENS


@pytest.mark.parametrize("name", ["dft_mistral.yaml", "dft_metamath.yaml"])
def test_offline_reference_alternative_validates(name: str, tmp_path: Path) -> None:
    """The alternative the recipes name: dft.reference=offline with a precomputed file, any PP."""
    ref_logps = tmp_path / "ref_logps.parquet"
    ref_logps.write_bytes(b"")
    cfg = load_recipe(
        name, ["dft.reference=offline", f"dft.ref_logps={ref_logps}", "model.pipeline_model_parallel_size=2"]
    )
    assert cfg.dft.reference == "offline" and cfg.model.init_from


# ---- recipes beyond the paper's: other model families (issue 27) and LoRA on one node (issue 28) ----
# The paper's DFT settings on another base model: everything of PAPER_COMMON and PAPER_DFT but the
# model, and UltraFeedback's lengths; the chat template follows the model (the recipe comments say why).
PAPER_DFT_SETTINGS = {k: v for k, v in {**PAPER_COMMON, **PAPER_DFT}.items() if k not in ("model.arch", "model.preset")}
FAMILY_RECIPES = {
    "dft_qwen3_8b.yaml": {**PAPER_DFT_SETTINGS, "model.arch": "qwen3", "model.preset": "checkpoint",
                          "data.max_length": 1024, "data.max_prompt_length": 512, "tokenizer.chat_template": None},
    "dft_llama31_8b.yaml": {**PAPER_DFT_SETTINGS, "model.arch": "llama", "model.preset": "checkpoint",
                            "data.max_length": 1024, "data.max_prompt_length": 512,
                            "tokenizer.chat_template": "zephyr"},
}
LORA_RECIPE = "dft_mistral_lora.yaml"
LORA_VALUES = {**{k: v for k, v in {**PAPER_COMMON, **PAPER_DFT, **PAPER_ULTRAFEEDBACK}.items() if k != "optim.lr"},
               "peft.scheme": "lora", "peft.dim": 16, "peft.dropout": 0.0, "trainer.num_nodes": 1,
               "peft.target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
# Planning without the imported checkpoint: the published shapes (HF config.json) as NeMo configs,
# and their parameter counts from those shapes (what HF reports).
PLAN_SHAPES = {
    # Qwen3-8B: 36 layers, hidden 4096, 32 heads of 128, 8 KV groups, MLP 12288, vocabulary 151936
    # untied, q/k RMSNorm: NeMo's Qwen3Config8B
    "dft_qwen3_8b.yaml": (["model.preset=null"], None, 8_190_735_360),
    # Llama-3.1-8B: 32 layers, hidden 4096, 32 heads, 8 KV groups, MLP 14336, vocabulary 128256 untied:
    # NeMo's Llama-2-7B with the MLP width and KV groups changed, the tokenizer's vocabulary
    "dft_llama31_8b.yaml": (["model.preset=null", "model.config.ffn_hidden_size=14336",
                             "model.config.num_query_groups=8"], 128256, 8_030_261_248),
    LORA_RECIPE: ([], None, 7_241_732_096),
}
NEW_RECIPES = [*FAMILY_RECIPES, LORA_RECIPE]


@functools.cache
def plan(name: str, extra: tuple[str, ...] = ()) -> tuple[object, dict[str, float]]:
    """scripts/memory_plan.py's numbers (GB per GPU) for a recipe at its published shape."""
    from nemo_dft.modeling.gpt_config import make_gpt_config
    from nemo_dft.training.memory_plan import GB, memory_per_gpu, plan_for_run

    overrides, vocab, _ = PLAN_SHAPES[name]
    cfg = load_recipe(name, ["model.config.apply_rope_fusion=false", *overrides, *extra])
    shape, layout = plan_for_run(cfg, make_gpt_config(cfg, on_gpu=True), vocab)
    return shape, {part: value / GB for part, value in memory_per_gpu(shape, layout).items()}


@pytest.mark.parametrize("name", sorted(FAMILY_RECIPES) + [LORA_RECIPE])
def test_new_recipe_loads_with_the_paper_dft_settings(name: str) -> None:
    cfg = load_recipe(name)
    for key, expected in {**FAMILY_RECIPES, LORA_RECIPE: LORA_VALUES}[name].items():
        actual = OmegaConf.select(cfg, key)
        actual = list(actual) if OmegaConf.is_list(actual) else actual
        assert actual == (pytest.approx(expected) if isinstance(expected, float) else expected), (
            f"{name}: {key} is {actual!r}, expected {expected!r}")
    assert cfg.checkpoint.every_n_steps > 0 and {"SIGTERM", "SIGUSR1"} <= set(cfg.trainer.preemption_signals)
    assert cfg.trainer.devices == GPUS_PER_NODE and cfg.model.init_from and cfg.tokenizer.path
    assert 0.0 <= cfg.optim.min_lr < cfg.optim.lr and cfg.model.fp8 is None


@pytest.mark.parametrize("name", sorted(FAMILY_RECIPES))
@pytest.mark.parametrize("nodes", [1, 2, 4, 8, 16])
def test_family_recipe_layout_is_valid_on_8_gpu_nodes(name: str, nodes: int) -> None:
    cfg = load_recipe(name, [f"trainer.num_nodes={nodes}"])
    m = cfg.model
    data_parallel = GPUS_PER_NODE * nodes // (m.tensor_model_parallel_size * m.pipeline_model_parallel_size)
    assert m.global_batch_size % (m.micro_batch_size * data_parallel) == 0
    assert m.use_distributed_optimizer and m.sequence_parallel and m.tensor_model_parallel_size == 2


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_lora_recipe_layout_is_valid_on_one_node(gpus: int) -> None:
    m = load_recipe(LORA_RECIPE, [f"trainer.devices={gpus}"]).model
    assert m.tensor_model_parallel_size == m.pipeline_model_parallel_size == 1
    assert m.global_batch_size % (m.micro_batch_size * gpus) == 0


@pytest.mark.parametrize("name", NEW_RECIPES)
def test_planned_shape_has_the_published_parameter_count(name: str) -> None:
    shape, _ = plan(name)
    assert shape.parameters == PLAN_SHAPES[name][2]


# docs/cluster.md sections 6b and 6c: the planner's numbers; columns of the static parts
DOCS_COLUMNS = {"weights": 2, "gradients": 3, "main_weights": 4, "optimizer_moments": 5, "reference": 6}


def docs_rows(name: str) -> list[list[str]]:
    lines = (REPO / "docs" / "cluster.md").read_text().splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith(f"| {name} |")]


@pytest.mark.parametrize("name", sorted(FAMILY_RECIPES))
def test_docs_table_is_the_plan_of_the_family_recipes(name: str) -> None:
    [row] = docs_rows(name)
    _, two_nodes = plan(name)
    _, one_node = plan(name, ("trainer.num_nodes=1",))
    shape, _ = plan(name)
    assert row[1] == f"{shape.parameters / 1e9:.2f}B"
    columns = {**DOCS_COLUMNS, "activations": 7, "logits": 8}
    for part, column in columns.items():
        assert row[column] == f"{two_nodes[part]:.1f}", f"{name}: {part}"
    assert row[9] == f"{two_nodes['total']:.1f} GB" and row[10] == f"{one_node['total']:.1f} GB"
    assert one_node["total"] <= GPU_MEMORY_BYTES / 1e9 and two_nodes["reference"] > 0


def test_docs_table_is_the_plan_of_the_lora_recipe() -> None:
    """One node, and a single GPU: the same memory per GPU; the adapters' state is all the optimizer
    holds and there is no reference copy."""
    rows = docs_rows(LORA_RECIPE)
    assert len(rows) == 2
    for row, gpus in zip(rows, [8, 1], strict=True):
        assert row[1].startswith(str(gpus))
        _, parts = plan(LORA_RECIPE, (f"trainer.devices={gpus}",))
        columns = {**DOCS_COLUMNS, "activations": 7, "adapter_activations": 8, "logits": 9}
        for part, column in columns.items():
            assert row[column] == f"{parts[part]:.1f}", f"{gpus} GPU(s): {part}"
        assert row[10] == f"{parts['total']:.1f} GB" and parts["total"] <= GPU_MEMORY_BYTES / 1e9
        assert parts["reference"] == 0 and parts["optimizer_moments"] < 0.5


def test_memory_plan_of_an_unreadable_checkpoint_names_the_way_out(capsys) -> None:
    """model.preset=checkpoint reads the shape from model.init_from; where it is not at hand the
    planner stops with exit 2, naming the key and the overrides that plan without it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_plan_script", REPO / "scripts" / "memory_plan.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--config", str(REPO / "conf" / "dft_llama31_8b.yaml")]) == 2
    error = capsys.readouterr().err
    assert "model.init_from: cannot read" in error and "model.preset=null" in error
