"""The adapter's README.md: what it is, what it was trained on and how, how well, and how to load it.

Replaces the card PEFT's ``save_pretrained`` writes ("More Information Needed"); the front matter keeps the
Hub's fields (``base_model``, ``library_name: peft``) so the folder still uploads as a PEFT adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftbridge.runs import ADAPTER, RunManifest


def write_model_card(run_dir: Path, manifest: RunManifest) -> Path:
    path = Path(run_dir) / ADAPTER / "README.md"
    path.write_text(model_card(manifest), encoding="utf-8")
    return path


def model_card(manifest: RunManifest) -> str:
    from sftbridge.report.collect import config_changes

    base = manifest.base_model
    name = base.name_or_path
    load_from = base.resolved_path or name  # a builtin model is a local folder
    config = manifest.config
    lora, train, data = config["lora"], config["train"], manifest.data
    metrics = manifest.metrics
    quant = "QLoRA (4-bit nf4 base)" if base.load_in_4bit else "LoRA"
    lines = [
        "---",
        f"base_model: {json.dumps(name)}",
        "library_name: peft",
        "tags: [sftbridge, lora, sft, trl]",
        "---",
        "",
        f"# {manifest.run_name} — {quant} adapter for `{name}`",
        "",
        f"A {quant} adapter trained by sftbridge with TRL's `SFTTrainer` and PEFT: "
        f"supervised fine-tuning on {_count(data.train)} examples, loss on the answer only.",
        "",
        "## Base model",
        "",
        f"- `{name}`, revision `{base.revision}`" + (" (loaded in 4-bit)" if base.load_in_4bit else ""),
        f"- prompt format: {_inline(manifest.prompt_format.model_dump())}",
        "",
        "## Data",
        "",
        "| file | bytes | sha256 |",
        "| --- | --- | --- |",
        *(f"| `{p}` | {_size(p)} | `{digest}` |" for p, digest in data.sha256.items()),
        "",
        "| split | examples | over max_length | dropped | truncated |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {split} | {r.get('total')} | {r.get('over_length')} | {r.get('dropped')} "
            f"| {r.get('truncated')} |"
            for split, r in (("train", data.train), ("validation", data.validation))
            if r
        ),
        "",
        "## Training",
        "",
        f"LoRA r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']} on "
        f"{', '.join(lora['target_modules'])}; "
        f"{train['epochs']:g} epochs, learning rate {train['learning_rate']:g}, batch "
        f"{train['per_device_batch_size']} × {train['gradient_accumulation_steps']} accumulation, "
        f"max length {config['data']['max_length']}, seed {manifest.seed}.",
        "",
        "Settings that differ from sftbridge's defaults:",
        "",
        *(
            f"- `{key}`: {_inline(value)} (default {_inline(default)})"
            for key, value, default in config_changes(config)
        ),
        "",
        "## Metrics",
        "",
        f"- train loss: {_num(metrics.train_loss)} after {metrics.global_step} steps",
        f"- eval loss: {_num(metrics.eval_loss)}",
        f"- training time: {manifest.timings.train_seconds} s on "
        f"{manifest.device.type} ({manifest.device.precision})",
        "",
        "`sftbridge eval RUN` scores adapter vs. base (exact match, answer length, EOS rate) and writes "
        "every prediction; `sftbridge report RUN` draws it all in one HTML file.",
        "",
        "## Use it",
        "",
        "With sftbridge (the prompt is formatted exactly as in training, generation stops at EOS):",
        "",
        "```bash",
        'sftbridge generate RUN "your question"',
        "```",
        "",
        "```python",
        "from sftbridge.inference.predictor import Predictor",
        "",
        'predictor = Predictor.from_run("RUN")',
        'print(predictor.generate([predictor.prompt("your question")])[0].text)',
        "```",
        "",
        "With PEFT (`RUN/adapter` is this folder; it holds the tokenizer too):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(load_from)}"
        + (f", revision={json.dumps(base.revision)}" if base.revision else "")
        + ")",
        'model = PeftModel.from_pretrained(base, "RUN/adapter")',
        'tokenizer = AutoTokenizer.from_pretrained("RUN/adapter")',
        "```",
        "",
        "Format prompts as in training: the tokenizer's chat template with the question as the user turn "
        "(`apply_chat_template(..., add_generation_prompt=True)`), or the template recorded in "
        "`sftbridge.json`.",
        "",
    ]
    return "\n".join(lines)


def _count(report: Any) -> str:
    return str(report.get("total")) if isinstance(report, dict) else "an unrecorded number of"


def _size(path: str) -> str:
    return str(Path(path).stat().st_size) if Path(path).is_file() else "?"


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _inline(value: Any) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`"
