"""``sftbridge plan``: peak memory, tokens per step, time per epoch and SageMaker cost, before a run.

Pure arithmetic on three inputs: the model's shapes (``sftbridge.planning.model_shapes``: its ``config.json``
only, never the weights), the config, and the token lengths of the training data (tokenized with the model's
tokenizer through ``sftbridge.data.encoding``, exactly as training encodes it); checked against the GPUs and
SageMaker instances of ``sftbridge.planning.hardware``.

Memory model (bytes; ``s`` = bytes of an activation: 2 under bf16/fp16 on a GPU, 4 in fp32 on the CPU):

- weights: 16/32-bit = params x 2/4. 4-bit nf4 with double quantization = the decoder's linear weights at
  4 bits + 0.127 bit of quantization constants (one 8-bit absmax per 64 weights, one fp32 per 256 absmax);
  embeddings, ``lm_head`` and norms stay in the compute dtype.
- LoRA: r x (in + out) per adapted layer. Weight + gradient + AdamW's two moments; the weights are the master
  copy (fp32 for 16-bit LoRA; TRL casts them to bf16 for a quantized base). 8-bit AdamW keeps 1-byte moments.
  The frozen base has no gradients and no optimizer state.
- activations saved for the backward pass, per token and decoder layer: each RMSNorm's input upcast to fp32
  (2 x 4h), q/k/v after RoPE and the attention output (s(2h + 2kv)), SwiGLU's gate, up and SiLU(gate) (3si),
  nothing for the frozen linear layers (16- or 4-bit: no weight gradient), and what the adapters read: the
  layer inputs without dropout, else each adapter's dropped copy of its input and the dropout mask (bool on
  CUDA), plus lora_A's rank-r output. Eager attention adds the softmax (fp32 + a cast copy) of heads x
  context per token; CPU sdpa keeps an fp32 copy of the attention mask (4 x context). Gradient checkpointing
  keeps each layer's input (sh) and recomputes one layer at a time. One more layer's worth is counted for
  the gradients in flight.
- the LM head: TRL's fused head scores tokens in tiles of 4096 x vocab without materializing the logits.
- runtime: the CUDA context (not in ``torch.cuda.max_memory_reserved``), or on the CPU the resident size of
  Python with torch, transformers, TRL, PEFT and datasets, the trainer and the data, before the first step.
  On the CPU, the step's peak is ``CPU_STEP_OVERHEAD`` x the activations (measured; see the constant).

Throughput model: FLOPs per processed token = 4N + attention. Forward 2N (a multiply-add per parameter
that takes part in a matmul: everything but the input embedding); backward 2N for the input gradients of
every frozen layer (they must flow down to the first adapter); no weight gradients for the frozen base (the
2N that full fine-tuning spends there); the LoRA matmuls add ~6 x LoRA params, under 0.2% here. Attention
without weights adds 6 x h x context per token and layer (QK^T and AV: forward 2, backward 4, causal).
Time = FLOPs / (peak bf16 dense FLOP/s x assumed MFU); padding tokens cost time like real ones.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sftbridge.errors import ConfigError, UserError
from sftbridge.planning.fsdp import ShardedMemory, sharded_memory, worst
from sftbridge.planning.hardware import GPU_ALIASES, GPUS, INSTANCES, PRICE_TABLE_DATE, PRICE_TABLE_NOTE, Gpu
from sftbridge.planning.model_shapes import Shapes, model_shapes

if TYPE_CHECKING:  # annotations only: `sftbridge --help` must not import pydantic
    from sftbridge.config import RunConfig
    from sftbridge.data.encoding import Lengths

GB = 1e9  # decimal gigabytes throughout, like "24 GB" on a card

CUDA_CONTEXT_BYTES = 0.5 * GB  # CUDA context + cuBLAS workspace; outside the caching allocator's count
# The CPU's two constants are measured by benchmarks/cpu_memory.py (tiny model, torch 2.13, 4000 examples).
# RSS just before the first step: Python, torch/transformers/TRL/PEFT/datasets, the trainer, the data.
CPU_RUNTIME_BYTES = 0.68 * GB
# Peak RSS growth while training over the saved-activation estimate (1.45 to 1.75 at batch 2 to 16, varying
# by up to 0.2 from run to run): the backward's transient gradients beside the saved tensors, and freed
# blocks glibc keeps mapped.
CPU_STEP_OVERHEAD = 1.6
ALLOCATOR_OVERHEAD = 1.10  # reserved / allocated of PyTorch's caching allocator under changing batch shapes
QLORA_SPEED = 0.7  # 4-bit: each matmul dequantizes its nf4 weights first (forward and backward)
SAGEMAKER_OVERHEAD_HOURS = 10 / 60  # billed but not training: image pull, model download and load
CHARS_PER_TOKEN = 3.6  # Llama-2's tokenizer on English prose, for data when the tokenizer is unavailable
FUSED_HEAD_TOKENS, FUSED_HEAD_VOCAB = 4096, 32768  # TRL's chunked log-prob tile


# ---- Inputs ----------------------------------------------------------------------------------------------


def data_lengths(config: RunConfig) -> tuple[Lengths, list[str]]:
    """Tokenize the training split with the model's tokenizer (no weights); estimate without one."""
    from sftbridge.data.encoding import Lengths, encode
    from sftbridge.data.loading import load_data
    from sftbridge.models.loading import load_tokenizer

    notes: list[str] = []
    data = load_data(config.data, eval_strategy=config.train.eval_strategy, with_test=False)
    estimated = False
    try:
        # Local only: a plan is a quick pre-flight check, and offline the hub client retries for ~50 s.
        tokenizer = load_tokenizer(config.model, local_only=True)
    except UserError:
        from sftbridge.config import ModelSection

        # Render with Llama-2's chat template (the built-in tokenizer carries it verbatim), count characters.
        tokenizer, estimated = load_tokenizer(ModelSection()), True
        notes.append(
            f"the tokenizer of {config.model.name_or_path} is not on this machine: token lengths estimated "
            f"at {CHARS_PER_TOKEN} characters per token (exact after "
            f"`hf download {config.model.name_or_path} --include '*.json' 'tokenizer.model'`)"
        )
    max_length, policy = config.data.max_length, config.data.over_length
    if policy == "error":
        policy = "drop"  # training would stop at the first over-length example; plan the rest
    encoded = encode(
        data,
        config.data,
        tokenizer,
        max_length=10**9 if estimated else max_length,
        over_length="drop" if estimated else policy,
    )
    report = encoded.reports["train"]
    if report.over_length:
        notes.append(f"{report.over_length} examples over data.max_length={max_length} ({policy})")
    tokens, trained = [], []
    for item in encoded.splits["train"]:
        n = len(item.input_ids)
        share = sum(label >= 0 for label in item.labels) / n
        if estimated:
            n = max(1, round(len(item.text) / CHARS_PER_TOKEN))
            share = min(1.0, sum(end - start for start, end in item.trained_spans) / CHARS_PER_TOKEN / n)
            if n > max_length:
                if policy == "drop":
                    continue
                n = max_length
        tokens.append(n)
        trained.append(round(n * share))
    if not tokens:
        raise ConfigError(f"data.max_length={config.data.max_length}: no training example is left")
    return Lengths(tokens, trained, "estimated" if estimated else "tokenizer"), notes


