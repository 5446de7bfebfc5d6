"""A Hugging Face Llama folder (a merged model) → one GGUF file, written with llama.cpp's ``gguf`` library.

``gguf`` (gguf-py, on PyPI) is the writer, the tensor-name map, the quantizer and the special-token reader
that llama.cpp's ``convert_hf_to_gguf.py`` itself uses; that script is not on PyPI (it lives in the llama.cpp
repository, next to a ``conversion/`` package of its own). This module does for the Llama architecture what
the script's ``LlamaModel`` does, and nothing else:

- the hyperparameters under ``llama.*`` (``TextModel.set_gguf_parameters`` + ``LlamaModel``'s rope dimension);
- the tensors renamed by ``gguf.get_tensor_name_map`` and ``q_proj``/``k_proj`` permuted back to the
  interleaved rotary layout llama.cpp computes with (``LlamaModel.permute``: Hugging Face's checkpoint
  conversion split each head's rotary pairs into halves); 1-D tensors and norms stay float32, the rest are f16
  or q8_0 (a row q8_0 cannot take, its length not a multiple of 32, falls back to f16, as in the script);
- the tokenizer as a SentencePiece-style ``llama`` vocabulary: tokens, scores, types, bos/eos/unk/pad ids,
  ``add_bos_token`` and ``tokenizer.chat_template`` (``gguf.SpecialVocab``, which reads the chat template from
  ``chat_template.jinja`` or tokenizer_config.json, unless the caller gives one).

One difference from the script, on purpose: for a folder without ``tokenizer.model`` (transformers 5 saves
only ``tokenizer.json``) the script's fallback (``gguf.LlamaHfVocab``) gives every token the score -1000, and
llama.cpp's SentencePiece tokenizer merges by score. Here a token made by the BPE merge of rank ``i`` scores
``-i``, the order SentencePiece's scores had before Hugging Face turned them into that merge list, so
llama.cpp and transformers' GGUF reader (which derives merges from the scores) split text as training did.

Memory: one tensor at a time (a two-pass write: the header first, then each tensor converted and written).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftbridge.errors import UserError

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0")
ARCHITECTURES = ("LlamaForCausalLM",)
ROPE_TYPES = ("default", "linear")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def write_gguf(
    model_dir: Path,
    out_file: Path,
    *,
    quant: str = "f16",
    name: str | None = None,
    chat_template: str | None = None,
) -> None:
    """Write the model in ``model_dir`` (config.json, safetensors, tokenizer.json) to ``out_file``, with
    ``chat_template`` as ``tokenizer.chat_template`` (default: the folder's own).

    Raises UserError naming the file and field for an architecture, rope scaling or tokenizer this writer does
    not support (nothing is written then)."""
    gguf = gguf_library()
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    config = _supported_config(model_dir)
    tensors = list(_tensor_plan(model_dir, config, quant))
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    _add_hyperparameters(writer, config, quant)
    _add_vocabulary(writer, model_dir, int(config["vocab_size"]), chat_template)
    for planned in tensors:
        writer.add_tensor_info(
            planned.gguf_name,
            planned.byte_shape,
            planned.numpy_dtype,
            planned.nbytes,
            raw_dtype=planned.qtype,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for planned, data in zip(tensors, _converted(model_dir, config, tensors), strict=True):
            writer.write_tensor_data(data)
            log.debug("%s -> %s %s", planned.hf_name, planned.gguf_name, planned.qtype.name)
    finally:
        writer.close()


def gguf_library() -> Any:
    """The ``gguf`` module, or a UserError saying how to install it (the ``export`` extra)."""
    try:
        import gguf
    except ImportError:
        raise UserError(
            "GGUF export needs llama.cpp's gguf library: pip install 'sftbridge[export]' (or gguf)"
        ) from None
    return gguf


# ---- what is supported -------------------------------------------------------------------------------------
def _supported_config(model_dir: Path) -> dict[str, Any]:
    file = model_dir / "config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise UserError(
            f"{file}: architectures {architectures}: GGUF export supports {', '.join(ARCHITECTURES)} only"
        )
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise UserError(
            f"{file}: rope_parameters.rope_type {rope.get('rope_type')!r}: GGUF export supports "
            f"{', '.join(ROPE_TYPES)} only"
        )
    if config.get("quantization_config"):
        raise UserError(f"{file}: a quantized checkpoint (quantization_config); export a 16-bit merged model")
    return config


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


# ---- metadata ----------------------------------------------------------------------------------------------
def _add_hyperparameters(writer: Any, config: dict[str, Any], quant: str) -> None:
    """``TextModel.set_gguf_parameters`` and ``LlamaModel.set_gguf_parameters`` for a Llama config."""
    import gguf

    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type") == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(_head_dim(config))
    if config.get("head_dim") is not None:
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocabulary(writer: Any, model_dir: Path, vocab_size: int, chat_template: str | None) -> None:
    """The tokenizer.json of a Llama-2-style tokenizer (BPE with byte fallback, made from SentencePiece) as
    llama.cpp's ``llama`` vocabulary, plus the special tokens, add_bos/add_eos and the chat template."""
    import gguf

    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{file}: missing; GGUF export reads the tokenizer from tokenizer.json")
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise UserError(
            f"{file}: model.type {model.get('type')!r} (byte_fallback {model.get('byte_fallback')}): GGUF "
            "export supports SentencePiece-style BPE tokenizers with byte fallback (Llama-2's) only"
        )
    vocab: dict[str, int] = model["vocab"]
    added = {int(token["id"]): token for token in spec.get("added_tokens", [])}
    vocab.update({token["content"]: token_id for token_id, token in added.items()})
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"{file}: token id {max(vocab.values())} >= config.json vocab_size {vocab_size}")

    # gguf's reader of the special tokens (bos/eos/unk/pad ids, add_bos/add_eos, the chat template) also
    # parses the pair template (sentence pairs, which a chat model never encodes) and warns about Llama-2's
    # ("Unknown separator token '<s>'"): a warning that would only puzzle a user here.
    reader_log = logging.getLogger("gguf.vocab")
    level = reader_log.level
    reader_log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(model_dir, n_vocab=vocab_size)
    finally:
        reader_log.setLevel(level)
    if chat_template is not None:
        special.chat_template = chat_template

    scores = _merge_scores(model.get("merges") or [])
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the tokenizer leaves unused, as the script does
    token_scores = [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in vocab.items():
        tokens[token_id] = text
        token_scores[token_id] = scores.get(text, 0.0)
        if token_id in added:
            special_token = added[token_id].get("special")
            types[token_id] = gguf.TokenType.CONTROL if special_token else gguf.TokenType.USER_DEFINED
            token_scores[token_id] = 0.0 if special_token else -1000.0
        elif _BYTE_TOKEN.fullmatch(text):
            types[token_id] = gguf.TokenType.BYTE
        else:
            types[token_id] = gguf.TokenType.NORMAL
    unknown = special.special_token_ids.get("unk")
    if unknown is not None:  # SentencePiece's <unk> is a type of its own, not a control token
        types[unknown] = gguf.TokenType.UNKNOWN

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(token_scores)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)


