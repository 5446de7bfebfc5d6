"""`sftbridge eval`: every prediction written beside the summary, progress shown, eval loss reported."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import SAMPLE_TRAIN, run_cli

PREDICTION_KEYS = {
    "where",
    "question",
    "reference",
    "reference_tokens",
    *(
        f"{side}_{key}"
        for side in ("adapter", "base")
        for key in ("answer", "tokens", "stopped_at_eos", "exact_match", "loss")
    ),
}


@pytest.fixture(scope="module")
def run_copy(short_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's short run, copied: eval writes into a run directory."""
    return Path(shutil.copytree(short_run, tmp_path_factory.mktemp("eval") / "run"))


@pytest.mark.slow
def test_eval_writes_predictions_into_the_run_and_refreshes_its_report(run_copy: Path) -> None:
    """In a subprocess: piped output has no progress bar, and the libraries read that once, at import."""
    result = run_cli("eval", str(run_copy), "--data", str(SAMPLE_TRAIN), "--limit", "6", "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    summary_path = run_copy / "eval-train.json"
    predictions_path = run_copy / "eval-train-predictions.jsonl"
    assert f"summary: {summary_path}" in result.stdout and f"predictions: {predictions_path}" in result.stdout
    assert "eval_loss" in result.stdout
    # Piped: progress as occasional lines (never a bar's carriage returns), one per stage at least.
    assert "\r" not in result.stderr
    for stage in ("adapter", "adapter loss", "base", "base loss"):
        assert f"eval {stage}: 6/6 (100%)" in result.stderr

    summary = json.loads(summary_path.read_text())
    assert summary["n"] == 6 and summary["data"] == str(SAMPLE_TRAIN)
    assert summary["predictions_file"] == predictions_path.name and "predictions" not in summary
    # Memorised training answers (the short run's first 8): the adapter's loss is far below the random base's.
    assert 0 < summary["eval_loss"]["adapter"] < 0.5 * summary["eval_loss"]["base"]

    rows = [json.loads(line) for line in predictions_path.read_text().splitlines()]
    references = [json.loads(line)["correct_answer"] for line in SAMPLE_TRAIN.read_text().splitlines()[:6]]
    questions = [json.loads(line)["question"] for line in SAMPLE_TRAIN.read_text().splitlines()[:6]]
    assert [r["reference"] for r in rows] == references and [r["question"] for r in rows] == questions
    assert all(set(row) == PREDICTION_KEYS for row in rows)
    # The summary's rates are the rows' rates: nothing is scored that the file does not show.
    for side in ("adapter", "base"):
        assert summary[side]["exact_match"] == sum(r[f"{side}_exact_match"] for r in rows) / 6
        assert summary[side]["eos_rate"] == sum(r[f"{side}_stopped_at_eos"] for r in rows) / 6
        assert summary[side]["mean_answer_tokens"] == sum(r[f"{side}_tokens"] for r in rows) / 6
    assert sum(r["adapter_exact_match"] for r in rows) >= 5
    # Counted alike: a perfect answer is as long as its reference (not one token longer for the space
    # Llama-2's template puts before </s>, which the adapter generates too).
    assert all(r["adapter_tokens"] == r["reference_tokens"] for r in rows if r["adapter_exact_match"])

    report = (run_copy / "report.html").read_text()
    assert f"Evaluation: {SAMPLE_TRAIN}" in report and rows[0]["adapter_answer"] in report


def test_eval_loss_is_the_mean_token_loss_of_the_reference(short_run: Path) -> None:
    """Batched and padded, it equals transformers' own loss on each example alone (the trained span only)."""
    import torch

    from sftbridge.inference.evaluate import load_cases, reference_losses
    from sftbridge.inference.predictor import Predictor

    predictor = Predictor.from_run(short_run)
    cases = load_cases(SAMPLE_TRAIN, predictor)[:5]
    batched = reference_losses(predictor, cases, batch_size=5, stage="loss")
    alone = reference_losses(predictor, cases, batch_size=1, stage="loss")
    for (total, count), (total_alone, count_alone) in zip(batched, alone, strict=True):
        assert count == count_alone and total == pytest.approx(
            total_alone, rel=1e-5
        )  # padding changes nothing
    tokenizer = predictor.tokenizer
    for case, (total, count) in zip(cases, batched, strict=True):
        assert case.example is not None
        encoded = predictor.prompt_format.encode(tokenizer, case.example)
        assert encoded.text.startswith(case.prompt)  # the prompt as generation sees it, then the answer
        ids, labels = torch.tensor([encoded.input_ids]), torch.tensor([encoded.labels])
        trained = [t for t in encoded.labels if t != -100]
        assert trained[-1] == tokenizer.eos_token_id and case.reference in tokenizer.decode(trained)
        with torch.no_grad():
            expected = predictor.model(input_ids=ids, labels=labels).loss.item()
        assert count == len(trained)
        # Memorised answers have losses near 0.01, where float32 log-softmax differs in the 6th digit.
        assert total / count == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_json_out_puts_the_predictions_beside_the_summary(tmp_path: Path) -> None:
    from sftbridge.inference.evaluate import write_results

    result = {
        "n": 1,
        "adapter": {"exact_match": 1.0},
        "predictions": [{"question": "q?", "reference": "é", "adapter_answer": "é"}],
    }
    predictions = write_results(result, tmp_path / "out" / "eval-test.json")
    assert predictions == tmp_path / "out" / "eval-test-predictions.jsonl"
    assert json.loads(predictions.read_text()) == result["predictions"][0]
    summary = json.loads((tmp_path / "out" / "eval-test.json").read_text())
    assert summary == {
        "n": 1,
        "adapter": {"exact_match": 1.0},
        "predictions_file": "eval-test-predictions.jsonl",
    }


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_sparse_lines_in_a_pipe() -> None:
    from sftbridge.cli.inference import EvalProgress

    piped = io.StringIO()
    progress = EvalProgress(piped)
    for done in range(1, 101):
        progress("adapter", done, 100)
    progress.close()
    lines = piped.getvalue().splitlines()
    assert 10 <= len(lines) <= 11 and lines[-1].startswith("eval adapter: 100/100 (100%)")

    terminal = _Terminal()
    progress = EvalProgress(terminal)
    for done in range(1, 5):
        progress("base", done, 4)
    progress.close()
    assert "\r" in terminal.getvalue() and "eval base" in terminal.getvalue() and "4/4" in terminal.getvalue()
