"""``sftbridge export RUN --format gguf --out DIR``: a run or merged folder as one GGUF file plus an Ollama
``Modelfile``, for llama.cpp, Ollama and LM Studio.

A run is merged first (:func:`~sftbridge.inference.merge.merge_run`: the unquantized base, also for a QLoRA
run, so the delta lands in 16/32-bit weights, never 4-bit ones) into a folder inside the staging folder, which
is deleted once the GGUF is written; a merged folder is read as it is. The GGUF embeds the chat template as
the run renders chats (:meth:`~sftbridge.data.prompter.Prompter.chat_template`: the tokenizer's template,
with the run's system prompt when it has one), so llama.cpp and LM Studio format chats as training did.

The ``Modelfile`` says ``FROM`` the GGUF beside it, ``PARAMETER stop`` with the EOS text, and the run's
generation defaults (greedy = temperature 0, ``num_predict`` = max_new_tokens, ``repeat_penalty``). Ollama
reads the embedded chat template; a ``TEMPLATE`` is written only where a question is not sent as a bare
user turn (a JumpStart-style prompt template around it, or a model without a chat template), and ``SYSTEM``
carries the run's system prompt. ``ollama create NAME -f DIR/Modelfile`` imports it.

Disk and memory: a run is merged to full size in the staging folder (Llama-2-7B in fp32 on the CPU: ~27 GB, or
13.5 GB with ``--dtype bfloat16``), and the GGUF is written one tensor at a time.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sftbridge.errors import UserError
from sftbridge.inference.folder import ModelFolder
from sftbridge.inference.gguf_file import QUANTS, gguf_library, write_gguf
from sftbridge.runs import require_empty, staged

if TYPE_CHECKING:
    from sftbridge.config import GenerationSection
    from sftbridge.data.prompter import Prompter

log = logging.getLogger(__name__)

FORMATS = ("gguf",)
MODELFILE = "Modelfile"
_QUESTION = "SFTBRIDGEQUESTION"


@dataclass(frozen=True)
class Exported:
    gguf: Path
    modelfile: Path


def export_folder(
    path: str | Path,
    out_dir: str | Path,
    *,
    format: str = "gguf",
    quant: str = "f16",
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> Exported:
    """Write ``path`` (a finished run or a merged folder) to ``out_dir`` as ``NAME-QUANT.gguf`` + Modelfile.

    ``out_dir`` must be absent or empty; it appears whole or not at all (an error or Ctrl-C leaves
    nothing)."""
    from sftbridge.inference.merge import merge_run

    path, out_dir = Path(path), Path(out_dir)
    if format not in FORMATS:
        raise UserError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    gguf_library()  # before a merge that may take minutes
    folder = ModelFolder.open(path, trust_remote_code=trust_remote_code)
    require_empty(out_dir, f"--out {out_dir}", "folder", UserError)
    name = folder.manifest.run_name or folder.name
    gguf_name = f"{name}-{quant}.gguf"
    with staged(out_dir, label=f"--out {out_dir}", choose="folder") as staging:
        if folder.is_merged:
            source = folder.path
        else:
            source = merge_run(
                path, staging / "merged", dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
        write_gguf(
            source, staging / gguf_name, quant=quant, name=name, chat_template=folder.prompter.chat_template()
        )
        if source != folder.path:
            shutil.rmtree(source)
        text = modelfile(folder.prompter, folder.generation, name=name, gguf_name=gguf_name)
        (staging / MODELFILE).write_text(text, encoding="utf-8")
    log.info("exported %s to %s (%s)", path, out_dir / gguf_name, quant)
    return Exported(out_dir / gguf_name, out_dir / MODELFILE)


def modelfile(prompter: Prompter, generation: GenerationSection, *, name: str, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF: the stop token, the run's generation defaults, and a TEMPLATE and
    SYSTEM only where the embedded chat template does not already say how a question is asked."""
    lines = [f"# ollama create {name} -f Modelfile", f"FROM ./{gguf_name}"]
    question = prompter.question(_QUESTION)
    if question != prompter.chat([{"role": "user", "content": _QUESTION}]):
        head, _, tail = question.partition(_QUESTION)
        # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token); Ollama's Go template gets the question.
        lines.append(f"TEMPLATE {_quoted(head.removeprefix(prompter.bos) + '{{ .Prompt }}' + tail)}")
    elif prompter.prompt_format.system_prompt:
        lines.append(f"SYSTEM {_quoted(prompter.prompt_format.system_prompt)}")
    eos = prompter.tokenizer.eos_token
    if eos:
        lines.append(f"PARAMETER stop {_quoted(eos)}")
    lines.append(f"PARAMETER num_predict {generation.max_new_tokens}")
    if generation.do_sample:
        lines.append(f"PARAMETER temperature {generation.temperature}")
        lines.append(f"PARAMETER top_p {generation.top_p}")
        if generation.top_k is not None:
            lines.append(f"PARAMETER top_k {generation.top_k}")
    else:
        lines.append("PARAMETER temperature 0")  # greedy, as the run generates by default
    lines.append(f"PARAMETER repeat_penalty {generation.repetition_penalty}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    """A Modelfile value: one line in double quotes, several in triple quotes."""
    if '"""' in text:
        raise UserError(f'{text[:40]!r}: a Modelfile value cannot hold """; change the run\'s template')
    if "\n" in text or '"' in text:
        return f'"""{text}"""'
    return f'"{text}"'
