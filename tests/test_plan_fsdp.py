"""``sftbridge plan`` under ``train.fsdp``: memory per GPU for N GPUs, the load peak, what instance fits."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import ROOT
from sftbridge.config import load_config
from sftbridge.data.encoding import Lengths
from sftbridge.planning.estimate import GB, make_plan
from sftbridge.planning.fsdp import QUANT_CONSTANT_BITS, layer_weight_bytes
from sftbridge.planning.hardware import GPUS
from sftbridge.planning.model_shapes import KNOWN_SHAPES

LLAMA2_7B = KNOWN_SHAPES["meta-llama/llama-2-7b-chat-hf"]
LLAMA2_70B = KNOWN_SHAPES["meta-llama/llama-2-70b-chat-hf"]
LENGTHS = Lengths([200] * 64, [50] * 64, "test")
# The command: Llama-2-70B QLoRA, FSDP on one ml.g5.12xlarge (4 x A10G, 24 GB each)
SEVENTY_B = (
    "model.name_or_path=meta-llama/Llama-2-70b-chat-hf",
    "train.fsdp=true",
    "train.per_device_batch_size=1",
)


@pytest.fixture(autouse=True)
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the shipped configs name data/ relative to the repository root


def plan(name: str, *overrides: str, **where: Any) -> Any:
    return make_plan(
        load_config(ROOT / "configs" / f"{name}.yaml", list(overrides)), lengths=LENGTHS, **where
    )


def test_16bit_lora_shards_weights_and_adapter_state_across_the_gpus() -> None:
    whole = plan("llama2-7b-chat-lora", instance_type="ml.g5.12xlarge")
    sharded = plan("llama2-7b-chat-lora", "train.fsdp=true", instance_type="ml.g5.12xlarge")
    f = sharded.sharded
    assert whole.sharded is None and f is not None and f.gpus == 4
    assert f.sharded_weights == pytest.approx(sharded.memory.weights / 4)
    assert f.sharded_lora_state == pytest.approx(sharded.memory.lora_state / 4)
    assert f.quant_constants == 0 and f.load_peak == 0  # a 16-bit base loads in host RAM, then is sharded
    # Two whole decoder layers (computing + prefetched) and the tail (final norm + lm_head), bf16
    layer = (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2 + 2 * 4096 * 2
    assert layer_weight_bytes(LLAMA2_7B, 16, 2) == layer
    assert f.gathered == 2 * layer + 32000 * 4096 * 2 + 4096 * 2
    assert f.host_bytes == pytest.approx(4 * sharded.memory.weights)  # every rank of the node reads the base
    assert f.peak_total < sharded.memory.peak_total
    assert sharded.fits is True and sharded.memory.peak_total > 0  # (13.5 GB of weights alone before FSDP)


def test_70b_qlora_on_four_a10g_trains_within_them_but_cannot_load() -> None:
    """The 4-bit base is quantized whole on each GPU before it is sharded: that load peak decides."""
    p = plan("llama2-7b-chat-qlora", *SEVENTY_B, instance_type="ml.g5.12xlarge")
    f = p.sharded
    a10g = GPUS["a10g"].memory_bytes
    assert f is not None and f.gpus == 4
    assert f.quant_constants == pytest.approx(LLAMA2_70B.decoder_linear_params * QUANT_CONSTANT_BITS / 8)
    assert f.sharded_weights == pytest.approx((p.memory.weights - f.quant_constants) / 4)
    assert f.peak_total < a10g < f.load_peak
    assert p.fits is False
    assert "will not fit" in p.warnings[0]
    # no key lowers the load peak (offload moves shards after loading): the advice is the instance that fits
    assert "offload" not in p.warnings[0] and "an instance that fits, ml.g6e.12xlarge" in p.warnings[0]
    cheapest = p.fitting_instances[0]
    assert cheapest.instance_type == "ml.g6e.12xlarge" and cheapest.gpus == 4  # 4 x L40S, 48 GB each
    prices = [fit.usd_per_hour for fit in p.fitting_instances if fit.usd_per_hour is not None]
    assert prices == sorted(prices)


def test_offload_moves_the_shards_to_host_ram() -> None:
    on_gpu = plan("llama2-7b-chat-lora", "train.fsdp=true", instance_type="ml.g5.12xlarge").sharded
    offloaded = plan(
        "llama2-7b-chat-lora", "train.fsdp=true", "train.fsdp_offload=true", instance_type="ml.g5.12xlarge"
    ).sharded
    assert on_gpu is not None and offloaded is not None
    assert offloaded.peak_total == pytest.approx(
        on_gpu.peak_total - (on_gpu.sharded_weights + on_gpu.sharded_lora_state) * 1.10, rel=1e-9
    )


def test_gpu_option_counts_the_local_processes() -> None:
    p = plan("llama2-7b-chat-lora", "train.fsdp=true", "backend.num_processes=2", gpu="rtx4090")
    assert p.sharded is not None and p.sharded.gpus == 2


def test_the_report_prints_memory_per_gpu_and_whether_it_fits() -> None:
    """What the issue's `sftbridge plan ... --instance-type ml.g5.12xlarge` prints (render, in process)."""
    from sftbridge.cli.plan import render

    config = load_config(ROOT / "configs" / "llama2-7b-chat-qlora.yaml", list(SEVENTY_B))
    out = render(make_plan(config, instance_type="ml.g5.12xlarge", lengths=LENGTHS), config)
    assert "per GPU under FSDP, 4 GPUs" in out
    assert "peak total, training: " in out and "peak total, loading " in out
    assert "fits      NO (per GPU, under FSDP)" in out
    assert "fits on   ml.g6e.12xlarge (4 x NVIDIA L40S" in out
    assert f"{GPUS['a10g'].memory_bytes / GB:.1f} GB of the NVIDIA A10G" in out
