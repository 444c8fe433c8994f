"""NeMo's ``MegatronStrategy`` with the per-rank RNG state in every distributed checkpoint, and
the NaN/inf guard around each optimizer step (:mod:`nemo_dft.training.nonfinite`).

NeMo 2 saves the model, optimizer, scheduler, loops and callback states, but not the random
generators; without them a resumed run with dropout draws different masks than the run it
continues.  See :mod:`nemo_dft.training.rng_state`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from nemo import lightning as nl

from nemo_dft.training import rng_state

logger = logging.getLogger(__name__)


class DFTMegatronStrategy(nl.MegatronStrategy):
    """Saves each rank's generators with the checkpoint; a resume puts them back at its first step.

    They are restored at the first batch rather than at load time because Lightning draws a
    seed for the new dataloader iterator in between, which the uninterrupted run did earlier.
    """

    _pending_rng_state: dict[str, Any] | None = None
    nonfinite_guard = None  # a NonFiniteGuard, set by training
    # peft.checkpoint=adapters: {"init_from", "fingerprint"} of the base (adapter_checkpoint.adapter_record);
    # checkpoints then hold the adapters only.  None: checkpoints hold every weight.
    adapter_base: dict[str, str] | None = None

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        """Run the step's forward/backward, then apply the update only if loss, u and gradients
        are finite on every rank; otherwise skip it (u restored) or stop with NonFiniteStep."""
        guard = self.nonfinite_guard
        mcore = getattr(optimizer, "mcore_optimizer", None)
        if guard is None or mcore is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        from nemo_dft.training.nonfinite import NonFiniteStep

        u_table = self.lightning_module.u_table
        u_before = u_table.values.clone()
        guard.reset()

        def checked_closure():
            out = closure()
            guard.check(list(self.model))
            return out

        apply_update = mcore.step

        def step_if_finite():
            return (False, float("nan"), None) if guard.bad else apply_update()

        mcore.step = step_if_finite
        try:
            output = super().optimizer_step(optimizer, checked_closure, model, **kwargs)
        finally:
            del mcore.step  # back to the class's method
        if guard.bad:
            u_table.values.copy_(u_before)
            message = guard.describe(int(self.trainer.global_step) + 1)
            if guard.mode == "stop":
                raise NonFiniteStep(message)
            guard.skipped += 1
            logger.warning("%s; the update was skipped (trainer.nonfinite=skip, %d skipped so far)",
                           message, guard.skipped)
        return output

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        checkpoint[rng_state.RNG_KEY] = rng_state.sharded_rng_state(rng_state.capture())
        checkpoint[rng_state.LAYOUT_KEY] = list(rng_state.current_layout())
        if self.adapter_base is not None:  # NeMo's PEFT filtering (WrappedAdapterIO), see adapter_checkpoint
            from nemo_dft.modeling.adapter_checkpoint import BASE_KEY, is_adapter_key

            state = self.megatron_parallel.sharded_state_dict()
            checkpoint["sharded_state_dict"] = {k: v for k, v in state.items() if is_adapter_key(k)}
            checkpoint[BASE_KEY] = dict(self.adapter_base)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, selective_restore: bool = False) -> dict[str, Any]:
        # init_from (selective restore) takes weights only; a resume also takes the generators,
        # when the checkpoint was written by the same layout.
        with_rng = not selective_restore and self._saved_layout(checkpoint_path) == list(rng_state.current_layout())
        if selective_restore and self._has_adapters():
            return self._load_base_weights(checkpoint_path)
        base = None if selective_restore else self._adapter_checkpoint_base(checkpoint_path)
        if not with_rng and base is None:
            return super().load_checkpoint(checkpoint_path, selective_restore=selective_restore)
        io = self.checkpoint_io
        load = io.load_checkpoint

        def load_with_rng(path, sharded_state_dict=None, **kwargs):
            if with_rng:
                sharded_state_dict[rng_state.RNG_KEY] = rng_state.sharded_rng_state()
            if base is None:
                return load(path, sharded_state_dict=sharded_state_dict, **kwargs)
            from nemo_dft.modeling.adapter_checkpoint import load_adapters_and_base

            return load_adapters_and_base(load, path, base, sharded_state_dict, **kwargs)

        io.load_checkpoint = load_with_rng
        try:
            checkpoint = super().load_checkpoint(checkpoint_path, selective_restore=selective_restore)
        finally:
            del io.load_checkpoint  # back to the class's method
        self._pending_rng_state = checkpoint.pop(rng_state.RNG_KEY, None)
        return checkpoint

    def _adapter_checkpoint_base(self, checkpoint_path) -> Path | None:
        """The base to load with an adapter-only checkpoint (the run's ``model.init_from``, checked
        against the checkpoint's record before NeMo started), or None for a full checkpoint."""
        from nemo_dft.modeling.adapter_checkpoint import check_recorded_base

        init_from = self.adapter_base["init_from"] if self.adapter_base else None
        return check_recorded_base(checkpoint_path, init_from)

    def _has_adapters(self) -> bool:
        from nemo_dft.modeling.lora import has_lora

        return any(has_lora(chunk) for chunk in self.model)

    def _load_base_weights(self, checkpoint_path) -> dict[str, Any]:
        """``model.init_from`` into a LoRA model: the checkpoint has the base weights only, so the
        adapters are left out of the load and keep their initial values."""
        io = self.checkpoint_io
        load = io.load_checkpoint

        def load_base(path, sharded_state_dict=None, **kwargs):
            state = sharded_state_dict["state_dict"]
            adapters = {key: state.pop(key) for key in [k for k in state if ".adapter." in k]}
            checkpoint = load(path, sharded_state_dict=sharded_state_dict, **kwargs)
            checkpoint["state_dict"].update({key: entry.data for key, entry in adapters.items()})
            return checkpoint

        io.load_checkpoint = load_base
        try:
            return super().load_checkpoint(checkpoint_path, selective_restore=True)
        finally:
            del io.load_checkpoint  # back to the class's method

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._pending_rng_state is not None:
            rng_state.restore(self._pending_rng_state)
            self._pending_rng_state = None

    def _saved_layout(self, checkpoint_path) -> list[int] | None:
        from megatron.core import dist_checkpointing
        from nemo.lightning.io.pl import ckpt_to_weights_subdir

        weights = ckpt_to_weights_subdir(Path(checkpoint_path), is_saving=False)
        common = dist_checkpointing.load_common_state_dict(str(weights))
        saved = common.get(rng_state.LAYOUT_KEY)
        if saved is None:
            logger.warning("%s holds no RNG state; generators keep their fresh seeds", checkpoint_path)
        elif list(saved) != list(rng_state.current_layout()):
            logger.warning(
                "%s was saved with (PP, TP, DP) = %s, this run is %s: generators keep their fresh seeds, so "
                "dropout masks differ from the saved run's", checkpoint_path, tuple(saved), rng_state.current_layout(),
            )
        return None if saved is None else list(saved)
