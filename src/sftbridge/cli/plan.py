"""``sftbridge plan CONFIG [--gpu NAME | --instance-type TYPE] [--json]``: the command and its report.

The arithmetic lives in ``sftbridge.planning.estimate``.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from sftbridge.cli.options import add_config, add_json
from sftbridge.planning.estimate import GB, SAGEMAKER_OVERHEAD_HOURS, Plan, make_plan
from sftbridge.planning.hardware import GPUS, PRICE_TABLE_DATE

if TYPE_CHECKING:  # annotations only: pydantic loads with the config, in cmd_plan
    from sftbridge.config import RunConfig


def plan_arguments(parser: argparse.ArgumentParser) -> None:
    add_config(
        parser,
        "YAML config, e.g. configs/llama2-7b-chat-qlora.yaml; keys: sftbridge config show",
        overrides_example="train.per_device_batch_size=8",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpu", help=f"the GPU to check against: {', '.join(GPUS)}")
    where.add_argument(
        "--instance-type", help="a SageMaker instance type, e.g. ml.g5.2xlarge (adds the cost)"
    )
    add_json(parser, "print the plan as JSON")
    parser.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from sftbridge.backends import options_model
    from sftbridge.config import load_config

    config = load_config(args.config, args.overrides, options_model=options_model)
    plan = make_plan(config, gpu=args.gpu, instance_type=args.instance_type)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan, config))
    return 0  # a run that will not fit is a warning, not an error: the plan itself succeeded


def render(plan: Plan, config: RunConfig) -> str:
    m, t, d, s = plan.memory, plan.throughput, plan.data, plan.shapes
    gc = config.train.gradient_checkpointing
    lines = [
        f"model     {plan.model}: {s.total_params / 1e9:.3g}B parameters, {s.num_layers} layers, hidden "
        f"{s.hidden_size} ({s.source})",
        f"data      {d['examples']} examples, {d['tokens']} tokens ({d['source']}): mean {d['mean']}, p50 "
        f"{d['p50']}, p90 {d['p90']}, p99 {d['p99']}, max {d['max']} tokens; {d['trained_tokens']} in the "
        "loss",
        f"target    {plan.target.describe()}",
        "memory    (GB = 10^9 bytes)",
        f"  base weights, {m.weight_bits}-bit{' nf4 + double quant' if m.weight_bits == 4 else ''}"
        f"{_gb(m.weights)}",
        f"  LoRA: {m.lora_params / 1e6:.2f}M params + grads + AdamW moments{_gb(m.lora_state)}",
        f"  activations, checkpointing {'on' if gc else 'off'}{_gb(m.activations)}   "
        f"(off{_gb(m.activations_without_checkpointing)}, on{_gb(m.activations_with_checkpointing)})",
        f"  LM head (fused, chunked log-probs){_gb(m.lm_head)}",
        *(
            [f"  DPO reference: frozen adapter copy + no-grad forward{_gb(m.reference)}"]
            if m.reference
            else []
        ),
        f"  {'CUDA context' if plan.target.kind != 'cpu' else 'Python + libraries'}{_gb(m.runtime)}",
        f"  peak {'reserved (torch)' if plan.target.kind != 'cpu' else 'allocated'}{_gb(m.peak_reserved)}",
        f"  peak total{_gb(m.peak_total)}",
        *_sharded_lines(plan),
        f"tokens    {t.tokens_per_step:,.0f} per optimizer step ({t.trained_tokens_per_step:,.0f} non-pad, "
        f"{t.non_pad_share:.0%}); {t.steps_per_epoch} steps per epoch",
        f"compute   {t.flops_per_token / 1e9:.3g} GFLOP per token (4N) + "
        f"{t.attention_flops_per_token / 1e9:.3g} for attention",
    ]
    if t.seconds_per_epoch is not None and t.mfu_assumed is not None and plan.target.gpu is not None:
        gpu = plan.target.gpu
        lines.append(
            f"time      {t.seconds_per_epoch / 60:.1f} min per epoch, {t.training_hours or 0:.2f} h in all, "
            f"at an assumed {t.mfu_assumed:.0%} MFU of {gpu.peak_tflops:g} TFLOPS "
            f"{'bf16' if gpu.bf16 else 'fp16'} per GPU"
        )
    if plan.cost is not None:
        c = plan.cost
        lines.append(
            f"cost      ${c.usd:.2f} = {c.billed_hours:.2f} h x ${c.price_per_hour}/h x {c.instances} "
            f"({c.instance_type}, {c.note}, prices of {c.price_table_date}; the hours include "
            f"{SAGEMAKER_OVERHEAD_HOURS * 60:.0f} min of download and load)"
            + ("; spot is billed at the spot price, often 60-70% less" if c.spot else "")
        )
    elif plan.target.instance_type:
        lines.append(f"cost      no price for {plan.target.instance_type} in the table of {PRICE_TABLE_DATE}")
    if plan.fits is not None:
        per_gpu = " (per GPU, under FSDP)" if plan.sharded else ""
        lines.append(f"fits      {'yes' if plan.fits else 'NO'}{per_gpu}")
    if plan.sharded is not None:
        cheapest = [
            f"{f.instance_type}{f' x {f.instances}' if f.instances > 1 else ''} ({f.gpus} x {f.gpu}, "
            f"{f.peak_per_gpu / GB:.1f} GB per GPU, "
            + (f"${f.usd_per_hour}/h)" if f.usd_per_hour is not None else "no price in the table)")
            for f in plan.fitting_instances[:4]
        ]
        lines.append(f"fits on   {'; '.join(cheapest) or 'no SageMaker instance in the table'}")
    if plan.learning is not None:
        lines.append(
            f"steps     {plan.learning.optimizer_steps} optimizer steps; summed learning rate "
            f"{plan.learning.lr_sum:.3g}"
        )
    lines += [f"note      {note}" for note in plan.notes]
    lines += [f"WARNING: {warning}" for warning in plan.warnings]
    if plan.learning is not None and plan.learning.warning:
        lines.append(f"WARNING: {plan.learning.warning}")
    return "\n".join(lines)


def _sharded_lines(plan: Plan) -> list[str]:
    """Per GPU under FSDP; the memory lines above are then one whole, unsharded copy."""
    f = plan.sharded
    if f is None:
        return []
    where = " (in host RAM: train.fsdp_offload)" if f.offload else ""
    lines = [
        f"per GPU under FSDP, {f.gpus} GPUs (the lines above: one unsharded copy)",
        f"  base weights, 1/{f.gpus} shard{where}{_gb(f.sharded_weights)}",
        f"  LoRA weights + grads + moments, 1/{f.gpus} shard{where}{_gb(f.sharded_lora_state)}",
        f"  gathered while computing: 2 decoder layers + final norm and lm_head{_gb(f.gathered)}",
        f"  activations + LM head of this GPU's micro-batch{_gb(f.activations + f.lm_head)}",
        f"  CUDA context{_gb(f.runtime)}",
        f"  peak total, training{_gb(f.peak_total)}",
    ]
    if f.quant_constants:
        lines.insert(2, f"  4-bit quantization constants, whole on every GPU{_gb(f.quant_constants)}")
    if f.load_peak:
        lines.append(
            f"  peak total, loading (the whole 4-bit base on each GPU before sharding){_gb(f.load_peak)}"
        )
    return lines


def _gb(value: float) -> str:
    return f": {value / GB:.2f} GB" if value >= 0.1 * GB else f": {value / 1e6:.1f} MB"
