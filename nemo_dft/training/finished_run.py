"""A rerun of a ``run.dir`` whose training already reached its final step.

Resuming it would ask the data loader for samples past the last one and crash; a pipeline rerun or
a Slurm requeue after completion does exactly that.  It is recognised before the model is built,
from the recorded ``config.yaml``, the number of training rows and the newest ``*-last``
checkpoint: such a rerun is a no-op, and a request for more steps or epochs is refused with the way
to continue (a new run.dir starting from the last checkpoint), because the finished run's learning
rate schedule has already decayed to its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_dft.config.loading import ConfigError


@dataclass(frozen=True)
class Finished:
    step: int
    checkpoint: Path


def final_step(cfg: DictConfig, num_examples: int) -> int:
    """The step a run with ``cfg`` ends at: ``trainer.max_steps``, else every epoch of the data."""
    if cfg.trainer.max_steps is not None:
        return int(cfg.trainer.max_steps)
    return num_examples * int(cfg.data.num_epochs) // int(cfg.model.global_batch_size)


def newest_last_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The usable ``*-last`` checkpoint with the highest step (read, never moved), or None."""
    from nemo_dft.training.recovery import checkpoint_problem

    found = []
    for path in (run_dir / "checkpoints").glob("*-last"):
        if path.is_dir():
            problem, step = checkpoint_problem(path)
            if problem is None:
                found.append((step, path))
    if not found:
        return None
    step, path = max(found)
    return path, step


def finished_run(run_dir: Path, cfg: DictConfig, num_examples: int) -> Finished | None:
    """The finished run in ``run_dir`` that ``cfg`` reruns (None: nothing finished, train or resume);
    ConfigError when ``cfg`` asks it for more steps than it trained."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / "checkpoints").is_dir():
        return None
    try:
        recorded = OmegaConf.load(saved)
        recorded_final = final_step(recorded, num_examples)
    except Exception as err:  # a damaged file is reported, never silently replaced
        raise ConfigError(f"{saved}: unreadable ({err}); restore it or use a new run.dir") from err
    last = newest_last_checkpoint(run_dir)
    if last is None or last[1] < recorded_final:
        return None
    path, step = last
    from nemo_dft.config.rerun import check_rerun

    check_rerun(saved, cfg)  # a changed objective, data or optimizer is another run, refused as on resume
    requested = final_step(cfg, num_examples)
    if requested > step:
        raise ConfigError(
            f"run.dir: {run_dir} finished at step {step} (trainer.max_steps={recorded.trainer.max_steps}, "
            f"data.num_epochs={recorded.data.num_epochs}) and its learning-rate schedule has ended; "
            f"trainer.max_steps={cfg.trainer.max_steps} / data.num_epochs={cfg.data.num_epochs} asks for "
            f"{requested} steps. To train further, start a new run.dir with model.init_from={path}")
    return Finished(step, path)
