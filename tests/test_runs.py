"""`sftbridge runs` and `sftbridge compare`: run folders listed and compared from what they hold."""

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sftbridge.cli import main
from sftbridge.config import load_config


def make_run(
    root: Path,
    name: str,
    *,
    overrides: list[str] | None = None,
    losses: tuple[float, ...] = (2.0, 1.5, 1.2),
    evaluation: dict[str, Any] | None = None,
    finished: bool = True,
    sha: str = "aa",
) -> Path:
    """A run folder laid out as training writes it (manifest keys as build_manifest writes them)."""
    config = load_config(None, ["data.train_file=data/sciq-sample/train.jsonl", *(overrides or [])]).to_dict()
    run = root / (name if finished else f".{name}.partial")
    run.mkdir(parents=True)
    lines = [
        {"time": 1.0 + i, "step": i + 1, "epoch": (i + 1) / 3, "loss": loss} for i, loss in enumerate(losses)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "lo')
    if finished:
        manifest = {
            "manifest_version": 1,
            "run_name": config["run_name"],
            "base_model": {"name_or_path": config["model"]["name_or_path"]},
            "prompt_format": {"format": "qa", "chat_format": "chat_template"},
            "generation": {},
            "config": config,
            "data": {"sha256": {"data/sciq-sample/train.jsonl": sha}},
            "backend": {"name": "local", "job_id": "local-run"},
            "metrics": {
                "train_loss": sum(losses) / len(losses),
                "global_step": len(losses),
                "eval_loss": None,
            },
        }
        (run / "sftbridge.json").write_text(json.dumps(manifest))
        (run / "COMPLETE").write_text("2026-03-01T10:00:00+00:00\n")
    if evaluation is not None:
        (run / "eval-test.json").write_text(json.dumps(evaluation))
    return run


EVAL = {
    "data": "data/sciq-sample/test.jsonl",
    "n": 60,
    "adapter": {"exact_match": 0.25, "contains": 0.5, "mean_answer_tokens": 4.0, "eos_rate": 1.0},
    "base": {"exact_match": 0.0, "contains": 0.1, "mean_answer_tokens": 24.0, "eos_rate": 0.0},
    "predictions_file": "eval-test-predictions.jsonl",
}


def test_runs_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path, "a-20260301", evaluation=EVAL)
    make_run(
        tmp_path,
        "b-20260302",
        overrides=["train.epochs=2", "model.name_or_path=meta-llama/Llama-2-7b-chat-hf"],
    )
    make_run(tmp_path, "c-20260303", finished=False)
    (tmp_path / "a-20260301.checkpoints" / "checkpoint-1").mkdir(parents=True)  # not a run
    (tmp_path / "notes").mkdir()  # not a run either
    (tmp_path / "merged").mkdir()  # `sftbridge merge` output has a manifest of its own kind
    (tmp_path / "merged" / "sftbridge.json").write_text(json.dumps({"kind": "merged", "run_name": "a"}))

    assert main(["runs", str(tmp_path), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"a-20260301", "b-20260302", "c-20260303"}
    a, b, c = rows["a-20260301"], rows["b-20260302"], rows["c-20260303"]
    # The epochs trained, as logged (train.epochs is 5; the log ends at epoch 1, as when max_steps cuts it)
    assert (a["finished"], a["base_model"], a["data"], a["epochs"]) == (
        True,
        "builtin:tiny-llama",
        "data/sciq-sample/train.jsonl",
        1.0,
    )
    assert (a["final_loss"], a["exact_match"], a["eos_rate"], a["backend"]) == (1.2, 0.25, 1.0, "local")
    assert a["eval_file"] == "eval-test.json"
    assert (b["epochs"], b["exact_match"], b["base_model"]) == (1.0, None, "meta-llama/Llama-2-7b-chat-hf")
    # still training (or crashed): no manifest, but its live metrics.jsonl says how far it got
    assert (c["finished"], c["final_loss"], c["global_step"], c["base_model"]) == (False, 1.2, 3, None)

    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "name", "status", "base", "model", "data", "epochs", "final", "loss", "exact", "match", "EOS", "rate",
        "backend", "date",
    ]  # fmt: skip
    row_a = next(line for line in lines if line.startswith("a-20260301"))
    assert row_a.split()[:9] == [
        "a-20260301",
        "done",
        "builtin:tiny-llama",
        "train.jsonl",
        "1",
        "1.2",
        "25.0%",
        "100.0%",
        "local",
    ]
    row_c = next(line for line in lines if line.startswith("c-20260303"))
    assert row_c.split()[:8] == ["c-20260303", "unfinished", "-", "-", "1", "1.2", "-", "-"]


def test_the_last_loss_says_its_step_when_the_run_went_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path, "sparse")
    manifest = json.loads((run / "sftbridge.json").read_text())
    manifest["metrics"]["global_step"] = 100  # logged at steps 1-3 only (logging_steps larger than the run)
    (run / "sftbridge.json").write_text(json.dumps(manifest))
    assert main(["runs", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sparse"))
    assert row.split()[5:7] == ["1.2", "@3"]


def test_runs_finds_the_runs_folder_inside_the_one_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "runs", "inner")
    assert main(["runs", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"no runs directly in {tmp_path}; these are in {tmp_path / 'runs'}:\n"
    assert captured.out.splitlines()[1].startswith("inner")


def test_runs_defaults_to_runs_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["runs"]) == 2
        assert "runs: no such folder of runs" in capsys.readouterr().err
        (tmp_path / "runs").mkdir()
        assert main(["runs"]) == 0
        assert capsys.readouterr().out == "no runs in runs\n"
    finally:
        os.chdir(cwd)


def test_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_run(tmp_path, "a", evaluation=EVAL)
    b = make_run(
        tmp_path, "b", overrides=["lora.r=16", "train.learning_rate=0.0002"], losses=(2.0, 1.0), sha="bb"
    )
    assert main(["compare", str(a), str(b), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["config"] == [
        {"key": "lora.r", "a": 8, "b": 16},
        {"key": "train.learning_rate", "a": 0.0001, "b": 0.0002},
    ]
    metrics = {row["metric"]: (row["a"], row["b"]) for row in body["metrics"]}
    assert metrics["final loss (last logged)"] == (1.2, 1.0)
    assert metrics["global_step"] == (3, 2)
    assert metrics["adapter exact_match"] == (0.25, None)
    assert metrics["base eos_rate"] == (0.0, None)
    assert body["same_data"] is False

    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    rows = {
        " ".join(line.split()[:-2]): line.split()[-2:] for line in out.splitlines() if len(line.split()) > 2
    }
    assert rows["lora.r"] == ["8", "16"]
    assert rows["adapter exact_match"] == ["0.25", "-"]
    assert rows["final loss (last logged)"] == ["1.2", "1"]
    assert "data files: different content (the data changed)" in out

    # The same bytes at another path are the same data.
    moved = make_run(tmp_path, "moved", sha="aa")
    manifest = json.loads((moved / "sftbridge.json").read_text())
    manifest["data"]["sha256"] = {"/elsewhere/train.jsonl": "aa"}
    (moved / "sftbridge.json").write_text(json.dumps(manifest))
    assert main(["compare", str(a), str(moved)]) == 0
    assert "data files: the same content (at other paths)" in capsys.readouterr().out


def test_compare_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = make_run(tmp_path, "a")
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(a), str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err
