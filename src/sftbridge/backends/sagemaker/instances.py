"""SageMaker training instances for the backend: GPUs per instance and the hourly price.

The one price table lives in ``sftbridge.planning.hardware`` (``INSTANCES``, dated ``PRICE_TABLE_DATE``);
this module only answers the backend's two questions, with a family rule for types the table does not list.
"""

from __future__ import annotations

from sftbridge.planning.hardware import INSTANCES, PRICE_TABLE_DATE

__all__ = ["PRICE_TABLE_DATE", "gpu_count", "price_per_hour"]


def gpu_count(instance_type: str) -> int:
    """GPUs of a training instance: from the table, else 1 for the g and p families and 0 for the others."""
    if instance_type in INSTANCES:
        return INSTANCES[instance_type][1]
    family = instance_type.split(".")[1] if instance_type.count(".") == 2 else ""
    return 1 if family[:1] in ("g", "p") else 0


def price_per_hour(instance_type: str, count: int = 1) -> float | None:
    """On-demand USD per hour for ``count`` instances; None when the table has no price for the type."""
    entry = INSTANCES.get(instance_type)
    price = entry[2] if entry else None
    return None if price is None else round(price * count, 3)
