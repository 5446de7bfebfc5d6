"""Benchmark harness: sftbridge's training path vs. a plain TRL SFTTrainer + PEFT script, per speed option.

    python benchmarks/harness.py                      # CPU: the tiny model, ~10 minutes on 2 cores
    python benchmarks/harness.py --device cuda --model random:meta-llama/Llama-2-7b-hf --load-in-4bit \\
        --max-length 1024                             # GPU: a random-init model with Llama-2-7B's shapes

One command runs every variant back to back, alternating, best of ``--repeats``: the plain-TRL baseline
(padding to the longest), our path with every option off, then our path with one option on at a time
(packing, padding_free, group_by_length, gradient checkpointing, eager instead of sdpa attention; on CUDA also
Liger kernels and paged 8-bit AdamW). Same model, data and hyperparameters for all. Each variant runs in a
fresh worker process so that its peak memory is its own (``ru_maxrss`` only grows; CUDA's caching allocator
keeps what a previous run freed). Writes benchmarks/results/harness-<device>.md and .json.

Measured per variant: non-pad tokens/s (TRL's ``num_tokens`` over the training time), median step time, peak
memory (``torch.cuda.max_memory_reserved`` on a GPU, peak RSS on the CPU), MFU on a GPU (4N FLOPs per non-pad
token against the card's bf16 dense peak) and the non-pad share of the batches (non-pad tokens over the
rows x columns the model was fed, seen by a forward pre-hook on the embedding). For our variants the
prediction of ``sftbridge plan`` is printed beside the measured peak, with its error. Also times
``sftbridge --help`` against ``python -c "import sys"``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORDS_FILE = ROOT / "data" / "sciq-sample" / "train.jsonl"

CPU_OPTIONS: dict[str, dict[str, Any]] = {
    "packing": {"train.packing": True},
    "padding_free": {"train.padding_free": True},
    "group_by_length": {"train.group_by_length": True},
    "gradient_checkpointing": {"train.gradient_checkpointing": True},
    "eager_attention": {"model.attn_implementation": "eager"},
}
CUDA_OPTIONS: dict[str, dict[str, Any]] = {
    "liger": {"train.use_liger_kernel": True},
    "paged_adamw_8bit": {"train.optim": "paged_adamw_8bit"},
}


# ---- data and model ----------------------------------------------------------------------------------------


def synthetic_dataset(path: Path, examples: int, median_tokens: int, seed: int = 0) -> Path:
    """Q/A records with long-tailed lengths, like instruction data: log-normal with sigma 0.9.

    Words come from the sample data, so the built-in tokenizer (trained on it) spends ~1.3 tokens a word.
    """
    rng = random.Random(seed)
    words = " ".join(json.loads(line)["question"] for line in WORDS_FILE.read_text().splitlines()).split()
    median_words = max(4, int(median_tokens / 1.3))
    with path.open("w", encoding="utf-8") as out:
        for _ in range(examples):
            total = max(4, int(rng.lognormvariate(math.log(median_words), 0.9)))
            question_words = max(2, int(total * rng.uniform(0.2, 0.6)))
            question = " ".join(rng.choices(words, k=question_words)) + "?"
            answer = " ".join(rng.choices(words, k=max(1, total - question_words)))
            out.write(json.dumps({"question": question, "correct_answer": answer}) + "\n")
    return path


def build_random_model(spec: str, out_dir: Path) -> Path:
    """``random:<known id>`` or ``random:small``: a random-init Llama with those shapes, no download.

    Same parameter count, FLOPs and memory as the real model; the built-in tokenizer (ids < 1024) feeds it.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from sftbridge.config import ModelSection
    from sftbridge.models.builtin import llama_config
    from sftbridge.models.loading import model_path
    from sftbridge.planning.model_shapes import KNOWN_SHAPES, Shapes

    name = spec.removeprefix("random:")
    shapes = (
        Shapes(512, 1408, 4, 8, 8, 32000)  # small: exercises the same path on a CPU
        if name == "small"
        else KNOWN_SHAPES[name.lower()]
    )
    if (out_dir / "config.json").is_file():
        return out_dir
    config = llama_config(
        vocab_size=shapes.vocab_size,
        hidden_size=shapes.hidden_size,
        intermediate_size=shapes.intermediate_size,
        num_layers=shapes.num_layers,
        num_heads=shapes.num_heads,
        num_kv_heads=shapes.num_kv_heads,
        max_positions=4096,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on a GPU: no fp32 copy (27 GB for a 7B) on the way
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model: Any = LlamaForCausalLM(config)  # 7B in bf16 on the GPU: ~13.5 GB to write
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_path(ModelSection())).save_pretrained(out_dir)
    return out_dir


