"""The resolved key settings of a training run, in a few lines for the console."""

from __future__ import annotations

from omegaconf import DictConfig

from nemo_dft.config.training import data_parallel_size, model_config_overrides


def key_settings(cfg: DictConfig) -> list[str]:
    """What a user checks before a run starts: where it writes, which model and layout, which data
    and batch, and the DFT and optimizer settings (the full config is in run.dir/config.yaml)."""
    m, d, o, t = cfg.model, cfg.dft, cfg.optim, cfg.trainer
    shape = model_config_overrides(cfg)
    sizes = ", ".join(f"{k}={shape[k]}" for k in ("num_layers", "hidden_size") if k in shape)
    precision = m.precision + (f" fp8={m.fp8}/{m.fp8_recipe}" if m.fp8 else "")
    reference = "none (ref_free)" if d.ref_free else d.reference
    peft = ""
    if cfg.peft.scheme == "lora":
        reference += " (adapters off)" if not d.ref_free and d.reference == "frozen" else ""
        p = cfg.peft
        peft = f"; peft lora dim={p.dim} alpha={p.alpha} targets={','.join(p.target_modules)}"
    objective = ("sft (negatives scored for metrics only)" if d.objective == "sft" else
                 f"{d.objective} tau={d.tau} gamma={d.gamma} reference={reference}") + peft
    return [
        f"run.dir {cfg.run.dir} (config.yaml, metrics.jsonl, checkpoints/, logs/, tensorboard/)",
        f"model {m.arch} preset={m.preset}{f' ({sizes})' if sizes else ''} init_from={m.init_from or 'random'} "
        f"{precision}; {t.devices} device(s) x {t.num_nodes} node(s), TP={m.tensor_model_parallel_size} "
        f"PP={m.pipeline_model_parallel_size} DP={data_parallel_size(cfg)}",
        f"data {cfg.data.path}, {cfg.data.num_epochs} epochs, {d.num_negatives} negatives per prompt; "
        f"global batch {m.global_batch_size} prompts (micro {m.micro_batch_size}), max_length {cfg.data.max_length}",
        f"objective {objective}; optim lr={o.lr} min_lr={o.min_lr} "
        f"warmup_ratio={o.warmup_ratio} clip_grad={o.clip_grad}",
    ]
