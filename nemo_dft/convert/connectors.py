"""NeMo's own HF Mistral/Llama/Qwen2/Qwen3 connectors, with the fixes nemo_dft relies on.

The weight maps, QKV/FC1 merge-and-split transforms and config translation stay NeMo's; the
subclasses here only:

* route the maps through :mod:`nemo_dft.convert.mapping` (local-spec norm names, tied
  embeddings, coverage check);
* take ``vocab_size``, tied embeddings and ``seq_length`` from the HF config (NeMo's Mistral
  importer derives the vocab from the tokenizer and the sequence length from the sliding window,
  and ignores tying; its Qwen2 importer and exporter ignore tying too), and carry the Llama 3.1
  rope-scaling factors that NeMo's Llama importer leaves at their defaults;
* stage tokenizer assets in a private temporary directory (NeMo uses a fixed /tmp path that
  concurrent imports overwrite) and export the tokenizer with its chat template;
* let the exporter cast to the requested dtype and work for any ``llm.GPTModel`` subclass.

NeMo finds connectors by the model's exact class, so :func:`register_hf_connectors` registers
dispatchers that pick the architecture per checkpoint.
"""

from __future__ import annotations

import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from nemo.collections.llm.gpt.model.base import GPTModel
from nemo.collections.llm.gpt.model.llama import HFLlamaExporter, HFLlamaImporter, LlamaModel
from nemo.collections.llm.gpt.model.mistral import HFMistralExporter, HFMistralImporter, MistralModel
from nemo.collections.llm.gpt.model.qwen2 import HFQwen2Exporter, HFQwen2Importer, Qwen2Model
from nemo.collections.llm.gpt.model.qwen3 import HFQwen3Exporter, HFQwen3Importer, Qwen3Model
from nemo.lightning import io, teardown

from nemo_dft.convert.arch import check_hf_config, detect_hf_arch, detect_nemo_arch
from nemo_dft.convert.cpu import apply_cpu_model_overrides, on_cpu
from nemo_dft.convert.errors import ConfigMismatchError, MissingFileError
from nemo_dft.convert.load import load_nemo_model
from nemo_dft.convert.mapping import adapted_apply_transforms, unwrap_module
from nemo_dft.convert.progress import describe_weights, note, stage

DEFAULT_MODEL_CLASSES: dict[str, type[GPTModel]] = {
    "mistral": MistralModel,
    "llama": LlamaModel,
    "qwen2": Qwen2Model,
    "qwen3": Qwen3Model,
}
# HF rope_scaling keys of type "llama3" and the Llama31Config fields that hold them.
LLAMA3_ROPE_FIELDS = {
    "factor": "scale_factor",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_max_position_embeddings": "old_context_len",
}


def set_tracked(config: Any, **values: Any) -> None:
    """Set config attributes so that NeMo's saved context records them too.

    NeMo serialises a config from the arguments captured at construction (``__io__``); plain
    assignment would be lost on save.  NeMo itself updates both for parallelism settings.
    """
    for key, value in values.items():
        setattr(config, key, value)
        if hasattr(config, "__io__"):
            setattr(config.__io__, key, value)


def hf_window_to_megatron(sliding_window: int) -> list[int]:
    """HF's window counts the query token itself; megatron's ``[left, 0]`` counts the tokens before it.

    NeMo maps ``sliding_window=w`` to ``[w, 0]``, one token wider than HF: logits then differ
    on every sequence longer than the window (measured on the tiny Mistral, window 16).
    """
    return [sliding_window - 1, 0]


def megatron_window_to_hf(window_size: Any) -> int:
    """Inverse of :func:`hf_window_to_megatron` (causal windows only)."""
    left, right = window_size
    if right != 0:
        raise ConfigMismatchError(
            f"model.config: window_size={window_size} is not causal; HF Mistral needs [w, 0]"
        )
    return int(left) + 1


