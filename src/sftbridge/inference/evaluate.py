"""Adapter vs. base model on a test file: exact match, answer contained, answer length, EOS rate.

The seed's complaint was that the fine-tuned model answered far too verbosely; ``mean_answer_tokens`` and
``eos_rate`` measure that directly, next to accuracy.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftbridge.data.loading import Record, check_record, read_jsonl, to_example
from sftbridge.errors import DataError
from sftbridge.inference.predictor import Generation, Predictor

METRICS = ("exact_match", "contains", "mean_answer_tokens", "eos_rate")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


@dataclass
class Case:
    where: str
    prompt: str
    reference: str


def load_cases(path: Path, predictor: Predictor) -> list[Case]:
    """Test records in the run's own format → prompts (as trained) and reference answers."""
    fmt = predictor.prompt_format
    if fmt.format == "text":
        raise DataError(
            f"{path}: this run was trained on plain text; there are no reference answers to score"
        )
    records = read_jsonl(path)
    problems = [p for record in records for p in check_record(record, fmt.format, fmt.template)]
    if problems:
        raise DataError("\n  ".join([f"{len(problems)} problem(s) in the test data:", *problems[:20]]))
    return [_case(record, predictor) for record in records]


def _case(record: Record, predictor: Predictor) -> Case:
    example = to_example(record, predictor.prompt_format)
    assert example.messages is not None
    *history, answer = example.messages
    return Case(record.where, predictor.prompt(history), answer["content"].strip())


def score(cases: list[Case], generations: list[Generation]) -> dict[str, float]:
    n = len(cases)
    exact = sum(normalize(g.text) == normalize(c.reference) for c, g in zip(cases, generations, strict=True))
    contains = sum(
        normalize(c.reference) in normalize(g.text) for c, g in zip(cases, generations, strict=True)
    )
    return {
        "exact_match": exact / n,
        "contains": contains / n,
        "mean_answer_tokens": sum(len(g.token_ids) for g in generations) / n,
        "eos_rate": sum(g.finished for g in generations) / n,
    }


def evaluate(
    predictor: Predictor, cases: list[Case], *, batch_size: int = 16, base: bool = True
) -> dict[str, Any]:
    """``{"adapter": {...}, "base": {...}, "n": N, "samples": [...]}`` with greedy decoding."""
    if not cases:
        raise DataError("no test examples to evaluate")
    prompts = [case.prompt for case in cases]
    tuned = predictor.generate(prompts, batch_size=batch_size, do_sample=False)
    result: dict[str, Any] = {"adapter": score(cases, tuned), "n": len(cases)}
    if base:
        with predictor.base_model():
            result["base"] = score(cases, predictor.generate(prompts, batch_size=batch_size, do_sample=False))
    result["samples"] = [
        {"where": c.where, "reference": c.reference, "adapter": g.text}
        for c, g in zip(cases[:5], tuned, strict=False)
    ]
    return result


def format_table(result: dict[str, Any]) -> str:
    columns = [name for name in ("adapter", "base") if name in result]
    lines = [f"{'metric':<20}" + "".join(f"{c:>10}" for c in columns)]
    for metric in METRICS:
        cells = []
        for column in columns:
            value = result[column][metric]
            cells.append(f"{value:>10.1f}" if metric == "mean_answer_tokens" else f"{value:>10.1%}")
        lines.append(f"{metric:<20}" + "".join(cells))
    lines.append(f"(n = {result['n']} test questions, greedy decoding)")
    return "\n".join(lines)
