"""Preference pairs for DPO: read, validated like SFT data, rendered exactly as SFT renders an answer.

A pair is a context and two answers to it, one preferred. Accepted lines (TRL's names)::

    {"question": "...", "chosen": "...", "rejected": "..."}          # or "prompt": "..." for "question"
    {"messages": [{"role": "user", ...}, ...], "chosen": "...", "rejected": "..."}
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}

A question goes through the run's prompt format (its template and system prompt) as any question does at
inference (``PromptFormat.question_to_messages``); each answer becomes the assistant turn after the context
and is encoded by ``PromptFormat.encode``, the very function SFT trains with: the tokens SFT would put in
the loss are the answer (TRL's ``chosen_ids``/``rejected_ids``), everything before them is the prompt.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sftbridge.config import DataSection
from sftbridge.data.formatting import (
    IGNORE_INDEX,
    Encoded,
    Example,
    Message,
    PromptFormat,
    resolve_chat_format,
)
from sftbridge.data.loading import (
    ROLES,
    LengthReport,
    Record,
    _raise_if,
    apply_length_policy,
    read_jsonl,
    split_records,
)
from sftbridge.errors import DataError

log = logging.getLogger(__name__)

PairFormat = Literal["qa", "messages"]
ANSWERS = ("chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    where: str  # "pairs.jsonl line 3"
    context: list[Message]  # the turns before the answer, ending with the user's
    chosen: str
    rejected: str


@dataclass
class EncodedPair:
    """A pair as TRL's DPOTrainer takes it, and both full sequences as SFT would encode them (for preview)."""

    where: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen: Encoded
    rejected: Encoded

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class LoadedPairs:
    format: PairFormat  # qa: a question (or prompt string) per pair; messages: a chat context
    train: list[Record]
    validation: list[Record]
    sha256: dict[str, str] = field(default_factory=dict)


def _answer(value: Any) -> str | None:
    """An answer as text: a string, or TRL's conversational form (one assistant turn); None if neither."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        turn = value[0]
        value = turn.get("content") if turn.get("role") == "assistant" else None
    return value if isinstance(value, str) else None


def _context(values: dict[str, Any]) -> tuple[str, Any]:
    for key in ("messages", "prompt", "question"):
        if key in values:
            return key, values[key]
    return "", None


def check_pair(record: Record) -> list[str]:
    """Problems of one pair line (empty when valid), each naming the line and the fix."""
    values, where = record.values, record.where
    problems = []
    key, context = _context(values)
    if not key:
        problems.append(
            f'{where}: missing field "question" (or "prompt", or "messages"): a pair needs its question; '
            f"the record has: {', '.join(sorted(values)) or 'nothing'}"
        )
    elif isinstance(context, str):
        if not context.strip():
            problems.append(f"{where}: field {key!r} is empty")
    elif isinstance(context, list) and context:
        for index, turn in enumerate(context):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                problems.append(f"{where}: {key}[{index}] needs a role in {ROLES}")
                break
            if not isinstance(turn.get("content"), str) or not turn["content"].strip():
                problems.append(f"{where}: {key}[{index}].content must be a non-empty string")
                break
        else:
            if context[-1]["role"] != "user":
                problems.append(f"{where}: the last turn of {key} must be the user's (the answers follow it)")
    else:
        problems.append(f"{where}: field {key!r} must be a string or a non-empty list of chat turns")
    answers = {}
    for name in ANSWERS:
        if name not in values:
            problems.append(
                f"{where}: missing field {name!r} (the {'preferred' if name == 'chosen' else 'worse'} answer)"
            )
            continue
        text = _answer(values[name])
        if text is None:
            problems.append(
                f"{where}: field {name!r} must be a string or one assistant turn "
                '[{"role": "assistant", "content": "..."}]'
            )
        elif not text.strip():
            problems.append(f"{where}: field {name!r} is empty")
        else:
            answers[name] = text
    if len(answers) == 2 and answers["chosen"].strip() == answers["rejected"].strip():
        problems.append(
            f"{where}: chosen and rejected are the same answer; DPO learns nothing from it: drop the line"
        )
    return problems


def load_pairs(cfg: DataSection, *, eval_strategy: str = "epoch") -> LoadedPairs:
    """Read and validate the pair files of a config (train, validation); DataError naming file and line."""
    problems: list[str] = []
    digests: dict[str, str] = {}
    train = read_jsonl(Path(cfg.train_file), problems, digests)
    validation = read_jsonl(Path(cfg.validation_file), problems, digests) if cfg.validation_file else []
    problems += [p for record in train + validation for p in check_pair(record)]
    _raise_if(problems)
    if not train:
        raise DataError(f"{cfg.train_file}: no pairs in the file")
    if not cfg.validation_file and cfg.validation_split_ratio > 0 and eval_strategy != "no":
        train, validation = split_records(train, cfg.validation_split_ratio, cfg.split_seed)
    fmt: PairFormat = "qa" if isinstance(_context(train[0].values)[1], str) else "messages"
    return LoadedPairs(fmt, train, validation, digests)


def pairs_prompt_format(
    section: DataSection, fmt: PairFormat, tokenizer: Any, parent: PromptFormat | None
) -> PromptFormat:
    """How pairs are rendered: as the run they continue was prompted (``model.adapter``: the DPO run is then
    prompted exactly as its SFT run), else by the config's chat format and system prompt."""
    if parent is not None:
        return parent
    return PromptFormat(fmt, resolve_chat_format(section.chat_format, tokenizer), None, section.system_prompt)


