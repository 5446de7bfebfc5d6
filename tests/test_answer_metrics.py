"""Answer metrics while training (issue 15): the schedule, the verdict, keep-the-best keys, and real runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, SAMPLE_TRAIN, run_cli, write_jsonl
from sftbridge.config import load_config
from sftbridge.errors import ConfigError
from sftbridge.training.answer_metrics import KEYS, REFERENCE_TOKENS, schedule, verdict


def figures(exact: float, tokens: float, eos: float, reference: float = 3.0) -> dict[str, float]:
    return {
        KEYS["exact_match"]: exact,
        KEYS["contains"]: exact,
        KEYS["mean_answer_tokens"]: tokens,
        KEYS["eos_rate"]: eos,
        REFERENCE_TOKENS: reference,
    }


def test_schedule_every_epoch_when_few_else_ten_points() -> None:
    assert schedule(100, 5, 10) == [20, 40, 60, 80, 100]  # 5 epochs: each epoch's end
    assert schedule(450, 30, 10) == [45 * k for k in range(1, 11)]  # tiny-cpu: 30 epochs, 10 points
    assert schedule(3, 30, 10) == [1, 2, 3]  # never more points than steps, never step 0
    assert schedule(7, 2.5, 10) == [2, 5, 7]


def test_verdict_learned_and_not() -> None:
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml", ["train.learning_rate=1e-7"])
    good = verdict(
        figures(0.0, 21, 0.0), figures(0.95, 3.1, 1.0), config=config, steps=450, n=32, source="train"
    )
    assert good.learned and good.message == "" and good.problems == []
    bad = verdict(
        figures(0.0, 21, 0.0), figures(0.0, 20.0, 0.1), config=config, steps=450, n=32, source="train"
    )
    assert not bad.learned and len(bad.problems) == 3
    for text in (
        "exact match 0% is no better than the base model's 0%",
        "answers run 20.0 tokens against 3.0",
        "only 10% of the answers stop at EOS",
        "450 optimizer steps at train.learning_rate=1e-07",
        "q_proj, k_proj, v_proj",
        "train.learning_rate",
        "lora.target_modules",
        "configs/facts-small-model.yaml",
    ):
        assert text in bad.message
    # train.max_steps cut the run short: the verdict names it, and suggests no lower learning rate.
    cut_config = load_config(
        ROOT / "configs" / "tiny-cpu.yaml", ["train.max_steps=100", "train.learning_rate=0.005"]
    )
    cut = verdict(
        figures(0.0, 21, 0.0),
        figures(0.0, 20.0, 0.1),
        config=cut_config,
        steps=100,
        n=32,
        source="train",
        epochs=6.67,
    )
    assert "stopped by train.max_steps=100 after 6.67 of train.epochs=30" in cut.message
    keys = cut.message.split("Keys to change: ")[1]
    assert keys.startswith("train.max_steps (-1 trains every epoch)")
    assert "train.learning_rate" not in keys and "train.epochs" not in keys
    # A perfect base cannot be beaten: that is not a failure to learn.
    assert verdict(
        figures(1.0, 3, 1.0), figures(1.0, 3, 1.0), config=config, steps=9, n=4, source="x"
    ).learned


def test_keep_best_needs_evaluations_and_aligned_checkpoints() -> None:
    config = ROOT / "configs" / "tiny-cpu.yaml"
    with pytest.raises(ConfigError, match=r"train\.eval_strategy=epoch"):
        load_config(config, ["train.load_best_model_at_end=true"])
    with pytest.raises(ConfigError, match="save_steps"):
        load_config(
            config, ["train.eval_strategy=epoch", "train.load_best_model_at_end=true"]
        )  # save_steps 150
    ok = load_config(
        config,
        [
            "train.eval_strategy=epoch",
            "train.save_steps=null",
            "train.load_best_model_at_end=true",
            "train.metric_for_best_model=answer_exact_match",
            "train.early_stopping_patience=2",
        ],
    )
    assert ok.train.metric_for_best_model == "answer_exact_match"


def small_run(tmp_path: Path, *overrides: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """tiny-cpu on 32 sample pairs for 3 epochs (6 steps), in this process."""
    from sftbridge.training.train import train

    rows = SAMPLE_TRAIN.read_text().splitlines()[:32]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    config = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [
            f"data.train_file={data}",
            "data.test_file=null",
            "train.epochs=3",
            "train.save_steps=null",
            "train.logging_steps=1",
            *overrides,
        ],
    )
    run = train(config, tmp_path / "run")
    manifest = json.loads((run / "sftbridge.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return manifest, metrics


@pytest.mark.slow  # ~30 s alone on 2 cores; minutes on a loaded machine
def test_a_run_logs_answer_metrics_per_epoch_and_an_undertrained_one_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    manifest, metrics = small_run(tmp_path, "train.learning_rate=1e-7")
    answers = [m for m in metrics if "answer_exact_match" in m]
    assert [m["step"] for m in answers] == [2, 4, 6]  # 3 epochs of 2 steps: every epoch
    assert "base_answer_exact_match" in answers[0] and "base_answer_exact_match" not in answers[1]
    for entry in answers:
        assert 0.0 <= entry["answer_exact_match"] <= entry["answer_contains"] <= 1.0
        assert 0.0 <= entry["answer_eos_rate"] <= 1.0
        assert 0 < entry["answer_mean_tokens"] <= manifest["answer_metrics"]["max_new_tokens"]
    record = manifest["answer_metrics"]
    assert record["sample"] == 32 and record["source"] == "train" and record["steps"] == [2, 4, 6]
    assert record["final"]["answer_exact_match"] == answers[-1]["answer_exact_match"]
    # lr 1e-7 leaves the adapter where the base was: the verdict says so, with its figures.
    assert record["verdict"]["learned"] is False
    assert "no better than the base model's" in " ".join(record["verdict"]["problems"])
    warning = [r.getMessage() for r in caplog.records if "did not learn" in r.getMessage()]
    assert warning and "train.learning_rate=1e-07" in warning[0] and "6 optimizer steps" in warning[0]
    assert manifest["best_model"]["load_best_model_at_end"] is False


@pytest.mark.slow
def test_answer_metrics_off(tmp_path: Path) -> None:
    manifest, metrics = small_run(tmp_path, "train.answer_metrics=false", "train.epochs=1")
    assert manifest.get("answer_metrics") is None
    assert not any(key.startswith(("answer_", "base_answer_")) for m in metrics for key in m)


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    """lr 1e-7 leaves the greedy answers as they were, so exact match never improves after the first
    evaluation: patience 1 stops at the second, and the run's adapter is the first evaluation's checkpoint."""
    from safetensors.torch import load_file

    checkpoints = tmp_path / "checkpoints"
    manifest, metrics = small_run(
        tmp_path,
        "train.epochs=5",
        "train.learning_rate=1e-7",
        "data.validation_split_ratio=0.25",  # 24 trained, 8 asked: 2 steps an epoch at batch 16
        "train.eval_strategy=epoch",
        "train.load_best_model_at_end=true",
        "train.metric_for_best_model=answer_exact_match",
        "train.early_stopping_patience=1",
        f"train.checkpoint_dir={checkpoints}",  # kept after the run, to compare with
    )
    evaluations = [m for m in metrics if "eval_loss" in m]
    # stopped after the second of five epochs; then the final evaluation, of the adapter the run keeps
    assert [m["step"] for m in evaluations] == [2, 4, 4]
    assert evaluations[-1]["eval_loss"] == pytest.approx(evaluations[0]["eval_loss"], rel=1e-6)
    best = manifest["best_model"]
    assert best["best_step"] == 2 and best["stopped_early"] is True
    at_step_2 = next(m for m in metrics if "answer_exact_match" in m and m["step"] == 2)
    assert best["metric"] == "answer_exact_match"
    assert best["best_metric"] == at_step_2["answer_exact_match"]
    assert Path(best["loaded_from"]).name == "checkpoint-2"
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    chosen = load_file(checkpoints / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(checkpoints / "checkpoint-4" / "adapter_model.safetensors")
    assert adapter.keys() == chosen.keys()
    assert all(adapter[k].equal(chosen[k]) for k in adapter)
    assert not all(adapter[k].equal(last[k]) for k in adapter)  # lr 1e-7 still moved the weights


@pytest.mark.slow  # ~1 minute on 2 cores: 1200 steps of the built-in model
def test_the_facts_recipe_learns_the_sample_data(tmp_path: Path) -> None:
    """configs/facts-small-model.yaml as a user runs it: ≥ 90% exact match on the trained questions it asks,
    answers about as long as the references, and no verdict warning."""
    result = run_cli("train", "configs/facts-small-model.yaml", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "did not learn" not in result.stdout + result.stderr
    record = json.loads((tmp_path / "run" / "sftbridge.json").read_text())["answer_metrics"]
    final = record["final"]
    assert record["source"] == "train" and record["sample"] == 32
    assert final["answer_exact_match"] >= 0.9, final
    assert final["answer_eos_rate"] >= 0.9 and final["answer_mean_tokens"] <= 1.5 * final[REFERENCE_TOKENS]
    assert record["verdict"]["learned"] is True
