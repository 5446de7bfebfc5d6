"""``train.fsdp``: FSDP2 through transformers' ``TrainingArguments``, and the checks before it starts.

transformers 5.24 / accelerate 1.15 as installed: ``fsdp=True`` with an ``fsdp_config`` of ``"version": 2``
shards with ``torch.distributed.fsdp.fully_shard`` (FSDP2); no ``accelerate launch`` is needed: torchrun
(local) or the SageMaker image's torchrun driver supplies the ranks. What this module decides, and why:

- Wrapping: one FSDP unit per decoder layer, the class read from the model's own ``_no_split_modules``
  (``LlamaDecoderLayer``...): a unit gathers one layer's weights at a time. accelerate would fall back to that
  list silently and wrap nothing when it is empty; here such a model is refused in one line.
- ``train.gradient_checkpointing`` becomes FSDP's ``activation_checkpointing`` (transformers raises when both
  are on; its own checkpointing under FSDP adds an all-gather per layer in the backward pass).
- ``FULL_STATE_DICT``: a checkpoint and the saved adapter hold whole tensors, loadable without FSDP.
- ``cpu_ram_efficient_loading`` (rank 0's weights broadcast after sharding) except for a 4-bit base, where
  accelerate skips it anyway.
- FSDP1-only keys (``use_orig_params``, ``sync_module_states``, ``forward_prefetch``, ``backward_prefetch``)
  are never written: FSDP2 ignores them without a word.
- On the CPU (gloo), where accelerate would silently train data-parallel instead, ``shard_on_cpu`` turns
  FSDP on, so that the whole path (sharding, checkpoints, resume, the saved adapter) runs in CPU tests.
- QLoRA: 4-bit weights stored as bf16 (``bnb_4bit_quant_storage``) and the base loaded in bf16. With the
  default uint8 storage accelerate (>= 1.14) leaves every 4-bit weight unsharded, a full copy per GPU, and
  only warns. TRL casts a quantized model's LoRA weights to bf16, so all trainable weights of a unit share one
  dtype, which FSDP2 requires (PEFT alone would upcast them to fp32 beside bf16 ones).
"""

from __future__ import annotations

from typing import Any

from sftbridge.config import ModelSection, RunConfig
from sftbridge.errors import ConfigError

QLORA_DTYPE = "bfloat16"  # the load dtype and the 4-bit storage dtype of QLoRA under FSDP


def check(config: RunConfig, *, world_size: int, device: str, precision: str) -> None:
    """Refuse, in one line each, what would not shard; before the data or the weights load."""
    train, model = config.train, config.model
    if not train.fsdp:
        return
    check_world_size(config, world_size)
    if train.fsdp_offload and device == "cpu":
        raise ConfigError(
            "train.fsdp_offload moves the shards from GPU memory to CPU RAM; on the CPU there is nothing to "
            "offload: set train.fsdp_offload=false"
        )
    if model.load_in_4bit:
        if precision == "fp16":
            raise ConfigError(
                "model.load_in_4bit with train.fsdp stores the 4-bit weights in bf16, which this GPU lacks "
                "(train.precision resolved to fp16): use an Ampere or newer GPU, or train.fsdp=false"
            )
        if model.dtype not in ("auto", QLORA_DTYPE):
            raise ConfigError(
                f"model.dtype={model.dtype} with model.load_in_4bit and train.fsdp: FSDP shards 4-bit "
                f"weights only when they are stored in the load dtype, {QLORA_DTYPE}: set model.dtype=auto"
            )


def check_world_size(config: RunConfig, world_size: int) -> None:
    """FSDP needs two processes or more; the local backend asks before it launches anything."""
    if config.train.fsdp and world_size < 2:
        raise ConfigError(
            "train.fsdp shards the model across processes but this run has 1: set backend.num_processes=N "
            "(local, N GPUs) or a multi-GPU backend.instance_type (SageMaker); or train.fsdp=false"
        )


def loading(config: RunConfig) -> ModelSection:
    """The model section the base loads with under FSDP: a 4-bit base in bf16 (see the module's notes)."""
    if config.train.fsdp and config.model.load_in_4bit:
        return config.model.model_copy(update={"dtype": QLORA_DTYPE})
    return config.model


def quant_storage(config: RunConfig) -> str | None:
    """``bnb_4bit_quant_storage``: bf16 under FSDP (shardable), None (bitsandbytes' uint8) otherwise."""
    return QLORA_DTYPE if config.train.fsdp and config.model.load_in_4bit else None


def decoder_layers(model: Any) -> list[str]:
    """The class names FSDP wraps one unit each: the model's own ``_no_split_modules``."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(
            f"train.fsdp: {type(model).__name__} does not name its decoder layer (no _no_split_modules), so "
            "FSDP cannot shard it layer by layer: train it without train.fsdp"
        )
    return names


def ram_efficient_loading(config: RunConfig) -> bool:
    """Whether rank 0 alone reads the weights (the others receive them after sharding): not for 4-bit."""
    return config.train.fsdp and not config.model.load_in_4bit


def training_arguments(config: RunConfig, layers: list[str]) -> dict[str, Any]:
    """The ``TrainingArguments`` keys that turn FSDP2 on ({} without ``train.fsdp``). The caller turns
    transformers' own ``activation_checkpointing`` off under FSDP: this one replaces it."""
    if not config.train.fsdp:
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layers,
            "activation_checkpointing": config.train.gradient_checkpointing,
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": ram_efficient_loading(config),
            "cpu_offload": config.train.fsdp_offload,
            "reshard_after_forward": True,  # ZeRO-3-like: a layer's full weights live only while it computes
        },
    }


def full_state_dict(trainer: Any) -> dict[str, Any] | None:
    """Under FSDP, the trained weights (the adapters) gathered whole: a collective, every rank calls it, and
    rank 0 keeps them. None without FSDP, where rank 0 reads its own full copy.

    Only the trainable weights: accelerate's ``get_state_dict`` would gather the whole base to rank 0's RAM
    too (138 GB for a 16-bit 70B), for a PEFT save that keeps the adapters alone.
    """
    from torch.distributed.tensor import DTensor

    if not trainer.is_fsdp_enabled:
        return None
    rank0 = trainer.args.process_index == 0
    state: dict[str, Any] = {}
    for name, param in trainer.model.named_parameters():  # the same order on every rank
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            if rank0:
                state[name] = whole.detach().cpu()
    return state


def shard_on_cpu(accelerator: Any, plugin_args: dict[str, Any]) -> bool:
    """FSDP2 on the CPU, which accelerate drops without a word; returns whether FSDP is on.

    accelerate 1.15, ``accelerate/state.py``, ``AcceleratorState.__init__``: the FSDP plugin is kept only
    ``elif self.distributed_type in [DistributedType.MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`` (line 986;
    ``self.fsdp_plugin = fsdp_plugin`` at line 1016): under torchrun on the CPU the type is ``MULTI_CPU``, the
    plugin is dropped and the Trainer wraps the model in DDP. torch's ``fully_shard`` itself runs on the CPU
    with gloo (torch 2.13), so the state is set as accelerate sets it on a GPU: in PartialState's shared
    state too, which every later ``AcceleratorState()`` copies over its own.
    ``tests/test_fsdp.py::test_accelerate_still_drops_fsdp_on_the_cpu`` says when this is no longer needed.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    return True
