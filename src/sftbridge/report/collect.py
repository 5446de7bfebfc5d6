"""What the report shows, read from a run directory: curves, evaluations, data lengths, config changes."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftbridge.data.encoding import Lengths
from sftbridge.runs import (
    ADAPTER,
    METRICS,
    MetricsLog,
    RunManifest,
    evaluation_files,
    is_evaluation,
    load_manifest,
)

log = logging.getLogger(__name__)

# metrics.jsonl keys drawn as curves over the optimizer step, besides the patterns in `is_curve`.
CURVES = ("loss", "eval_loss", "learning_rate", "grad_norm")
SAMPLES = 10  # sample questions shown per evaluation


@dataclass
class Evaluation:
    """One `sftbridge eval`: its summary file and every prediction (empty if the predictions file is gone)."""

    path: Path
    summary: dict[str, Any]
    predictions: list[dict[str, Any]]


@dataclass
class ReportData:
    run_dir: Path  # where it is read from
    manifest: RunManifest
    curves: dict[str, list[tuple[float, float]]]  # metric -> [(step, value)]
    evaluations: list[Evaluation]
    config_changes: list[tuple[str, Any, Any]]  # (key, value, default)
    lengths: dict[str, Lengths] = field(default_factory=dict)  # split -> lengths
    lengths_problem: str | None = None  # why lengths are missing
    shown_as: Path | None = None  # the run's final path, when it is read while still being written


def collect(
    run_dir: Path, *, manifest: RunManifest | None = None, extra_evals: Iterable[Path] = ()
) -> ReportData:
    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else load_manifest(run_dir)
    summaries = evaluation_files(run_dir)
    summaries += [p for p in map(Path, extra_evals) if p.resolve() not in {s.resolve() for s in summaries}]
    data = ReportData(
        run_dir=run_dir,
        manifest=manifest,
        curves=read_curves(run_dir / METRICS),
        evaluations=[e for e in map(read_evaluation, summaries) if e is not None],
        config_changes=config_changes(manifest.config),
    )
    try:
        data.lengths = data_lengths(run_dir, manifest)
    except Exception as exc:  # the data may live elsewhere (a fetched SageMaker run): say so, show the rest
        data.lengths_problem = f"{type(exc).__name__}: {exc}"
    return data


def is_curve(key: str) -> bool:
    """Training curves, the trainer's throughput, the answer metrics of generation during training and DPO's
    rewards (TRL's ``rewards/chosen``, ``/rejected``, ``/margins``, ``/accuracies``, and their ``eval_``)."""
    return (
        key in CURVES
        or (key.endswith("tokens_per_second") and not key.startswith("train_"))
        or key.removeprefix("eval_").startswith(("answer_", "rewards/"))
    )


def read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    """metric -> [(step, value)] from metrics.jsonl; a step logged twice keeps its last value."""
    points: dict[str, dict[float, float]] = {}
    for row in MetricsLog(path).read():
        step = row.get("step")
        if not isinstance(step, int | float):
            continue
        for key, value in row.items():
            if is_curve(key) and isinstance(value, int | float) and not isinstance(value, bool):
                points.setdefault(key, {})[float(step)] = float(value)
    return {key: sorted(values.items()) for key, values in points.items()}


def read_evaluation(path: Path) -> Evaluation | None:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: not an evaluation summary (%s)", path, exc)
        return None
    if not is_evaluation(summary):
        return None
    predictions: list[dict[str, Any]] = []
    if summary.get("predictions_file"):
        predictions_file = path.with_name(summary["predictions_file"])
        if predictions_file.is_file():
            lines = predictions_file.read_text(encoding="utf-8").splitlines()
            predictions = [json.loads(line) for line in lines if line.strip()]
    return Evaluation(path, summary, predictions)


def config_changes(config: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, value, default) of every setting that differs from the schema's default."""
    from pydantic import BaseModel

    from sftbridge.config import RunConfig

    changes: list[tuple[str, Any, Any]] = []

    def walk(schema: type[BaseModel], values: dict[str, Any], prefix: str) -> None:
        for name, info in schema.model_fields.items():
            value = values.get(name)
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(value, dict):
                walk(kind, value, f"{prefix}{name}.")
                continue
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            if value != default:
                changes.append((f"{prefix}{name}", value, "(required)" if info.is_required() else default))

    walk(RunConfig, config, "")
    return changes


def data_lengths(run_dir: Path, manifest: RunManifest) -> dict[str, Lengths]:
    """Token lengths of the train and validation splits, re-rendered through the run's own tokenizer and
    prompt format (the data files must still be where the config says, with the sha256 recorded)."""
    from transformers import AutoTokenizer

    from sftbridge.data.encoding import encode
    from sftbridge.data.formatting import PromptFormat
    from sftbridge.data.loading import load_data

    config = manifest.run_config
    if config.train.method == "dpo":
        return pair_lengths(run_dir, manifest)
    loaded = load_data(config.data, eval_strategy=config.train.eval_strategy, with_test=False)
    recorded = manifest.data.sha256
    changed = [path for path, digest in loaded.sha256.items() if recorded.get(path, digest) != digest]
    if changed:
        raise ValueError(f"{', '.join(changed)} changed since the run (sha256 differs)")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / ADAPTER)
    encoded = encode(
        loaded,
        config.data,
        tokenizer,
        ("train", "validation"),
        prompt_format=PromptFormat.from_record(manifest.prompt_format),
        max_length=sys.maxsize,  # every example at its full length: the histogram marks data.max_length
    )
    return {split: Lengths.of(examples) for split, examples in encoded.splits.items() if examples}


def pair_lengths(run_dir: Path, manifest: RunManifest) -> dict[str, Lengths]:
    """A DPO run's token lengths: two rows a pair (prompt + chosen, prompt + rejected), as it trained."""
    from transformers import AutoTokenizer

    from sftbridge.data.encoding import Lengths
    from sftbridge.data.formatting import PromptFormat
    from sftbridge.data.pairs import encode_pairs, load_pairs

    config = manifest.run_config
    loaded = load_pairs(config.data, eval_strategy=config.train.eval_strategy)
    changed = [
        path for path, digest in loaded.sha256.items() if manifest.data.sha256.get(path, digest) != digest
    ]
    if changed:
        raise ValueError(f"{', '.join(changed)} changed since the run (sha256 differs)")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / ADAPTER)
    fmt = PromptFormat.from_record(manifest.prompt_format)
    lengths = {}
    for split, records in (("train", loaded.train), ("validation", loaded.validation)):
        pairs, _ = encode_pairs(records, fmt, tokenizer, sys.maxsize, "drop")
        if pairs:
            rows = [(p.prompt_ids, ids) for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
            lengths[split] = Lengths([len(a) + len(b) for a, b in rows], [len(b) for _, b in rows])
    return lengths
