"""A Hub model that cannot be had fails in one line, in seconds: unreachable, gated, or unknown, each with
what to do; a cached copy loads without the Hub. The Hub is a local HTTP server here (127.0.0.1)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT
from sftbridge.cli import main
from sftbridge.config import ModelSection
from sftbridge.errors import UserError
from sftbridge.models.loading import load_tokenizer

MODEL = "meta-llama/Llama-2-7b-chat-hf"


class FakeHub(BaseHTTPRequestHandler):
    answer: tuple[int, str] = (200, "")

    def do_HEAD(self) -> None:
        status, code = self.answer
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[type[FakeHub]]:
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield FakeHub
    server.shutdown()


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ((401, "GatedRepo"), f"{MODEL} is gated and HF_TOKEN is not set: accept its licence on"),
        ((401, "RepositoryNotFound"), "not on the Hugging Face Hub (or private: set HF_TOKEN)"),
        ((404, "RevisionNotFound"), "(revision main): not on the Hugging Face Hub"),
    ],
)
def test_gated_and_unknown_models_say_what_to_do(
    hub: type[FakeHub], answer: tuple[int, str], says: str
) -> None:
    hub.answer = answer
    with pytest.raises(UserError) as refused:
        load_tokenizer(ModelSection(name_or_path=MODEL))
    assert says in str(refused.value) and str(refused.value).startswith("model.name_or_path: ")


def test_an_unreachable_hub_is_one_line_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(ROOT)
    config = ROOT / "configs" / "tiny-cpu.yaml"
    assert main(["preview", str(config), f"model.name_or_path={MODEL}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: model.name_or_path: {MODEL}: the Hugging Face Hub (http://127.0.0.1:9) is unreachable "
        "(ConnectError) and the model is not in the cache; connect to it, download the model where there is "
        "a connection (hf download), or point model.name_or_path at a local folder"
    ]


@pytest.mark.slow  # the real CLI and its training subprocess
def test_train_without_the_hub_fails_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """Through the real CLI and the training subprocess: nothing of the run is left to resume or clean."""
    import os

    from conftest import run_cli

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))
    run_dir = tmp_path / "runs" / "hubless"
    config = str(ROOT / "configs" / "tiny-cpu.yaml")
    result = run_cli("train", config, f"model.name_or_path={MODEL}", "--run-dir", str(run_dir), env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    # The training script's output (its stderr too) is relayed on stdout, as a terminal shows it.
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the Hugging Face Hub (http://127.0.0.1:9) is unreachable" in errors[0]
    assert "Retrying" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