def _merge_scores(merges: list[Any]) -> dict[str, float]:
    """Each token a merge makes scores minus that merge's rank (its best one): SentencePiece's order."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank))
    return scores


# ---- tensors -----------------------------------------------------------------------------------------------
class _Planned:
    """One tensor: its names, its GGUF type and the shape and size it is written with."""

    def __init__(self, hf_name: str, gguf_name: str, shape: tuple[int, ...], qtype: Any) -> None:
        import gguf
        import numpy as np

        self.hf_name, self.gguf_name, self.shape, self.qtype = hf_name, gguf_name, shape, qtype
        self.numpy_dtype: Any
        if qtype == gguf.GGMLQuantizationType.F32:
            self.numpy_dtype, self.byte_shape = np.dtype(np.float32), shape
        elif qtype == gguf.GGMLQuantizationType.F16:
            self.numpy_dtype, self.byte_shape = np.dtype(np.float16), shape
        else:
            self.numpy_dtype = np.dtype(np.uint8)
            self.byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
        count = 1
        for size in self.byte_shape:
            count *= size
        self.nbytes = count * self.numpy_dtype.itemsize


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors weights; merge again")
    return files


def _tensor_names(model_dir: Path) -> Iterator[tuple[Path, str, tuple[int, ...]]]:
    from safetensors import safe_open

    for file in _weight_files(model_dir):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if key.endswith(".rotary_emb.inv_freq"):  # computed, not learned: llama.cpp has its own
                    continue
                yield file, key, tuple(handle.get_slice(key).get_shape())


def _tensor_plan(model_dir: Path, config: dict[str, Any], quant: str) -> Iterator[_Planned]:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    q8_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    for file, key, shape in _tensor_names(model_dir):
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{file}: tensor {key} has no GGUF name for the llama architecture")
        if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType.F32  # llama.cpp reads 1-D tensors and norms as float32 only
        elif quant == "q8_0" and shape[-1] % q8_block == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
        else:
            qtype = gguf.GGMLQuantizationType.F16
        yield _Planned(key, gguf_name, shape, qtype)


def _converted(model_dir: Path, config: dict[str, Any], plan: list[_Planned]) -> Iterator[Any]:
    """Each planned tensor's data, permuted and quantized as planned, in the plan's order."""
    import gguf
    import torch
    from safetensors import safe_open

    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    by_name = {planned.hf_name: planned for planned in plan}
    for file in _weight_files(model_dir):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                planned = by_name.get(key)
                if planned is None:
                    continue
                tensor = handle.get_tensor(key).to(torch.float32)
                if key.endswith(("q_proj.weight", "q_proj.bias")):
                    tensor = permute(tensor, heads)
                elif key.endswith(("k_proj.weight", "k_proj.bias")):
                    tensor = permute(tensor, kv_heads)
                yield gguf.quants.quantize(tensor.numpy(), planned.qtype)


def permute(weights: Any, heads: int) -> Any:
    """``LlamaModel.permute`` of convert_hf_to_gguf: per head, the rotary halves back to interleaved pairs."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
