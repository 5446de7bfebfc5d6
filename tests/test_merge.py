"""`sftbridge merge`: the adapter folded into the base gives the same logits as base + adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import cli

QUESTIONS = [
    "What pigment produced by skin cells gives human skin, hair, and eyes much of their color?",
    "At sea level, at what temperature on the Celsius scale does pure water boil?",
    "How do bipedal creatures walk?",
]


def logits(model: Any, tokenizer: Any, prompts: list[str]) -> Any:
    import torch

    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]  # padding positions carry no meaning


def test_merged_model_matches_base_plus_adapter(short_run: Path, tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sftbridge.inference.folder import ModelFolder
    from sftbridge.inference.merge import merge_run
    from sftbridge.inference.predictor import Predictor
    from sftbridge.runs import load_manifest

    out = merge_run(short_run, tmp_path / "merged", device="cpu", max_shard_size="1MB")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert {"sftbridge.json", "model.safetensors.index.json"} <= files
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1  # the tiny model is ~2.4 MB: 1 MB shards
    keys = [key for shard in shards for key in safe_open(shard, "pt").keys()]  # noqa: SIM118
    assert keys and not any("lora" in key or "base_layer" in key for key in keys)
    assert not list(tmp_path.glob(".*partial"))

    record = json.loads((out / "sftbridge.json").read_text())
    run_manifest = load_manifest(short_run).model_dump(mode="json")
    assert record["kind"] == "merged" and record["dtype"] == "float32"
    assert record["prompt_format"] == run_manifest["prompt_format"]
    assert record["generation"] == run_manifest["generation"]

    predictor = Predictor.from_run(short_run, device="cpu")
    prompts = [predictor.prompt(q) for q in QUESTIONS]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = logits(predictor.model, predictor.tokenizer, prompts)
    torch.testing.assert_close(logits(merged, predictor.tokenizer, prompts), expected, atol=1e-4, rtol=1e-4)
    with predictor.base_model():  # the comparison has teeth: without the adapter the logits differ
        assert (logits(predictor.model, predictor.tokenizer, prompts) - expected).abs().max() > 0.1

    # Loaded back with its manifest, the merged folder formats and answers exactly as the run.
    served = ModelFolder.open(out).predictor(device="cpu")
    assert [served.prompt(q) for q in QUESTIONS] == prompts
    assert [g.text for g in served.generate(prompts)] == [g.text for g in predictor.generate(prompts)]


def test_merge_command(short_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    command = ["merge", str(short_run), "--out", str(out)]
    result = cli(*command)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"merged model: {out}" in result.stdout.splitlines()  # our line; libraries may add theirs
    assert (out / "model.safetensors").is_file() and (out / "sftbridge.json").is_file()
    again = cli(*command)
    assert again.returncode == 2
    assert (
        f"error: --out {out}: already exists and is not empty; choose another folder"
        in again.stderr.splitlines()
    )


def test_qlora_run_merges_into_a_full_precision_base(tiny_config: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftbridge.inference.merge import merge_run
    from sftbridge.inference.predictor import Predictor
    from sftbridge.models.loading import load_model
    from sftbridge.training.train import train

    config = tiny_config(model__load_in_4bit=True, train__max_steps=4)
    run = train(config, tmp_path / "qlora")
    out = merge_run(run, tmp_path / "merged", device="cpu")
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert json.loads((out / "sftbridge.json").read_text())["qlora"] is True

    # Equal to the same adapter on the unquantized base ...
    quantized = Predictor.from_run(run, device="cpu")
    prompts = [quantized.prompt(q) for q in QUESTIONS]
    base = load_model(config.model.model_copy(update={"load_in_4bit": False}), "cpu", "fp32")
    unquantized = PeftModel.from_pretrained(base, run / "adapter").eval()
    expected = logits(unquantized, quantized.tokenizer, prompts)
    torch.testing.assert_close(logits(merged, quantized.tokenizer, prompts), expected, atol=1e-4, rtol=1e-4)
    # ... and close to, not identical with, the 4-bit model it was trained on (nf4 rounding is gone).
    four_bit = logits(quantized.model, quantized.tokenizer, prompts)
    similarity = torch.nn.functional.cosine_similarity(four_bit.flatten(), expected.flatten(), dim=0)
    assert 0.9 < similarity < 1.0
