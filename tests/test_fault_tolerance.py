"""Resume equals uninterrupted, atomic checkpoints, signals, divergence, out of memory, reproducibility."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from sftbridge.errors import Interrupted, UserError
from sftbridge.runs import checkpoint_dir_for, latest_checkpoint, load_manifest
from sftbridge.training.train import train

# 24 rows, batch 8: 3 steps an epoch; 8 steps = 2 epochs and a bit.
STEPS = dict(train__max_steps=8, train__save_steps=2, train__logging_steps=1, lora__dropout=0.1)


LOSS_LOGGED = re.compile(r"'loss'|\bloss=")  # a training log line, as a dict or as the progress line


def losses(run: Path) -> list[float]:
    return [
        row["loss"]
        for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "loss" in row
    ]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def stop_after(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliver SIGTERM's effect (the handler's flag) when `step` ends, as a real signal would."""
    from sftbridge.training.trainer import StopOnSignal

    original = StopOnSignal.on_step_end

    def on_step_end(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == step:
            self._handle(signal.SIGTERM, None)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnSignal, "on_step_end", on_step_end)


def test_resume_equals_uninterrupted(
    tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = train(tiny_config(**STEPS), tmp_path / "straight")
    assert not checkpoint_dir_for(straight).exists()  # a finished run drops its checkpoints

    resumed_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        stop_after(4, patch)
        with pytest.raises(Interrupted) as info:
            train(tiny_config(**STEPS), resumed_dir)
    assert info.value.exit_code == 143
    assert info.value.checkpoint == checkpoint_dir_for(resumed_dir) / "checkpoint-4"
    assert not resumed_dir.exists()  # nothing half-finished is presented as a run

    resumed = train(tiny_config(**STEPS), resumed_dir)
    assert load_manifest(resumed).model_dump(mode="json")["resumed_from"].endswith("checkpoint-4")
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    assert len(losses(resumed)) == 8
    first, second = adapter(straight), adapter(resumed)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-5, atol=1e-7)


