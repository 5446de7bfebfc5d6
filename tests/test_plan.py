"""``sftbridge plan``: memory, tokens, time and cost for the tiny config and the shipped 7B configs."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from conftest import ROOT, cli
from sftbridge.config import load_config
from sftbridge.data.encoding import Lengths
from sftbridge.errors import ConfigError
from sftbridge.planning.estimate import (
    GB,
    SAGEMAKER_OVERHEAD_HOURS,
    batching,
    layer_activation_bytes,
    make_plan,
    weight_bytes,
)
from sftbridge.planning.hardware import GPUS, INSTANCES, PRICE_TABLE_DATE, instance_bf16
from sftbridge.planning.model_shapes import KNOWN_SHAPES, model_shapes

LLAMA2_7B = KNOWN_SHAPES["meta-llama/llama-2-7b-chat-hf"]
# A skewed mix like instruction data: many short examples, a few long ones (tokens, trained tokens).
SKEWED = Lengths([40] * 50 + [120] * 30 + [300] * 15 + [500] * 5, [10] * 50 + [60] * 30 + [150] * 20, "test")


@pytest.fixture
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the shipped configs name data/ relative to the repository root


def config_7b(name: str, *overrides: str) -> Any:
    return load_config(ROOT / "configs" / f"{name}.yaml", list(overrides))


def test_llama2_7b_weights_in_4_and_16_bit() -> None:
    assert LLAMA2_7B.total_params == 6_738_415_616  # the published 6.74B of Llama-2-7B
    four_bit = weight_bytes(LLAMA2_7B, 4, other_bytes=2) / GB
    sixteen_bit = weight_bytes(LLAMA2_7B, 16, other_bytes=2) / GB
    assert 3.5 <= four_bit <= 4.0
    assert sixteen_bit == pytest.approx(13.48, abs=0.02)
    assert weight_bytes(LLAMA2_7B, 32, other_bytes=4) == pytest.approx(2 * sixteen_bit * GB)
    # 13B: twice-ish; the table covers it without a download.
    assert weight_bytes(KNOWN_SHAPES["meta-llama/llama-2-13b-hf"], 16, 2) / GB == pytest.approx(26.0, abs=0.1)


def test_shipped_7b_configs(in_root: None) -> None:
    qlora = make_plan(config_7b("llama2-7b-chat-qlora"), gpu="a10g", lengths=SKEWED)
    lora = make_plan(config_7b("llama2-7b-chat-lora"), gpu="a100-40gb", lengths=SKEWED)
    assert qlora.memory.weight_bits == 4 and lora.memory.weight_bits == 16
    assert 3.5 * GB <= qlora.memory.weights <= 4.0 * GB
    # JumpStart's q_proj/v_proj at r=8: 2 x 8 x (4096 + 4096) x 32 layers.
    assert qlora.memory.lora_params == lora.memory.lora_params == 4_194_304
    assert lora.memory.lora_state == 4_194_304 * 16  # fp32 weight + grad + 2 AdamW moments
    assert qlora.memory.lora_state == 4_194_304 * (2 + 2 + 1 + 1)  # bf16 (TRL), paged 8-bit AdamW
    assert qlora.fits and lora.fits
    assert qlora.memory.peak_total < qlora.target.gpu.memory_bytes  # type: ignore[union-attr]
    assert qlora.memory.peak_total == pytest.approx(qlora.memory.peak_reserved + 0.5 * GB)


def test_checkpointing_lowers_the_activation_estimate(in_root: None) -> None:
    off = make_plan(config_7b("llama2-7b-chat-lora"), gpu="h100", lengths=SKEWED)
    on = make_plan(
        config_7b("llama2-7b-chat-lora", "train.gradient_checkpointing=true"), gpu="h100", lengths=SKEWED
    )
    assert on.memory.activations < off.memory.activations / 5
    assert on.memory.activations == off.memory.activations_with_checkpointing
    assert on.memory.peak_total < off.memory.peak_total
    # Recomputing the forward costs time: 6N instead of 4N of work per token.
    assert on.throughput.seconds_per_epoch > off.throughput.seconds_per_epoch  # type: ignore[operator]


@pytest.mark.parametrize("dropout", [0.0, 0.05], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_activation_model_matches_what_autograd_saves(masked: bool, dropout: float) -> None:
    """The per-layer formula against the tensors autograd really keeps for one decoder layer (fp32, CPU).

    With padding in the batch, attention gets a mask, and the CPU's sdpa kernel keeps an fp32 copy of it.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sftbridge.config import ModelSection
    from sftbridge.models.loading import model_path

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = AutoModelForCausalLM.from_pretrained(model_path(ModelSection()), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_dropout=dropout, target_modules=targets))
    model.train()
    layer, rotary = model.base_model.model.model.layers[0], model.base_model.model.model.rotary_emb
    batch, length = 4, 256
    hidden = torch.randn(batch, length, 128, requires_grad=True)
    position = rotary(hidden, torch.arange(length)[None])
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # activations, not the weights a matmul keeps for backward
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril() if masked else None
        layer(hidden, position_embeddings=position, attention_mask=mask)
    measured = sum(storages.values()) / (batch * length)
    shapes = model_shapes("builtin:tiny-llama")
    predicted = layer_activation_bytes(
        shapes,
        16,
        targets,
        dropout,
        4,
        eager=False,
        context=length,
        cpu_sdpa_mask=masked,
        dropout_mask_bytes=4,  # the CPU's dropout keeps a float mask
    )
    assert predicted == pytest.approx(measured, rel=0.01)