# ---- worker: one training run, measured --------------------------------------------------------------------


class Probe:
    """Sees each training forward's input shape and start time through a global embedding pre-hook."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.fed_tokens = 0
        self._handle: Any = None

    def __enter__(self) -> Probe:
        import torch

        def hook(module: Any, args: Any) -> None:
            if (
                isinstance(module, torch.nn.Embedding)
                and module.training
                and args
                and torch.is_grad_enabled()
            ):
                self.starts.append(time.perf_counter())
                self.fed_tokens += int(args[0].numel())

        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def step_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)][2:]  # skip warm-up
        return statistics.median(gaps) if gaps else float("nan")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sftbridge.config import load_config

    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in spec["overrides"].items()])
    started = time.perf_counter()
    with Probe() as probe:
        if spec["variant"] == "baseline":
            seconds, steps, log_history = plain_trl(config)
        else:
            seconds, steps, log_history = ours(config)
    wall = time.perf_counter() - started
    non_pad = max((e["num_tokens"] for e in log_history if "num_tokens" in e), default=0)
    cuda = torch.cuda.is_available() and config.train.device != "cpu"
    result: dict[str, Any] = {
        "variant": spec["variant"],
        "steps": steps,
        "train_seconds": seconds,
        "wall_seconds": wall,
        "step_seconds": probe.step_seconds(),
        "non_pad_tokens": non_pad,
        "fed_tokens": probe.fed_tokens,
        "non_pad_share": non_pad / probe.fed_tokens if probe.fed_tokens else None,
        "tokens_per_second": non_pad / seconds if seconds else None,
        "peak_memory_bytes": (
            torch.cuda.max_memory_reserved()
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ),
        "peak_memory_kind": "torch.cuda.max_memory_reserved" if cuda else "peak RSS (ru_maxrss)",
    }
    from sftbridge.planning.estimate import make_plan
    from sftbridge.planning.hardware import GPUS
    from sftbridge.planning.model_shapes import model_shapes

    shapes = model_shapes(config.model.name_or_path)
    gpu = None
    if cuda:
        name = torch.cuda.get_device_name(0)
        gpu = next((key for key, g in GPUS.items() if g.name.lower() in name.lower()), None)
        if gpu and result["tokens_per_second"]:
            peak = GPUS[gpu].peak_tflops * 1e12
            result["mfu"] = 4 * shapes.matmul_params * result["tokens_per_second"] / peak
        result["gpu"] = name
    plan = make_plan(config, gpu=gpu)
    predicted = plan.memory.peak_reserved if cuda else plan.memory.peak_total
    result["plan_peak_bytes"] = predicted
    result["plan_error"] = predicted / result["peak_memory_bytes"] - 1
    result["plan_non_pad_share"] = plan.throughput.non_pad_share
    return result


def ours(config: Any) -> tuple[float, int, list[dict[str, Any]]]:
    """sftbridge's own training path, end to end (run directory and all)."""
    from sftbridge.runs import METRICS, MetricsLog, load_manifest
    from sftbridge.training.train import train

    with tempfile.TemporaryDirectory() as out:
        run = train(config, Path(out) / "run")
        manifest = load_manifest(run)
        history = MetricsLog(run / METRICS).read()
    return manifest.timings.train_seconds or 0.0, manifest.metrics.global_step or 0, history


