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
