"""Where the CPU's peak RSS goes during `sftbridge train`, against `sftbridge plan`'s estimate.

For a few batch sizes, in a fresh process each: the RSS just before the first optimizer step (Python, the
libraries, the loaded model and trainer, the encoded data) and the peak RSS while training, sampled every
5 ms, beside the plan's saved-activation estimate. The two CPU constants of
``sftbridge.planning.estimate`` come from here:
``CPU_RUNTIME_BYTES`` (the RSS before training) and ``CPU_STEP_OVERHEAD`` (peak growth over the estimate).

    python benchmarks/cpu_memory.py                 # tiny model, batch 2, 8, 16 x 512 tokens; ~3 min
    python benchmarks/cpu_memory.py --batch-sizes 4 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import base_overrides, run_worker, synthetic_dataset

MIB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def measure(spec: dict[str, Any]) -> dict[str, float]:
    """Run in a fresh process: train with spec's overrides, return the RSS before and during training."""
    from sftbridge.config import load_config
    from sftbridge.planning.estimate import make_plan
    from sftbridge.training import trainer
    from sftbridge.training.train import train

    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in spec["overrides"].items()])
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), rss_bytes()))
            time.sleep(0.005)

    marks: dict[str, float] = {}
    fit = trainer.SafeSFTTrainer.train

    def timed_fit(self: Any, *args: Any, **kwargs: Any) -> Any:  # marks where training starts and ends
        marks["begin"] = time.perf_counter()
        try:
            return fit(self, *args, **kwargs)
        finally:
            marks["end"] = time.perf_counter()

    trainer.SafeSFTTrainer.train = timed_fit  # type: ignore[method-assign]
    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory() as out:
        train(config, Path(out) / "run")
    done.set()
    before = max(r for t, r in samples if t <= marks["begin"])
    during = max(r for t, r in samples if marks["begin"] <= t <= marks["end"])
    memory = make_plan(config, gpu=None).memory
    return {
        "rss_before_training": before,
        "peak_rss_training": during,
        "plan_saved_activations": memory.activations + memory.lm_head,
        "plan_peak_total": memory.peak_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--examples", type=int, default=4000)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(measure(json.loads(args.worker))))
        return
    harness_args = argparse.Namespace(
        load_in_4bit=False,
        max_length=args.max_length,
        device="cpu",
        steps=args.steps,
        batch_size=0,
        gradient_checkpointing=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_dataset(Path(tmp) / "train.jsonl", args.examples, args.max_length // 6)
        print(
            f"{'batch':>5} {'RSS before':>11} {'peak RSS':>9} {'growth':>7} {'plan: saved':>12} "
            f"{'growth/saved':>12} {'plan peak (error)':>18}"
        )
        for batch in args.batch_sizes:
            overrides = base_overrides(harness_args, "builtin:tiny-llama", data)
            overrides["train.per_device_batch_size"] = batch
            r = run_worker({"variant": f"batch {batch}", "overrides": overrides}, threads=1, script=__file__)
            if "error" in r:
                raise SystemExit(f"batch {batch}: {r['error']}")
            growth = r["peak_rss_training"] - r["rss_before_training"]
            error = r["plan_peak_total"] / r["peak_rss_training"] - 1
            print(
                f"{batch:>5} {r['rss_before_training'] / MIB:>7.0f} MiB "
                f"{r['peak_rss_training'] / MIB:>5.0f} MiB "
                f"{growth / MIB:>3.0f} MiB {r['plan_saved_activations'] / MIB:>8.0f} MiB "
                f"{growth / r['plan_saved_activations']:>12.2f} {r['plan_peak_total'] / MIB:>8.0f} MiB "
                f"({error:+.1%})"
            )


if __name__ == "__main__":
    main()
