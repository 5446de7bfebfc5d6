"""Read and validate datasets before any model is loaded, then encode them for the trainer.

Stage 1 (``load_data``) needs nothing but the files: it checks encoding, JSON, fields and types and reports
every problem with its file and line. Stage 2 (``encode_split``) needs the tokenizer only: it renders each
example through ``formatting`` and applies the over-length policy. The trainer receives ``input_ids`` and
``labels`` ready-made, so what ``sftbridge preview`` shows is exactly what is trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from sftbridge.config import QA_TEMPLATE, DataSection, Template, template_fields
from sftbridge.data.formatting import Encoded, Example, FormatError, PromptFormat
from sftbridge.errors import DataError

log = logging.getLogger(__name__)

MAX_REPORTED = 20  # problems listed per file before "... and N more"
# A line this long (~1M tokens) is a broken file (a missing newline, a binary blob), not an example; refusing
# it early avoids minutes of tokenization before the over-length policy would drop it anyway.
MAX_LINE_BYTES = 4 << 20
ROLES = ("system", "user", "assistant")
DataFormat = Literal["qa", "template", "messages", "text"]


@dataclass
class Record:
    where: str  # "data/train.jsonl line 17"
    values: dict[str, Any]


@dataclass
class LoadedData:
    """Validated records of every split, the detected format and the files' sha256."""

    format: DataFormat
    template: Template | None
    template_source: str | None
    train: list[Record]
    validation: list[Record]
    test: list[Record]
    sha256: dict[str, str] = field(default_factory=dict)  # path -> digest

    def prompt_format(
        self, chat_format: Literal["chat_template", "plain"], system_prompt: str | None
    ) -> PromptFormat:
        return PromptFormat(self.format, chat_format, self.template, system_prompt)


@dataclass
class LengthReport:
    total: int = 0
    over_length: int = 0
    dropped: int = 0
    truncated: int = 0
    lines: list[str] = field(default_factory=list)  # where the over-length examples are

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("total", "over_length", "dropped", "truncated")}


def read_jsonl(
    path: Path, problems: list[str] | None = None, digests: dict[str, str] | None = None
) -> list[Record]:
    """Every non-blank line of a JSONL file as an object; all problems reported at once.

    With ``problems`` given, line problems are appended there (for the caller to report with its own),
    not raised. With ``digests``, the sha256 of the very bytes parsed is put there under ``str(path)``: a file
    appended to while a run starts is recorded as it was read, not as it is a moment later.
    """
    if not path.is_file():
        if path.is_absolute():
            raise DataError(f"{path}: file not found")
        raise DataError(
            f"{path}: file not found in the current folder ({Path.cwd()}); run from the folder the config's "
            "data paths start from (the repository root for configs/*.yaml), or make them absolute"
        )
    read = path.read_bytes()
    if digests is not None:
        digests[str(path)] = hashlib.sha256(read).hexdigest()
    raw = read.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM is harmless: drop it
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; it needs one JSON object per line")
    records: list[Record] = []
    collect = problems is not None
    problems = problems if problems is not None else []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if len(line) > MAX_LINE_BYTES:
            problems.append(
                f"{where}: {len(line) / (1 << 20):.1f} MB on one line (the limit is "
                f"{MAX_LINE_BYTES >> 20} MB); is a newline missing between records?"
            )
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(
                f"{where}: not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                "re-save the file as UTF-8"
            )
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a JSON object {{...}}, got {type(value).__name__}")
            continue
        records.append(Record(where, value))
    if not collect:
        _raise_if(problems)
    return records


def _raise_if(problems: list[str]) -> None:
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DataError(f"{len(problems)} data problem(s):\n  " + "\n  ".join(shown) + more)