class _ImporterFixes:
    """Mixin placed before a NeMo HF importer in the MRO."""

    model_cls: type[GPTModel] = GPTModel
    arch: str = ""
    trust_remote_code: bool | None = None  # NeMo's Qwen connectors read it before apply() sets it

    @cached_property
    def hf_config(self) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self))

    @cached_property
    def config(self) -> Any:
        check_hf_config(self.hf_config.to_dict(), self.arch, Path(str(self)) / "config.json")
        try:
            config = super().config
        except OSError as err:  # NeMo's Mistral importer requires generation_config.json
            raise MissingFileError(f"{self}: {err}") from err
        hf = self.hf_config
        set_tracked(
            config,
            vocab_size=hf.vocab_size,
            share_embeddings_and_output_weights=bool(getattr(hf, "tie_word_embeddings", False)),
            seq_length=hf.max_position_embeddings,
        )
        return config

    @cached_property
    def tokenizer(self) -> Any:
        from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

        self._tokenizer_dir = tempfile.mkdtemp(prefix="nemo_dft_")
        # The directory's name becomes the artifact's name in context/; keep NeMo's.
        save_path = str(Path(self._tokenizer_dir) / "nemo_tokenizer")
        return AutoTokenizer(self.save_hf_tokenizer_assets(str(self), save_path=save_path))

    def init(self) -> GPTModel:
        config = self.config
        if on_cpu():  # by assignment: the saved context keeps the portable settings
            apply_cpu_model_overrides(config)
        return self.model_cls(config, tokenizer=self.tokenizer)

    def apply(self, output_path: Path, **kwargs: Any) -> Path:
        try:
            with stage(f"importing {self.arch} checkpoint {self} as {self.model_cls.__name__}"):
                return super().apply(output_path)
        finally:
            tokenizer_dir = self.__dict__.get("_tokenizer_dir")
            if tokenizer_dir:
                shutil.rmtree(tokenizer_dir, ignore_errors=True)

    def convert_state(self, source: Any, target: Any) -> Any:
        note(f"HF weights loaded: {describe_weights(source)} ({next(source.parameters()).dtype})")
        tied = bool(target.config.share_embeddings_and_output_weights)
        with stage("mapping HF weights onto the NeMo model"):
            with adapted_apply_transforms("target", tied=tied, where=str(self)):
                return super().convert_state(source, target)

    def nemo_save(self, output_path: Path, trainer: Any, dump_io: bool = True) -> None:
        with stage(f"writing NeMo checkpoint {output_path}"):
            super().nemo_save(output_path, trainer, dump_io=dump_io)


class MistralImporter(_ImporterFixes, HFMistralImporter):
    """HF ``MistralForCausalLM`` -> NeMo (NeMo's importer, fixed as described above)."""

    arch = "mistral"

    @cached_property
    def config(self) -> Any:
        config = super().config
        window = getattr(self.hf_config, "sliding_window", None)
        if window is not None:
            set_tracked(config, window_size=hf_window_to_megatron(window))
        return config


class LlamaImporter(_ImporterFixes, HFLlamaImporter):
    """HF ``LlamaForCausalLM`` -> NeMo (NeMo's importer, fixed as described above)."""

    arch = "llama"

    @cached_property
    def config(self) -> Any:
        config = super().config
        rope_scaling = getattr(self.hf_config, "rope_scaling", None) or {}
        if rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3":
            # NeMo's importer takes only "factor" and leaves the other three at 3.1's defaults
            set_tracked(config, **{field: rope_scaling[key] for key, field in LLAMA3_ROPE_FIELDS.items()
                                   if key in rope_scaling})
        return config


class Qwen2Importer(_ImporterFixes, HFQwen2Importer):
    """HF ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5) -> NeMo, q/k/v biases included."""

    arch = "qwen2"

    @cached_property
    def config(self) -> Any:
        config = super().config
        head_dim = getattr(self.hf_config, "head_dim", None)
        if head_dim:  # NeMo's importer always derives it from hidden_size / num_attention_heads
            set_tracked(config, kv_channels=head_dim)
        return config


class Qwen3Importer(_ImporterFixes, HFQwen3Importer):
    """HF ``Qwen3ForCausalLM`` -> NeMo, per-head q/k RMSNorm included."""

    arch = "qwen3"

    @cached_property
    def config(self) -> Any:
        config = super().config
        # NeMo's exporter writes max_position_embeddings, which its importer leaves at 40960
        set_tracked(config, max_position_embeddings=self.hf_config.max_position_embeddings,
                    kv_channels=self.hf_config.head_dim)
        return config