def to_pair(record: Record, prompt_format: PromptFormat) -> Pair:
    _, context = _context(record.values)
    if isinstance(context, str):
        turns = prompt_format.question_to_messages(context)
    else:
        turns = prompt_format.with_system([{"role": t["role"], "content": t["content"]} for t in context])
    chosen, rejected = (_answer(record.values[name]) or "" for name in ANSWERS)
    return Pair(record.where, turns, chosen, rejected)


def answer_example(pair: Pair, answer: str) -> Example:
    """The context and one answer as an SFT example: what SFT would train on."""
    return Example(pair.where, messages=[*pair.context, {"role": "assistant", "content": answer}])


def _answer_start(labels: list[int]) -> int:
    """Where the last trained run of tokens starts: the final answer (earlier assistant turns are context)."""
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def encode_pair(pair: Pair, prompt_format: PromptFormat, tokenizer: Any) -> EncodedPair:
    chosen = prompt_format.encode(tokenizer, answer_example(pair, pair.chosen))
    rejected = prompt_format.encode(tokenizer, answer_example(pair, pair.rejected))
    # Both share the context; the prompt ends where either answer begins (tokens never merge across it).
    start = min(_answer_start(chosen.labels), _answer_start(rejected.labels))
    while start and chosen.input_ids[:start] != rejected.input_ids[:start]:
        start -= 1
    for encoded in (chosen, rejected):  # only the final answer is trained: the preview marks just that
        encoded.labels = [IGNORE_INDEX] * start + encoded.input_ids[start:]
        encoded.trained_spans = encoded.trained_spans[-1:]
    return EncodedPair(
        pair.where,
        chosen.input_ids[:start],
        chosen.input_ids[start:],
        rejected.input_ids[start:],
        chosen,
        rejected,
    )


def encode_pairs(
    records: list[Record],
    prompt_format: PromptFormat,
    tokenizer: Any,
    max_length: int,
    policy: Literal["drop", "truncate", "error"],
) -> tuple[list[EncodedPair], LengthReport]:
    """Render and tokenize every pair; a pair whose longer sequence is over ``max_length`` is dropped, cut
    (by TRL's collator, which keeps the start) or an error, as ``data.over_length`` says."""
    return apply_length_policy(
        records,
        lambda record: encode_pair(to_pair(record, prompt_format), prompt_format, tokenizer),
        len,
        # kept whole: TRL's collator cuts the answers; a prompt alone at max_length leaves nothing to compare
        lambda item: item if len(item.prompt_ids) < max_length else None,
        max_length=max_length,
        policy=policy,
        noun="pairs",
    )


def sample_records(records: list[Record], prompt_format: PromptFormat, count: int, seed: int) -> list[Record]:
    """Up to ``count`` pairs as SFT chat records (context + the chosen answer), chosen by ``seed``: the
    questions the answer metrics ask, the chosen answer their reference."""
    picked = sorted(random.Random(seed).sample(range(len(records)), min(len(records), count)))
    out = []
    for index in picked:
        pair = to_pair(records[index], prompt_format)
        messages = answer_example(pair, pair.chosen).messages
        out.append(Record(pair.where, {"messages": messages}))
    return out
