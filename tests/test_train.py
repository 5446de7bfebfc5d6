"""Training on the tiny model: loss falls, LoRA changes, the base does not, the run directory is complete."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAKE_TOKEN, ROOT, SAMPLE_TRAIN
from sftbridge.config import ModelSection
from sftbridge.models.loading import model_path
from sftbridge.runs import COMPLETE, load_manifest

RUN_FILES = {"COMPLETE", "adapter", "config.yaml", "metrics.jsonl", "report.html", "sftbridge.json"}


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_run_directory_layout(short_run: Path) -> None:
    assert {p.name for p in short_run.iterdir()} == RUN_FILES
    adapter = {p.name for p in (short_run / "adapter").iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= adapter
    assert not list(short_run.parent.glob(".*partial"))


def test_loss_falls(short_run: Path) -> None:
    values = losses(short_run)
    assert len(values) >= 5
    assert values[-1] <= 0.5 * values[0]
    assert values[-1] > 1e-5


def test_lora_weights_trained_and_base_untouched(short_run: Path) -> None:
    weights = load_file(str(short_run / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in name for name in weights)  # the adapter holds no base weights
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # B starts at zero: it was trained

    from transformers import AutoModelForCausalLM

    from sftbridge.inference.predictor import Predictor

    predictor = Predictor.from_run(short_run, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(model_path(ModelSection()))
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad(), predictor.base_model():
        assert torch.equal(predictor.model(ids).logits, base(ids).logits)
    with torch.no_grad():
        assert not torch.allclose(predictor.model(ids).logits, base(ids).logits)


def test_adapter_reload_gives_identical_logits(short_run: Path) -> None:
    from sftbridge.inference.predictor import Predictor

    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    first, second = Predictor.from_run(short_run), Predictor.from_run(short_run)
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)


@pytest.mark.slow
def test_memorises_training_answers_and_base_does_not(trained_run: Path) -> None:
    """The shipped config learns: 450 steps on the whole sample answer its questions (the one test that needs
    the long run)."""
    from sftbridge.inference.evaluate import evaluate, load_cases
    from sftbridge.inference.predictor import Predictor

    predictor = Predictor.from_run(trained_run)
    result = evaluate(predictor, load_cases(SAMPLE_TRAIN, predictor)[:120])
    assert result["adapter"]["exact_match"] >= 0.9, result
    assert result["base"]["exact_match"] <= 0.02
    assert result["adapter"]["eos_rate"] >= 0.95
    assert result["adapter"]["mean_answer_tokens"] < result["base"]["mean_answer_tokens"]


def test_manifest_records_the_run(short_run: Path) -> None:
    manifest = load_manifest(short_run).model_dump(mode="json")
    assert manifest["base_model"]["name_or_path"] == "builtin:tiny-llama"
    assert manifest["prompt_format"] == {
        "format": "qa",
        "chat_format": "chat_template",
        "template": None,
        "system_prompt": None,
    }
    assert manifest["config"]["lora"]["r"] == 16 and manifest["seed"] == 10
    train_file = Path(manifest["config"]["data"]["train_file"])
    assert manifest["data"]["sha256"][str(train_file)] == hashlib.sha256(train_file.read_bytes()).hexdigest()
    for library in ("python", "torch", "transformers", "peft", "trl"):
        assert manifest["versions"][library]
    assert set(manifest["git"]) == {"commit", "dirty"}
    assert manifest["generation"]["max_new_tokens"] == 24
    assert manifest["metrics"]["train_loss"] > 0 and manifest["timings"]["train_seconds"] > 0
    assert manifest["backend"]["name"]


def test_no_secret_in_the_run_directory(short_run: Path) -> None:
    assert os.environ["HF_TOKEN"] == FAKE_TOKEN
    for path in short_run.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_incomplete_run_is_not_loaded(short_run: Path, tmp_path: Path) -> None:
    import shutil

    from sftbridge.errors import RunDirError

    copy = tmp_path / "copy"
    shutil.copytree(short_run, copy)
    (copy / COMPLETE).unlink()
    with pytest.raises(RunDirError, match="did not finish"):
        load_manifest(copy)


def test_run_trained_with_flash_attention_loads_on_the_cpu(short_run: Path, tmp_path: Path) -> None:
    """A run trained on a GPU with FlashAttention is still usable where it cannot run: generate with sdpa."""
    import shutil

    from sftbridge.inference.predictor import Predictor
    from sftbridge.runs import MANIFEST

    copy = tmp_path / "gpu-run"
    shutil.copytree(short_run, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["config"]["model"]["attn_implementation"] = "flash_attention_2"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    predictor = Predictor.from_run(copy, device="cpu")
    assert predictor.model.config._attn_implementation == "sdpa"
    assert predictor.generate([predictor.prompt("What gas do plants take in?")])[0].text


def test_failed_validation_creates_nothing(tiny_config: Any, tmp_path: Path) -> None:
    from sftbridge.errors import DataError
    from sftbridge.training.train import train

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?"}\n')
    with pytest.raises(DataError):
        train(tiny_config(data__train_file=str(bad)), tmp_path / "runs" / "x")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_qlora_4bit_trains_on_cpu(tiny_config: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from sftbridge.training.train import train

    run = train(tiny_config(model__load_in_4bit=True, train__epochs=3), tmp_path / "qlora")
    manifest = load_manifest(run).model_dump(mode="json")
    assert manifest["base_model"]["load_in_4bit"] is True
    values = losses(run)
    assert values[-1] < values[0]
    from sftbridge.inference.predictor import Predictor

    predictor = Predictor.from_run(run)
    assert "Linear4bit" in {type(m).__name__ for m in predictor.model.modules()}
    assert predictor.generate([predictor.prompt("What is water?")])[0].token_ids


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path) -> None:
    """Real DDP with gloo on the CPU; only rank 0 writes the run directory."""
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(SAMPLE_TRAIN.read_text().splitlines(keepends=True)[:32]))
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "sftbridge.cli",
        "train",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        f"data.train_file={train_file}",
        "data.test_file=null",
        "train.epochs=2",
        "train.logging_steps=1",
        "backend.num_processes=2",
        "--run-dir",
        str(run_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # DDP is told that every trainable (LoRA) weight is used: no extra graph traversal, no warning per rank
    assert "find_unused_parameters=True" not in result.stdout + result.stderr
    manifest = load_manifest(run_dir).model_dump(mode="json")
    assert manifest["device"]["world_size"] == 2
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
