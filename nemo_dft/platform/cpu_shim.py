"""Compatibility shim that lets NeMo 2.7 / megatron-core 0.15 train on CPU-only machines (gloo).

Both libraries are CUDA-first: they allocate with ``device=torch.cuda.current_device()`` or a
literal ``device="cuda"``, seed a CUDA RNG tracker, open CUDA streams and compare tensor type
names against ``torch.cuda.FloatTensor``.  :func:`enable_cpu_compat` redirects all of these to the
CPU.  It is only ever applied when no GPU is present (see :func:`maybe_enable_cpu_compat`); GPU
runs never import anything from here.  The failure sites it covers are listed in
``shared/reference/cpu-notes/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_enabled = False
_function_mode: torch.overrides.TorchFunctionMode | None = None


def _is_cuda_device(device: object) -> bool:
    # Module-level function, not a method: dynamo cannot guard on a staticmethod of an active mode.
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA placements to CPU inside every torch call.

    Covers ``device="cuda"`` keyword arguments, ``Tensor.cuda()``, ``Tensor.to("cuda")`` and
    ``pin_memory=True``, and reports CPU tensors' ``type()`` as ``torch.cuda.*`` so that the
    optimizer's and gradient clipping's type assertions hold.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _patch_torch_cuda() -> None:
    """Make the torch.cuda calls used for placement and ordering harmless on CPU."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.max_memory_reserved = lambda *args, **kwargs: 0
    torch.cuda.Stream = lambda *args, **kwargs: None
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


def _patch_rng_tracker() -> None:
    """Keep megatron's model-parallel RNG states on the CPU generator."""
    import megatron.core.tensor_parallel.random as mp_random

    tracker_cls = mp_random.CudaRNGStatesTracker

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

    tracker_cls.add = add
    tracker_cls.fork = fork
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    seed_model_parallel = mp_random.model_parallel_cuda_manual_seed

    def model_parallel_cuda_manual_seed(seed: int, *args, **kwargs):
        torch.manual_seed(seed)  # torch.cuda.manual_seed is a silent no-op on a CPU build
        return seed_model_parallel(seed, *args, **kwargs)

    mp_random.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed
    import megatron.core.tensor_parallel as tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed


def _patch_nemo() -> None:
    """NeMo-specific CUDA assumptions: checkpoint device fix-up and model-parallel seeding."""
    import megatron.core.tensor_parallel.random as mp_random
    import nemo.lightning.io.pl as nemo_io_pl
    import nemo.lightning.megatron_init as megatron_init
    from megatron.core.parallel_state import get_pipeline_model_parallel_rank

    nemo_io_pl._fix_tensors_device = lambda checkpoint: checkpoint
    seed_all = megatron_init._set_random_seed

    def _set_random_seed(seed: int) -> None:
        seed_all(seed)  # skips the model-parallel RNG tracker when torch sees no GPU
        mp_random.model_parallel_cuda_manual_seed(seed + 100 * get_pipeline_model_parallel_rank())

    megatron_init._set_random_seed = _set_random_seed


def _disable_unavailable_rope_fusion() -> None:
    """Let configs that default to ``apply_rope_fusion=True`` be built where its kernel is missing.

    ``LlamaConfig`` defaults to the fused RoPE of Transformer Engine, and megatron's
    ``TransformerConfig.__post_init__`` raises when TE is absent, so neither NeMo's Llama importer
    nor ``load_context`` of a Llama checkpoint can build its config on a CPU.  The flag is
    cleared on the instance only; the saved context keeps the portable default.  Idempotent.
    """
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.transformer_config import TransformerConfig

    kernels = (rope_utils.fused_apply_rotary_pos_emb, rope_utils.fused_apply_rotary_pos_emb_thd)
    original = TransformerConfig.__post_init__
    if any(k is not None for k in kernels) or getattr(original, "_nemo_dft_rope", False):
        return

    def __post_init__(self: TransformerConfig) -> None:
        if self.apply_rope_fusion and not self.multi_latent_attention:
            self.apply_rope_fusion = False
        original(self)

    __post_init__._nemo_dft_rope = True  # type: ignore[attr-defined]
    TransformerConfig.__post_init__ = __post_init__


def _patch_distributed_optimizer_state_dict() -> None:
    """Let megatron's distributed optimizer build its state dict before its first step.

    Without Transformer Engine or apex (so on every CPU run) megatron reads Adam's "step" from the
    torch optimizer's per-parameter state, which is empty until the first step; resuming a run
    builds the load-time state dict exactly then and fails an assertion.  An empty state means
    step 0; the checkpoint's own step replaces it when the saved state is loaded.
    """
    from megatron.core.optimizer import distrib_optimizer

    original = distrib_optimizer.DistributedOptimizer.state_dict
    if getattr(original, "_nemo_dft_cpu", False):
        return

    def state_dict(self):
        if distrib_optimizer.HAVE_APEX_OR_TE or len(self.optimizer.state) > 0:
            return original(self)
        inner = self.optimizer.state_dict()
        result = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
        for group in result["optimizer"]["param_groups"]:
            del group["params"]
            group["step"] = 0
        if self.grad_scaler:
            result["grad_scaler"] = self.grad_scaler.state_dict()
        return result

    state_dict._nemo_dft_cpu = True  # type: ignore[attr-defined]
    distrib_optimizer.DistributedOptimizer.state_dict = state_dict

    # Loading a fully reshardable checkpoint copies the saved tensors into the torch optimizer's
    # per-parameter state, which (torch Adam, not TE/apex) also holds "step"; the checkpoint keeps
    # step in its param groups instead, and load_state_dict has already set it from there.
    original_set = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if distrib_optimizer.HAVE_APEX_OR_TE or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            destinations[key].copy_(value)
        return None

    distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    # The same load path gives every parameter's Adam state one shared "step" tensor; torch's Adam
    # increments each parameter's step in place, so a shared one would advance once per parameter
    # per optimizer step and skew the bias correction of every step after a resume.
    original_load = distrib_optimizer.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        if not distrib_optimizer.HAVE_APEX_OR_TE:
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        return result

    distrib_optimizer.DistributedOptimizer.load_state_dict = load_state_dict


def enable_cpu_compat() -> None:
    """Apply every CPU patch once in this process (idempotent)."""
    global _enabled, _function_mode
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU compatibility shim must not be enabled on a machine with a GPU")
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_nemo()
    _disable_unavailable_rope_fusion()
    _patch_distributed_optimizer_state_dict()
    _function_mode = CudaToCpuMode()
    _function_mode.__enter__()  # stays active for the life of the process (thread-local)
    _enabled = True


def maybe_enable_cpu_compat() -> bool:
    """Enable the shim when this machine has no GPU; return whether it is active."""
    if torch.cuda.is_available():
        return False
    enable_cpu_compat()
    return True
