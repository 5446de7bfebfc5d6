"""Per-step training time: `sftbridge` vs. a plain TRL SFTTrainer + PEFT script, same model, data, settings.

    python benchmarks/step_time.py [--epochs 3] [--repeats 2]

Both run in this process, back to back, on the built-in tiny model and data/sciq-sample/train.jsonl, on the
CPU, with the same LoRA settings, batch size, learning rate and seed. Prints a Markdown table and writes
benchmarks/results/step_time.json. Target: sftbridge <= 1.05x the plain script's step time.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def plain_trl(epochs: float) -> tuple[float, int]:
    """The baseline: what a user would write with TRL and PEFT alone."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sftbridge.config import load_config
    from sftbridge.training.modeling import model_path

    config = load_config(CONFIG)
    path = model_path(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    raw = load_dataset("json", data_files=str(ROOT / config.data.train_file), split="train")
    dataset = raw.map(
        lambda r: {
            "prompt": [{"role": "user", "content": r["question"]}],
            "completion": [{"role": "assistant", "content": r["correct_answer"]}],
        },
        remove_columns=raw.column_names,
    )
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            num_train_epochs=epochs,
            per_device_train_batch_size=config.train.per_device_batch_size,
            learning_rate=config.train.learning_rate,
            lr_scheduler_type="linear",
            logging_steps=50,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=config.seed,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            max_length=config.data.max_length,
        )
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
        )
        result = trainer.train()
    return result.metrics["train_runtime"], result.global_step


def ours(epochs: float) -> tuple[float, int]:
    import os

    from sftbridge.config import load_config
    from sftbridge.runs import load_manifest
    from sftbridge.training.train import train

    os.chdir(ROOT)
    # our overhead alone: the plain script samples at random, so ours does too (grouping is on by default)
    overrides = [f"train.epochs={epochs}", "train.logging_steps=50", "train.group_by_length=false"]
    config = load_config(CONFIG, overrides)
    with tempfile.TemporaryDirectory() as out:
        run = train(config, Path(out) / "run")
        manifest = load_manifest(run)
    return manifest["timings"]["train_seconds"], manifest["metrics"]["global_step"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(torch.get_num_threads())
    best: dict[str, float] = {}
    steps: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, run in (("plain TRL", plain_trl), ("sftbridge", ours)):
            started = time.perf_counter()
            seconds, n = run(args.epochs)
            per_step = seconds / n
            best[name] = min(best.get(name, float("inf")), per_step)
            steps[name] = n
            print(f"{name}: {n} steps in {seconds:.1f} s ({time.perf_counter() - started:.1f} s with set-up)")
    ratio = best["sftbridge"] / best["plain TRL"]
    import transformers
    import trl

    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "model": "builtin:tiny-llama",
        "data": "data/sciq-sample/train.jsonl (240 pairs)",
        "epochs": args.epochs,
        "steps": steps,
        "seconds_per_step": best,
        "ratio": ratio,
    }
    print(f"\n| run | steps | s/step (best of {args.repeats}) |\n| --- | --- | --- |")
    for name in best:
        print(f"| {name} | {steps[name]} | {best[name] * 1000:.1f} ms |")
    print(f"\nsftbridge / plain TRL = {ratio:.3f} (target <= 1.05)")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
