"""Load the base model and tokenizer: hub id, local folder or built-in, in 16/32-bit or 4-bit (QLoRA)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Literal

from sftbridge.config import ModelSection, RunConfig, TrainSection
from sftbridge.environment import local_rank
from sftbridge.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# PEFT 0.21 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates with a FutureWarning
# on every adapter load (train, generate, eval, serve, merge). Nothing in it is for our users to act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

Device = Literal["cpu", "cuda"]
Precision = Literal["bf16", "fp16", "fp32"]


def model_path(cfg: ModelSection) -> str:
    """Where ``from_pretrained`` loads from: a built-in model is built (once) and its folder returned."""
    if cfg.name_or_path.startswith("builtin:"):
        from sftbridge.models.builtin import resolve_builtin

        return str(resolve_builtin(cfg.name_or_path))
    return cfg.name_or_path


def _load_error(name: str, exc: Exception) -> UserError:
    hint = ""
    if "/" in name and not os.path.exists(name):
        hint = (
            "; for a gated model (meta-llama/...) accept its licence on the Hugging Face Hub and set "
            "HF_TOKEN in the environment; offline, point model.name_or_path at a local folder"
        )
    return UserError(f"model.name_or_path: cannot load {name!r}: {exc}{hint}")


HUB_PROBE_TIMEOUT_S = 5.0  # one request; huggingface_hub itself retries a dead connection for about a minute


def check_hub_model(cfg: ModelSection) -> None:
    """A Hub model that cannot be had fails here, in seconds and one line, not after a minute of retries.

    A local folder, a built-in model, ``HF_HUB_OFFLINE`` or a copy in the Hugging Face cache need no Hub
    (with the cache and no Hub, this process goes offline: the cached copy loads at once). Otherwise one
    request asks the Hub for the model: unreachable, gated (no token, or the licence not accepted) and
    unknown each get the line that says what to do."""
    import httpx
    from huggingface_hub import constants, get_token, try_to_load_from_cache

    name = cfg.name_or_path
    if name.startswith("builtin:") or os.path.exists(name) or constants.HF_HUB_OFFLINE:
        return
    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=cfg.revision), str)
    revision = cfg.revision or "main"
    # What from_pretrained asks first: the Hub answers with X-Error-Code (GatedRepo, RepositoryNotFound, ...).
    url = f"{constants.ENDPOINT}/{name}/resolve/{revision}/config.json"
    token = get_token()
    try:
        response = httpx.head(
            url, timeout=HUB_PROBE_TIMEOUT_S, headers={"authorization": f"Bearer {token}"} if token else {}
        )
    except httpx.HTTPError as exc:
        if cached:
            log.warning("the Hugging Face Hub is unreachable (%s): loading %s from the cache", exc, name)
            os.environ["HF_HUB_OFFLINE"] = "1"
            constants.HF_HUB_OFFLINE = True
            return
        raise UserError(
            f"model.name_or_path: {name}: the Hugging Face Hub ({constants.ENDPOINT}) is unreachable "
            f"({type(exc).__name__}) and the model is not in the cache; connect to it, download the model "
            "where there is a connection (hf download), or point model.name_or_path at a local folder"
        ) from None
    code = response.headers.get("x-error-code", "")
    if code == "GatedRepo" or (response.status_code == 403 and code != "RepositoryNotFound"):
        why = "HF_TOKEN is not set" if not token else "this token's account has not been granted access"
        raise UserError(
            f"model.name_or_path: {name} is gated and {why}: accept its licence on "
            f"https://huggingface.co/{name}, then set HF_TOKEN (backend.hf_token_secret on SageMaker)"
        )
    if code in ("RepositoryNotFound", "RevisionNotFound") or response.status_code in (401, 404):
        private = "" if token else " (or private: set HF_TOKEN)"
        raise UserError(
            f"model.name_or_path: {name} (revision {revision}): not on the Hugging Face Hub{private}; "
            "check the id and model.revision, or point model.name_or_path at a local folder"
        )


def load_tokenizer(cfg: ModelSection, *, local_only: bool = False) -> Any:
    """The model's tokenizer; ``local_only``: from a folder or the Hugging Face cache, never the network."""
    from transformers import AutoTokenizer

    if not local_only:
        check_hub_model(cfg)
    try:
        # HF_TOKEN is read from the environment by huggingface_hub; it never passes through our config.
        return AutoTokenizer.from_pretrained(
            model_path(cfg),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=local_only,
        )
    except (OSError, ValueError) as exc:
        raise _load_error(cfg.name_or_path, exc) from exc


