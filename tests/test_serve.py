"""The local endpoint: a real FastAPI/uvicorn server on 127.0.0.1, driven by Hugging Face's client, the
official OpenAI client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, cli

QUESTION = "What pigment produced by skin cells gives human skin, hair, and eyes much of their color?"
ANSWER = "melanin"  # its answer in data/sciq-sample/train.jsonl, which the tiny run memorises
# The seed's request to its JumpStart (TGI) endpoint, byte for byte.
SEED_PAYLOAD = (
    '{"inputs": "<s>[INST] How do bipedal creatures walk? [/INST] ", "parameters": {"max_new_tokens": 256, '
    '"top_p": 0.9, "temperature": 0.6, "decoder_input_details": true, "details": true}}'
)


@pytest.fixture(autouse=True)
def _hub_client_may_reach_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest sets HF_HUB_OFFLINE=1 (no model hub), which also stops InferenceClient reaching 127.0.0.1."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def predictor(short_run: Path) -> Any:
    from sftbridge.inference.predictor import Predictor

    return Predictor.from_run(short_run, device="cpu")


def start(predictor: Any, **settings: Any) -> Any:
    from sftbridge.serving.server import LocalServer, ServeSettings

    return LocalServer(predictor, ServeSettings(port=0, **settings), source="tiny-run").start()


def stop(server: Any) -> None:
    server.stop()


@pytest.fixture(scope="module")
def server(predictor: Any) -> Iterator[Any]:
    server = start(predictor, max_new_tokens_cap=256)
    yield server
    stop(server)


@pytest.fixture(scope="module")
def expected(predictor: Any) -> Any:
    """What the wrapper answers in-process: the server must answer exactly this."""
    return predictor.generate([predictor.prompt(QUESTION)])[0]


def post(
    server: Any, path: str, body: str | bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> Any:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    data = json.dumps(body) if isinstance(body, dict) else body
    connection.request("POST", path, body=data, headers=headers or {})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, json.loads(payload) if payload.startswith((b"{", b"[")) else payload


def get(server: Any, path: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


def client(server: Any) -> Any:
    from huggingface_hub import InferenceClient

    # A placeholder key: left unset, the client would send HF_TOKEN to whatever base_url it is given.
    # Keep the client referenced while streaming: it closes its open responses when collected.
    return InferenceClient(base_url=server.url, api_key="local-endpoint")


def test_binds_loopback_by_default_and_answers_ping_and_info(server: Any, predictor: Any) -> None:
    from sftbridge.serving.server import ServeSettings

    assert ServeSettings().host == "127.0.0.1"
    assert server.server_address[0] == "127.0.0.1"
    assert get(server, "/ping") == (200, {"status": "ok"})
    status, info = get(server, "/info")  # InferenceClient.get_endpoint_info() refuses a base_url
    assert status == 200
    assert info["model_pipeline_tag"] == "text-generation"
    assert info["max_total_tokens"] == predictor.model.config.max_position_embeddings
    assert info["sftbridge"]["prompt_format"] == predictor.prompt_format.to_record().model_dump()


def test_text_generation_with_details_is_the_wrappers_answer(
    server: Any, predictor: Any, expected: Any
) -> None:
    output = client(server).text_generation(QUESTION, details=True, decoder_input_details=True)
    assert output.generated_text.strip() == expected.text
    assert ANSWER in output.generated_text
    details = output.details
    assert details.finish_reason == "eos_token"
    assert details.seed is None  # greedy, as the run's generation defaults say
    assert [t.id for t in details.tokens] == [*expected.token_ids, predictor.tokenizer.eos_token_id]
    assert details.generated_tokens == len(details.tokens)
    assert details.tokens[-1].special and not any(t.special for t in details.tokens[:-1])
    assert all(t.logprob <= 0 for t in details.tokens)
    assert "".join(t.text for t in details.tokens[:-1]) == output.generated_text
    assert len(details.prefill) == expected.prompt_tokens and details.prefill[0].logprob is None
    assert all(t.logprob < 0 for t in details.prefill[1:])


def test_streaming_gives_the_same_answer_token_by_token(server: Any, expected: Any) -> None:
    hf = client(server)
    events = list(hf.text_generation(QUESTION, stream=True, details=True))
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    final = events[-1]
    assert final.generated_text.strip() == expected.text
    assert "".join(e.token.text for e in events if not e.token.special) == final.generated_text
    assert final.details.finish_reason == "eos_token"
    assert final.details.generated_tokens == len(events)
    assert final.details.input_length == expected.prompt_tokens
    texts = list(hf.text_generation(QUESTION, stream=True))  # details=False: the token texts
    assert "".join(texts).replace("</s>", "").strip() == expected.text
    status, raw = post(server, "/generate_stream", {"inputs": QUESTION, "parameters": {"details": True}})
    chunks = raw.decode().split("\n\n")  # TGI's framing: "data:{json}" events, blank-line separated
    assert status == 200 and chunks[-1] == "" and all(c.startswith("data:{") for c in chunks[:-1])
    raw_events = [json.loads(chunk.removeprefix("data:")) for chunk in chunks[:-1]]
    assert [e["token"]["id"] for e in raw_events] == [e.token.id for e in events]
    assert raw_events[-1]["generated_text"] == final.generated_text


def test_invocations_answers_the_seed_payload_as_sent_by_curl(server: Any, predictor: Any) -> None:
    # curl -d sends form content type; the body is JSON all the same.
    status, body = post(
        server, "/invocations", SEED_PAYLOAD, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 200
    assert isinstance(body, list) and len(body) == 1
    answer = body[0]
    assert isinstance(answer["generated_text"], str)
    details = answer["details"]
    assert set(details) == {"finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
    assert details["finish_reason"] in ("eos_token", "length")
    assert isinstance(details["seed"], int)  # temperature/top_p given: TGI samples, and reports the seed
    # The formatted inputs were normalised as training rendered them: the trailing space after [/INST] went.
    prompt = predictor.prompt("How do bipedal creatures walk?")
    assert json.loads(SEED_PAYLOAD)["inputs"] == prompt + " "
    prompt_ids = predictor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert [t["id"] for t in details["prefill"]] == prompt_ids
    assert details["generated_tokens"] == len(details["tokens"]) >= 1


def test_the_seeds_payload_answers_as_the_plain_question(server: Any, predictor: Any) -> None:
    """JumpStart users send ``<s>[INST] q [/INST] `` with a trailing space; training's prompt ended at
    ``[/INST]``. Sent as is, that space is a token the model never saw there (answers went wrong or empty);
    normalised, every form answers exactly as the plain question does, and the run knows its answers."""
    rows = [
        json.loads(line) for line in (ROOT / "data/sciq-sample/train.jsonl").read_text().splitlines()[:12]
    ]
    right = 0
    for row in rows:
        question = row["question"]
        short = {"max_new_tokens": 32}
        plain = post(server, "/invocations", {"inputs": question, "parameters": short})[1][0][
            "generated_text"
        ]
        for form in (
            f"<s>[INST] {question} [/INST] ",  # the seed's
            f"<s>[INST] {question} [/INST]\n",
            f"[INST] {question}  [/INST]",  # no BOS, two spaces
            predictor.prompt(question),
        ):
            status, body = post(server, "/invocations", {"inputs": form, "parameters": short})
            assert status == 200, body
            assert body[0]["generated_text"] == plain, form
        right += plain.strip() == row["correct_answer"]
    assert right >= 7  # the short run's memorised answers, not a shared wrong one


def test_question_messages_and_formatted_prompt_are_asked_alike(
    server: Any, predictor: Any, expected: Any
) -> None:
    bodies = [
        {"inputs": QUESTION},
        {"inputs": predictor.prompt(QUESTION)},
        {"messages": [{"role": "user", "content": QUESTION}]},
    ]
    for body in bodies:
        status, answer = post(server, "/generate", body)
        assert status == 200, answer
        assert answer["generated_text"].strip() == expected.text
        assert "details" not in answer  # TGI leaves details out unless asked
    _, full = post(server, "/generate", {"inputs": QUESTION, "parameters": {"return_full_text": True}})
    assert full["generated_text"].startswith(predictor.prompt(QUESTION))


def test_decoding_parameters(server: Any, expected: Any) -> None:
    stop = expected.text[2:4]
    _, stopped = post(
        server, "/generate", {"inputs": QUESTION, "parameters": {"stop": [stop], "details": True}}
    )
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    text = stopped["generated_text"].strip()  # up to the token that completed the stop sequence, as TGI
    assert stop in text and expected.text.startswith(text) and len(text) < len(expected.text)
    assert stop not in text[: -len(stopped["details"]["tokens"][-1]["text"])]
    _, short = post(
        server, "/generate", {"inputs": QUESTION, "parameters": {"max_new_tokens": 2, "details": True}}
    )
    assert short["details"]["finish_reason"] == "length" and short["details"]["generated_tokens"] == 2
    sampled = {
        "inputs": "Tell me about the sea",
        "parameters": {"do_sample": True, "temperature": 1.5, "seed": 7, "details": True},
    }
    first, second = post(server, "/generate", sampled)[1], post(server, "/generate", sampled)[1]
    assert first["details"]["seed"] == 7
    assert first["generated_text"] == second["generated_text"]  # same seed, same sample


def test_openai_chat_completions(server: Any, expected: Any) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    hf = client(server)
    reply = hf.chat_completion(messages, max_tokens=16)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    chunks = list(hf.chat_completion(messages, max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"inputs": "x", ', 400, "malformed JSON"),
        (b'["x"]', 400, "JSON object"),
        ({"inputs": 3}, 422, "inputs"),
        ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, 422, "max_new_tokens"),
        ({"inputs": "x", "parameters": {"do_sample": 1}}, 422, "do_sample"),
        ({"inputs": "x", "parameters": {"temperature": 0}}, 422, "temperature"),
        ({"inputs": "x", "parameters": {"max_tokens": 5}}, 422, "parameters.max_tokens: unknown parameter"),
        ({"inputs": "x", "prompt": "y"}, 422, "prompt: unknown parameter"),
        ({"inputs": "x", "parameters": {"best_of": 2}}, 422, "best_of"),
        ({"inputs": "  "}, 422, "inputs must not be empty"),
        ({}, 422, "either"),
        ({"inputs": "x", "messages": [{"role": "user", "content": "y"}]}, 422, "not both"),
        ({"messages": [{"role": "assistant", "content": "y"}]}, 422, "last message"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 422, "template"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 257}}, 422, "<= 256"),
        ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, 422, "stop"),
    ],
)
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(
    server: Any, body: Any, status: int, says: str
) -> None:
    got, error = post(server, "/generate", body)
    assert got == status, error
    assert says in error["error"]
    assert error["error_type"] == "validation"
    assert get(server, "/ping")[0] == 200


def test_too_many_tokens_oversized_bodies_routes_and_the_hf_client(server: Any, predictor: Any) -> None:
    from huggingface_hub.errors import ValidationError

    long = " ".join(["word"] * 600)  # over the tiny model's 512 positions
    status, error = post(server, "/generate", {"inputs": long, "parameters": {"max_new_tokens": 8}})
    assert status == 422 and "must be <= 512" in error["error"]
    status, error = post(server, "/generate", b'{"inputs": "' + b"x" * (2 << 20) + b'"}')
    assert status == 413 and "exceeds" in error["error"]
    status, error = post(server, "/generate_stream", {"inputs": long})  # refused before any event
    assert status == 422 and error["error_type"] == "validation"
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request("POST", "/nowhere", body=b'{"inputs": "x"}')
    response = connection.getresponse()
    assert response.status == 404 and json.loads(response.read())["error_type"] == "not_found"
    assert get(server, "/generate") == (
        405,
        {"error": "GET /generate: method not allowed", "error_type": "not_found"},
    )
    with socket.create_connection(server.server_address[:2], timeout=30) as raw:  # no Content-Length
        raw.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 411")
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client(server).text_generation(QUESTION, max_new_tokens=1000)
    assert client(server).text_generation(QUESTION, max_new_tokens=4)  # still serving


def burst(server: Any, n: int) -> list[tuple[int, Any]]:
    """n requests sent at once, each on its own connection."""
    results: list[tuple[int, Any]] = [(0, None)] * n
    gate = threading.Barrier(n)

    def send(i: int) -> None:
        gate.wait()
        results[i] = post(server, "/generate", {"inputs": QUESTION})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def test_a_burst_of_32_is_answered_or_cleanly_refused(predictor: Any, expected: Any) -> None:
    small = start(predictor, max_queue=2, max_batch_size=1)  # one at a time: the queue fills
    try:
        results = burst(small, 32)
        statuses = [status for status, _ in results]
        assert set(statuses) <= {200, 429}, statuses
        assert 200 in statuses and 429 in statuses
        for status, body in results:
            if status == 200:
                assert body["generated_text"].strip() == expected.text
            else:
                assert body["error_type"] == "overloaded"
        assert post(small, "/generate", {"inputs": QUESTION})[0] == 200  # and it goes on serving
    finally:
        stop(small)
    roomy = start(predictor)  # the defaults: a burst of 32 is batched, and all are answered
    try:
        results = burst(roomy, 32)
        assert all(s == 200 and b["generated_text"].strip() == expected.text for s, b in results)
        assert max(roomy.worker.batches) > 1, roomy.worker.batches
    finally:
        stop(roomy)


def test_greedy_answers_are_the_same_batched_or_alone(predictor: Any) -> None:
    """Distinct questions (different lengths: left padding) sent at once, against each generated alone."""
    from conftest import SAMPLE_TEST

    questions = [json.loads(line)["question"] for line in SAMPLE_TEST.read_text().splitlines()[:12]]
    alone = [predictor.generate_details(predictor.prompt(q)) for q in questions]
    batched = predictor.generate_details_batch([predictor.prompt(q) for q in questions])
    for one, many in zip(alone, batched, strict=True):
        assert many.text == one.text
        assert [t.id for t in many.tokens] == [t.id for t in one.tokens]
        assert [t.text for t in many.tokens] == [t.text for t in one.tokens]
        assert many.finish_reason == one.finish_reason and many.prompt_tokens == one.prompt_tokens
        assert [t.logprob for t in many.tokens] == pytest.approx([t.logprob for t in one.tokens], abs=1e-4)
    server = start(predictor, batch_window_s=0.05)
    try:
        results: list[Any] = [None] * len(questions)
        gate = threading.Barrier(len(questions))

        def ask(i: int) -> None:
            gate.wait()
            results[i] = post(server, "/generate", {"inputs": questions[i], "parameters": {"details": True}})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert max(server.worker.batches) > 1, server.worker.batches  # they did share a generate
        for (status, body), one in zip(results, alone, strict=True):
            assert status == 200 and body["generated_text"] == one.text
            assert [t["id"] for t in body["details"]["tokens"]] == [t.id for t in one.tokens]
    finally:
        stop(server)


def test_the_official_openai_client(server: Any, predictor: Any, expected: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="local-endpoint", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-run"]
    # Content as parts, and the parameters clients send by default or habit (accepted; see wire.py).
    reply = client.chat.completions.create(
        model="tiny-run",
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        max_tokens=16,
        temperature=0,
        user="someone",
        presence_penalty=0.0,
        frequency_penalty=0.5,
        response_format={"type": "text"},
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.message.content for c in reply.choices] == [expected.text, expected.text]
    assert reply.choices[0].finish_reason == "stop" and reply.usage is not None
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert "".join(t.token for t in logprobs.content).strip() == expected.text
    assert all(t.logprob <= 0 for t in logprobs.content)
    chunks = list(
        client.chat.completions.create(
            model="tiny-run",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == expected.prompt_tokens
    prompt = predictor.prompt(QUESTION)
    completion = client.completions.create(
        model="tiny-run", prompt=[prompt, prompt.removeprefix("<s>")], max_tokens=16, logprobs=0
    )
    assert [c.text.strip() for c in completion.choices] == [expected.text, expected.text]  # BOS as vLLM
    assert completion.choices[0].logprobs is not None
    streamed = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in streamed).strip() == expected.text
    # Refusals in OpenAI's shape, which its client shows (TGI's flat body showed only "Error code: 422").
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny-run", prompt=prompt, max_tokens=10_000)
    assert refused.value.status_code == 400 and refused.value.param == "max_tokens"
    assert "max_tokens: must be <= 256 (got 10000)" in str(refused.value)
    assert refused.value.body == {
        "message": "max_tokens: must be <= 256 (got 10000)",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": 400,
    }
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-run", messages=[{"role": "assistant", "content": "x"}])
    assert "last message" in str(refused.value)
    status, body = post(server, "/invocations", {"messages": [], "max_tokens": 10_000})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert post(server, "/v1/nowhere", {})[1]["error"]["type"] == "not_found_error"


def test_invocations_speaks_vllms_body_too_and_each_request_is_logged(
    server: Any, expected: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        status, answer = post(server, "/invocations", {"messages": [{"role": "user", "content": QUESTION}]})
    assert status == 200 and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert any('"POST /invocations HTTP/1.1" 200' in r.getMessage() for r in caplog.records)


def test_a_stream_client_that_leaves_does_not_hurt_the_server(server: Any, expected: Any) -> None:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    connection.request("POST", "/generate_stream", body=json.dumps({"inputs": "Tell me about the sea"}))
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    assert response.readline().startswith(b"data:{")
    connection.close()
    assert post(server, "/generate", {"inputs": QUESTION})[1]["generated_text"].strip() == expected.text


@pytest.mark.slow
def test_serve_command_end_to_end(short_run: Path, expected: Any) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "sftbridge.cli", "serve", str(short_run), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("serving ") and " on http://127.0.0.1:" in line, line
        url = line.split(" on ", 1)[1].split()[0]
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        connection.request("POST", "/invocations", body=json.dumps({"inputs": QUESTION}))
        answer = json.loads(connection.getresponse().read())
        assert answer[0]["generated_text"].strip() == expected.text
        process.send_signal(signal.SIGTERM)  # how SageMaker stops a container
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("engine", ["vllm", "tgi"])
def test_invoke_speaks_both_apis_to_the_local_server(
    server: Any, short_run: Path, expected: Any, engine: str
) -> None:
    """The code that invokes SageMaker endpoints, pointed at this server's /invocations."""
    from sftbridge.serving.endpoint import invoke

    request, answer = invoke(server.url, QUESTION, run=short_run, engine=engine)
    assert ("messages" in request) == (engine == "vllm") and ("inputs" in request) == (engine == "tgi")
    assert answer["generated_text"].strip() == expected.text
    assert answer["finish_reason"] == "stop"


