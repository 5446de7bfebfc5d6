"""The one place the prompt format lives: record → chat turns → text → token ids and labels.

Training (``loading.py``), ``preview``, inference and evaluation all call this module, so the model is asked
questions exactly the way it was trained. For Llama-2-chat a Q/A pair becomes
``<s>[INST] {question} [/INST] {answer} </s>``: one BOS, EOS trained, loss on the answer only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sftbridge.config import QA_TEMPLATE, Template, template_fields
from sftbridge.runs import PromptRecord

IGNORE_INDEX = -100  # label of a token that is not trained on (PyTorch's cross-entropy ignore_index)

Message = dict[str, str]
ChatFormat = Literal["chat_template", "plain"]

# A model without a chat template sees Q/A pairs in this plain form.
PLAIN_QA_TEMPLATE = Template(prompt="Question: {question}\nAnswer:", completion=" {correct_answer}")


class FormatError(ValueError):
    """An example cannot be rendered (message says why); loading.py adds the file and line."""


@dataclass(frozen=True)
class Example:
    """One validated training/eval example: chat turns, or plain text for domain adaptation."""

    where: str  # "data/train.jsonl line 17", for error messages
    messages: list[Message] | None = None
    text: str | None = None


@dataclass
class Encoded:
    text: str
    input_ids: list[int]
    labels: list[int]
    trained_spans: list[tuple[int, int]] = field(default_factory=list)  # char spans of `text` in the loss


@dataclass(frozen=True)
class PromptFormat:
    """How records are turned into model input; stored in every run's manifest."""

    format: Literal["qa", "template", "messages", "text"]
    chat_format: ChatFormat
    template: Template | None = None
    system_prompt: str | None = None

    # ---- records → turns ------------------------------------------------------------------------------
    @property
    def effective_template(self) -> Template:
        if self.template is not None:
            return self.template
        return QA_TEMPLATE if self.chat_format == "chat_template" else PLAIN_QA_TEMPLATE

    def record_to_messages(self, record: dict[str, Any]) -> list[Message]:
        """A Q/A or template record → [system?, user, assistant]."""
        template = self.effective_template
        return self.with_system(
            [
                {"role": "user", "content": fill(template.prompt, record)},
                {"role": "assistant", "content": fill(template.completion, record)},
            ]
        )

    def question_to_messages(self, question: str) -> list[Message]:
        """A bare question typed by a user → [system?, user], through the template when it has one field."""
        fields = template_fields(self.effective_template.prompt) if self.format in ("qa", "template") else []
        content = (
            self.effective_template.prompt.format(**{fields[0]: question})
            if len(set(fields)) == 1
            else question
        )
        return self.with_system([{"role": "user", "content": content}])

    def with_system(self, messages: list[Message]) -> list[Message]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    # ---- turns → text ---------------------------------------------------------------------------------
    def render_prompt(self, tokenizer: Any, messages: list[Message]) -> str:
        """Text the model continues from: everything up to where the assistant's answer starts."""
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if self.chat_format == "chat_template":
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return bos_text(tokenizer) + self._plain_prefix(messages)

    def _plain_prefix(self, messages: list[Message]) -> str:
        parts = []
        for message in messages:
            if message["role"] == "system":
                parts.append(message["content"] + "\n\n")
            elif message["role"] == "user":
                parts.append(message["content"])
            else:
                raise FormatError(
                    "multi-turn conversations need a chat template; this tokenizer has none "
                    "(use Q/A or template data, or a model with a chat template)"
                )
        return "".join(parts)

    def render(self, tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
        """Full text of an example and the char spans that are trained on."""
        if example.text is not None:
            body = bos_text(tokenizer) + example.text
            return body + _eos(tokenizer), [(len(bos_text(tokenizer)), len(body) + len(_eos(tokenizer)))]
        assert example.messages is not None
        messages = self.with_system(example.messages)
        if self.chat_format == "plain":
            prompt = self.render_prompt(tokenizer, messages[:-1])
            if messages[-1]["role"] != "assistant" or any(m["role"] == "assistant" for m in messages[:-1]):
                raise FormatError("without a chat template an example must be one prompt and one answer")
            text = prompt + messages[-1]["content"] + _eos(tokenizer)
            return text, [(len(prompt), len(text))]
        return _render_chat(tokenizer, messages)

    # ---- text → ids -----------------------------------------------------------------------------------
    def encode(self, tokenizer: Any, example: Example) -> Encoded:
        text, spans = self.render(tokenizer, example)
        input_ids, offsets = tokenize_with_offsets(tokenizer, text)
        labels = [
            token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
            for token, (begin, _) in zip(input_ids, offsets, strict=True)
        ]
        return Encoded(text=text, input_ids=input_ids, labels=labels, trained_spans=spans)

    # ---- manifest ---------------------------------------------------------------------------------------
    def to_record(self) -> PromptRecord:
        return PromptRecord(
            format=self.format,
            chat_format=self.chat_format,
            template=self.template,
            system_prompt=self.system_prompt,
        )

    @classmethod
    def from_record(cls, record: PromptRecord) -> PromptFormat:
        return cls(
            format=record.format,
            chat_format=record.chat_format,
            template=record.template,
            system_prompt=record.system_prompt,
        )


def resolve_chat_format(setting: str, tokenizer: Any) -> ChatFormat:
    """``data.chat_format``: auto = the tokenizer's chat template when it has one, else plain."""
    if setting == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "plain"
    return "chat_template" if setting == "chat_template" else "plain"


def fill(template: str, record: dict[str, Any]) -> str:
    """``template.format(**record)`` with a clear error for a field the record lacks."""
    missing = [name for name in template_fields(template) if name not in record]
    if missing:
        raise FormatError(
            f"missing field {missing[0]!r} (the record has: {', '.join(sorted(record)) or 'nothing'})"
        )
    return template.format(**{key: str(value) for key, value in record.items()})


def _render_chat(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template; each assistant turn's span is found by rendering the prefixes."""
    full = str(tokenizer.apply_chat_template(messages, tokenize=False))
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = str(
            tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        )
        through = str(tokenizer.apply_chat_template(messages[: index + 1], tokenize=False))
        if not (through.startswith(before) and full.startswith(through)):
            raise FormatError(
                "the tokenizer's chat template does not render conversations prefix by prefix, so the answer "
                "span cannot be located; set data.chat_format=plain or fix the template"
            )
        spans.append((len(before), len(through)))
    if not spans:
        raise FormatError("the conversation has no assistant turn to train on")
    return full, spans


def tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of text that already holds its special tokens (``<s>``, ``</s>``), with char offsets."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(pair) for pair in encoding["offset_mapping"]]


def bos_text(tokenizer: Any) -> str:
    """BOS as text, only for tokenizers that add one (Llama does; GPT-2 style ones don't)."""
    bos = tokenizer.bos_token
    if not bos or tokenizer.bos_token_id is None:
        return ""
    return bos if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else ""


def _eos(tokenizer: Any) -> str:
    return tokenizer.eos_token or ""
