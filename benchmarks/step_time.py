"""Per-step training time: `sftbridge` vs. a plain TRL SFTTrainer + PEFT script, same model, data, settings.

    python benchmarks/step_time.py [--epochs 3] [--repeats 2]

Both run in this process, back to back, on the built-in tiny model and data/sciq-sample/train.jsonl, on the
CPU, with the same LoRA settings, batch size, learning rate and seed (``harness.ours`` and
``harness.plain_trl``). Prints a Markdown table and writes
benchmarks/results/step_time.json. Target: sftbridge <= 1.05x the plain script's step time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ours, plain_trl  # the same two runs the harness measures

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def run_config(epochs: float) -> Any:
    """configs/tiny-cpu.yaml for both runs. Our overhead alone: the plain script samples at random, so ours
    does too (grouping is on by default)."""
    from sftbridge.config import load_config

    os.chdir(ROOT)  # the config's data path is relative to the checkout
    overrides = [f"train.epochs={epochs}", "train.logging_steps=50", "train.group_by_length=false"]
    return load_config(CONFIG, overrides)


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
            seconds, n, _ = run(run_config(args.epochs))
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