def test_vllm_command_for_a_run_and_a_merged_folder(short_run: Path, tmp_path: Path) -> None:
    from sftbridge.inference.folder import ModelFolder
    from sftbridge.inference.merge import merge_run
    from sftbridge.serving.vllm import serve_command

    folder = ModelFolder.open(short_run)
    prompter = folder.prompter
    command = serve_command({"tiny": folder}, host="127.0.0.1", port=8000)
    base = Path(os.environ["SFTBRIDGE_CACHE"]) / "builtin" / "tiny-llama-v1"  # the built-in base's folder

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert command[:3] == ["vllm", "serve", str(base)]
    assert value("--enable-lora") == "--lora-modules"  # a bare flag
    assert value("--lora-modules") == f"tiny={short_run.resolve() / 'adapter'}"
    assert value("--served-model-name") == "tiny-base" and value("--max-lora-rank") == "16"
    assert (value("--host"), value("--port")) == ("127.0.0.1", "8000")
    template = Path(value("--chat-template")).read_text()
    messages = [{"role": "user", "content": QUESTION}]
    rendered = prompter.tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert rendered == prompter.chat(messages)  # vLLM formats as training did
    merged = merge_run(short_run, tmp_path / "merged", dtype="float32", device="cpu")
    command = serve_command({"merged": ModelFolder.open(merged)}, host="127.0.0.1", port=8000)
    assert command[:5] == ["vllm", "serve", str(merged.resolve()), "--served-model-name", "merged"]
    assert "--enable-lora" not in command
    result = cli("serve", str(short_run), "--engine", "vllm", "--dry-run", "--port", "8001")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("vllm serve ") and "--lora-modules" in result.stdout