def plain_trl(config: Any) -> tuple[float, int, list[dict[str, Any]]]:
    """The baseline: what a user writes with TRL + PEFT alone; pads each batch to its longest example."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from sftbridge.models.loading import model_path

    path = model_path(config.model)
    cuda = config.train.device != "cpu" and torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config.model.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    raw = load_dataset("json", data_files=config.data.train_file, split="train")
    dataset = raw.map(
        lambda r: {
            "prompt": [{"role": "user", "content": r["question"]}],
            "completion": [{"role": "assistant", "content": r["correct_answer"]}],
        },
        remove_columns=raw.column_names,
    )

    # TRL truncates where we drop over-length examples: drop them here too, so both train on the same rows.
    def fits(row: dict[str, Any]) -> bool:
        text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= config.data.max_length

    dataset = dataset.filter(fits)
    train = config.train
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            num_train_epochs=train.epochs,
            max_steps=train.max_steps,
            per_device_train_batch_size=train.per_device_batch_size,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            learning_rate=train.learning_rate,
            lr_scheduler_type=train.lr_scheduler,
            optim=train.optim,
            logging_steps=train.logging_steps,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=config.seed,
            use_cpu=not cuda,
            bf16=cuda,
            gradient_checkpointing=train.gradient_checkpointing,
            max_length=config.data.max_length,
        )
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=list(config.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
        )
        result = trainer.train()
    return result.metrics["train_runtime"], result.global_step, trainer.state.log_history


# ---- driver ------------------------------------------------------------------------------------------------


def run_worker(
    spec: dict[str, Any], threads: int, script: str = __file__, timeout: float | None = None
) -> dict[str, Any]:
    """Run ``script --worker SPEC`` in a fresh process; its ``RESULT {...}`` line, or ``{"error": ...}``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        proc = subprocess.run(
            [sys.executable, script, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"variant": spec["variant"], "error": f"stopped after {timeout:.0f} s: the time budget"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        return {"variant": spec["variant"], "error": f"exit {proc.returncode}: {tail}"}
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def cli_startup(repeats: int) -> dict[str, float]:
    """Best-of wall time of ``sftbridge --help`` and of a bare interpreter, alternating."""
    commands = {
        "python -c 'import sys'": [sys.executable, "-c", "import sys"],
        # the console script, as users run it (`python -m` would add runpy's imports)
        "sftbridge --help": [str(Path(sys.executable).with_name("sftbridge")), "--help"],
    }
    best = dict.fromkeys(commands, float("inf"))
    for _ in range(repeats):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True, cwd=ROOT)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def base_overrides(args: argparse.Namespace, model: str, train_file: Path) -> dict[str, Any]:
    return {
        "model.name_or_path": model,
        "model.load_in_4bit": args.load_in_4bit,
        "data.train_file": str(train_file),
        "data.validation_split_ratio": 0.0,
        "data.max_length": args.max_length,
        "train.device": args.device,
        "train.eval_strategy": "no",
        # Training throughput only: the answer metrics' generation would count in train_runtime (their cost is
        # measured on its own by benchmarks/answer_metrics_overhead.py).
        "train.answer_metrics": False,
        "train.max_steps": args.steps,
        "train.per_device_batch_size": args.batch_size,
        "train.learning_rate": 1e-4,
        "train.logging_steps": 1,
        "train.gradient_checkpointing": args.gradient_checkpointing,
        # every speed option off in the base: each variant turns one on (group_by_length is on by default)
        "train.group_by_length": False,
        "train.packing": False,
        "train.padding_free": False,
        "lora.r": 16,
        "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--model", default="builtin:tiny-llama", help="builtin:tiny-llama, random:<id>, id, folder"
    )
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA (nf4 + double quantization)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on in every variant")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant")
    # Enough that transformers' length grouping works on full megabatches (50 batches), as on a real dataset:
    # with 400, its megabatches hold 11 batches and the grouped non-pad share drops from ~0.96 to ~0.85.
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--median-tokens", type=int, default=0, help="0 = max_length / 6")
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating runs per variant; the best counts"
    )
    parser.add_argument("--only", nargs="*", help="variants to run (default: all for the device)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--name", help="result file name without extension (default: harness-<device>[-tag])")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the .md and .json")
    parser.add_argument(
        "--model-cache",
        type=Path,
        help="folder for random:<id> models, built once and reused (default: temp)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=0,
        help="seconds for all variants; one that would not finish in what is left is skipped (0 = none)",
    )
    parser.add_argument(
        "--startup-repeats", type=int, default=-1, help="timings of `sftbridge --help` (-1: auto, 0: skip)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of each worker; 1 keeps a shared CPU's contention from multiplying step times"
        " (0 = torch's default)",
    )
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return

    started = time.perf_counter()
    os.environ.setdefault("SFTBRIDGE_CACHE", str(Path(tempfile.gettempdir()) / "sftbridge-bench-cache"))
    work = Path(tempfile.mkdtemp(prefix="sftbridge-harness-"))
    model = args.model
    if model.startswith("random:"):
        folder = (args.model_cache or work) / model.removeprefix("random:").replace("/", "--")
        model = str(build_random_model(model, folder))
    train_file = synthetic_dataset(
        work / "train.jsonl", args.examples, args.median_tokens or args.max_length // 6
    )
    options: dict[str, dict[str, Any]] = {**CPU_OPTIONS, **(CUDA_OPTIONS if args.device == "cuda" else {})}
    variants: dict[str, dict[str, Any]] = {"baseline": {}, "sftbridge": {}}
    variants.update({f"+{name}": change for name, change in options.items()})
    if args.only:  # in the order given: under a --budget the first ones run first
        variants = {k: variants[k] for name in args.only for k in variants if name in (k, k.lstrip("+"))}
    base = base_overrides(args, model, train_file)
    best: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        names = list(variants)
        names = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotate: no fixed order bias
        for name in names:
            timeout = None
            if args.budget:
                left = args.budget - (time.perf_counter() - started)
                longest = max(
                    (r["worker_seconds"] for r in best.values() if "worker_seconds" in r), default=0
                )
                if left < 1.2 * longest or left < 20:
                    best.setdefault(
                        name, {"variant": name, "error": f"skipped: {left:.0f} s of the budget left"}
                    )
                    continue
                timeout = left
            spec = {"variant": name, "overrides": {**base, **variants[name]}}
            worker_started = time.perf_counter()
            result = run_worker(spec, args.threads, timeout=timeout)
            result["worker_seconds"] = time.perf_counter() - worker_started
            _progress(result)
            kept = best.get(name)
            if "error" in result or kept is None or "error" in kept:
                best[name] = result if kept is None or "error" in kept else kept
            elif result["tokens_per_second"] > kept["tokens_per_second"]:
                best[name] = result
    repeats = max(10, args.repeats * 5) if args.startup_repeats < 0 else args.startup_repeats
    startup = cli_startup(repeats) if repeats else {}
    write_results(args, model, train_file, base, best, startup)


