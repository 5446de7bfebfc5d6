"""The report's figures with matplotlib (Agg: no display), each returned as a base64 PNG for an <img> tag."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: renders to memory on any machine, no display needed

import matplotlib.pyplot as plt

from sftbridge.data.encoding import Lengths

COLORS = {"adapter": "#1f77b4", "base": "#d62728", "reference": "#2ca02c"}
TITLES = {
    "loss": "Loss",
    "learning_rate": "Learning rate",
    "grad_norm": "Gradient norm",
}


def png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Panels that hold several curves: DPO's rewards of the chosen and rejected answers beside their margin, and
# the share of pairs where the chosen one wins (training and evaluation alike).
SHARED_PANELS = {
    "Loss": ("loss", "eval_loss"),
    "DPO rewards": tuple(
        f"{prefix}rewards/{name}" for prefix in ("", "eval_") for name in ("chosen", "rejected", "margins")
    ),
    "DPO reward accuracy": ("rewards/accuracies", "eval_rewards/accuracies"),
}


def curve_groups(curves: dict[str, list[tuple[float, float]]]) -> list[tuple[str, list[str]]]:
    """One panel per quantity: train and eval loss share one, DPO's rewards two, every other metric has its
    own."""
    groups: list[tuple[str, list[str]]] = []
    for title, keys in SHARED_PANELS.items():
        present = [key for key in keys if key in curves]
        if present:
            groups.append((title, present))
    shared = {key for keys in SHARED_PANELS.values() for key in keys}
    for key in curves:
        if key not in shared:
            groups.append((TITLES.get(key, key.replace("_", " ")), [key]))
    return groups


def curve(title: str, keys: list[str], curves: dict[str, list[tuple[float, float]]]) -> str:
    figure, axes = plt.subplots(figsize=(5, 3))
    for key in keys:
        steps, values = zip(*curves[key], strict=True)
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if len(keys) > 1:
        axes.legend()
    return png(figure)


def answer_lengths(series: dict[str, list[int]], max_new_tokens: int | None) -> str:
    """Overlaid histograms of answer lengths in tokens: verbosity at a glance."""
    figure, axes = plt.subplots(figsize=(7, 3.5))
    top = max(max(values) for values in series.values() if values)
    bins = list(range(0, top + 2, max(1, (top + 1) // 40 + 1)))
    for name, values in series.items():
        if values:
            mean = sum(values) / len(values)
            axes.hist(
                values,
                bins=bins,
                histtype="step",
                linewidth=2,
                color=COLORS.get(name),
                label=f"{name} (mean {mean:.1f})",
            )
    if max_new_tokens:
        axes.axvline(
            max_new_tokens,
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"max_new_tokens {max_new_tokens}",
        )
    axes.set_title("Answer length")
    axes.set_xlabel("tokens")
    axes.set_ylabel("answers")
    axes.legend()
    axes.grid(alpha=0.3)
    return png(figure)


def data_lengths(lengths: dict[str, Lengths], max_length: int) -> str:
    """Example lengths (prompt + answer) per split, with data.max_length marked."""
    figure, axes = plt.subplots(figsize=(7, 3.5))
    for split, values in lengths.items():
        axes.hist(values.tokens, bins=30, alpha=0.6, label=f"{split} ({len(values.tokens)} examples)")
    if max_length <= 2 * max(max(v.tokens) for v in lengths.values()):
        axes.axvline(
            max_length, color="black", linestyle="--", linewidth=1, label=f"data.max_length {max_length}"
        )
    axes.set_title("Example length (prompt + answer)")
    axes.set_xlabel("tokens")
    axes.set_ylabel("examples")
    axes.legend()
    axes.grid(alpha=0.3)
    return png(figure)
