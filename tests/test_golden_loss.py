"""The first training steps of the shipped tiny-cpu config, pinned loss by loss as torchtune pins its own.

Anything that changes what training computes (data rendering and masking, the tiny model or tokenizer, LoRA
setup, optimizer, scheduler, seeds, the SFTConfig that train.py builds) moves these numbers. A deliberate
change regenerates them; an accidental one fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT

STEPS = 6

# Produced by this test (fp32 on the CPU; torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2, trl 1.16.0)
# on an x86-64 CPU with AVX-512. Re-running with ATEN_CPU_CAPABILITY=avx2 or =default (no SIMD kernels) and
# with 1 or 2 threads moved no value by more than 4e-7 relative: rtol 1e-3 leaves room for other CPUs and
# library patch releases, while a learning rate of 4e-3 instead of 5e-3 moves step 2 by 2% and step 3 by 10%.
# They hold for STEPS only: the linear schedule decays the learning rate over train.max_steps.
# To regenerate after a deliberate change: run this test; its failure message lists the losses it got.
GOLDEN_LOSSES = [
    8.593215942382812,
    7.039321422576904,
    7.082170486450195,
    7.064199447631836,
    6.225834846496582,
    6.633705139160156,
]


def test_first_steps_match_the_golden_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training only (train.py's prepare and fit phases): the losses as logged to metrics.jsonl. The answer
    metrics only generate between steps (greedy, no gradient): off, they change no loss."""
    from sftbridge.config import load_config
    from sftbridge.training.train import fit, prepare

    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the repository root
    config = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [f"train.max_steps={STEPS}", "train.logging_steps=1", "train.answer_metrics=false"],
    )
    run = prepare(config, tmp_path / "run")
    fit(run)
    rows = [json.loads(line) for line in run.live_metrics.path.read_text().splitlines()]
    logged = [row for row in rows if "loss" in row]
    assert [row["step"] for row in logged] == list(range(1, STEPS + 1))
    losses = [row["loss"] for row in logged]
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-3), f"losses of steps 1-{STEPS}: {losses}"


def test_a_file_added_beside_the_sample_data_leaves_the_tokenizer_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The built-in tokenizer trains on the two named sample files only: DPO's padded answers, put in
    data/sciq-sample/, once changed the built-in model (and these losses) without a word."""
    import shutil

    from sftbridge.models import builtin

    sample = tmp_path / "sciq-sample"
    shutil.copytree(ROOT / "data" / "sciq-sample", sample)
    monkeypatch.setattr(builtin, "sample_data_dir", lambda: sample)
    corpus = builtin._corpus()
    (sample / "extra.jsonl").write_text(json.dumps({"question": "zebra?", "correct_answer": "quagga"}) + "\n")
    assert builtin._corpus() == corpus
