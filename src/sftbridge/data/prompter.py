"""The one prompt path at inference time: a question, a chat or a raw prompt → the text the model continues.

Training renders an example through :class:`~sftbridge.data.formatting.PromptFormat` (the run's chat template,
or its plain form); :class:`Prompter` renders requests the same way, for ``generate``, ``eval``, every server
route, the vLLM chat template and the answer metrics during training.

A raw prompt that already holds the run's template (the seed's JumpStart payload,
``<s>[INST] question [/INST] ``) is normalised to what training rendered. Training's prompt ended where
the answer began (``[/INST]``, then `` answer</s>``): a trailing space after ``[/INST]`` becomes a token
of its own that the model never saw there, and it answers wrongly or not at all. So :meth:`Prompter.raw`

1. takes a prompt that is the run's template around one question (with or without BOS, any whitespace
   around the question or after the template's end) and renders that question again, as training did;
2. otherwise, when the prompt ends with the template's generation prompt plus whitespace (e.g. its own
   system prompt inside ``<<SYS>>``), puts the generation prompt back exactly, and BOS in front;
3. leaves any other text that starts with BOS or the template's head as written; text that neither starts
   nor ends like the template is a plain question, rendered through it.

The same holds for other templates: for ChatML the end is ``<|im_end|>\\n<|im_start|>assistant\\n``, and a
prompt ending ``assistant`` or ``assistant\\n\\n`` gets exactly one newline back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sftbridge.data.formatting import Message, PromptFormat, bos_text

_MARKER = "SFTBRIDGEQUESTIONMARKER"  # no whitespace or punctuation: every chat template keeps it intact
_INJECT_SYSTEM = (
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "{%- set messages = [{'role': 'system', 'content': SYSTEM}] + messages -%}"
    "{%- endif -%}"
)
_PLAIN = (
    "{{- BOS -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- message['content'] -}}"
    "{%- else -%}{{- raise_exception('multi-turn conversations need a chat template') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


class Prompter:
    """A run's tokenizer and prompt format: how any request becomes the model's input text."""

    def __init__(self, tokenizer: Any, prompt_format: PromptFormat) -> None:
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.bos = bos_text(tokenizer)
        rendered = self.question(_MARKER)
        head, found, tail = rendered.partition(_MARKER)
        # The template around one question; None when the question does not appear once as written.
        self.frame: tuple[str, str] | None = (head, tail) if found and _MARKER not in tail else None

    def question(self, question: str) -> str:
        """A bare question typed by a user, through the run's template and system prompt."""
        fmt = self.prompt_format
        return fmt.render_prompt(self.tokenizer, fmt.question_to_messages(question))

    def chat(self, messages: Sequence[Message]) -> str:
        """A chat history ending with the user, with the run's system prompt when it has none."""
        fmt = self.prompt_format
        return fmt.render_prompt(self.tokenizer, fmt.with_system(list(messages)))

    def chat_template(self) -> str:
        """One Jinja chat template that renders a conversation exactly as :meth:`chat`: what an engine that
        formats chats itself is given (vLLM's ``--chat-template``, a GGUF's ``tokenizer.chat_template``)."""
        fmt = self.prompt_format
        if fmt.chat_format == "chat_template":
            body = str(self.tokenizer.chat_template)
        else:
            bos = self.chat([{"role": "user", "content": "x"}]).removesuffix("x")
            if fmt.system_prompt:
                bos = bos.removesuffix(fmt.system_prompt + "\n\n")
            body = _PLAIN.replace("BOS", _literal(bos))
        if fmt.system_prompt:
            body = _INJECT_SYSTEM.replace("SYSTEM", _literal(fmt.system_prompt)) + body
        return body

    def holds_template(self, text: str) -> bool:
        """Whether ``text`` is already a formatted prompt, not a plain question: it starts with BOS or the
        template's head, or ends with the template's end (the generation prompt, e.g. ``[/INST]``)."""
        heads = [self.bos]
        if self.frame is not None:
            head, tail = self.frame
            heads += [head, head.removeprefix(self.bos)]
            if tail.strip() and text.rstrip().endswith(tail.strip()):
                return True
        return any(head.strip() and text.startswith(head) for head in heads)

    def raw(self, text: str) -> str:
        """A TGI ``inputs`` string: a formatted prompt normalised as training rendered it (see the module's
        docstring), or a plain question through the template."""
        if not self.holds_template(text):
            return self.question(text)
        if self.frame is None:
            return text
        head, tail = self.frame
        body, end = text.rstrip(), tail.strip()
        if not end or not body.endswith(end):
            return text
        body = body[: len(body) - len(end)]
        for start in (head, head.removeprefix(self.bos)):
            if start.strip() and body.startswith(start):
                question = body[len(start) :].strip()
                if question and _MARKER not in question:
                    return self.question(question)
        if tail[:1].isspace():  # the template puts its own whitespace before its end: only that, once
            body = body.rstrip()
        bos = self.bos if head.startswith(self.bos) else ""  # as the template renders it (ChatML: none)
        return (body if body.startswith(bos) else bos + body) + tail

    def completion(self, text: str) -> str:
        """An OpenAI completions prompt: text to continue, used as written after BOS (as vLLM does)."""
        return text if not self.bos or text.startswith(self.bos) else self.bos + text


def _literal(text: str) -> str:
    """A Jinja string literal (JSON's escapes are Jinja's too)."""
    return json.dumps(text)
