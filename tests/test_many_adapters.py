"""`sftbridge serve A B`: two runs trained on different facts, on one base loaded once, behind one real
FastAPI/uvicorn server; each answers as it does served alone, batched or not."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SAMPLE_TRAIN, SHORT_RUN_PAIRS, cli

ROWS = [json.loads(line) for line in SAMPLE_TRAIN.read_text().splitlines()[: 2 * SHORT_RUN_PAIRS]]
A_FACTS, B_FACTS = (
    ROWS[:SHORT_RUN_PAIRS],
    ROWS[SHORT_RUN_PAIRS:],
)  # what short_run and other_short_run learned
SERVE_FLAGS = ("--port", "0", "--device", "cpu")
MODELS = ("alpha", "other", "alpha-base")  # short_run as NAME=RUN, other_short_run by its folder's name


@pytest.fixture(scope="module")
def served(short_run: Path, other_short_run: Path) -> dict[str, Any]:
    from sftbridge.inference.adapters import load_adapters
    from sftbridge.inference.folder import ModelFolder

    return load_adapters(
        {"alpha": ModelFolder.open(short_run), "other": ModelFolder.open(other_short_run)}, device="cpu"
    )


@pytest.fixture(scope="module")
def server(served: dict[str, Any]) -> Iterator[Any]:
    from sftbridge.serving.server import LocalServer, ServeSettings

    server = LocalServer(served, ServeSettings(port=0, batch_window_s=0.05)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alone(short_run: Path, other_short_run: Path) -> dict[str, dict[str, Any]]:
    """Each model's greedy answer (token ids) to every question, from that run loaded alone (batched: that
    this equals one question at a time is test_serve's); the base is short_run's with its adapter off."""
    from sftbridge.inference.predictor import Predictor

    answers: dict[str, dict[str, Any]] = {}
    for name, run in (("alpha", short_run), ("other", other_short_run)):
        predictor = Predictor.from_run(run, device="cpu")
        answers[name] = _ids(predictor)
        if name == "alpha":
            with predictor.base_model():
                answers["alpha-base"] = _ids(predictor)
    return answers


def _ids(predictor: Any) -> dict[str, list[int]]:
    questions = [row["question"] for row in ROWS]
    results = predictor.generate_details_batch([predictor.prompt(q) for q in questions])
    return {q: [t.id for t in result.tokens] for q, result in zip(questions, results, strict=True)}


def post(server: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    connection.request("POST", path, body=json.dumps(body))
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


def test_each_adapter_answers_as_served_alone_in_mixed_concurrent_batches(
    server: Any, alone: dict[str, dict[str, Any]]
) -> None:
    """Every question to every model at once (48 requests, interleaved): batches form, each holds one model,
    and every answer is token for token the one that run gives alone. Each run answers its own facts."""
    asks = [(model, row["question"]) for row in ROWS for model in MODELS]
    results: list[Any] = [None] * len(asks)
    gate = threading.Barrier(len(asks))

    def ask(i: int) -> None:
        model, question = asks[i]
        gate.wait()
        body = {"inputs": question, "parameters": {"details": True, "adapter_id": model}}
        results[i] = post(server, "/generate", body)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert max(server.worker.batches) > 1, server.worker.batches
    for (model, question), (status, body) in zip(asks, results, strict=True):
        assert status == 200, body
        assert [t["id"] for t in body["details"]["tokens"]] == alone[model][question], (model, question)
    answers = {(m, q): body["generated_text"] for (m, q), (_, body) in zip(asks, results, strict=True)}
    assert all(r["correct_answer"] in answers["alpha", r["question"]] for r in A_FACTS)
    assert all(r["correct_answer"] in answers["other", r["question"]] for r in B_FACTS)
    # Each knows only its own facts, and the base neither.
    assert not any(r["correct_answer"] in answers["other", r["question"]] for r in A_FACTS)
    assert not any(r["correct_answer"] in answers["alpha", r["question"]] for r in B_FACTS)
    assert not any(r["correct_answer"] in answers["alpha-base", r["question"]] for r in ROWS)


def test_openai_model_and_tgi_adapter_id_pick_the_model_and_models_lists_all(server: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="local-endpoint", max_retries=0)
    cards = client.models.list().data
    assert [(m.id, getattr(m, "parent", None)) for m in cards] == [
        ("alpha", "alpha-base"),
        ("other", "alpha-base"),
        ("alpha-base", None),
    ]
    a_question, b_question = A_FACTS[0]["question"], B_FACTS[0]["question"]
    reply = client.chat.completions.create(
        model="other", messages=[{"role": "user", "content": b_question}], temperature=0
    )
    assert reply.model == "other" and B_FACTS[0]["correct_answer"] in (reply.choices[0].message.content or "")
    stream = client.chat.completions.create(
        model="other", messages=[{"role": "user", "content": b_question}], temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.choices[0].message.content
    # No model named: the first run, as vLLM serves its first model.
    status, body = post(server, "/invocations", {"messages": [{"role": "user", "content": a_question}]})
    assert status == 200 and body["model"] == "alpha"
    assert A_FACTS[0]["correct_answer"] in body["choices"][0]["message"]["content"]
    # SageMaker's route with a TGI body takes TGI's adapter_id; with an OpenAI body, the model.
    status, body = post(server, "/invocations", {"inputs": b_question, "parameters": {"adapter_id": "other"}})
    assert status == 200 and B_FACTS[0]["correct_answer"] in body[0]["generated_text"]
    status, body = post(
        server, "/invocations", {"model": "other", "messages": [{"role": "user", "content": b_question}]}
    )
    assert status == 200 and B_FACTS[0]["correct_answer"] in body["choices"][0]["message"]["content"]
    completion = client.completions.create(model="alpha-base", prompt="The sea", max_tokens=4)
    assert completion.model == "alpha-base"
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}])
    assert "no model 'gamma' here; it serves alpha, other, alpha-base" in str(refused.value)
    status, body = post(server, "/generate", {"inputs": "hi", "parameters": {"adapter_id": "gamma"}})
    assert status == 404 and body["error"].startswith("parameters.adapter_id: no model 'gamma'")


def test_runs_on_another_base_or_revision_are_refused_naming_them(
    short_run: Path, other_short_run: Path, tmp_path: Path
) -> None:
    from sftbridge.runs import read_manifest, write_manifest

    moved = tmp_path / "moved-revision"
    shutil.copytree(other_short_run, moved)
    manifest = read_manifest(moved)
    manifest.base_model.revision = "0123abcd"
    write_manifest(moved, manifest)
    result = cli("serve", str(short_run), str(moved), "--port", "0")
    assert result.returncode == 2
    assert f"moved-revision={moved}" in result.stderr and "revision 0123abcd" in result.stderr
    assert f"{short_run.name}={short_run}" in result.stderr and "revision unpinned" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, before any model loads
    result = cli("serve", f"x={short_run}", f"x={other_short_run}", "--port", "0")
    assert result.returncode == 2 and "a second run named 'x'" in result.stderr
    result = cli("serve", f"x={short_run}", f"x-base={other_short_run}", "--port", "0")
    assert result.returncode == 2 and "x-base: the name the base is served under" in result.stderr


def test_vllm_command_serves_every_adapter(short_run: Path, other_short_run: Path) -> None:
    result = cli("serve", f"alpha={short_run}", str(other_short_run), "--engine", "vllm", "--dry-run")
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    modules = command[command.index("--lora-modules") + 1 : command.index("--lora-modules") + 3]
    assert modules == [f"alpha={short_run / 'adapter'}", f"other={other_short_run / 'adapter'}"]
    assert command[command.index("--max-loras") + 1] == "2"
    assert command[command.index("--max-lora-rank") + 1] == "16"
    assert command[command.index("--served-model-name") + 1] == "alpha-base"


@pytest.mark.slow
def test_serve_command_with_two_runs_end_to_end(short_run: Path, other_short_run: Path) -> None:
    """`sftbridge serve alpha=A B` as a user runs it: one line names what is served; invoke --model picks."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    from sftbridge.serving.endpoint import invoke

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sftbridge.cli",
            "serve",
            f"alpha={short_run}",
            str(other_short_run),
            *SERVE_FLAGS,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(f"serving alpha ({short_run}), other ({other_short_run}), alpha-base on "), (
            line
        )
        url = line.split(" on ", 1)[1].split()[0]
        for model, row in (("alpha", A_FACTS[1]), ("other", B_FACTS[1])):
            request, answer = invoke(url, row["question"], run=short_run, model=model)
            assert request["model"] == model and row["correct_answer"] in answer["generated_text"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
