"""Adapter vs. base model on a test file: exact match, answer contained, answer length, EOS rate, eval loss.

The seed's complaint was that the fine-tuned model answered far too verbosely; ``mean_answer_tokens`` and
``eos_rate`` measure that directly, next to accuracy. Every prediction is kept (``predictions``: question,
reference, both answers, their token counts, whether each stopped at EOS), so an evaluation can be read
example by example and plotted by the run report.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftbridge.data.formatting import IGNORE_INDEX, Example
from sftbridge.data.loading import Record, check_record, read_jsonl, to_example
from sftbridge.errors import DataError
from sftbridge.inference.predictor import Generation, Predictor

METRICS = ("exact_match", "contains", "mean_answer_tokens", "eos_rate")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)

# progress(stage, done, total): called after every batch of every stage ("adapter", "base", "loss").
Progress = Callable[[str, int, int], None]


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


@dataclass
class Case:
    where: str
    prompt: str
    reference: str
    question: str = ""  # the last user turn, as the reader of the predictions wants to see it
    example: Example | None = None  # the whole example, to score the reference answer's loss


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
    question = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
    return Case(record.where, predictor.prompt(history), answer["content"].strip(), question, example)


def answer_tokens(tokenizer: Any, text: str) -> int:
    """A reference answer's length in tokens: the text alone, as the model would write it."""
    return len(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])


def generated_tokens(tokenizer: Any, generation: Generation) -> int:
    """A generated answer's length in tokens, counted as :func:`answer_tokens` counts a reference: without
    EOS (already dropped) and without the whitespace-only tokens around the text that the chat template
    trains in (Llama-2's ends an answer with `` </s>``: a perfect answer would read one token longer)."""
    ids = list(generation.token_ids)

    def blank(token: int) -> bool:
        return not tokenizer.decode([token], skip_special_tokens=True).strip()

    while ids and blank(ids[-1]):
        ids.pop()
    start = 0
    while start < len(ids) and blank(ids[start]):
        start += 1
    return len(ids) - start


def score(cases: list[Case], generations: list[Generation], tokenizer: Any) -> dict[str, float]:
    n = len(cases)
    exact = sum(normalize(g.text) == normalize(c.reference) for c, g in zip(cases, generations, strict=True))
    contains = sum(
        normalize(c.reference) in normalize(g.text) for c, g in zip(cases, generations, strict=True)
    )
    return {
        "exact_match": exact / n,
        "contains": contains / n,
        "mean_answer_tokens": sum(generated_tokens(tokenizer, g) for g in generations) / n,
        "eos_rate": sum(g.finished for g in generations) / n,
    }


def evaluate(
    predictor: Predictor,
    cases: list[Case],
    *,
    batch_size: int = 16,
    base: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Greedy answers and reference loss of the adapter (and the base), scored.

    Returns ``{"n", "adapter": {...}, "base": {...}, "eval_loss": {side: loss}, "predictions": [...]}``;
    ``eval_loss`` is the mean token loss on the reference answers (the trained span, as in training).
    """
    if not cases:
        raise DataError("no test examples to evaluate")
    sides = ["adapter", "base"] if base else ["adapter"]
    generations: dict[str, list[Generation]] = {}
    losses: dict[str, list[tuple[float, int]]] = {}
    for side in sides:
        with predictor.base_model() if side == "base" else contextlib.nullcontext():
            generations[side] = _generate(predictor, cases, batch_size, side, progress)
            losses[side] = reference_losses(predictor, cases, batch_size, f"{side} loss", progress)
    result: dict[str, Any] = {"n": len(cases)}
    tokenizer = predictor.tokenizer
    result.update({side: score(cases, generations[side], tokenizer) for side in sides})
    result["eval_loss"] = {side: _mean_loss(losses[side]) for side in sides}
    result["predictions"] = [
        _prediction(case, tokenizer, {side: (generations[side][i], losses[side][i]) for side in sides})
        for i, case in enumerate(cases)
    ]
    return result


def _generate(
    predictor: Predictor, cases: list[Case], batch_size: int, stage: str, progress: Progress | None
) -> list[Generation]:
    out: list[Generation] = []
    for start in range(0, len(cases), batch_size):
        prompts = [case.prompt for case in cases[start : start + batch_size]]
        out.extend(predictor.generate(prompts, batch_size=batch_size, do_sample=False))
        if progress:
            progress(stage, len(out), len(cases))
    return out


def reference_losses(
    predictor: Predictor, cases: list[Case], batch_size: int, stage: str, progress: Progress | None = None
) -> list[tuple[float, int]]:
    """(summed token loss, answer tokens) of each case's reference, encoded exactly as training encodes it."""
    import torch

    encoded = []
    for case in cases:
        assert case.example is not None
        encoded.append(predictor.prompt_format.encode(predictor.tokenizer, case.example))
    pad = predictor.tokenizer.pad_token_id
    results: list[tuple[float, int]] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(item.input_ids) for item in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):  # padded on the right: positions stay those of training
            ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
            labels[row, : len(item.labels)] = torch.tensor(item.labels)
            mask[row, : len(item.input_ids)] = 1
        device = predictor.model.device
        with torch.inference_mode():
            logits = predictor.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        target = labels[:, 1:].to(device)
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counts = (target != IGNORE_INDEX).sum(dim=1)
        results.extend(zip(token_loss.sum(dim=1).tolist(), counts.tolist(), strict=True))
        if progress:
            progress(stage, len(results), len(encoded))
    return results