def _progress(result: dict[str, Any]) -> None:
    if "error" in result:
        print(f"{result['variant']}: FAILED {result['error']}", flush=True)
        return
    print(
        f"{result['variant']}: {result['steps']} steps, {result['tokens_per_second']:.0f} tok/s, "
        f"step {result['step_seconds'] * 1000:.0f} ms, non-pad {result['non_pad_share']:.3f}, "
        f"peak {result['peak_memory_bytes'] / 1e6:.0f} MB (plan {result['plan_error']:+.1%})",
        flush=True,
    )


def write_results(
    args: argparse.Namespace,
    model: str,
    train_file: Path,
    base: dict[str, Any],
    best: dict[str, dict[str, Any]],
    startup: dict[str, float],
) -> None:
    import peft
    import torch
    import transformers
    import trl

    from sftbridge.config import load_config
    from sftbridge.planning.estimate import data_lengths

    lengths, _ = data_lengths(load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()]))
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    conditions = {
        "device": device,
        "torch_threads": args.threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "model": args.model,
        "load_in_4bit": args.load_in_4bit,
        # flash-attn is not installed where the GPU figures are taken: sdpa (torch's fused kernels) throughout
        "attention": "sdpa (the default; +eager_attention where run)",
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "repeats": args.repeats,
        "dataset": {"file": "synthetic, log-normal lengths (sigma 0.9)", **lengths.summary()},
    }
    reference = best.get("baseline", {}).get("tokens_per_second")
    sft_peak = best.get("baseline", {}).get("peak_memory_bytes")
    for result in best.values():
        if "error" not in result and reference:
            result["tokens_per_second_vs_baseline"] = result["tokens_per_second"] / reference
            result["peak_memory_vs_baseline"] = result["peak_memory_bytes"] / sft_peak
    help_ratio = startup["sftbridge --help"] / startup["python -c 'import sys'"] if startup else None
    payload = {
        "conditions": conditions,
        "variants": best,
        "cli_startup_seconds": startup,
        "help_ratio": help_ratio,
    }
    name = args.name or "harness-" + args.device + (f"-{args.tag}" if args.tag else "")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.results / f"{name}.md").write_text(markdown(payload))
    print(markdown(payload))