# attn_implementation -> the module transformers imports for it
FLASH_ATTENTION_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check_attention(cfg: ModelSection, device: Device) -> None:
    """Refuse a FlashAttention kernel this machine cannot run before anything loads (transformers would raise
    an ImportError from deep inside ``from_pretrained``, after the run had started)."""
    import importlib.util

    name = cfg.attn_implementation or ""
    module = FLASH_ATTENTION_MODULES.get(name)
    if module is None:
        return
    if device != "cuda":
        raise ConfigError(
            f"model.attn_implementation={name}: FlashAttention runs on CUDA GPUs only; use sdpa (the "
            "default) on this machine"
        )
    if importlib.util.find_spec(module) is None:
        package = "flash-attn" if name == "flash_attention_2" else "flash-attn-3"
        raise ConfigError(
            f"model.attn_implementation={name}: the {package} package is not installed (pip install "
            f"{package} --no-build-isolation, for an Ampere or newer GPU), or set "
            "model.attn_implementation=sdpa"
        )


def runnable_attention(cfg: ModelSection, device: Device) -> ModelSection:
    """For inference and merging: a run trained with FlashAttention on a GPU still loads on a machine that
    cannot run it (the CPU), with sdpa, which computes the same attention."""
    try:
        check_attention(cfg, device)
    except ConfigError as exc:
        log.info("%s; loading with sdpa instead", exc)
        return cfg.model_copy(update={"attn_implementation": "sdpa"})
    return cfg


def resolve_device(train: TrainSection) -> Device:
    import torch

    if train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device: cuda was asked for but no CUDA GPU is visible (set train.device=auto)"
        )
    if train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return train.device


def resolve_precision(train: TrainSection, device: Device) -> Precision:
    import torch

    if device == "cpu":
        if train.precision in ("bf16", "fp16"):
            log.warning("train.precision=%s ignored on the CPU: training in fp32", train.precision)
        return "fp32"
    if train.precision != "auto":
        return train.precision
    # Native bf16 only (Ampere and newer): torch's default also counts the emulation a V100 or T4 can run,
    # which works but is many times slower than their fp16 tensor cores.
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def torch_dtype(cfg: ModelSection, precision: Precision) -> Any:
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_model(
    cfg: ModelSection, device: Device, precision: Precision, *, quant_storage: str | None = None
) -> Any:
    """The frozen base model; with ``load_in_4bit`` quantized to nf4 with double quantization (QLoRA), the
    4-bit weights packed into ``quant_storage`` (a torch dtype name; default uint8)."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(cfg, precision)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(dtype, quant_storage)
        # Quantized weights cannot be moved after loading: place them on this process's device now.
        kwargs["device_map"] = {"": local_rank()} if device == "cuda" else {"": "cpu"}
    try:
        return AutoModelForCausalLM.from_pretrained(model_path(cfg), **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(cfg.name_or_path, exc) from exc


def load_run_base(
    config: RunConfig, device: str = "auto", *, unquantized: bool = False, dtype: str = "auto"
) -> Any:
    """A finished run's base model, on this machine's device, ready for its adapter.

    The attention implementation falls back to one this machine runs (a FlashAttention-trained run still
    loads on the CPU); ``unquantized`` loads a QLoRA run's base in 16/32-bit, for merging (a 4-bit weight
    cannot take the LoRA delta); ``dtype`` overrides the weights' dtype.
    """
    train = config.train if device == "auto" else config.train.model_copy(update={"device": device})
    target = resolve_device(train)
    cfg = runnable_attention(config.model, target)
    if unquantized:
        cfg = cfg.model_copy(update={"load_in_4bit": False})
    if dtype != "auto":
        cfg = cfg.model_copy(update={"dtype": dtype})
    base = load_model(cfg, target, resolve_precision(train, target))
    if target == "cuda" and not cfg.load_in_4bit:  # a 4-bit model is placed while it loads
        base = base.to("cuda")
    return base


def bnb_config(compute_dtype: Any, quant_storage: str | None = None) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise UserError("model.load_in_4bit needs bitsandbytes: pip install 'sftbridge[qlora]'") from exc
    # QLoRA's recipe: 4-bit NormalFloat with the quantization constants quantized too (~0.4 bit/param saved).
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP shards only floating-point storage (training/fsdp.py); the default uint8 packs the same bits
        bnb_4bit_quant_storage=quant_storage or "uint8",
    )


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
    )
