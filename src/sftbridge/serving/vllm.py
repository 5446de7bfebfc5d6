"""vLLM for a run: the chat template that formats prompts as training did, and the ``vllm serve`` command.

vLLM formats a chat request with a Jinja chat template (``--chat-template``). A run formats prompts with its
``Prompter``: the tokenizer's chat template with the run's system prompt added when the conversation has
none, or, for a tokenizer without a template, its plain format (``system\\n\\n`` + the question, after
BOS). ``Prompter.chat_template`` writes that as one Jinja template, so that vLLM (locally, or in the SageMaker
image through ``SM_VLLM_CHAT_TEMPLATE``) gives the same prompt text token for token.

``sftbridge serve RUN [RUN ...] --engine vllm`` runs :func:`serve_command`: the runs' base model with each
adapter as a LoRA module named after its run (``--enable-lora --lora-modules A=A/adapter B=B/adapter
--max-loras 2 --max-lora-rank R``, R the largest rank), or a merged folder as the model; requests that name
the model A get A's fine-tune, ``A-base`` the base. vLLM takes one chat template for all of them, so runs
whose prompt formats differ are refused (the sftbridge engine formats each run's own way). vLLM is the
``vllm`` extra, never installed by the CPU set-up (``make vllm-venv``: a CPU build, for the tests).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sftbridge.errors import UserError
from sftbridge.runs import ADAPTER

if TYPE_CHECKING:
    from sftbridge.inference.folder import ModelFolder


def _base_of(folder: ModelFolder) -> str:
    """The run's base model as vLLM loads it: a Hub id or a local folder (the built-in tiny model's cache)."""
    from sftbridge.config import BUILTIN_TINY_MODEL
    from sftbridge.models.builtin import resolve_builtin

    name = folder.run_config.model.name_or_path
    return str(resolve_builtin(name)) if name == BUILTIN_TINY_MODEL else name


Options = dict[str, str | list[str]]  # ``vllm serve`` option -> value ("" a bare flag, a list several values)


def launch_options(
    folder: ModelFolder,
    *,
    merged: bool,
    name: str,
    model: str,
    weights: str,
    chat_template: str,
    revision: str | None = None,
    adapters: Mapping[str, tuple[ModelFolder, str]] | None = None,
) -> Options:
    """The one recipe for serving a folder with vLLM, as ``vllm serve`` option -> value ("" for a bare flag).

    ``merged`` weights (a merged folder, or a run merged on the way) are the model, served as ``name``.
    Otherwise the run's base is the model, served as ``name-base``, with the adapter as the LoRA module
    ``name``, or with every one of ``adapters`` (LoRA module name -> (its run, where its adapter is)).
    ``model`` and ``weights`` are where the base (or merged model) and the adapter are on the machine vLLM
    runs on; ``sftbridge serve --engine vllm`` makes them a command line (:func:`as_command`), ``deploy`` the
    SageMaker image's ``SM_VLLM_*`` variables (:func:`as_sagemaker_environment`)."""
    modules = dict(adapters or {name: (folder, weights)})
    for run, _ in modules.values():
        if run.qlora and not merged:
            raise UserError(
                f"{run.path} is a QLoRA run: vLLM serves its adapter on the 16-bit base only after "
                f"`sftbridge merge {run.path} --out MERGED`; serve or deploy MERGED"
            )
    if merged:
        return {"model": model, "served-model-name": name, "chat-template": chat_template}
    paths = [f"{module}={path}" for module, (_, path) in modules.items()]
    rank = max(run.adapter_rank for run, _ in modules.values())
    options: Options = {
        "model": model,
        "served-model-name": f"{name}-base",
        "enable-lora": "",
        "lora-modules": paths[0] if len(paths) == 1 else paths,
        "max-lora-rank": str(max(rank, 8)),  # the largest rank; vLLM's smallest supported rank bucket is 8
        # The first run's tokenizer, saved beside its adapter (a pad token it may have added); the runs share
        # their base, so its vocabulary.
        "tokenizer": next(iter(modules.values()))[1],
        "chat-template": chat_template,
    }
    if len(paths) > 1:
        # vLLM's default, 1, batches one adapter's requests at a time.
        options["max-loras"] = str(len(paths))
    if revision:
        options["revision"] = revision
    return options


