"""The machines a plan is checked against: GPUs (memory, bf16 peak) and SageMaker instances with their prices.

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
    bf16_tflops: float  # dense peak (no sparsity), NVIDIA datasheets
    mfu: float  # ASSUMED model-FLOPs utilisation of bf16 LoRA (4N accounting); replace with measured values

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


# The MFU column is an assumption, not a measurement: HF/TRL LoRA on 7B-class models reaches roughly a third
# of the dense peak on A100s; faster cards lose more to launch overhead. Replace with the harness's figures.
GPUS: dict[str, Gpu] = {
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
GPU_ALIASES = {"a100": "a100-40gb", "4090": "rtx4090", "h100-80gb": "h100"}

# SageMaker training, on-demand, us-east-1, USD per instance-hour. g5/g6/g6e/p4d: the AWS Price List API's
# SageMaker training rates as published in August 2026 (g5 and p4d unchanged since June 2024); p5: a public
# listing of the same month, not checked against AWS. Spot is billed at the spot price (often 60-70% less).
PRICE_TABLE_DATE = "2026-08"
PRICE_TABLE_NOTE = "on-demand SageMaker training, us-east-1; other regions differ, verify before budgeting"


class Instance(NamedTuple):
    gpu: str  # key of GPUS
    gpus: int  # per instance
    usd_per_hour: float | None  # SageMaker training, on demand; None = no published price checked


INSTANCES: dict[str, Instance] = {
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