# ---- Batches ---------------------------------------------------------------------------------------------


@dataclass
class Batching:
    micro_batches_per_epoch: int  # per device
    processed_tokens_per_epoch: int  # all devices, padding included
    real_tokens_per_epoch: int
    peak_micro_batch: tuple[int, int]  # (rows, columns) of the largest micro-batch, for memory
    tokens_per_step: float  # processed tokens per optimizer step, all devices

    @property
    def non_pad_share(self) -> float:
        return self.real_tokens_per_epoch / self.processed_tokens_per_epoch


def batching(config: RunConfig, lengths: list[int], world: int, seed: int = 0) -> Batching:
    """Batches of one epoch the way TRL forms them: padded to the longest, grouped, packed or padding-free."""
    train, max_length = config.train, config.data.max_length
    rows = train.per_device_batch_size
    total = sum(lengths)
    global_batch = rows * world
    if train.packing:
        # Best-fit decreasing fills rows nearly full when examples are much shorter than max_length.
        packed_rows = max(1, math.ceil(total / max_length))
        micro = math.ceil(packed_rows / global_batch)
        return Batching(
            micro, total, total, (rows, max_length), total / max(1, micro) * train.gradient_accumulation_steps
        )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if train.group_by_length:
        order = _length_grouped(order, lengths, rows * train.gradient_accumulation_steps)
    batches = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    # what each device is fed: its own rows of every global batch
    parts = [
        [lengths[j] for j in batch[k : k + rows]] for batch in batches for k in range(0, len(batch), rows)
    ]
    if train.padding_free:
        processed = total
        # one row of the part's real tokens; the widest part of this epoch (as sampled with this seed)
        peak = (1, max(map(sum, parts)))
    else:
        processed = sum(len(part) * max(part) for part in parts)  # each part padded to its longest
        peak = (min(rows, len(lengths)), max(lengths))
    micro = len(batches)
    per_step = processed / micro * train.gradient_accumulation_steps
    return Batching(micro, processed, total, peak, per_step)