def test_failed_save_leaves_the_previous_checkpoint(
    tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import TrainerState

    from sftbridge.runs import CHECKPOINT_COMPLETE, latest_checkpoint

    original = TrainerState.save_to_json  # written last but one into a checkpoint (the marker is last)

    def flaky(self: Any, json_path: str) -> None:
        if "checkpoint-4" in str(json_path):
            raise OSError("disk full (injected)")
        original(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", flaky)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="injected"):
        train(tiny_config(**STEPS), run_dir)
    checkpoints = checkpoint_dir_for(run_dir)
    assert latest_checkpoint(checkpoints) == checkpoints / "checkpoint-2"
    half_written = checkpoints / "checkpoint-4"
    assert half_written.is_dir() and not (half_written / CHECKPOINT_COMPLETE).exists()  # never picked
    assert not run_dir.exists()

    monkeypatch.undo()
    finished = train(tiny_config(**STEPS), run_dir)
    assert load_manifest(finished).model_dump(mode="json")["resumed_from"].endswith("checkpoint-2")


def test_a_full_disk_is_one_line_naming_the_path_and_the_space_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The final save runs out of space (injected where safetensors writes): the training script says so in
    one line, the run folder is not half-written, and the checkpoint to resume from stays."""
    import errno

    import peft.peft_model
    import safetensors.torch

    from conftest import SAMPLE_TRAIN
    from sftbridge.training.train import main

    real = safetensors.torch.save_file

    def full(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        if "adapter" in str(filename) and "checkpoint" not in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)  # PEFT's own name for it
    run_dir = tmp_path / "run"
    argv = [
        "--config",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        "--run-dir",
        str(run_dir),
        f"data.train_file={SAMPLE_TRAIN}",
        "train.max_steps=2",
        "train.save_steps=2",
        "train.answer_metrics=false",
        'train.eval_strategy="no"',
    ]
    assert main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {run_dir.parent / '.run.partial' / 'adapter'}")
    assert "no space left on its disk (" in line and "GiB free); free some" in line
    assert not run_dir.exists() and not (tmp_path / ".run.partial").exists()
    assert latest_checkpoint(checkpoint_dir_for(run_dir)) is not None


def test_private_override_still_fits_transformers() -> None:
    """SafeSFTTrainer's one private override, checked against the installed transformers.

    Fails, saying what moved, on a transformers version where the override would no longer be called the same
    way, or where it is no longer needed (the length-grouped sampler got a seeded generator).
    """
    import inspect

    import transformers
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from sftbridge.training.trainer import SafeSFTTrainer

    version = transformers.__version__
    assert SafeSFTTrainer.PRIVATE_OVERRIDES == ("_get_train_sampler",)
    method = getattr(Trainer, "_get_train_sampler", None)
    assert method is not None, (
        f"transformers {version}: Trainer._get_train_sampler is gone; port the override"
    )
    params = list(inspect.signature(method).parameters)
    assert params == ["self", "train_dataset"], f"transformers {version}: _get_train_sampler{params}"
    assert "LengthGroupedSampler(" in inspect.getsource(method), (
        f"transformers {version}: _get_train_sampler no longer builds a LengthGroupedSampler"
    )
    sampler = list(inspect.signature(LengthGroupedSampler.__init__).parameters)
    assert {"batch_size", "lengths", "generator"} <= set(sampler), f"LengthGroupedSampler{sampler}"
    assert "generator=" not in inspect.getsource(method), (
        f"transformers {version} passes a generator to LengthGroupedSampler: check whether it is seeded per "
        "epoch, and drop SafeSFTTrainer._get_train_sampler if so"
    )
    # Everything else is public: no other private method of Trainer is overridden.
    assert private_overrides(SafeSFTTrainer) == set(SafeSFTTrainer.PRIVATE_OVERRIDES)


def private_overrides(trainer_class: type) -> set[str]:
    """The private methods a trainer class (and the sftbridge classes it derives from) defines itself."""
    own = [cls for cls in trainer_class.__mro__ if cls.__module__.startswith("sftbridge.")]
    return {
        name
        for cls in own
        for name in vars(cls)
        if name.startswith("_") and not name.startswith("__") and callable(getattr(trainer_class, name))
    }


def test_non_finite_gradient_stops_before_the_optimizer_step(
    tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sftbridge.training.trainer import SafeSFTTrainer

    original = SafeSFTTrainer.training_step

    def poisoned(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        loss = original(self, model, *args, **kwargs)
        if self.state.global_step == 3:
            next(p for p in model.parameters() if p.grad is not None).grad[0] = float("inf")
        return loss

    monkeypatch.setattr(SafeSFTTrainer, "training_step", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"training diverged at step 4: the gradient norm is (nan|inf)"):
        train(tiny_config(**STEPS), run_dir)
    assert sorted(
        p.name for p in checkpoint_dir_for(run_dir).iterdir() if p.name.startswith("checkpoint")
    ) == ["checkpoint-2"]


def test_nan_loss_stops_with_a_clear_error(
    tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sftbridge.training.trainer import SafeSFTTrainer

    original = SafeSFTTrainer.compute_loss

    def poisoned(self: Any, *args: Any, **kwargs: Any) -> Any:
        loss = original(self, *args, **kwargs)
        if self.state.global_step == 3:
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(SafeSFTTrainer, "compute_loss", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(
        UserError, match=r"training diverged at step 4: the loss is nan.*learning rate"
    ) as info:
        train(tiny_config(**STEPS), run_dir)
    assert "train.learning_rate=0.005" in str(info.value)
    checkpoints = sorted(p.name for p in checkpoint_dir_for(run_dir).glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"]  # nothing written at or after the bad step
    assert not run_dir.exists()


def test_out_of_memory_names_the_keys_to_change(
    tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sftbridge.training.trainer import SafeSFTTrainer

    def oom(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SafeSFTTrainer, "training_step", oom)
    with pytest.raises(UserError) as info:
        train(tiny_config(), tmp_path / "run")
    message = str(info.value)
    for text in (
        "train.per_device_batch_size=8",
        "data.max_length=128",
        "train.gradient_accumulation_steps",
        "train.gradient_checkpointing",
        "model.load_in_4bit",
    ):
        assert text in message


def test_same_seed_same_losses(tiny_config: Any, tmp_path: Path) -> None:
    """Training alone (train.py's prepare and fit phases), twice: the losses logged are identical."""
    from sftbridge.training.train import fit, prepare

    logged = []
    for name in ("a", "b"):
        run = prepare(tiny_config(train__max_steps=4, train__logging_steps=1), tmp_path / name)
        fit(run)
        logged.append(losses(run.live_metrics.path.parent))
    assert len(logged[0]) == 4 and logged[0] == logged[1]


@pytest.mark.slow
def test_sigterm_mid_run_then_resume(tmp_path: Path, qa_rows: list[dict[str, str]]) -> None:
    """A real SIGTERM to the training process: checkpoint, non-zero exit, then the same command finishes."""
    from conftest import write_jsonl

    train_file = write_jsonl(tmp_path / "train.jsonl", qa_rows)
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "sftbridge.training.train",
        "--config",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        "--run-dir",
        str(run_dir),
        f"data.train_file={train_file}",
        "data.test_file=null",
        "train.epochs=30",
        "train.save_steps=1000",
        "train.logging_steps=1",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    for line in process.stdout:
        if LOSS_LOGGED.search(line):
            break
    process.send_signal(signal.SIGTERM)
    started = time.time()
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output[-2000:]
    assert time.time() - started < 60
    assert "interrupted: stopped by SIGTERM" in output
    checkpoint = next(checkpoint_dir_for(run_dir).glob("checkpoint-*"))
    assert not run_dir.exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    manifest = load_manifest(run_dir).model_dump(mode="json")
    assert manifest["resumed_from"].endswith(checkpoint.name)
    assert manifest["metrics"]["global_step"] == 60


@pytest.mark.slow
def test_reproduce_from_the_manifest(
    tiny_config: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sftbridge.cli import main

    original = train(tiny_config(train__max_steps=3, train__logging_steps=1), tmp_path / "original")
    assert main(["reproduce", str(original), "--run-dir", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "(identical)" in out
    assert losses(tmp_path / "again") == losses(original)

    train_file = Path(next(iter(load_manifest(original).model_dump(mode="json")["data"]["sha256"])))
    train_file.write_text(train_file.read_text().replace("?", "??", 1))
    assert main(["reproduce", str(original), "--run-dir", str(tmp_path / "third")]) == 2
    assert "its sha256 differs from the run's" in capsys.readouterr().err
    assert not (tmp_path / "third").exists()


@pytest.mark.slow
def test_cli_resume_and_no_secret_in_checkpoints(
    tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import FAKE_TOKEN
    from sftbridge.cli import main
    from sftbridge.config import dump_config

    config = tiny_config(**STEPS)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))
    run_dir = tmp_path / "run"
    assert main(["train", str(config_file), "--resume", str(run_dir)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err

    with monkeypatch.context() as patch:
        stop_after(2, patch)
        with pytest.raises(Interrupted):
            train(config, run_dir)
    for path in checkpoint_dir_for(run_dir).rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path

    assert main(["train", str(config_file), "--resume", str(run_dir)]) == 0
    assert load_manifest(run_dir).model_dump(mode="json")["resumed_from"].endswith("checkpoint-2")
    assert main(["train", str(config_file), "--resume", str(run_dir)]) == 2
    assert "already finished" in capsys.readouterr().err