def as_command(options: Options) -> list[str]:
    """``vllm serve MODEL --option value ...`` (a bare flag for an empty value, a list as several values)."""
    flags: list[str] = []
    for key, value in options.items():
        if key != "model":
            flags += [f"--{key}", *([value] if isinstance(value, str) else value)]
    model = options["model"]
    assert isinstance(model, str)
    return ["vllm", "serve", model, *[flag for flag in flags if flag]]


def as_sagemaker_environment(options: Options, *, config_file: str = "") -> dict[str, str]:
    """The Hugging Face vLLM image's ``SM_VLLM_*`` variables. Its entrypoint (aws/deep-learning-containers
    ``vllm/build_artifacts/sagemaker_entrypoint.sh``, and vLLM's ``examples/online_serving/
    sagemaker-entrypoint.sh``) turns each back into a flag: the prefix dropped, lower case, ``_`` to ``-``,
    the value appended only when non-empty, as one argument. So an option with several values (several
    ``--lora-modules``: vLLM would read ``a=X b=Y`` as one module ``a`` at the path ``X b=Y``) cannot be a
    variable: those go into vLLM's ``--config`` YAML file (:func:`as_config_file`), which must be at
    ``config_file`` in the container, named by ``SM_VLLM_CONFIG``."""
    environment = {
        "SM_VLLM_" + key.upper().replace("-", "_"): value
        for key, value in options.items()
        if isinstance(value, str)
    }
    if as_config_file(options) is not None:
        if not config_file:
            raise ValueError("options with several values need a config_file")
        environment["SM_VLLM_CONFIG"] = config_file
    return environment


def as_config_file(options: Options) -> str | None:
    """vLLM's ``--config`` YAML for the options with several values (a list: the option, then each value),
    or None when there are none."""
    lists = {key: value for key, value in options.items() if not isinstance(value, str)}
    if not lists:
        return None
    return "".join(
        f"{key}:\n" + "".join(f"  - {json.dumps(v)}\n" for v in values) for key, values in lists.items()
    )


def shared_chat_template(folders: Mapping[str, ModelFolder]) -> str:
    """The one chat template of several runs (vLLM takes one for every LoRA module); UserError naming the
    runs whose prompt format renders otherwise than the first's."""
    templates = {name: folder.prompter.chat_template() for name, folder in folders.items()}
    (first, template), *rest = templates.items()
    differ = [f"{name}={folders[name].path}" for name, other in rest if other != template]
    if differ:
        raise UserError(
            f"{', '.join(differ)}: formats prompts otherwise than {first}={folders[first].path} (its chat "
            "template or system prompt), and vLLM takes one chat template for all adapters; serve those "
            "apart, or with the sftbridge engine, which formats each run its own way"
        )
    return template


def serve_command(
    folders: Mapping[str, ModelFolder],
    *,
    host: str,
    port: int,
    extra: list[str] | None = None,
) -> list[str]:
    """``vllm serve`` on this machine for ``name -> folder``: run directories on one base (each adapter a
    LoRA module named ``name``, the base ``<first>-base``), or one merged folder served as ``name``. The chat
    template goes to a file in sftbridge's cache, named by its hash."""
    from sftbridge.models.builtin import cache_root

    (name, folder), *_ = folders.items()
    template = shared_chat_template(folders)
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    template_file = cache_root() / "chat-templates" / f"{digest}.jinja"
    template_file.parent.mkdir(parents=True, exist_ok=True)
    template_file.write_text(template, encoding="utf-8")
    source = folder.path.resolve()
    options = launch_options(
        folder,
        merged=folder.is_merged,
        name=name,
        model=str(source) if folder.is_merged else _base_of(folder),
        weights=str(source / ADAPTER),
        chat_template=str(template_file),
        revision=None if folder.is_merged else folder.run_config.model.revision,
        adapters={n: (f, str(f.path.resolve() / ADAPTER)) for n, f in folders.items()},
    )
    return [*as_command(options), "--host", host, "--port", str(port), *(extra or [])]
