"""The run report (one self-contained HTML file, rendered by headless Chromium) and the adapter's card."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import SAMPLE_TRAIN, cli

IMAGE = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def evaluated_run(short_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the short run with one in-process evaluation of 12 training questions written into it."""
    from sftbridge.inference.evaluate import evaluate, load_cases, write_results
    from sftbridge.inference.predictor import Predictor

    run = Path(shutil.copytree(short_run, tmp_path_factory.mktemp("report") / "run"))
    predictor = Predictor.from_run(run)
    result = evaluate(predictor, load_cases(SAMPLE_TRAIN, predictor)[:12], batch_size=12)
    write_results({"data": str(SAMPLE_TRAIN), **result}, run / "eval-train.json")
    return run


@pytest.fixture(scope="module")
def report(evaluated_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    result = cli("report", str(evaluated_run), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out)
    return out


def test_train_writes_the_report_and_a_model_card(short_run: Path) -> None:
    manifest = json.loads((short_run / "sftbridge.json").read_text())
    html = (short_run / "report.html").read_text()
    assert "Training curves" in html and "No evaluation yet" in html and len(IMAGE.findall(html)) >= 3
    # Written while the run had its staging name, it names (and tells you to evaluate) the finished run.
    assert ".partial" not in html and f"run <code>sftbridge eval {short_run}</code>" in html
    if (manifest.get("answer_metrics") or {}).get("verdict"):  # the end-of-run verdict, when it was measured
        assert "its answers" in html

    card = (short_run / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in card  # PEFT's empty card is replaced
    assert card.startswith('---\nbase_model: "builtin:tiny-llama"\nlibrary_name: peft\n')
    for path, digest in manifest["data"]["sha256"].items():
        assert f"| `{path}` | {Path(path).stat().st_size} | `{digest}` |" in card
    assert f"| train | {manifest['data']['train']['total']} |" in card
    metrics = manifest["metrics"]
    assert f"train loss: {metrics['train_loss']:.4f} after {metrics['global_step']} steps" in card
    assert 'PeftModel.from_pretrained(base, "RUN/adapter")' in card and 'sftbridge generate RUN "' in card
    assert "- `train.epochs`: `30.0` (default `5.0`)" in card  # configs/tiny-cpu.yaml's change


def test_report_shows_curves_evaluation_samples_data_config_and_manifest(
    report: Path, evaluated_run: Path
) -> None:
    html = report.read_text()
    manifest = json.loads((evaluated_run / "sftbridge.json").read_text())
    predictions = [
        json.loads(line) for line in (evaluated_run / "eval-train-predictions.jsonl").read_text().splitlines()
    ]
    summary = json.loads((evaluated_run / "eval-train.json").read_text())

    assert (
        "http://" not in html and "https://" not in html and "<script" not in html
    )  # nothing to fetch or run
    assert f"Evaluation: {SAMPLE_TRAIN}" in html
    assert f"<td class='num'>{summary['adapter']['exact_match']:.1%}</td>" in html
    assert f"<td class='num'>{summary['eval_loss']['base']:.3f}</td>" in html
    # Ten samples side by side: each question with its reference, the adapter's and the base's answer.
    samples = html.split("sample questions")[1].split("</table>")[0]
    assert samples.count("<tr>") == 11  # header + 10
    from html import escape

    for row in predictions[:10]:
        for key in ("question", "reference", "adapter_answer", "base_answer"):
            assert escape(row[key]) in samples
    assert escape(predictions[10]["question"]) not in samples
    # Curves (loss, learning rate, grad norm, ...), the answer-length histogram and the data-length histogram.
    assert {
        "Loss",
        "Learning rate",
        "Gradient norm",
        "answer length histogram",
        "example length histogram",
    } <= set(re.findall(r"<img alt='([^']+)'", html))
    assert f"<td>train</td><td class='num'>{manifest['data']['train']['total']}</td>" in html
    assert "<td>train.epochs</td><td>30.0</td><td>5.0</td>" in html
    assert manifest["git"]["commit"] is None or manifest["git"]["commit"] in html


def test_every_embedded_image_decodes(report: Path) -> None:
    from PIL import Image

    images = IMAGE.findall(report.read_text())
    assert len(images) >= 5
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            image.load()
            assert image.format == "PNG" and image.width > 200 and image.height > 100


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    shot = tmp_path / "report.png"
    url = report.resolve().as_uri()
    rendered = subprocess.run(
        [CHROMIUM, *flags, "--window-size=1280,2400", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), rendered.stderr[-3000:]
    # The page has no script: any console message (a JS error, a failed load) is a fault.
    assert not [line for line in rendered.stderr.splitlines() if ":CONSOLE" in line], rendered.stderr[-3000:]
    with Image.open(shot) as image:
        gray = image.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 10  # not a blank page
        assert len(gray.getcolors(maxcolors=1 << 16) or []) > 50  # text and plots, not a flat fill

    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "<h2>Training curves</h2>" in dom.stdout and "sample questions" in dom.stdout


def test_answer_metrics_and_throughput_become_curves(tmp_path: Path) -> None:
    from sftbridge.report.collect import read_curves

    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "loss": 3.0, "learning_rate": 1e-3, "grad_norm": 2.0, "tokens_per_second": 900.0},
        {"step": 2, "loss": 2.0, "eval_loss": 2.5, "eval_answer_exact_match": 0.25, "answer_eos_rate": 0.5},
        {"step": 2, "loss": 1.5},  # logged twice: the last value wins
        {"train_runtime": 10.0, "train_loss": 2.0, "train_tokens_per_second": 800.0, "step": 2},
        {"loss": 9.0},  # no step: not a point
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')  # cut by a crash
    assert read_curves(metrics) == {
        "loss": [(1.0, 3.0), (2.0, 1.5)],
        "learning_rate": [(1.0, 1e-3)],
        "grad_norm": [(1.0, 2.0)],
        "tokens_per_second": [(1.0, 900.0)],
        "eval_loss": [(2.0, 2.5)],
        "eval_answer_exact_match": [(2.0, 0.25)],
        "answer_eos_rate": [(2.0, 0.5)],
    }


def test_a_failing_report_never_fails_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from sftbridge.report import write_run_documents

    (tmp_path / "adapter").mkdir()
    write_run_documents(tmp_path, {"run_name": "broken"})  # no base model, no config: both documents fail
    assert "model card was not written" in caplog.text and "run report was not written" in caplog.text
    assert not (tmp_path / "report.html").exists()