def read_template_json(path: Path) -> Template | None:
    """JumpStart's layout: a ``template.json`` with "prompt" and "completion" beside the training data."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Template.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f'{path}: invalid JSON ({exc}); expected {{"prompt": ..., "completion": ...}}'
        ) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DataError(
            f'{path}: {problems}; expected {{"prompt": "...{{field}}...", "completion": ...}}'
        ) from None


def detect_format(records: list[Record], cfg: DataSection, template: Template | None) -> DataFormat:
    if cfg.format != "auto":
        if cfg.format == "template" and template is None:
            raise DataError(
                "data.format is 'template' but there is no data.template and no template.json "
                f"beside {cfg.train_file}; add one"
            )
        return cfg.format
    if template is not None:
        return "template"
    first = records[0]
    keys = set(first.values)
    if keys & {"messages", "dialog"}:
        return "messages"
    if keys & {"question", "correct_answer"}:  # Q/A; a missing half is reported as a missing field
        return "qa"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{first.where}: cannot tell the data format from the keys {sorted(keys)}; expected question + "
        "correct_answer (Q/A), messages or dialog (chat), or text; or give data.template / a template.json"
    )


def check_record(record: Record, fmt: DataFormat, template: Template | None) -> list[str]:
    """Problems of one record for its format (empty list when valid)."""
    values = record.values
    if fmt in ("qa", "template"):
        used = template or QA_TEMPLATE
        names = dict.fromkeys(template_fields(used.prompt) + template_fields(used.completion))
        problems = []
        for name in names:
            if name not in values:
                problems.append(
                    f"missing field {name!r} (the record has: {', '.join(sorted(values)) or 'nothing'})"
                )
            elif isinstance(values[name], bool) or not isinstance(values[name], str | int | float):
                problems.append(f"field {name!r} must be a string, got {type(values[name]).__name__}")
            elif not str(values[name]).strip():
                problems.append(f"field {name!r} is empty")
        return [f"{record.where}: {p}" for p in problems]
    if fmt == "messages":
        key = "messages" if "messages" in values else "dialog"
        turns = values.get(key)
        if not isinstance(turns, list) or not turns:
            return [f"{record.where}: field 'messages' (or 'dialog') must be a non-empty list of turns"]
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                return [f"{record.where}: {key}[{index}] needs a role in {ROLES}"]
            if not isinstance(turn.get("content"), str) or not turn["content"].strip():
                return [f"{record.where}: {key}[{index}].content must be a non-empty string"]
        if turns[-1]["role"] != "assistant":
            return [f"{record.where}: the last turn of {key} must be the assistant's answer"]
        return []
    text = values.get("text")
    if not isinstance(text, str) or not text.strip():
        return [f"{record.where}: field 'text' must be a non-empty string"]
    return []


def load_data(cfg: DataSection, *, eval_strategy: str = "epoch", with_test: bool = True) -> LoadedData:
    """Read and validate every data file of a config. Raises DataError naming file and line."""
    train_path = Path(cfg.train_file)
    problems: list[str] = []
    digests: dict[str, str] = {}
    train = read_jsonl(train_path, problems, digests)
    if not train:
        _raise_if(problems)
    template, source = cfg.template, "data.template"
    if template is None:
        source = str(train_path.parent / "template.json")
        template = read_template_json(Path(source))
    fmt = detect_format(train, cfg, template)
    if fmt != "template":
        template = None
    paths = {"train": train_path}
    splits: dict[str, list[Record]] = {"train": train, "validation": [], "test": []}
    for role in ("validation", "test"):
        name = getattr(cfg, f"{role}_file")
        if name and (role != "test" or with_test):
            paths[role] = Path(name)
            splits[role] = read_jsonl(Path(name), problems, digests)
    problems += [
        p for records in splits.values() for record in records for p in check_record(record, fmt, template)
    ]
    _raise_if(problems)
    if not cfg.validation_file and cfg.validation_split_ratio > 0 and eval_strategy != "no":
        splits["train"], splits["validation"] = split_records(
            train, cfg.validation_split_ratio, cfg.split_seed
        )
    return LoadedData(
        format=fmt,
        template=template,
        template_source=source if template is not None else None,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        sha256={str(path): digests[str(path)] for path in paths.values()},
    )


def split_records(records: list[Record], ratio: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``ratio`` of the records (at least one, at most all but one), chosen by ``seed``."""
    if len(records) < 2:
        return records, []
    indices = list(range(len(records)))
    random.Random(seed).shuffle(indices)
    n_val = min(max(1, round(len(records) * ratio)), len(records) - 1)
    held = set(indices[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


def to_example(record: Record, prompt_format: PromptFormat) -> Example:
    values = record.values
    if prompt_format.format == "text":
        return Example(record.where, text=values["text"])
    if prompt_format.format == "messages":
        turns = values.get("messages") or values["dialog"]
        return Example(record.where, messages=[{"role": t["role"], "content": t["content"]} for t in turns])
    return Example(record.where, messages=prompt_format.record_to_messages(values))


def encode_split(
    records: list[Record],
    prompt_format: PromptFormat,
    tokenizer: Any,
    max_length: int,
    policy: Literal["drop", "truncate", "error"],
) -> tuple[list[Encoded], LengthReport]:
    """Render and tokenize; examples longer than ``max_length`` are dropped, truncated or an error."""

    def truncated(item: Encoded) -> Encoded | None:
        if all(label < 0 for label in item.labels[:max_length]):
            return None  # nothing left to train on
        item.input_ids, item.labels = item.input_ids[:max_length], item.labels[:max_length]
        return item

    return apply_length_policy(
        records,
        lambda record: prompt_format.encode(tokenizer, to_example(record, prompt_format)),
        lambda item: len(item.input_ids),
        truncated,
        max_length=max_length,
        policy=policy,
        noun="examples",
    )


Item = TypeVar("Item")


def apply_length_policy(
    records: list[Record],
    encode: Callable[[Record], Item],
    length: Callable[[Item], int],
    truncated: Callable[[Item], Item | None],
    *,
    max_length: int,
    policy: Literal["drop", "truncate", "error"],
    noun: str,
) -> tuple[list[Item], LengthReport]:
    """``encode`` every record, then apply ``data.over_length`` to those over ``max_length`` tokens: drop,
    ``truncated`` (None: nothing trainable is left, so dropped), or an error naming each line. Examples (SFT)
    and pairs (DPO) share it."""
    encoded, report, problems = [], LengthReport(total=len(records)), []
    for record in records:
        try:
            item = encode(record)
        except FormatError as exc:
            problems.append(f"{record.where}: {exc}")
            continue
        if length(item) > max_length:
            report.over_length += 1
            report.lines.append(record.where)
            if policy == "error":
                problems.append(
                    f"{record.where}: {length(item)} tokens, over data.max_length={max_length} "
                    "(raise data.max_length or set data.over_length to drop or truncate)"
                )
                continue
            cut = truncated(item) if policy == "truncate" else None
            if cut is None:
                report.dropped += 1
                continue
            item = cut
            report.truncated += 1
        encoded.append(item)
    _raise_if(problems)
    if report.over_length:
        log.warning(
            "%d of %d %s are over data.max_length=%d tokens: %d dropped, %d truncated (first: %s)",
            report.over_length,
            report.total,
            noun,
            max_length,
            report.dropped,
            report.truncated,
            report.lines[0],
        )
    return encoded, report
