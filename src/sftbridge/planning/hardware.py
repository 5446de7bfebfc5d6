"""The machines a plan is checked against: GPUs (memory, 16-bit peak, bf16 or not) and SageMaker instances
with their prices.

One table each; ``sftbridge plan``, the SageMaker training backend, ``deploy`` and the benchmarks read them
from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

MIB = 1 << 20


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int  # total, as nvidia-smi reports it
    # Dense tensor-core peak (no sparsity, NVIDIA datasheets) of the 16-bit type the card trains in: bf16, or
    # fp16 where it has no bf16 (V100, T4)
    peak_tflops: float
    mfu: float  # ASSUMED model-FLOPs utilisation of 16-bit LoRA (4N accounting); replace with measured values
    bf16: bool = True  # Ampere and newer; before it, training runs in fp16 (models.loading.resolve_precision)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


# The MFU column is an assumption, not a measurement: HF/TRL LoRA on 7B-class models reaches roughly a third
# of the dense peak on A100s; faster cards lose more to launch overhead. Replace with the harness's figures.
GPUS: dict[str, Gpu] = {
    # Kepler: no 16-bit tensor math (the figure is its fp32 peak per GPU, half a K80 board); current PyTorch
    # builds no longer run on it. Listed so that deploy picks fp16 for ml.p2 as it always did.
    "k80": Gpu("Tesla K80", 11441, 4.37, 0.30, bf16=False),
    "t4": Gpu("Tesla T4", 15360, 65.0, 0.30, bf16=False),  # fp16 tensor peak
    "v100": Gpu("Tesla V100-SXM2-16GB", 16160, 125.0, 0.30, bf16=False),  # fp16 tensor peak, SXM2
    "v100-32gb": Gpu("Tesla V100-SXM2-32GB", 32480, 125.0, 0.30, bf16=False),
    # NVIDIA publishes no A10G datasheet; it is GA102 like the A10, whose 125 TFLOPS bf16 is used here.
    "a10g": Gpu("NVIDIA A10G", 23028, 125.0, 0.30),
    "a10": Gpu("NVIDIA A10", 23028, 125.0, 0.30),
    "l4": Gpu("NVIDIA L4", 23034, 121.0, 0.30),
    "l40s": Gpu("NVIDIA L40S", 46068, 362.0, 0.30),
    "rtx4090": Gpu("NVIDIA GeForce RTX 4090", 24564, 165.2, 0.30),
    "a100-40gb": Gpu("NVIDIA A100 40GB", 40960, 312.0, 0.35),
    "a100-80gb": Gpu("NVIDIA A100 80GB", 81920, 312.0, 0.35),
    "h100": Gpu("NVIDIA H100 80GB HBM3", 81559, 989.0, 0.30),
    "h200": Gpu("NVIDIA H200", 143771, 989.0, 0.30),
}
GPU_ALIASES = {"a100": "a100-40gb", "4090": "rtx4090", "h100-80gb": "h100", "v100-16gb": "v100"}

# SageMaker training, on-demand, us-east-1, USD per instance-hour. Spot is billed at the spot price (often
# 60-70% less). None = no source found: never a guess.
# - g5/g6/g6e/p4d: the AWS Price List API's SageMaker training rates as published in August 2026 (g5 and p4d
#   unchanged since June 2024); p5: a public listing of the same month, not checked against AWS.
# - g4dn/p3/p3dn (added 2026-12-01): the table copied from https://aws.amazon.com/sagemaker/pricing/ in
#   github.com/goerlitz/nlp-classification, notebooks/10kGNAD/sagemaker/README.md (undated, region not stated:
#   that page's default is us-east-1); github.com/JHUAPL-DTC-TA2/wiki docs/sagemaker_instances.md gives the
#   same p3.2xlarge, p3.8xlarge, g4dn.4xlarge and g4dn.8xlarge rates. Not checked against the Price List API.
# - p2, p4de, p5e, p5en: no source found on 2026-12-01 (searched public pages and code): None.
PRICE_TABLE_DATE = "2026-08 (g4dn/p3: 2026-12-01)"
PRICE_TABLE_NOTE = "on-demand SageMaker training, us-east-1; other regions differ, verify before budgeting"


class Instance(NamedTuple):
    gpu: str  # key of GPUS
    gpus: int  # per instance
    usd_per_hour: float | None  # SageMaker training, on demand; None = no published price checked


INSTANCES: dict[str, Instance] = {
    "ml.p2.xlarge": Instance("k80", 1, None),
    "ml.p2.8xlarge": Instance("k80", 8, None),
    "ml.p2.16xlarge": Instance("k80", 16, None),
    "ml.g4dn.xlarge": Instance("t4", 1, 0.7364),
    "ml.g4dn.2xlarge": Instance("t4", 1, 0.94),
    "ml.g4dn.4xlarge": Instance("t4", 1, 1.505),
    "ml.g4dn.8xlarge": Instance("t4", 1, 2.72),
    "ml.g4dn.16xlarge": Instance("t4", 1, 5.44),
    "ml.g4dn.12xlarge": Instance("t4", 4, 4.89),
    "ml.p3.2xlarge": Instance("v100", 1, 3.825),
    "ml.p3.8xlarge": Instance("v100", 4, 14.688),
    "ml.p3.16xlarge": Instance("v100", 8, 28.152),
    "ml.p3dn.24xlarge": Instance("v100-32gb", 8, 35.894),
    "ml.g5.xlarge": Instance("a10g", 1, 1.408),
    "ml.g5.2xlarge": Instance("a10g", 1, 1.515),
    "ml.g5.4xlarge": Instance("a10g", 1, 2.03),
    "ml.g5.8xlarge": Instance("a10g", 1, 3.06),
    "ml.g5.16xlarge": Instance("a10g", 1, 5.12),
    "ml.g5.12xlarge": Instance("a10g", 4, 7.09),
    "ml.g5.24xlarge": Instance("a10g", 4, 10.18),
    "ml.g5.48xlarge": Instance("a10g", 8, 20.36),
    "ml.g6.xlarge": Instance("l4", 1, 1.127),
    "ml.g6.2xlarge": Instance("l4", 1, 1.222),
    "ml.g6.4xlarge": Instance("l4", 1, 1.654),
    "ml.g6.8xlarge": Instance("l4", 1, 2.518),
    "ml.g6.16xlarge": Instance("l4", 1, None),
    "ml.g6.12xlarge": Instance("l4", 4, 5.752),
    "ml.g6.24xlarge": Instance("l4", 4, 8.344),
    "ml.g6.48xlarge": Instance("l4", 8, 16.688),
    "ml.g6e.xlarge": Instance("l40s", 1, 2.61),
    "ml.g6e.2xlarge": Instance("l40s", 1, 2.80),
    "ml.g6e.4xlarge": Instance("l40s", 1, None),
    "ml.g6e.8xlarge": Instance("l40s", 1, None),
    "ml.g6e.16xlarge": Instance("l40s", 1, None),
    "ml.g6e.12xlarge": Instance("l40s", 4, 13.12),
    "ml.g6e.24xlarge": Instance("l40s", 4, None),
    "ml.g6e.48xlarge": Instance("l40s", 8, None),
    "ml.p4d.24xlarge": Instance("a100-40gb", 8, 37.688),
    "ml.p4de.24xlarge": Instance("a100-80gb", 8, None),
    "ml.p5.48xlarge": Instance("h100", 8, 113.07),
    "ml.p5e.48xlarge": Instance("h200", 8, None),
    "ml.p5en.48xlarge": Instance("h200", 8, None),
}


def gpu_count(instance_type: str) -> int:
    """GPUs of an instance: from the table, else 1 for the g and p families and 0 for the others."""
    if instance_type in INSTANCES:
        return INSTANCES[instance_type].gpus
    family = instance_type.split(".")[1] if instance_type.count(".") == 2 else ""
    return 1 if family[:1] in ("g", "p") else 0


def price_per_hour(instance_type: str, count: int = 1) -> float | None:
    """On-demand USD per hour for ``count`` instances; None when the table has no price for the type."""
    entry = INSTANCES.get(instance_type)
    price = entry.usd_per_hour if entry else None
    return None if price is None else round(price * count, 3)


def gpu_memory(instance_type: str) -> tuple[int, int] | None:
    """(GPUs, total GPU MiB) of an instance in the table; None for one it does not list."""
    entry = INSTANCES.get(instance_type)
    return None if entry is None else (entry.gpus, entry.gpus * GPUS[entry.gpu].memory_mib)


def instance_bf16(instance_type: str) -> bool:
    """Whether an instance's GPUs compute in bf16: the table's flag for the type, or for a listed type of the
    same family (``ml.g4dn.*``); True for a family the table does not list (newer cards all have bf16)."""
    entry = INSTANCES.get(instance_type)
    if entry is None:
        family = instance_type.split(".")[1] if instance_type.count(".") == 2 else ""
        entry = next((e for name, e in INSTANCES.items() if name.split(".")[1] == family), None)
    return entry is None or GPUS[entry.gpu].bf16
