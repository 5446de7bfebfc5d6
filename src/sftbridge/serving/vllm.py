"""vLLM for a run: the chat template that formats prompts as training did, and the ``vllm serve`` command.

vLLM formats a chat request with a Jinja chat template (``--chat-template``). A run formats prompts with its
``Prompter``: the tokenizer's chat template with the run's system prompt added when the conversation has
none, or, for a tokenizer without a template, its plain format (``system\\n\\n`` + the question, after
BOS). :func:`chat_template` writes that as one Jinja template, so that vLLM (locally, or in the SageMaker
image through ``SM_VLLM_CHAT_TEMPLATE``) gives the same prompt text token for token.

``sftbridge serve RUN --engine vllm`` runs :func:`serve_command`: the run's base model with its adapter as a
LoRA module named after the run (``--enable-lora --lora-modules NAME=RUN/adapter``), or a merged folder as
the model; requests that name the model NAME get the fine-tune. vLLM is the ``vllm`` extra, never installed
by the CPU set-up.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from sftbridge.errors import UserError
from sftbridge.runs import ADAPTER

if TYPE_CHECKING:
    from sftbridge.data.prompter import Prompter
    from sftbridge.inference.folder import ModelFolder

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


def _literal(text: str) -> str:
    """A Jinja string literal (JSON's escapes are Jinja's too)."""
    return json.dumps(text)


def chat_template(prompter: Prompter) -> str:
    """One Jinja chat template that renders a conversation exactly as the run's :meth:`Prompter.chat`."""
    fmt = prompter.prompt_format
    if fmt.chat_format == "chat_template":
        body = str(prompter.tokenizer.chat_template)
    else:
        bos = prompter.chat([{"role": "user", "content": "x"}]).removesuffix("x")
        if fmt.system_prompt:
            bos = bos.removesuffix(fmt.system_prompt + "\n\n")
        body = _PLAIN.replace("BOS", _literal(bos))
    if fmt.system_prompt:
        body = _INJECT_SYSTEM.replace("SYSTEM", _literal(fmt.system_prompt)) + body
    return body


def _base_of(folder: ModelFolder) -> str:
    """The run's base model as vLLM loads it: a Hub id or a local folder (the built-in tiny model's cache)."""
    from sftbridge.config import BUILTIN_TINY_MODEL
    from sftbridge.models.builtin import resolve_builtin

    name = folder.run_config.model.name_or_path
    return str(resolve_builtin(name)) if name == BUILTIN_TINY_MODEL else name


def serve_command(
    folder: ModelFolder,
    *,
    host: str,
    port: int,
    name: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """``vllm serve`` for a run directory (base + adapter as a LoRA module) or a merged folder.

    The chat template goes to a file in sftbridge's cache, named by its hash.
    """
    from sftbridge.models.builtin import cache_root

    source = folder.path.resolve()
    template = chat_template(folder.prompter)
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    template_file = cache_root() / "chat-templates" / f"{digest}.jinja"
    template_file.parent.mkdir(parents=True, exist_ok=True)
    template_file.write_text(template, encoding="utf-8")
    name = name or source.name
    common = ["--host", host, "--port", str(port), "--chat-template", str(template_file)]
    if folder.is_merged:
        return ["vllm", "serve", str(source), "--served-model-name", name, *common, *(extra or [])]
    if folder.qlora:
        raise UserError(
            f"{source} is a QLoRA run: vLLM serves its adapter on the 16-bit base only after "
            f"`sftbridge merge {source} --out MERGED`; then `sftbridge serve MERGED --engine vllm`"
        )
    adapter = source / ADAPTER
    return [
        "vllm",
        "serve",
        _base_of(folder),
        "--served-model-name",
        f"{name}-base",
        "--enable-lora",
        "--lora-modules",
        f"{name}={adapter}",
        "--max-lora-rank",
        str(max(folder.adapter_rank, 8)),  # vLLM's smallest supported rank bucket is 8
        "--tokenizer",
        str(adapter),  # the run's tokenizer (a pad token or template it may have added)
        *common,
        *(extra or []),
    ]