def test_batching_padding_packing_grouping() -> None:
    config = load_config(
        None,
        [
            "data.train_file=x.jsonl",
            "data.max_length=512",
            "train.per_device_batch_size=8",
            "train.group_by_length=false",
        ],
    )
    padded = batching(config, SKEWED.tokens, world=1)
    assert padded.real_tokens_per_epoch == sum(SKEWED.tokens)
    assert padded.non_pad_share < 0.6  # a 500-token example pads most batches it lands in
    grouped_config = load_config(
        None,
        [
            "data.train_file=x.jsonl",
            "data.max_length=512",
            "train.per_device_batch_size=8",
            "train.group_by_length=true",
        ],
    )
    grouped = batching(grouped_config, SKEWED.tokens, world=1)
    assert grouped.non_pad_share > padded.non_pad_share
    packed_config = load_config(
        None, ["data.train_file=x.jsonl", "data.max_length=512", "train.packing=true"]
    )
    packed = batching(packed_config, SKEWED.tokens, world=1)
    assert packed.non_pad_share == 1.0
    assert packed.peak_micro_batch == (4, 512)  # the default batch of 4 full rows
    rows = -(-sum(SKEWED.tokens) // 512)  # ceil: best-fit decreasing fills rows of short examples
    assert packed.micro_batches_per_epoch == -(-rows // 4)


@pytest.mark.parametrize("examples", [380, 4000])
def test_grouped_share_matches_transformers_sampler(examples: int) -> None:
    """The plan's group_by_length batches keep as many non-pad tokens as transformers' own sampler."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    rng = random.Random(0)
    lengths = [min(512, max(8, int(rng.lognormvariate(math.log(85), 0.9)))) for _ in range(examples)]
    config = load_config(
        None,
        [
            "data.train_file=x.jsonl",
            "data.max_length=512",
            "train.per_device_batch_size=8",
            "train.group_by_length=true",
        ],
    )

    def sampler_share(seed: int) -> float:
        order = get_length_grouped_indices(lengths, 8, generator=torch.Generator().manual_seed(seed))
        batches = [[lengths[i] for i in order[k : k + 8]] for k in range(0, len(order), 8)]
        return sum(map(sum, batches)) / sum(len(b) * max(b) for b in batches)

    seeds = range(5)  # one shuffle swings a small dataset's share by a few points; compare the means
    planned = sum(batching(config, lengths, world=1, seed=seed).non_pad_share for seed in seeds) / 5
    assert planned == pytest.approx(sum(map(sampler_share, seeds)) / 5, abs=0.015)


def test_tiny_config_on_the_cpu(in_root: None) -> None:
    """The tokenizer-only path: real token lengths of the sample data, no weights loaded."""
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml")
    plan = make_plan(config)
    assert plan.target.kind == "cpu" and plan.fits is None and plan.cost is None
    assert plan.data["examples"] == 240 and plan.data["source"] == "tokenizer"
    assert 0 < plan.data["trained_tokens"] < plan.data["tokens"] and plan.data["max"] <= 128
    assert plan.shapes.hidden_size == 128 and plan.shapes.num_layers == 2  # its config.json
    assert plan.memory.weight_bits == 32
    assert plan.throughput.steps_per_epoch == 15  # 240 examples / batch 16
    assert plan.throughput.seconds_per_epoch is None  # no GPU, no MFU
    assert 0.5 * GB < plan.memory.peak_total < 1.5 * GB  # the Python runtime dominates a 2-layer model


def test_a_run_that_does_not_fit_warns_and_names_keys(in_root: None) -> None:
    config = config_7b("llama2-7b-chat-lora", "train.per_device_batch_size=64")
    plan = make_plan(config, gpu="a10g", lengths=SKEWED)
    assert plan.fits is False
    (warning,) = plan.warnings
    assert "will not fit" in warning
    for key in (
        "train.gradient_checkpointing=true",
        "model.load_in_4bit=true",
        "train.per_device_batch_size=1",
    ):
        assert key in warning


def test_cost_is_hours_times_price(in_root: None) -> None:
    config = config_7b("llama2-7b-chat-qlora-sagemaker")
    plan = make_plan(config, lengths=SKEWED)  # backend.instance_type of the config: ml.g5.2xlarge
    assert plan.cost is not None and plan.throughput.training_hours is not None
    assert (
        plan.cost.instance_type == "ml.g5.2xlarge"
        and plan.cost.price_per_hour == INSTANCES["ml.g5.2xlarge"][2]
    )
    assert plan.cost.billed_hours == pytest.approx(plan.throughput.training_hours + SAGEMAKER_OVERHEAD_HOURS)
    assert plan.cost.usd == pytest.approx(plan.cost.billed_hours * 1.515)
    assert plan.cost.price_table_date == PRICE_TABLE_DATE
    # Eight H100s: 8x the work per hour, 113.07 $/h.
    p5 = make_plan(config, instance_type="ml.p5.48xlarge", lengths=SKEWED)
    assert p5.target.world == 8 and p5.cost is not None
    assert p5.cost.usd == pytest.approx(p5.cost.billed_hours * 113.07)
    assert p5.throughput.training_hours < plan.throughput.training_hours  # type: ignore[operator]


def test_unknown_model_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.name_or_path"):
        model_shapes("nobody/no-such-model")


def test_cli_prints_the_plan_and_warns_with_exit_0() -> None:
    out = cli("plan", "configs/llama2-7b-chat-lora.yaml", "train.per_device_batch_size=256", "--gpu", "a10g")
    assert out.returncode == 0, out.stderr
    assert "base weights, 16-bit: 13.48 GB" in out.stdout
    assert "fits      NO" in out.stdout
    assert "WARNING: the run will not fit" in out.stdout and "train.gradient_checkpointing=true" in out.stdout
    assert "estimated at 3.6 characters per token" in out.stdout  # the gated tokenizer is not readable here


def test_cli_json() -> None:
    out = cli(
        "plan",
        "configs/tiny-cpu.yaml",
        "train.per_device_batch_size=4",
        "--instance-type",
        "ml.g6.2xlarge",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["target"]["gpu"]["name"] == "NVIDIA L4"
    assert plan["throughput"]["steps_per_epoch"] == 60
    assert plan["cost"]["usd"] == pytest.approx(plan["cost"]["billed_hours"] * 1.222)
    assert plan["cost"]["price_table_date"] == PRICE_TABLE_DATE
    assert plan["memory_bytes"]["peak_total"] > plan["memory_bytes"]["peak_reserved"]
    assert cli("plan", "configs/tiny-cpu.yaml", "--gpu", "tpu").returncode == 2


# Every GPU family SageMaker trains on: (an instance type, its GPU key, GPUs, MiB per GPU, bf16).
SAGEMAKER_GPUS = [
    ("ml.g4dn.xlarge", "t4", 1, 15360, False),
    ("ml.g4dn.12xlarge", "t4", 4, 15360, False),
    ("ml.p3.2xlarge", "v100", 1, 16160, False),
    ("ml.p3.16xlarge", "v100", 8, 16160, False),
    ("ml.p3dn.24xlarge", "v100-32gb", 8, 32480, False),
    ("ml.g5.xlarge", "a10g", 1, 23028, True),
    ("ml.g6.xlarge", "l4", 1, 23034, True),
    ("ml.g6e.xlarge", "l40s", 1, 46068, True),
    ("ml.p4d.24xlarge", "a100-40gb", 8, 40960, True),
    ("ml.p4de.24xlarge", "a100-80gb", 8, 81920, True),
    ("ml.p5.48xlarge", "h100", 8, 81559, True),
    ("ml.p5e.48xlarge", "h200", 8, 143771, True),
    ("ml.p5en.48xlarge", "h200", 8, 143771, True),
]


@pytest.mark.parametrize(("instance_type", "gpu", "count", "mib", "bf16"), SAGEMAKER_GPUS)
def test_sagemaker_gpus_in_the_table(instance_type: str, gpu: str, count: int, mib: int, bf16: bool) -> None:
    entry = INSTANCES[instance_type]
    assert (entry.gpu, entry.gpus) == (gpu, count)
    assert GPUS[gpu].memory_mib == mib and GPUS[gpu].bf16 is bf16
    assert instance_bf16(instance_type) is bf16


def test_instance_bf16_by_family() -> None:
    """deploy's dtype: a size the table lacks takes its family's flag; an unknown family is a newer card."""
    assert instance_bf16("ml.g4dn.metal") is False and instance_bf16("ml.p2.xlarge") is False
    assert instance_bf16("ml.g5.96xlarge") is True and instance_bf16("ml.g7e.2xlarge") is True


@pytest.mark.parametrize(
    ("instance_type", "precision"),
    [
        ("ml.g4dn.xlarge", "fp16"),
        ("ml.p3.2xlarge", "fp16"),
        ("ml.g5.2xlarge", "bf16"),
        ("ml.p5.48xlarge", "bf16"),
    ],
)
def test_plan_says_fp16_without_bf16(in_root: None, instance_type: str, precision: str) -> None:
    plan = make_plan(config_7b("llama2-7b-chat-qlora"), instance_type=instance_type, lengths=SKEWED)
    assert plan.precision == precision and plan.to_dict()["precision"] == precision
    assert any("has no bf16" in note for note in plan.notes) is (precision == "fp16")
    assert not plan.warnings


def test_plan_warns_when_bf16_is_asked_of_a_v100(in_root: None) -> None:
    config = config_7b("llama2-7b-chat-qlora", "train.precision=bf16")
    (warning,) = make_plan(config, gpu="v100", lengths=SKEWED).warnings
    assert "train.precision=bf16: the Tesla V100-SXM2-16GB has no bf16" in warning
    assert make_plan(config, gpu="a10g", lengths=SKEWED).warnings == []


def test_run_resolves_fp16_on_a_gpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A V100/T4 as torch sees it: bf16 only through emulation. The run must not take that for support."""
    import torch

    from sftbridge.config import TrainSection
    from sftbridge.models.loading import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision(TrainSection(), "cuda") == "fp16"
    assert resolve_precision(TrainSection(precision="bf16"), "cuda") == "bf16"  # asked for: taken as asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere+
    assert resolve_precision(TrainSection(), "cuda") == "bf16"


def test_an_instance_without_a_price_has_no_cost(in_root: None) -> None:
    config = config_7b("llama2-7b-chat-qlora")
    p5e = make_plan(config, instance_type="ml.p5e.48xlarge", lengths=SKEWED)
    assert INSTANCES["ml.p5e.48xlarge"].usd_per_hour is None
    assert p5e.cost is None and p5e.throughput.training_hours is not None and p5e.fits
    g4dn = make_plan(config, instance_type="ml.g4dn.xlarge", lengths=SKEWED)
    assert g4dn.cost is not None and g4dn.cost.usd == pytest.approx(g4dn.cost.billed_hours * 0.7364)


def test_train_warns_before_it_starts_when_it_will_barely_learn(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's path (JumpStart's defaults, submitted to SageMaker): said at `train`, dry run or not, in
    the words of the symptom the seed's user saw."""
    from sftbridge.cli import main

    monkeypatch.chdir(ROOT)
    for name, value in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "x"}.items():
        monkeypatch.setenv(name, value)
    seed = [
        "train",
        "configs/llama2-7b-chat-qlora-sagemaker.yaml",
        "backend.role=arn:aws:iam::123456789012:role/x",
    ]
    assert main([*seed, "--dry-run"]) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: 120 optimizer steps at train.learning_rate=0.0001 (linear)")
    assert "long, and not stopping where the references do" in warning and "issue 15" not in warning
    assert (
        main(
            [
                "train",
                "configs/tiny-cpu.yaml",
                "--backend",
                "sagemaker",
                "backend.role=arn:aws:iam::123456789012:role/x",
                "--dry-run",
            ]
        )
        == 0
    )
    assert "warning:" not in capsys.readouterr().err  # the built-in recipe learns


def test_dpo_plan_counts_two_rows_per_pair_and_the_reference(in_root: None) -> None:
    """A DPO micro-batch of B pairs is SFT's arithmetic on 2B rows, plus the frozen reference adapter and its
    no-grad forward in memory, and a third more work per step."""
    sft = make_plan(
        config_7b("llama2-7b-chat-lora", "train.per_device_batch_size=8", "train.group_by_length=false"),
        gpu="a100-40gb",
        lengths=SKEWED,
    )
    dpo = make_plan(
        config_7b("llama2-7b-chat-lora", "train.method=dpo", "train.per_device_batch_size=4"),
        gpu="a100-40gb",
        lengths=SKEWED,
    )
    lora_weights = dpo.memory.lora_params * 4  # fp32 adapters on a 16-bit base
    assert lora_weights < dpo.memory.reference < 0.5 * dpo.memory.activations
    assert dpo.memory.peak_total == pytest.approx(sft.memory.peak_total + dpo.memory.reference)
    assert dpo.throughput.steps_per_epoch == sft.throughput.steps_per_epoch == 13  # 50 pairs / 4
    assert dpo.throughput.training_hours == pytest.approx(sft.throughput.training_hours * 4 / 3)
    assert any(note.startswith("DPO: each pair is two rows") for note in dpo.notes)
    precomputed = make_plan(
        config_7b(
            "llama2-7b-chat-lora",
            "train.method=dpo",
            "train.per_device_batch_size=4",
            "train.dpo_precompute_ref_log_probs=true",
        ),
        gpu="a100-40gb",
        lengths=SKEWED,
    )
    assert precomputed.memory.reference == pytest.approx(lora_weights)
