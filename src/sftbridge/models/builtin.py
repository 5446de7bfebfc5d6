"""``builtin:tiny-llama``: a small random-init Llama and tokenizer, built locally once and cached.

It has Llama-2's special tokens (``<unk> <s> </s>`` as ids 0/1/2), byte fallback and Llama-2's chat template,
so every code path (templates, loss masks, LoRA, 4-bit, generation) runs exactly as for Llama-2-7B-chat,
on the CPU and without a download.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sftbridge.config import BUILTIN_TINY_MODEL
from sftbridge.environment import CACHE
from sftbridge.errors import ConfigError

log = logging.getLogger(__name__)

# Bump when the recipe below changes: it is the cache key.
RECIPE_VERSION = "1"
VOCAB_SIZE = 1024  # 3 specials + 256 byte-fallback tokens + 765 BPE tokens trained on the sample data

# meta-llama/Llama-2-7b-chat-hf's chat template, verbatim.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE, Path.home() / ".cache" / "sftbridge")).expanduser()


def sample_data_dir() -> Path:
    """The project's sample Q/A data: inside an installed wheel, or ``data/`` of a source checkout."""
    packaged = Path(__file__).resolve().parents[1] / "_sample_data"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "data" / "sciq-sample"


def resolve_builtin(name: str) -> Path:
    """Path of a built-in model, building it on first use."""
    if name != BUILTIN_TINY_MODEL:
        raise ConfigError(
            f"model.name_or_path: unknown built-in model {name!r}; the only one is {BUILTIN_TINY_MODEL}"
        )
    target = cache_root() / "builtin" / f"tiny-llama-v{RECIPE_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        build_tiny_llama(staging)
        try:
            staging.rename(target)  # atomic: a concurrent builder either wins or finds it complete
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s in %s", name, target)
    return target


# The files the tiny tokenizer is trained on, named: a file added beside them must not change the built-in
# model (its weights, the golden losses and every cached copy at this RECIPE_VERSION would silently differ).
CORPUS_FILES = ("test.jsonl", "train.jsonl")


def _corpus() -> list[str]:
    lines: list[str] = []
    for path in (sample_data_dir() / name for name in CORPUS_FILES):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                lines.extend(str(value) for value in json.loads(line).values())
    if not lines:
        raise FileNotFoundError(f"no sample data found in {sample_data_dir()} to train the tiny tokenizer")
    # Llama-2's chat markers, so the template costs a few tokens instead of one per byte.
    return lines + ["[INST] [/INST] <<SYS>> <</SYS>>"] * 50


def build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(byte_tokens), special_tokens=specials, show_progress=False
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    # Llama layout: specials, then the 256 byte tokens, then the BPE pieces.
    ordered = (
        specials + byte_tokens + [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1])[3:]]
    )
    vocab = {token: index for index, token in enumerate(ordered)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=LLAMA2_CHAT_TEMPLATE,
        model_max_length=512,
    )
    wrapped.save_pretrained(out_dir)


def llama_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_positions: int,
) -> Any:
    """A Llama architecture with Llama-2's special-token ids (BOS 1, EOS 2) and an untied output head: the
    built-in tiny model and the benchmarks' random-init 7B-shaped models."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def build_tiny_llama(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    build_tokenizer(out_dir)
    # Sizes are multiples of 64 so bitsandbytes' 4-bit layers work on the CPU too.
    config = llama_config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        max_positions=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # With the default std 0.02 the frozen random lm_head caps the logits and LoRA plateaus; 2/sqrt(hidden)
    # lets LoRA reach 100% exact match on the 240 sample pairs (1/sqrt(hidden): ~91%).
    torch.nn.init.normal_(model.lm_head.weight, std=2 / math.sqrt(config.hidden_size))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(out_dir)
