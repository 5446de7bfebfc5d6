"""What the generated-answer metrics (train.answer_metrics, issue 15) cost: their share of the training time.

    python benchmarks/answer_metrics_overhead.py [--config configs/tiny-cpu.yaml] [KEY=VALUE ...]

Trains the config once through the training script, as `sftbridge train` does, with the answer metrics on
(their default). The callback times its own measurements; the manifest records that time
(``answer_metrics.seconds``) beside the run's ``train_runtime``, which includes it. The overhead is their
ratio within the one run: ``seconds / (train_runtime - seconds)``, so a machine shared with other work slows
both sides alike. Prints the figures and writes benchmarks/results/answer_metrics_overhead.{json,md}.
Target: <= 10% on configs/tiny-cpu.yaml.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(RESULTS / "answer_metrics_overhead"), help="path without suffix")
    args = parser.parse_args()

    import os

    os.chdir(ROOT)  # the shipped configs name their data relative to the checkout
    from sftbridge.runs import load_manifest
    from sftbridge.training.train import main as train_main

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        code = train_main(["--config", args.config, "--run-dir", str(run_dir), *args.overrides])
        if code != 0:
            sys.exit(code)
        manifest = load_manifest(run_dir)
    answers = manifest.answer_metrics or {}
    train_seconds = manifest.timings.train_seconds or 0.0
    overhead = answers["seconds"] / (train_seconds - answers["seconds"])
    import torch
    import transformers

    result = {
        "command": shlex.join(["python", "benchmarks/answer_metrics_overhead.py", *sys.argv[1:]]),
        "config": args.config,
        "overrides": args.overrides,
        "optimizer_steps": manifest.metrics.global_step,
        "measurements": len(answers["steps"]) + 1,  # the scheduled points + the base model once
        "sample": answers["sample"],
        "max_new_tokens": answers["max_new_tokens"],
        "answer_metrics_seconds": answers["seconds"],
        "train_seconds": train_seconds,
        "overhead": round(overhead, 4),
        "final": answers["final"],
        "base": answers["base"],
        "verdict": answers["verdict"],
        "conditions": {
            "device": manifest.device.type,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "note": "shared 2-core machine; the ratio is taken within one run",
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(
        [
            "# Answer metrics overhead (issue 15)",
            "",
            f"`{result['command']}`",
            "",
            "| config | steps | measurements | sample | max new tokens | answer metrics s | train s "
            "| overhead |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {args.config} {' '.join(args.overrides)} | {result['optimizer_steps']} | "
            f"{result['measurements']} | {result['sample']} | {result['max_new_tokens']} | "
            f"{answers['seconds']:.1f} | {train_seconds:.1f} | {overhead:.1%} |",
            "",
            f"Final answers: exact match {answers['final']['answer_exact_match']:.0%} (base "
            f"{answers['base']['answer_exact_match']:.0%}), "
            f"{answers['final']['answer_mean_tokens']:.1f} tokens "
            f"(reference {answers['final']['answer_reference_tokens']:.1f}), EOS rate "
            f"{answers['final']['answer_eos_rate']:.0%}; verdict: "
            f"{'learned' if answers['verdict']['learned'] else 'did not learn'}.",
            "",
            f"Conditions: {json.dumps(result['conditions'])}. Overhead = answer-metric seconds / "
            "(train_runtime - answer-metric seconds), both from the run's own manifest.",
        ]
    )
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
