"""TRL's SFTTrainer with the guarantees a long run needs.

- Checkpoints are written under a temporary name, renamed, then marked complete; resume only ever picks a
  complete one (``latest_checkpoint``).
- SIGTERM (SageMaker spot reclaim, 120 s before the kill) and Ctrl-C finish the current step, write a
  checkpoint and stop; the script then exits non-zero so the job is resumed, not mistaken for finished.
- A NaN/inf loss or gradient norm stops training before the optimizer step and before any checkpoint.
- Length-grouped batches come in an order fixed by (data seed, epoch), so a resumed run sees the same batches.

Imported lazily by ``train.py`` (it imports TRL).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

from sftbridge.errors import UserError
from sftbridge.runs import CHECKPOINT_COMPLETE, CHECKPOINT_PATTERN, latest_checkpoint

log = logging.getLogger(__name__)


class DivergenceError(UserError):
    """The loss or gradient norm stopped being finite."""


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: training stops at once, without a checkpoint of the current step."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopOnSignal(TrainerCallback):
    """Turns SIGTERM/SIGINT into: finish this step, save a checkpoint, stop training."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise StopNow(signum)
        if os.environ.get("SFTBRIDGE_SUPERVISED") != "1":  # else `sftbridge train` reports it, in one line
            name = signal.Signals(signum).name
            log.warning("%s received: finishing this step and writing a checkpoint", name)
        self.signum = signum

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping with its shuffle seeded by (seed, epoch).

    transformers gives the training LengthGroupedSampler no generator, so an epoch's order came from the
    global RNG at the moment the epoch began, and a run resumed from a checkpoint trained on other batches
    than the uninterrupted run. Accelerate calls ``set_epoch`` before every epoch (as for its own seeded
    sampler), on every rank, so all ranks also agree on the order.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        assert self.generator is not None
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class SafeSFTTrainer(SFTTrainer):
    """SFTTrainer whose checkpoints are atomic and whose training stops on non-finite values."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)
        if not math.isfinite(float(loss)):
            raise self._divergence("loss", float(loss))
        return loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise self._divergence("gradient norm", float(grad_norm))
        return grad_norm

    def _divergence(self, what: str, value: float) -> DivergenceError:
        step = self.state.global_step + 1
        fp16 = " fp16 overflow (use bf16: train.precision=bf16);" if self.args.fp16 else ""
        return DivergenceError(
            f"training diverged at step {step}: the {what} is {value}. Likely causes: a learning rate too "
            f"high (train.learning_rate={self.args.learning_rate:g}; try 10x lower or add "
            f"train.warmup_ratio);{fp16} bad data (an empty or huge example). No checkpoint was written "
            "after this step."
        )

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write ``checkpoint-N`` as ``.tmp-checkpoint-N`` first; rename and mark complete only at the end."""
        final_root = Path(str(self.args.output_dir))
        step = self.state.global_step
        staging_root = final_root / f".tmp-checkpoint-{step}"
        self.args.output_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(final_root)
        if self.args.should_save:
            written = staging_root / f"checkpoint-{step}"
            target = final_root / written.name
            shutil.rmtree(target, ignore_errors=True)
            written.rename(target)
            shutil.rmtree(staging_root, ignore_errors=True)
            marker = target / CHECKPOINT_COMPLETE
            with marker.open("w") as handle:  # the marker is durable before anyone relies on it
                handle.write(f"{step}\n")
                handle.flush()
                os.fsync(handle.fileno())
            self._rotate(final_root)
        self.accelerator.wait_for_everyone()

    def _rotate(self, root: Path) -> None:
        """Keep the newest ``save_total_limit`` complete checkpoints; drop older and unmarked ones."""
        newest = latest_checkpoint(root)
        complete: list[tuple[int, Path]] = []
        unmarked: list[tuple[int, Path]] = []
        for path in root.iterdir():
            if match := CHECKPOINT_PATTERN.match(path.name):
                bucket = complete if (path / CHECKPOINT_COMPLETE).is_file() else unmarked
                bucket.append((int(match.group(1)), path))
        limit = self.args.save_total_limit or len(complete)
        doomed = sorted(complete)[:-limit] + [item for item in unmarked if newest and item[1] != newest]
        for _, path in doomed:
            shutil.rmtree(path, ignore_errors=True)


def clean_partial_checkpoints(root: Path) -> None:
    """Remove what a crash in the middle of a save left behind."""
    if root.is_dir():
        for path in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