def _length_grouped(order: list[int], lengths: list[int], batch: int) -> list[int]:
    """transformers' LengthGroupedSampler: megabatches of min(50, n / 4 batches) sorted by length.

    On a small dataset the megabatches are small and batches less uniform: 380 examples in batches of 8 keep
    83% non-pad tokens, 2,000 or more keep 96%.
    """
    mega = batch * max(1, min(len(lengths) // (batch * 4), 50))
    grouped = [sorted(order[i : i + mega], key=lambda j: -lengths[j]) for i in range(0, len(order), mega)]
    flat = [j for group in grouped for j in group]
    return flat


# ---- Memory ----------------------------------------------------------------------------------------------


@dataclass
class Memory:
    weights: float
    weight_bits: int
    lora_params: int
    lora_state: float  # weights + gradients + optimizer moments of the adapters
    activations: float  # at the peak micro-batch, with the configured checkpointing
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    lm_head: float
    runtime: float  # CUDA context, or the CPU process's runtime
    peak_allocated: float
    peak_reserved: float  # what torch.cuda.max_memory_reserved reports on a GPU
    peak_total: float  # what the device must hold: reserved + runtime (CPU: peak RSS)
    reference: float = 0.0  # DPO: the frozen reference adapter and its no-grad forward (see preference_plan)


def weight_bytes(shapes: Shapes, bits: int, other_bytes: int) -> float:
    """Base weights; at 4 bits only the decoder's linear layers are quantized (nf4, double quantization)."""
    if bits == 4:
        quantized = shapes.decoder_linear_params * (4 + 8 / 64 + 32 / (64 * 256)) / 8
        rest = shapes.embedding_params + shapes.lm_head_params + shapes.norm_params
        return quantized + rest * other_bytes
    return shapes.total_params * bits / 8


def lora_params(shapes: Shapes, r: int, targets: list[str]) -> int:
    linear = shapes.linear_shapes()
    return shapes.num_layers * sum(r * (linear[t][0] + linear[t][1]) for t in targets if t in linear)


def layer_activation_bytes(
    shapes: Shapes,
    r: int,
    targets: list[str],
    dropout: float,
    s: int,
    *,
    eager: bool,
    context: int,
    cpu_sdpa_mask: bool = False,
    dropout_mask_bytes: int = 1,
) -> float:
    """Bytes saved for backward per token in one decoder layer (see the module docstring).

    Checked against the tensors autograd saves (``saved_tensors_hooks``) for one layer of the tiny model in
    fp32, with and without dropout and attention mask: within 1% (tests/test_plan.py).
    ``dropout_mask_bytes``: CUDA's fused dropout keeps a bool mask, the CPU's a float one (4 bytes in fp32).
    """
    h, i, q, kv = shapes.hidden_size, shapes.intermediate_size, shapes.q_dim, shapes.kv_dim
    linear = shapes.linear_shapes()
    saved = 2.0 * 4 * (h + 1)  # each RMSNorm: its input upcast to fp32 and 1/rms; its frozen weight: nothing
    saved += s * (q + 2 * kv) + s * q  # q, k, v after RoPE; the attention output
    saved += 3 * s * i  # SwiGLU: gate, up, SiLU(gate)
    if eager:
        saved += shapes.num_heads * context * (4 + (s if s < 4 else 0))  # fp32 softmax (+ its 16-bit copy)
    else:
        saved += 4 * shapes.num_heads  # sdpa's fp32 log-sum-exp per head
    if cpu_sdpa_mask and not eager:
        saved += 4 * context  # the CPU's flash kernel keeps the attention mask as fp32, one copy per layer
    adapted = [t for t in targets if t in linear]
    # A frozen linear layer, 16-bit or 4-bit, keeps no input: there is no weight gradient to compute. What
    # the adapters' lora_A reads is kept: without dropout the layer inputs themselves (one copy shared by
    # q/k/v, one by gate/up; o_proj's is the attention output, counted above), with dropout each adapter's
    # own dropped copy and its mask.
    if dropout == 0:
        shared = {"q_proj": "n1", "k_proj": "n1", "v_proj": "n1", "gate_proj": "n2", "up_proj": "n2"}
        saved += s * h * len({shared[t] for t in adapted if t in shared})
        saved += s * i * ("down_proj" in adapted)
    else:
        saved += sum((s + dropout_mask_bytes) * linear[t][0] for t in adapted)
    saved += s * r * len(adapted)  # rank-r outputs of lora_A
    return saved


def memory(
    config: RunConfig, shapes: Shapes, batch: Batching, device: str, mean_trained_share: float
) -> Memory:
    on_gpu = device != "cpu"
    s = 2 if on_gpu else 4
    bits = 4 if config.model.load_in_4bit else _weight_bits(config, on_gpu)
    other = 2 if on_gpu and config.model.dtype in ("auto", "bfloat16", "float16") else 4
    weights = weight_bytes(shapes, bits, other)
    n_lora = lora_params(shapes, config.lora.r, config.lora.target_modules)
    # TRL keeps adapters of a quantized base in bf16; otherwise PEFT upcasts them to fp32 (the master copy).
    param_b = 2 if (bits == 4 and on_gpu) else 4
    moments = 2.0 if "8bit" in config.train.optim else 2.0 * param_b
    lora_state = n_lora * (2 * param_b + moments)

    rows, cols = batch.peak_micro_batch
    tokens = rows * cols
    eager = (config.model.attn_implementation or "sdpa") == "eager"
    per_layer = layer_activation_bytes(
        shapes,
        config.lora.r,
        config.lora.target_modules,
        config.lora.dropout,
        s,
        eager=eager,
        context=cols,
        cpu_sdpa_mask=not on_gpu,
        dropout_mask_bytes=1 if on_gpu else s,
    )
    h = shapes.hidden_size
    outside = 4.0 * h  # final norm input in fp32
    full = tokens * (shapes.num_layers * per_layer + outside) + tokens * per_layer  # + gradients in flight
    checkpointed = tokens * (shapes.num_layers * s * h + outside) + 2 * tokens * per_layer
    activations = checkpointed if config.train.gradient_checkpointing else full
    # Fused LM head: on a GPU only the answer positions are scored; on the CPU every position is.
    scored = tokens * (mean_trained_share if on_gpu else 1.0)
    tile = min(scored, FUSED_HEAD_TOKENS) * min(shapes.vocab_size, FUSED_HEAD_VOCAB) * s
    lm_head = 2 * tile + scored * s * h
    if on_gpu:
        allocated = weights + lora_state + activations + lm_head
        reserved = allocated * ALLOCATOR_OVERHEAD
    else:
        allocated = reserved = weights + lora_state + (activations + lm_head) * CPU_STEP_OVERHEAD
    runtime = CUDA_CONTEXT_BYTES if on_gpu else CPU_RUNTIME_BYTES
    return Memory(
        weights=weights,
        weight_bits=bits,
        lora_params=n_lora,
        lora_state=lora_state,
        activations=activations,
        activations_without_checkpointing=full,
        activations_with_checkpointing=checkpointed,
        lm_head=lm_head,
        runtime=runtime,
        peak_allocated=allocated,
        peak_reserved=reserved,
        peak_total=reserved + runtime,
    )


def flattened_dense(config: RunConfig) -> bool:
    """Packing/padding-free flatten a batch into one row; without a varlen (flash) kernel, sdpa and eager
    attention then run over the whole row with a block-diagonal mask: quadratic in the batch's tokens."""
    flash = (config.model.attn_implementation or "").startswith("flash_attention")
    return (config.train.packing or config.train.padding_free) and not flash


def _weight_bits(config: RunConfig, on_gpu: bool) -> int:
    if config.model.dtype == "float32" or (config.model.dtype == "auto" and not on_gpu):
        return 32
    return 16


# ---- machine, time, cost ----------------------------------------------------------------------------------


@dataclass
class Machine:
    kind: str  # "gpu", "cpu" or "unspecified" (a GPU of unknown kind)
    gpu: Gpu | None = None
    gpus_per_instance: int = 1
    instances: int = 1
    instance_type: str | None = None
    price_per_hour: float | None = None

    @property
    def world(self) -> int:
        return self.gpus_per_instance * self.instances

    def describe(self) -> str:
        if self.kind == "cpu":
            return "CPU (peak resident memory of the training process)"
        if self.gpu is None:
            return "a GPU (unspecified: pass --gpu NAME or --instance-type TYPE for the fit check and time)"
        count = f"{self.world} x " if self.world > 1 else ""
        where = f" on {self.instances} x {self.instance_type}" if self.instance_type else ""
        return f"{count}{self.gpu.name} ({self.gpu.memory_bytes / GB:.1f} GB){where}"


def resolve_target(config: RunConfig, gpu: str | None, instance_type: str | None) -> Machine:
    if gpu:
        key = GPU_ALIASES.get(gpu.lower(), gpu.lower())
        if key not in GPUS:
            raise ConfigError(f"--gpu {gpu}: unknown GPU; known: {', '.join(GPUS)}")
        return Machine("gpu", GPUS[key], instances=1)
    if instance_type is None and config.backend.name == "sagemaker":
        instance_type = config.backend.instance_type
    if instance_type:
        if instance_type not in INSTANCES:
            raise ConfigError(
                f"instance type {instance_type}: not in the table; known: {', '.join(INSTANCES)} "
                "(or pass --gpu NAME)"
            )
        key, count, price = INSTANCES[instance_type]
        instances = config.backend.instance_count if config.backend.name == "sagemaker" else 1
        return Machine("gpu", GPUS[key], count, instances, instance_type, price)
    if config.train.device == "cpu":
        return Machine("cpu")
    return Machine("unspecified")


@dataclass
class Throughput:
    flops_per_token: float  # model FLOPs (4N) per processed token
    attention_flops_per_token: float
    steps_per_epoch: int
    tokens_per_step: float
    trained_tokens_per_step: float  # non-pad tokens
    non_pad_share: float
    mfu_assumed: float | None
    seconds_per_epoch: float | None
    training_hours: float | None


def throughput(config: RunConfig, shapes: Shapes, batch: Batching, target: Machine) -> Throughput:
    ga = config.train.gradient_accumulation_steps
    steps = max(1, math.ceil(batch.micro_batches_per_epoch / ga))
    model_flops = 4.0 * shapes.matmul_params
    # Mean causal context of a processed token is half its row; packed rows hold whole examples.
    context = batch.processed_tokens_per_epoch / max(
        1, batch.micro_batches_per_epoch * batch.peak_micro_batch[0]
    )
    if flattened_dense(config):
        context *= (
            config.train.per_device_batch_size
        )  # one row holds the whole batch, masked block-diagonally
    attention = 6.0 * shapes.num_layers * shapes.q_dim * context / 2
    seconds = mfu = None
    if target.gpu is not None:
        mfu = target.gpu.mfu * (QLORA_SPEED if config.model.load_in_4bit else 1.0)
        flops = model_flops * (1.5 if config.train.gradient_checkpointing else 1.0) + attention
        seconds = (
            batch.processed_tokens_per_epoch * flops / (target.world * target.gpu.peak_tflops * 1e12 * mfu)
        )
    hours = seconds * config.train.epochs / 3600 if seconds is not None else None
    if config.train.max_steps > 0 and seconds is not None:
        hours = seconds / steps * config.train.max_steps / 3600
    return Throughput(
        flops_per_token=model_flops,
        attention_flops_per_token=attention,
        steps_per_epoch=steps,
        tokens_per_step=batch.tokens_per_step,
        trained_tokens_per_step=batch.tokens_per_step * batch.non_pad_share,
        non_pad_share=batch.non_pad_share,
        mfu_assumed=mfu,
        seconds_per_epoch=seconds,
        training_hours=hours,
    )


@dataclass
class Cost:
    instance_type: str
    instances: int
    price_per_hour: float
    billed_hours: float  # training + SAGEMAKER_OVERHEAD_HOURS
    usd: float
    spot: bool
    price_table_date: str = PRICE_TABLE_DATE
    note: str = PRICE_TABLE_NOTE


def cost(target: Machine, hours: float | None, spot: bool) -> Cost | None:
    if target.instance_type is None or target.price_per_hour is None or hours is None:
        return None
    billed = hours + SAGEMAKER_OVERHEAD_HOURS
    usd = billed * target.price_per_hour * target.instances
    return Cost(target.instance_type, target.instances, target.price_per_hour, billed, usd, spot)


# ---- The plan --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    model: str
    shapes: Shapes
    data: dict[str, Any]
    target: Machine
    memory: Memory
    throughput: Throughput
    cost: Cost | None
    fits: bool | None
    precision: str  # what the run computes in there: bf16, fp16 (a GPU without bf16) or fp32 (the CPU)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    learning: Learning | None = None
    sharded: ShardedMemory | None = None  # per GPU under train.fsdp; `memory` is then one unsharded copy
    fitting_instances: list[InstanceFit] = field(default_factory=list)  # under train.fsdp, cheapest first

    def to_dict(self) -> dict[str, Any]:
        shapes = asdict(self.shapes)
        shapes.update(total_params=self.shapes.total_params, matmul_params=self.shapes.matmul_params)
        target = {
            "kind": self.target.kind,
            "description": self.target.describe(),
            "gpu": asdict(self.target.gpu) if self.target.gpu else None,
            "gpus": self.target.world,
            "instance_type": self.target.instance_type,
        }
        return {
            "model": self.model,
            "shapes": shapes,
            "data": self.data,
            "target": target,
            "memory_bytes": asdict(self.memory),
            "throughput": asdict(self.throughput),
            "cost": asdict(self.cost) if self.cost else None,
            "fits": self.fits,
            "precision": self.precision,
            "warnings": self.warnings,
            "notes": self.notes,
            "learning": asdict(self.learning) if self.learning else None,
            "fsdp_memory_bytes": asdict(self.sharded) if self.sharded else None,
            "fitting_instances": [asdict(fit) for fit in self.fitting_instances],
        }


def make_plan(
    config: RunConfig,
    *,
    gpu: str | None = None,
    instance_type: str | None = None,
    lengths: Lengths | None = None,
    shapes: Shapes | None = None,
) -> Plan:
    """Everything ``sftbridge plan`` prints. ``lengths``/``shapes`` skip the tokenizer / config.json reads."""
    notes: list[str] = []
    shapes = shapes or model_shapes(config.model.name_or_path)
    if lengths is None:
        lengths, notes = pair_lengths(config) if config.train.method == "dpo" else data_lengths(config)
    target = resolve_target(config, gpu, instance_type)
    dpo = config.train.method == "dpo"
    plan = _plan_of_method(config, shapes, lengths, target)
    plan.notes = notes + plan.notes
    if config.train.fsdp and target.kind != "cpu":
        plan.fitting_instances = instances_that_fit(config, shapes, plan.memory)
    if plan.fits is False:
        plan.warnings.append(_advice(config, shapes, lengths, target, plan))
    plan.learning = learning(config, plan.throughput.steps_per_epoch)
    if dpo:  # its heuristics are SFT's, of an adapter learning new answers; DPO moves a trained one
        plan.learning.warning = None
    return plan


# ---- DPO -------------------------------------------------------------------------------------------------


def pair_lengths(config: RunConfig) -> tuple[Lengths, list[str]]:
    """DPO's rows: two per pair, prompt + chosen and prompt + rejected, tokenized as training encodes them
    (estimated from characters, as for SFT, when the model's tokenizer is not on this machine)."""
    from sftbridge.config import ModelSection
    from sftbridge.data.encoding import Lengths
    from sftbridge.data.pairs import encode_pairs, load_pairs, pairs_prompt_format
    from sftbridge.models.loading import load_tokenizer

    notes: list[str] = []
    loaded = load_pairs(config.data, eval_strategy="no")
    try:
        tokenizer, estimated = load_tokenizer(config.model, local_only=True), False
    except UserError:
        tokenizer, estimated = load_tokenizer(ModelSection()), True  # Llama-2's chat template, verbatim
        notes.append(
            f"the tokenizer of {config.model.name_or_path} is not on this machine: token lengths estimated "
            f"at {CHARS_PER_TOKEN} characters per token"
        )
    fmt = pairs_prompt_format(config.data, loaded.format, tokenizer, None)
    max_length = 10**9 if estimated else config.data.max_length
    pairs, _ = encode_pairs(loaded.train, fmt, tokenizer, max_length, "drop")
    tokens, trained = [], []
    for pair in pairs:
        for encoded in (pair.chosen, pair.rejected):
            if estimated:
                start, end = encoded.trained_spans[-1]
                n = min(max(1, round(len(encoded.text) / CHARS_PER_TOKEN)), config.data.max_length)
                tokens.append(n)
                trained.append(min(n, round((end - start) / CHARS_PER_TOKEN)))
            else:
                tokens.append(len(encoded.input_ids))
                trained.append(len(encoded.input_ids) - len(pair.prompt_ids))
    if not tokens:
        raise ConfigError(f"data.max_length={config.data.max_length}: no pair is left")
    return Lengths(tokens, trained, "estimated" if estimated else "tokenizer"), notes


def preference_plan(config: RunConfig, shapes: Shapes, lengths: Lengths, target: Machine) -> Plan:
    """DPO's memory and time: SFT's arithmetic on twice the rows, plus the reference.

    A micro-batch of B pairs is 2B rows (chosen and rejected, padded to the longest): the policy's forward
    and backward run on all of them. The reference is a frozen copy of the adapter on the same base (its LoRA
    weights only), run without gradients on the same 2B rows after the policy's forward, while the policy's
    activations are held: one layer's working set and the LM head's tile on top of the peak. That forward is
    a third of a step's work (a backward costs two forwards); ``train.dpo_precompute_ref_log_probs`` moves it
    into one pass before training.
    """
    rows = _with(config, {"train.per_device_batch_size": 2 * config.train.per_device_batch_size})
    plan = _evaluate(
        rows.model_copy(update={"train": rows.train.model_copy(update={"group_by_length": False})}),
        shapes,
        lengths,
        target,
    )
    m, on_gpu = plan.memory, target.kind != "cpu"
    precompute = config.train.dpo_precompute_ref_log_probs
    one_layer = m.activations_without_checkpointing / (shapes.num_layers + 1)
    forward = (
        0.0 if precompute else (one_layer + m.lm_head) * (ALLOCATOR_OVERHEAD if on_gpu else CPU_STEP_OVERHEAD)
    )
    m.reference = m.lora_params * (2 if m.weight_bits == 4 and on_gpu else 4) + forward
    m.peak_allocated += m.reference
    m.peak_reserved += m.reference
    m.peak_total += m.reference
    if target.gpu is not None:
        plan.fits = m.peak_total <= target.gpu.memory_bytes
    t = plan.throughput
    # A step's work: policy forward + backward (3 forwards' worth) and the reference forward (1).
    factor = 1.0 if precompute else 4 / 3
    if t.seconds_per_epoch is not None:
        extra = t.seconds_per_epoch / 3 if precompute else 0.0  # the one pass before training
        t.seconds_per_epoch *= factor
        if t.training_hours is not None:
            t.training_hours = t.training_hours * factor + extra / 3600
        plan.cost = cost(target, t.training_hours, config.backend.use_spot)
    plan.notes.append(
        "DPO: each pair is two rows (chosen, rejected) through the policy, and a no-grad reference forward "
        f"on them{' (precomputed once)' if precompute else ''}; memory counts the reference adapter and that "
        "forward"
    )
    return plan


# ---- Will it learn? ----------------------------------------------------------------------------------------

# Heuristics from sftbridge's measured runs (a small pretrained chat model, 160 Q/A pairs of invented
# facts): a summed learning rate of 0.01 (JumpStart's lr 1e-4, 200 linearly decaying steps) reached 2.5% exact
# match on the trained questions; 0.2 (lr 1e-3, 400 steps, linear) 49%; 0.96 (lr 2e-3, 480 steps, constant)
# 93%.
FEW_STEPS = 100
SMALL_LR_SUM = 0.1


@dataclass
class Learning:
    """How much training a config gives its adapter, and a warning when that is very little."""

    optimizer_steps: int
    lr_sum: float  # the learning rate summed over the steps: how far AdamW can move the LoRA weights
    warning: str | None


def learning(config: RunConfig, steps_per_epoch: int) -> Learning:
    t = config.train
    steps = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.epochs)
    warmup = t.warmup_ratio * steps
    decays = not t.lr_scheduler.startswith("constant")  # linear, cosine, ... fall to ~0: half on average
    lr_sum = t.learning_rate * (warmup / 2 + (steps - warmup) * (0.5 if decays else 1.0))
    warning = None
    if steps < FEW_STEPS or lr_sum < SMALL_LR_SUM:
        cut = t.max_steps > 0 and t.max_steps < steps_per_epoch * t.epochs
        keys = [
            *(["train.max_steps (-1 trains every epoch)"] if cut else []),
            *(["train.learning_rate (1e-3 to 2e-3 for a small model)"] if t.learning_rate < 1e-3 else []),
            *(["train.epochs"] if not cut else []),
            *(["train.lr_scheduler=constant"] if decays else []),
            "train.per_device_batch_size (lower: more steps)",
        ]
        warning = (
            f"{steps} optimizer steps at train.learning_rate={t.learning_rate:g} ({t.lr_scheduler})"
            + (f", cut by train.max_steps={t.max_steps}" if cut else "")
            + f": a summed learning rate of {lr_sum:.3g}, little for an adapter to learn new answers. Expect "
            "answers like the base model's: long, and not stopping where the references do (the seed's "
            f"JumpStart run answered so). Measured: a sum of 0.01 learned 2.5% exact match, ~1 learned 93%. "
            f"Raise {', '.join(keys)}; configs/facts-small-model.yaml is a recipe that learns; "
            "train.answer_metrics measures it while it trains."
        )
    return Learning(steps, lr_sum, warning)


def learning_for(config: RunConfig, train_examples: int) -> Learning:
    """:func:`learning` from the number of training examples alone (no tokenizer, no model): what ``train``
    checks before it starts. One example per row; packing makes fewer, longer rows (fewer steps)."""
    from sftbridge.planning.hardware import gpu_count

    t, backend = config.train, config.backend
    if backend.name == "sagemaker":
        world = backend.instance_count * max(1, gpu_count(backend.instance_type))
    else:
        world = max(1, backend.num_processes)
    rows = math.ceil(train_examples / (t.per_device_batch_size * world))
    return learning(config, max(1, math.ceil(rows / t.gradient_accumulation_steps)))


def _evaluate(config: RunConfig, shapes: Shapes, lengths: Lengths, target: Machine) -> Plan:
    world = target.world if target.kind == "gpu" else config.backend.num_processes
    batch = batching(config, lengths.tokens, world, seed=config.seed)
    share = sum(lengths.trained) / sum(lengths.tokens)
    device = "cpu" if target.kind == "cpu" else "cuda"
    mem = memory(config, shapes, batch, device, share)
    speed = throughput(config, shapes, batch, target)
    fits = None
    notes = []
    sharded = None
    if config.train.fsdp and target.kind != "cpu":
        # --gpu NAME: the local run's processes, one GPU each
        gpus = target.world if target.instance_type else max(target.world, config.backend.num_processes)
        per_node = target.gpus_per_instance if target.instance_type else gpus
        sharded = sharded_memory(config, shapes, mem, gpus, per_node)
        notes += _fsdp_notes(sharded, mem)
    peak = worst(sharded) if sharded else mem.peak_total
    if target.gpu is not None:
        fits = peak <= target.gpu.memory_bytes
        if fits and peak > 0.9 * target.gpu.memory_bytes:
            notes.append("predicted peak within 10% of the card's memory: fragmentation may tip it over")
    if flattened_dense(config):
        notes.append(
            "packing/padding_free without flash attention: attention runs over the whole flattened batch "
            "(a dense block-diagonal mask), quadratic in its tokens; set model.attn_implementation="
            "flash_attention_2 on a GPU"
        )
    precision, warnings = _precision(config, target)
    if target.gpu is not None and not target.gpu.bf16:
        notes.append(
            f"the {target.gpu.name} has no bf16: the run trains in fp16 with loss scaling (train.precision="
            f"auto), and the time is reckoned at its fp16 tensor peak"
        )
    if target.kind == "cpu" and config.model.load_in_4bit:
        notes.append("4-bit on the CPU: bitsandbytes' CPU kernels are far slower than a GPU's")
    return Plan(
        model=config.model.name_or_path,
        shapes=shapes,
        data=lengths.summary(),
        target=target,
        memory=mem,
        throughput=speed,
        cost=cost(target, speed.training_hours, config.backend.use_spot),
        fits=fits,
        precision=precision,
        warnings=warnings,
        notes=notes,
        sharded=sharded,
    )


def _fsdp_notes(sharded: ShardedMemory, unsharded: Memory) -> list[str]:
    notes = []
    if sharded.load_peak:
        notes.append(
            f"FSDP with a 4-bit base: each GPU quantizes the whole base while it loads, before sharding "
            f"({sharded.load_peak / GB:.1f} GB with the CUDA context): the fit counts this load peak"
        )
    if sharded.host_bytes:
        what = "the offloaded shards" if sharded.offload else "every rank's copy of the base while it loads"
        notes.append(f"host RAM per node: {sharded.host_bytes / GB:.1f} GB ({what})")
    moved = 2 * (unsharded.weights - sharded.quant_constants) * (sharded.gpus - 1) / sharded.gpus
    notes.append(
        f"FSDP all-gathers the base twice per micro-batch (forward and backward): {moved / GB:.1f} GB per "
        "GPU per micro-batch over the GPUs' interconnect, not counted in the time (slow on PCIe: g5, g6)"
    )
    return notes


@dataclass
class InstanceFit:
    instance_type: str
    instances: int
    gpus: int
    gpu: str
    peak_per_gpu: float  # bytes, training or loading, whichever is more
    usd_per_hour: float | None  # all instances together


def instances_that_fit(config: RunConfig, shapes: Shapes, unsharded: Memory) -> list[InstanceFit]:
    """The SageMaker instances (x backend.instance_count) on whose GPUs this FSDP run fits, cheapest first
    (unpriced ones last). Only bf16 GPUs: QLoRA under FSDP stores its weights in bf16."""
    count = config.backend.instance_count if config.backend.name == "sagemaker" else 1
    fits = []
    for name, (key, gpus, price) in INSTANCES.items():
        gpu = GPUS[key]
        if not gpu.bf16 or gpus * count < 2:
            continue
        peak = worst(sharded_memory(config, shapes, unsharded, gpus * count, gpus))
        if peak <= gpu.memory_bytes:
            total = None if price is None else round(price * count, 3)
            fits.append(InstanceFit(name, count, gpus * count, gpu.name, peak, total))
    return sorted(fits, key=lambda f: (f.usd_per_hour is None, f.usd_per_hour or 0.0, f.instance_type))


def _precision(config: RunConfig, target: Machine) -> tuple[str, list[str]]:
    """What ``models.loading.resolve_precision`` will pick on the target, and a warning where the config
    asks for bf16 on a card that has none."""
    asked = config.train.precision
    if target.kind == "cpu":
        return "fp32", []
    if target.gpu is None:
        return asked if asked != "auto" else "bf16 (fp16 on a GPU without bf16)", []
    if asked == "bf16" and not target.gpu.bf16:
        return "bf16", [
            f"train.precision=bf16: the {target.gpu.name} has no bf16 (torch emulates it, many times "
            "slower); set train.precision=auto or fp16"
        ]
    return (asked if asked != "auto" else ("bf16" if target.gpu.bf16 else "fp16")), []


def _advice(config: RunConfig, shapes: Shapes, lengths: Lengths, target: Machine, plan: Plan) -> str:
    """Name the keys that bring the run under the card's memory, each with its predicted peak."""
    assert target.gpu is not None
    limit = target.gpu.memory_bytes
    train = config.train
    options: list[tuple[str, dict[str, Any]]] = []
    if not train.gradient_checkpointing:
        options.append(("train.gradient_checkpointing=true", {"train.gradient_checkpointing": True}))
    if not config.model.load_in_4bit:
        options.append(("model.load_in_4bit=true", {"model.load_in_4bit": True}))
    if train.per_device_batch_size > 1:
        ga = train.gradient_accumulation_steps * train.per_device_batch_size
        options.append(
            (
                f"train.per_device_batch_size=1 train.gradient_accumulation_steps={ga}",
                {"train.per_device_batch_size": 1, "train.gradient_accumulation_steps": ga},
            )
        )
    if train.fsdp and not train.fsdp_offload:
        options.append(("train.fsdp_offload=true", {"train.fsdp_offload": True}))
    if config.data.max_length > 256:
        half = config.data.max_length // 2
        options.append((f"data.max_length={half}", {"data.max_length": half}))
    tried = []
    for label, changes in options:
        changed = _with(config, changes)
        short = replace(lengths, tokens=[min(n, changed.data.max_length) for n in lengths.tokens])
        peak = _peak(_plan_of_method(changed, shapes, short, target))
        if peak < _peak(plan) - 0.05 * GB:  # a key that lowers nothing is no advice
            tried.append(f"{label} -> {peak / GB:.1f} GB{' (fits)' if peak <= limit else ''}")
    head = (
        f"the run will not fit: predicted peak {_peak(plan) / GB:.1f} GB > {limit / GB:.1f} GB of the "
        f"{target.gpu.name}."
    )
    if plan.fitting_instances and not any(option.endswith("(fits)") for option in tried):
        first = plan.fitting_instances[0]
        tried.append(f"an instance that fits, {first.instance_type} (backend.instance_type; `fits on` above)")
    return f"{head} Change: " + "; ".join(tried) if tried else f"{head} No key of this config lowers it"


def _plan_of_method(config: RunConfig, shapes: Shapes, lengths: Lengths, target: Machine) -> Plan:
    """SFT's plan, or DPO's (two rows a pair through the policy, the reference's forward)."""
    if config.train.method == "dpo":
        return preference_plan(config, shapes, lengths, target)
    return _evaluate(config, shapes, lengths, target)


def _peak(plan: Plan) -> float:
    """What the GPU must hold: per GPU under FSDP (training or loading), else the one copy's peak."""
    return worst(plan.sharded) if plan.sharded else plan.memory.peak_total


def _with(config: RunConfig, changes: dict[str, Any]) -> RunConfig:
    from sftbridge.config import set_dotted, validate_config

    raw = config.to_dict()
    for key, value in changes.items():
        set_dotted(raw, key, value)
    return validate_config(raw)