class _ExporterFixes:
    """Mixin placed before a NeMo HF exporter in the MRO."""

    arch: str = ""
    tokenizer_dir: Path | None = None  # export this HF tokenizer instead of the checkpoint's
    trust_remote_code: bool | None = None  # NeMo's Qwen exporters read it in init()

    @cached_property
    def nemo_config(self) -> Any:
        return io.load_context(str(self), subpath="model.config")

    @cached_property
    def nemo_tokenizer(self) -> Any:
        """The checkpoint's NeMo tokenizer (or one built from ``tokenizer_dir``)."""
        from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

        if self.tokenizer_dir is not None:
            return AutoTokenizer(str(self.tokenizer_dir))
        tokenizer = io.load_context(str(self), subpath="model.tokenizer")
        if tokenizer is None:
            raise MissingFileError(
                f"{self}/context: the checkpoint carries no tokenizer; pass --tokenizer DIR"
            )
        return tokenizer

    @cached_property
    def hf_tokenizer(self) -> Any:
        """The HF tokenizer to ship, reloaded from its files so NeMo's wrapper leaves no trace.

        NeMo's ``AutoTokenizer`` sets extra special-token attributes (cls/sep) on the HF
        tokenizer it wraps; the files it was built from are the tokenizer used in training.  A
        chat template set through the wrapper is kept.
        """
        from transformers import AutoTokenizer

        wrapped = getattr(self.nemo_tokenizer, "tokenizer", self.nemo_tokenizer)
        if not hasattr(wrapped, "save_pretrained"):
            raise ConfigMismatchError(
                f"{self}/context: model.tokenizer is a {type(wrapped).__name__}, not an HF tokenizer; "
                "pass --tokenizer DIR"
            )
        source = Path(getattr(wrapped, "name_or_path", "") or "")
        if not source.is_dir():
            return wrapped
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        if getattr(wrapped, "chat_template", None):
            tokenizer.chat_template = wrapped.chat_template
        return tokenizer

    @cached_property
    def config(self) -> Any:
        hf_config = super().config
        nemo = self.nemo_config
        hf_config.vocab_size = nemo.vocab_size or self.nemo_tokenizer.vocab_size
        hf_config.tie_word_embeddings = bool(nemo.share_embeddings_and_output_weights)
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self.hf_tokenizer, name, None)
            if value is not None:
                setattr(hf_config, name, value)
        return hf_config

    def nemo_load(self, path: Path, trainer: Any = None, cpu: bool = True) -> tuple[Any, Any]:
        """NeMo's loader, with the CPU overrides (see :mod:`nemo_dft.convert.load`)."""
        return load_nemo_model(path, on_gpu=not cpu)

    def apply(self, output_path: Path, dtype: torch.dtype | None = None, **kwargs: Any) -> Path:
        with stage(f"loading NeMo checkpoint {self}"):
            source, trainer = self.nemo_load(str(self))
        try:
            from nemo_dft.modeling.lora import merge_adapters

            merged = merge_adapters(unwrap_module(source))  # a LoRA run: W + (alpha / dim) B A
            if merged:
                note(f"merged {merged} LoRA adapters into their base weights")
            weights = next(unwrap_module(source).parameters())
            note(f"NeMo weights loaded: {describe_weights(unwrap_module(source))} ({weights.dtype})")
            target = self.init(weights.dtype)  # NeMo's map asserts that it keeps dtypes; cast after
            tied = bool(self.config.tie_word_embeddings)
            with stage("mapping NeMo weights onto the HF model"):
                with adapted_apply_transforms("source", tied=tied, where=str(self)):
                    target = self.convert_state(source, target)
            if tied:  # HF skips tying under NeMo's no_init_weights(); lm_head is still unset
                target.tie_weights()
            target = target.to(dtype or weights.dtype)
            generation_config = getattr(self.nemo_config, "generation_config", None)
            if generation_config is not None:
                target.generation_config = generation_config
            with stage(f"writing HF checkpoint {output_path} ({target.dtype})"):
                target.save_pretrained(output_path)
                tokenizer = self.hf_tokenizer
                # decoder-only models take no token_type_ids: without this,
                # model.generate(**tokenizer(prompt, return_tensors="pt")) fails on the export
                tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
                tokenizer.save_pretrained(output_path)
        finally:
            teardown(trainer, source)
        return Path(output_path)


class MistralExporter(_ExporterFixes, HFMistralExporter):
    """NeMo -> HF ``MistralForCausalLM`` (NeMo's exporter, fixed as described above)."""

    arch = "mistral"

    @cached_property
    def config(self) -> Any:
        hf_config = super().config
        window = getattr(self.nemo_config, "window_size", None)
        hf_config.sliding_window = None if window is None else megatron_window_to_hf(window)
        return hf_config

    @property
    def tokenizer(self) -> Any:  # NeMo's Mistral exporter expects the HF tokenizer here
        return self.hf_tokenizer


class LlamaExporter(_ExporterFixes, HFLlamaExporter):
    """NeMo -> HF ``LlamaForCausalLM`` (NeMo's exporter, fixed as described above)."""

    arch = "llama"

    @property
    def tokenizer(self) -> Any:  # NeMo's Llama exporter expects the NeMo tokenizer here
        return self.nemo_tokenizer


class _QwenExporterFixes(_ExporterFixes):
    """What NeMo's Qwen exporters leave out of config.json."""

    @cached_property
    def config(self) -> Any:
        hf_config = super().config
        # full attention everywhere (sliding windows are refused on import): as Qwen's own configs
        hf_config.max_window_layers = hf_config.num_hidden_layers
        return hf_config

    @property
    def tokenizer(self) -> Any:  # NeMo's Qwen exporters expect the HF tokenizer here
        return self.hf_tokenizer


