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
from typing import TYPE_CHECKING

from sftbridge.errors import UserError
from sftbridge.runs import ADAPTER

if TYPE_CHECKING:
    from sftbridge.data.prompter import Prompter
    from sftbridge.inference.folder import ModelFolder


def chat_template(prompter: Prompter) -> str:
    """One Jinja chat template that renders a conversation exactly as the run's :meth:`Prompter.chat`."""
    return prompter.chat_template()


def _base_of(folder: ModelFolder) -> str:
    """The run's base model as vLLM loads it: a Hub id or a local folder (the built-in tiny model's cache)."""
    from sftbridge.config import BUILTIN_TINY_MODEL
    from sftbridge.models.builtin import resolve_builtin

    name = folder.run_config.model.name_or_path
    return str(resolve_builtin(name)) if name == BUILTIN_TINY_MODEL else name


def launch_options(
    folder: ModelFolder,
    *,
    merged: bool,
    name: str,
    model: str,
    weights: str,
    chat_template: str,
    revision: str | None = None,
) -> dict[str, str]:
    """The one recipe for serving a folder with vLLM, as ``vllm serve`` option -> value ("" for a bare flag).

    ``merged`` weights (a merged folder, or a run merged on the way) are the model, served as ``name``.
    Otherwise the run's base is the model, served as ``name-base``, with the adapter as the LoRA module
    ``name``. ``model`` and ``weights`` are where the base (or merged model)
    and the adapter are on the machine vLLM runs on; ``sftbridge serve --engine vllm`` makes them a command
    line (:func:`as_command`), ``deploy`` the SageMaker image's ``SM_VLLM_*`` variables
    (:func:`as_sagemaker_environment`)."""
    if folder.qlora and not merged:
        raise UserError(
            f"{folder.path} is a QLoRA run: vLLM serves its adapter on the 16-bit base only after "
            f"`sftbridge merge {folder.path} --out MERGED`; serve or deploy MERGED"
        )
    if merged:
        return {"model": model, "served-model-name": name, "chat-template": chat_template}
    options = {
        "model": model,
        "served-model-name": f"{name}-base",
        "enable-lora": "",
        "lora-modules": f"{name}={weights}",
        "max-lora-rank": str(max(folder.adapter_rank, 8)),  # vLLM's smallest supported rank bucket is 8
        "tokenizer": weights,  # the run's tokenizer, saved beside the adapter (a pad token it may have added)
        "chat-template": chat_template,
    }
    if revision:
        options["revision"] = revision
    return options


def as_command(options: dict[str, str]) -> list[str]:
    """``vllm serve MODEL --option value ...`` (a bare flag for an empty value)."""
    rest = {key: value for key, value in options.items() if key != "model"}
    flags = [item for key, value in rest.items() for item in (f"--{key}", value) if item]
    return ["vllm", "serve", options["model"], *flags]


def as_sagemaker_environment(options: dict[str, str]) -> dict[str, str]:
    """The Hugging Face vLLM image's ``SM_VLLM_*`` variables. Its entrypoint (aws/deep-learning-containers
    ``vllm/build_artifacts/sagemaker_entrypoint.sh``, and vLLM's ``examples/online_serving/
    sagemaker-entrypoint.sh``) turns each back into a flag: the prefix dropped, lower case, ``_`` to ``-``,
    the value appended only when non-empty."""
    return {"SM_VLLM_" + key.upper().replace("-", "_"): value for key, value in options.items()}


def serve_command(
    folder: ModelFolder,
    *,
    host: str,
    port: int,
    name: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """``vllm serve`` on this machine for a run directory (base + adapter as a LoRA module) or a merged
    folder. The chat template goes to a file in sftbridge's cache, named by its hash."""
    from sftbridge.models.builtin import cache_root

    source = folder.path.resolve()
    template = chat_template(folder.prompter)
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    template_file = cache_root() / "chat-templates" / f"{digest}.jinja"
    template_file.parent.mkdir(parents=True, exist_ok=True)
    template_file.write_text(template, encoding="utf-8")
    options = launch_options(
        folder,
        merged=folder.is_merged,
        name=name or source.name,
        model=str(source) if folder.is_merged else _base_of(folder),
        weights=str(source / ADAPTER),
        chat_template=str(template_file),
        revision=None if folder.is_merged else folder.run_config.model.revision,
    )
    return [*as_command(options), "--host", host, "--port", str(port), *(extra or [])]
