"""``benchmarks/gpu_check.sh --smoke``: the GPU check's every step on the CPU (tiny model, a few steps), so
that the one device session that runs it for real spends its minutes measuring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

HARNESS_VARIANTS = {  # the CPU runs every variant but the CUDA-only ones (Liger, paged 8-bit AdamW)
    "baseline",
    "sftbridge",
    "+group_by_length",
    "+packing",
    "+padding_free",
    "+gradient_checkpointing",
}


@pytest.mark.slow
def test_smoke_writes_every_result(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--smoke", "--results", str(results), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {
        "e2e-qlora-smoke",
        "harness-tiny-lora-128-smoke",
        "harness-tiny-lora-256-smoke",
    }
    expected = {f"{n}.{ext}" for n in names for ext in ("md", "json")} | {"gpu-check-smoke.log"}
    assert {p.name for p in results.iterdir()} == expected
    assert {p.name for p in out.iterdir()} == expected  # what the device call brings back

    e2e = json.loads((results / "e2e-qlora-smoke.json").read_text())
    assert e2e["steps"] == {"train": "ok", "eval": "ok", "merge": "ok", "generate": "ok"}
    assert e2e["load_in_4bit"] is True and e2e["device"]["type"] == "cpu"
    assert e2e["global_step"] == 6 and e2e["loss_last"] < e2e["loss_first"]
    assert e2e["eval"]["n"] == 8 and {"adapter", "base"} <= set(e2e["eval"])
    assert "model.safetensors" in e2e["merged_files"] and "config.json" in e2e["merged_files"]
    assert e2e["generate"].strip()

    # every variant in the first configuration; the second, to keep the smoke short, the baseline and default
    for name, expected_variants in (
        ("harness-tiny-lora-128-smoke", HARNESS_VARIANTS),
        ("harness-tiny-lora-256-smoke", {"baseline", "+group_by_length"}),
    ):
        payload = json.loads((results / f"{name}.json").read_text())
        variants = payload["variants"]
        assert set(variants) == expected_variants
        for variant, r in variants.items():
            assert "error" not in r, (name, variant, r)
            assert r["steps"] == 5 and r["step_seconds"] > 0 and r["tokens_per_second"] > 0
            assert r["peak_memory_bytes"] > 0
            assert 0 < r["non_pad_share"] <= 1 and r["plan_peak_bytes"] > 0
            # the same order as plain TRL: a figure 30x off means something else ran inside train_runtime
            assert r["tokens_per_second_vs_baseline"] > 0.25, (name, variant, r)
        if "+packing" in variants:
            assert variants["+packing"]["non_pad_share"] == pytest.approx(1.0, abs=0.02)
        assert variants["+group_by_length"]["non_pad_share"] > variants["baseline"]["non_pad_share"]
        table = (results / f"{name}.md").read_text()
        assert "| baseline |" in table and "plan peak (error)" in table and "Attention: sdpa" in table