class Qwen2Exporter(_QwenExporterFixes, HFQwen2Exporter):
    """NeMo -> HF ``Qwen2ForCausalLM`` (NeMo's exporter, fixed as described above)."""

    arch = "qwen2"

    @cached_property
    def config(self) -> Any:
        hf_config = super().config
        if hf_config.head_dim == hf_config.hidden_size // hf_config.num_attention_heads:
            del hf_config.head_dim  # Qwen2's config.json derives it; NeMo's exporter always writes it
        return hf_config


class Qwen3Exporter(_QwenExporterFixes, HFQwen3Exporter):
    """NeMo -> HF ``Qwen3ForCausalLM`` (NeMo's exporter, fixed as described above)."""

    arch = "qwen3"


IMPORTERS: dict[str, type[_ImporterFixes]] = {
    "mistral": MistralImporter,
    "llama": LlamaImporter,
    "qwen2": Qwen2Importer,
    "qwen3": Qwen3Importer,
}
EXPORTERS: dict[str, type[_ExporterFixes]] = {
    "mistral": MistralExporter,
    "llama": LlamaExporter,
    "qwen2": Qwen2Exporter,
    "qwen3": Qwen3Exporter,
}


def make_importer(hf_dir: str | Path, arch: str, model_cls: type[GPTModel] | None = None) -> Any:
    """The importer of ``arch`` for an HF directory, building ``model_cls`` (default: NeMo's)."""
    importer = IMPORTERS[arch](str(hf_dir))
    importer.model_cls = model_cls or DEFAULT_MODEL_CLASSES[arch]
    return importer


def make_exporter(nemo_dir: str | Path, arch: str = "auto", tokenizer_dir: str | Path | None = None) -> Any:
    """The exporter for a NeMo checkpoint of any ``llm.GPTModel`` subclass; arch from its config."""
    config = io.load_context(str(nemo_dir), subpath="model.config")
    arch = detect_nemo_arch(config, arch, where=f"{nemo_dir}/context (model.config)")
    exporter = EXPORTERS[arch](str(nemo_dir))
    exporter.__dict__["nemo_config"] = config
    exporter.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
    return exporter


class _Dispatcher:
    """Delegates to the connector of the checkpoint's architecture, chosen on first use."""

    def _build(self, arch: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    def resolve(self, arch: str = "auto", **kwargs: Any) -> Any:
        if "_impl" not in self.__dict__:
            self.__dict__["_impl"] = self._build(arch, **kwargs)
        return self.__dict__["_impl"]

    def init(self) -> Any:
        return self.resolve().init()

    @property
    def config(self) -> Any:
        return self.resolve().config

    @property
    def tokenizer(self) -> Any:
        return self.resolve().tokenizer


class HFImporter(_Dispatcher, io.ModelConnector):
    """The "hf" importer registered for a model class; ``arch`` may be passed to ``llm.import_ckpt``."""

    model_cls: type[GPTModel] | None = None

    def _build(self, arch: str, **kwargs: Any) -> Any:
        return make_importer(str(self), detect_hf_arch(Path(str(self)), arch), self.model_cls)

    def apply(self, output_path: Path, arch: str = "auto", **kwargs: Any) -> Path:
        return self.resolve(arch).apply(output_path)


class HFExporter(_Dispatcher, io.ModelConnector):
    """The "hf" exporter registered for a model class; accepts ``arch``, ``dtype``, ``tokenizer_dir``."""

    def _build(self, arch: str, tokenizer_dir: str | Path | None = None, **kwargs: Any) -> Any:
        return make_exporter(str(self), arch, tokenizer_dir)

    def nemo_load(self, path: Path, trainer: Any = None, cpu: bool = True) -> tuple[Any, Any]:
        return self.resolve().nemo_load(path, trainer, cpu)

    def apply(
        self,
        output_path: Path,
        arch: str = "auto",
        dtype: torch.dtype | None = None,
        tokenizer_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> Path:
        return self.resolve(arch, tokenizer_dir=tokenizer_dir).apply(output_path, dtype=dtype)


def register_hf_connectors(model_cls: type[GPTModel]) -> None:
    """Register the HF importer and exporter for exactly ``model_cls`` (idempotent).

    After this, ``llm.import_ckpt(model_cls(config), "hf://DIR")`` builds a ``model_cls`` and
    ``llm.export_ckpt(ckpt, "hf")`` works on its checkpoints, for Mistral and Llama alike.
    """
    importer = type(f"{model_cls.__name__}HFImporter", (HFImporter,), {"model_cls": model_cls})
    model_cls.register_importer("hf")(importer)
    model_cls.register_exporter("hf")(HFExporter)