def markdown(payload: dict[str, Any]) -> str:
    c = payload["conditions"]
    d = c["dataset"]
    lines = [
        f"# Harness results: {c['device']}",
        "",
        f"- versions: {', '.join(f'{k} {v}' for k, v in c['versions'].items())}; python {c['python']}; "
        f"{c['torch_threads']} torch threads",
        f"- model: {c['model']}{' (4-bit nf4)' if c['load_in_4bit'] else ''}; batch {c['batch_size']} x max "
        f"{c['max_length']} tokens; {c['steps']} steps per variant; best of {c['repeats']} alternating runs",
        f"- data: {d['file']}: {d['examples']} examples, {d['tokens']} tokens, mean {d['mean']}, "
        f"p50 {d['p50']}, p90 {d['p90']}, p99 {d['p99']}, max {d['max']}",
        "",
        "| variant | non-pad tok/s | vs baseline | step time | non-pad share | peak memory | vs baseline "
        "| MFU | plan peak (error) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in payload["variants"].items():
        if "error" in r:
            error = r["error"].splitlines()[-1][:80]
            lines.append(f"| {name} | {error if 'skipped' in error else 'failed: ' + error} | | | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a (CPU)"
        lines.append(
            f"| {name} | {r['tokens_per_second']:.0f} | {r.get('tokens_per_second_vs_baseline', 1):.2f}x "
            f"| {r['step_seconds'] * 1000:.0f} ms | {r['non_pad_share']:.3f} "
            f"| {r['peak_memory_bytes'] / 1e6:.0f} MB | {r.get('peak_memory_vs_baseline', 1):.2f}x | {mfu} "
            f"| {r['plan_peak_bytes'] / 1e6:.0f} MB ({r['plan_error']:+.1%}) |"
        )
    kinds = [r["peak_memory_kind"] for r in payload["variants"].values() if "peak_memory_kind" in r]
    lines += [
        "",
        f"Attention: {c['attention']}. Peak memory: {kinds[0] if kinds else 'n/a'}. "
        "Non-pad share: TRL's non-pad token count over the rows x columns fed to the model.",
        "",
    ]
    s = payload["cli_startup_seconds"]
    if s:
        bare = s["python -c 'import sys'"]
        lines += [
            f"`sftbridge --help`: {s['sftbridge --help'] * 1000:.0f} ms vs `python -c 'import sys'` "
            f"{bare * 1000:.0f} ms: "
            f"{payload['help_ratio']:.1f}x (best of each, alternating)",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
