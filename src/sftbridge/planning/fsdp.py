"""Memory per GPU under FSDP (``train.fsdp``, ``training/fsdp.py``): what each of N GPUs holds at the peak.

FSDP2 as sftbridge configures it (one unit per decoder layer, ``reshard_after_forward``, accelerate 1.15's
grouping) keeps on every GPU:

- its 1/N of every parameter: base weights (4-bit weights packed in bf16 storage shard like any other
  tensor), and the adapters' weights with their gradients and AdamW moments;
- whole, on every GPU: a 4-bit weight's quantization constants (``quant_state``: absmax and its scales are
  attributes of the weight, not parameters, so FSDP does not shard them);
- gathered while they compute: two decoder layers at a time (the one computing and the next one, which
  FSDP2 all-gathers ahead), and the tail unit (final norm and ``lm_head``), which accelerate keeps gathered
  from the end of the forward pass to the start of the backward pass;
- the activations and the fused LM head of its own micro-batch, as without FSDP (``estimate.memory``);
- with ``train.fsdp_offload`` the sharded state lives in host RAM instead, and only what is gathered,
  the activations and the quantization constants stay on the GPU.

Loading comes before sharding: a 16-bit base is read into host RAM by every rank of a node (transformers
5.24 materialises it on each rank; accelerate then broadcasts rank 0's copy into the shards), so the host
needs GPUs-per-node x the weights. A 4-bit base is quantized on each rank's own GPU as it loads and only then
sharded (accelerate cannot move 4-bit weights to the meta device): every GPU briefly holds the whole
quantized model. That load peak is part of whether a run fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sftbridge.planning.model_shapes import Shapes

if TYPE_CHECKING:
    from sftbridge.config import RunConfig
    from sftbridge.planning.estimate import Memory

QUANT_CONSTANT_BITS = 8 / 64 + 32 / (
    64 * 256
)  # per 4-bit weight: one 8-bit absmax per 64, fp32 per 256 of those
GATHERED_LAYERS = 2  # the layer computing and the one FSDP2 prefetches


@dataclass
class ShardedMemory:
    """Bytes per GPU under FSDP across ``gpus`` GPUs (``gpus_per_node`` of them sharing a host)."""

    gpus: int
    gpus_per_node: int
    offload: bool
    sharded_weights: float  # base weights / N (on the host with offload)
    quant_constants: float  # 4-bit: every GPU holds all of them
    sharded_lora_state: float  # adapters' weights + gradients + moments / N (on the host with offload)
    gathered: float  # whole while computing: two decoder layers + the tail (final norm, lm_head)
    activations: float  # this GPU's micro-batch, as without FSDP
    lm_head: float
    runtime: float  # the CUDA context
    peak_reserved: float  # training's peak, what torch.cuda.max_memory_reserved reports
    peak_total: float  # + the CUDA context
    load_peak: float  # on each GPU while the base loads, before sharding
    host_bytes: float  # host RAM per node: the loading copies, or the offloaded shards, whichever is more


def layer_weight_bytes(shapes: Shapes, bits: int, other_bytes: int) -> float:
    """One decoder layer's weights, whole: its linear layers at ``bits`` and its two norms."""
    linear = sum(a * b for a, b in shapes.linear_shapes().values())
    return linear * bits / 8 + 2 * shapes.hidden_size * other_bytes


def sharded_memory(
    config: RunConfig, shapes: Shapes, unsharded: Memory, gpus: int, gpus_per_node: int
) -> ShardedMemory:
    """Per-GPU memory under FSDP across ``gpus`` GPUs, from the plan's unsharded figures (``unsharded``)."""
    from sftbridge.planning.estimate import ALLOCATOR_OVERHEAD

    n = max(1, gpus)
    bits = unsharded.weight_bits
    other = 2  # FSDP trains on GPUs in 16-bit; a 4-bit base loads in bf16 (training/fsdp.py)
    constants = shapes.decoder_linear_params * QUANT_CONSTANT_BITS / 8 if bits == 4 else 0.0
    packed = unsharded.weights - constants  # what FSDP shards: everything but the quantization constants
    tail = (shapes.lm_head_params or shapes.embedding_params) * other + shapes.hidden_size * other
    gathered = GATHERED_LAYERS * layer_weight_bytes(shapes, bits, other) + tail
    offload = config.train.fsdp_offload
    on_gpu_state = 0.0 if offload else packed / n + unsharded.lora_state / n
    allocated = on_gpu_state + constants + gathered + unsharded.activations + unsharded.lm_head
    reserved = allocated * ALLOCATOR_OVERHEAD
    load_peak = unsharded.weights + unsharded.runtime if bits == 4 else 0.0
    loading_host = 0.0 if bits == 4 else gpus_per_node * unsharded.weights
    offloaded_host = (packed + unsharded.lora_state) / n * gpus_per_node if offload else 0.0
    return ShardedMemory(
        gpus=n,
        gpus_per_node=gpus_per_node,
        offload=offload,
        sharded_weights=packed / n,
        quant_constants=constants,
        sharded_lora_state=unsharded.lora_state / n,
        gathered=gathered,
        activations=unsharded.activations,
        lm_head=unsharded.lm_head,
        runtime=unsharded.runtime,
        peak_reserved=reserved,
        peak_total=reserved + unsharded.runtime,
        load_peak=load_peak,
        host_bytes=max(loading_host, offloaded_host),
    )


def worst(memory: ShardedMemory) -> float:
    """What a GPU must hold at its worst moment: training's peak or, for a 4-bit base, loading's."""
    return max(memory.peak_total, memory.load_peak)