def _mean_loss(losses: list[tuple[float, int]]) -> float | None:
    tokens = sum(count for _, count in losses)
    return sum(total for total, _ in losses) / tokens if tokens else None


def _prediction(
    case: Case, tokenizer: Any, answers: dict[str, tuple[Generation, tuple[float, int]]]
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "where": case.where,
        "question": case.question,
        "reference": case.reference,
        "reference_tokens": answer_tokens(tokenizer, case.reference),
    }
    for side, (generation, (loss, count)) in answers.items():
        row[f"{side}_answer"] = generation.text
        row[f"{side}_tokens"] = generated_tokens(tokenizer, generation)
        row[f"{side}_stopped_at_eos"] = generation.finished
        row[f"{side}_exact_match"] = normalize(generation.text) == normalize(case.reference)
        row[f"{side}_loss"] = loss / count if count else None
    return row


# An answer this many times its reference's length is "long": eval --pairs prefers the reference to it.
LONG_ANSWER_RATIO = 1.5


def preference_pairs(result: dict[str, Any], cases: list[Case], prompt_format: Any) -> list[dict[str, Any]]:
    """DPO pairs from an evaluation (``eval --pairs``): for every question the adapter got wrong or answered
    over LONG_ANSWER_RATIO times the reference's length, the reference is chosen, the adapter's answer
    rejected. A pair asks its question as the test record did: ``question`` when the run's format renders it
    back to the same turns, else the ``messages`` before the answer (``data.pairs`` reads both)."""
    pairs = []
    for case, row in zip(cases, result["predictions"], strict=True):
        answer = row["adapter_answer"].strip()
        long = row["adapter_tokens"] > LONG_ANSWER_RATIO * row["reference_tokens"]
        if not answer or answer == case.reference or not (long or not row["adapter_exact_match"]):
            continue  # nothing to prefer the reference to (an empty answer has no tokens to push down)
        assert case.example is not None and case.example.messages is not None
        history = case.example.messages[:-1]
        as_question = history == prompt_format.question_to_messages(case.question)
        context: dict[str, Any] = {"question": case.question} if as_question else {"messages": history}
        pairs.append({**context, "chosen": case.reference, "rejected": answer})
    return pairs


def write_pairs(pairs: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    partial.replace(path)


def predictions_path(summary: Path) -> Path:
    """Where a summary's predictions go: ``eval-test.json`` → ``eval-test-predictions.jsonl`` beside it."""
    return summary.with_name(f"{summary.stem}-predictions.jsonl")


def write_results(result: dict[str, Any], summary: Path) -> Path:
    """The summary (metrics, no predictions) to ``summary``, every prediction to its JSONL beside it."""
    predictions = predictions_path(summary)
    summary.parent.mkdir(parents=True, exist_ok=True)
    with predictions.open("w", encoding="utf-8") as handle:
        for row in result["predictions"]:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    body = {k: v for k, v in result.items() if k != "predictions"}
    body["predictions_file"] = predictions.name
    summary.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return predictions


def format_table(result: dict[str, Any]) -> str:
    columns = [name for name in ("adapter", "base") if name in result]
    lines = [f"{'metric':<20}" + "".join(f"{c:>10}" for c in columns)]
    for metric in METRICS:
        cells = []
        for column in columns:
            value = result[column][metric]
            cells.append(f"{value:>10.1f}" if metric == "mean_answer_tokens" else f"{value:>10.1%}")
        lines.append(f"{metric:<20}" + "".join(cells))
    losses = result.get("eval_loss") or {}
    if any(losses.get(column) is not None for column in columns):
        lines.append(
            f"{'eval_loss':<20}"
            + "".join(f"{losses[c]:>10.3f}" if losses.get(c) is not None else f"{'-':>10}" for c in columns)
        )
    lines.append(
        f"(n = {result['n']} test questions, greedy decoding; eval_loss: mean token loss of the reference)"
    )
    return "\n".join(lines)