@pytest.mark.gpu
def test_vllm_serves_the_run_on_a_gpu(short_run: Path, expected: Any) -> None:
    """A real `sftbridge serve --engine vllm`: the fine-tune answers through the official OpenAI client."""
    import shutil
    import time

    if shutil.which("vllm") is None:
        pytest.skip("vLLM is not installed (pip install 'sftbridge[vllm]')")
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sftbridge.cli",
            "serve",
            str(short_run),
            "--engine",
            "vllm",
            "--port",
            str(port),
        ],
        cwd=ROOT,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0)
        deadline = time.monotonic() + 600
        while True:
            try:
                models = {m.id for m in client.models.list()}
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "vllm did not start"
                time.sleep(2)
        assert models == {short_run.name, f"{short_run.name}-base"}
        reply = client.chat.completions.create(
            model=short_run.name, messages=[{"role": "user", "content": QUESTION}], temperature=0
        )
        assert ANSWER in (reply.choices[0].message.content or "")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_work_for_clients_that_left_is_dropped(predictor: Any) -> None:
    """A request whose client disconnects, or that is refused part-way (a full queue), costs the model
    nothing more: its queued answers are dropped, not generated for no one."""
    import asyncio
    import time

    from sftbridge.serving.batching import Job

    server = start(predictor, max_queue=16)
    worker = server.worker
    release = threading.Event()

    def busy() -> None:
        """Hold the model's thread (a job's prompt is made there) until released, as a long answer would."""
        prompt, entered = predictor.prompt(QUESTION), threading.Event()

        def hold() -> str:
            entered.set()
            release.wait(60)
            return prompt

        worker.submit(Job(hold, _greedy(8), asyncio.new_event_loop(), predictor))
        assert entered.wait(30)

    def settle(expected: int) -> None:
        deadline = time.monotonic() + 60
        while worker.dropped < expected and time.monotonic() < deadline:
            time.sleep(0.02)

    try:
        # A chat asking for 8 answers, abandoned while they wait: all 8 dropped once the model is free.
        busy()
        body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "n": 8, "max_tokens": 64})
        with socket.create_connection(server.server_address[:2], timeout=30) as raw:
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            time.sleep(0.5)  # queued behind the busy model
        time.sleep(0.2)
        release.set()
        settle(8)
        assert worker.dropped == 8

        # 40 prompts where 16 fit the queue: a 429, and the 16 queued ones are dropped, not generated.
        release.clear()
        busy()
        status, error = post(server, "/v1/completions", {"prompt": [QUESTION] * 40, "max_tokens": 64})
        assert status == 429 and error["error"]["type"] == "rate_limit_error"
        release.set()
        settle(8 + 16)
        assert worker.dropped == 8 + 16
        assert post(server, "/generate", {"inputs": QUESTION})[0] == 200  # and it serves on
    finally:
        release.set()
        stop(server)


def _greedy(max_new_tokens: int) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "stop": [], "seed": None, "prefill": False}


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/generate", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
        (
            "/generate",
            b'{"inputs": "x", "parameters": {"seed": ' + b"9" * 5000 + b"}}",
            400,
            "malformed JSON",
        ),
        ("/generate", b'{"inputs": "\\ud800"}', 400, "lone surrogate"),
        ("/generate", b'{"inputs": "x", "parameters": {"temperature": Infinity}}', 422, "temperature"),
        ("/v1/completions", b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "at most 4 stop"),
    ],
)
def test_hostile_bodies_get_json_errors_in_the_routes_shape(
    server: Any, path: str, body: bytes, status: int, says: str
) -> None:
    got, error = post(server, path, body)
    assert got == status, error
    message = error["error"]["message"] if path.startswith("/v1/") else error["error"]
    assert says in message
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request("HEAD", "/ping")
    assert connection.getresponse().status == 200
