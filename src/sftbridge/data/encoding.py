"""A dataset rendered through the prompt format and tokenized exactly as training encodes it, and the token
lengths that come of it: training, ``sftbridge preview``, ``sftbridge plan`` and the run report all call
``encode``. Light to import (``Lengths`` is read by ``plan`` before pydantic loads); the rest loads inside.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sftbridge.config import DataSection
    from sftbridge.data.formatting import Encoded, PromptFormat
    from sftbridge.data.loading import LengthReport, LoadedData

Split = Literal["train", "validation", "test"]
OverLength = Literal["drop", "truncate", "error"]


@dataclass
class EncodedData:
    """Splits of a dataset rendered and tokenized through one prompt format."""

    prompt_format: PromptFormat
    splits: dict[str, list[Encoded]]  # split -> its examples, after the over-length policy
    reports: dict[str, LengthReport]  # split -> how many were over data.max_length, and what became of them


def encode(
    data: LoadedData,
    section: DataSection,
    tokenizer: Any,
    splits: tuple[Split, ...] = ("train",),
    *,
    prompt_format: PromptFormat | None = None,
    limit: int | None = None,
    max_length: int | None = None,
    over_length: OverLength | None = None,
) -> EncodedData:
    """Render and tokenize ``splits`` of ``data`` the way training does; DataError names every bad record.

    Args:
        section: the config's ``data``: its chat format, system prompt, max length and over-length policy.
        prompt_format: a format recorded by a finished run, instead of the one ``section`` resolves to.
        limit: only the first N records of each split.
        max_length, over_length: instead of the section's (``plan`` estimates without truncating, say).
    """
    from sftbridge.data.formatting import resolve_chat_format
    from sftbridge.data.loading import encode_split

    if prompt_format is None:
        chat_format = resolve_chat_format(section.chat_format, tokenizer)
        prompt_format = data.prompt_format(chat_format, section.system_prompt)
    max_length = section.max_length if max_length is None else max_length
    policy = section.over_length if over_length is None else over_length
    encoded = EncodedData(prompt_format, {}, {})
    for split in splits:
        records = getattr(data, split)[:limit]
        encoded.splits[split], encoded.reports[split] = encode_split(
            records, prompt_format, tokenizer, max_length, policy
        )
    return encoded


@dataclass
class Lengths:
    """Token counts per example of one split, as training encodes it (after the over-length policy)."""

    tokens: list[int]  # prompt + answer
    trained: list[int]  # tokens in the loss (the answer)
    source: str = "tokenizer"  # or "estimated": counted in characters, the model's tokenizer being absent

    @classmethod
    def of(cls, examples: list[Encoded]) -> Lengths:
        return cls([len(e.input_ids) for e in examples], [sum(x >= 0 for x in e.labels) for e in examples])

    def stats(self, which: str) -> dict[str, float]:
        """min, median, mean, p95 and max of ``tokens`` or ``trained``."""
        values = sorted(getattr(self, which))
        return {
            "min": values[0],
            "median": statistics.median(values),
            "mean": statistics.fmean(values),
            "p95": _percentile(values, 0.95),
            "max": values[-1],
        }

    def summary(self) -> dict[str, Any]:
        """Examples, tokens in all and in the loss, and the spread of ``tokens``: what ``plan`` shows."""
        ordered = sorted(self.tokens)
        return {
            "examples": len(ordered),
            "tokens": sum(ordered),
            "trained_tokens": sum(self.trained),
            "mean": round(statistics.fmean(ordered), 1),
            "p50": _percentile(ordered, 0.5),
            "p90": _percentile(ordered, 0.9),
            "p99": _percentile(ordered, 0.99),
            "max": ordered[-1],
            "source": self.source,
        }


def _percentile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
