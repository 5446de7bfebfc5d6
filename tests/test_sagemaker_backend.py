"""The SageMaker backend against moto: the request it sends, what it uploads, pre-flight errors, status, logs,
fetch; the hyperparameter round trip; safe extraction. The real SDK (v3) makes the calls throughout."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from conftest import FAKE_TOKEN, ROOT, cli, train_in_root
from conftest import run_cli as sftbridge
from sftbridge.archive import safe_extract
from sftbridge.backends.sagemaker import hyperparameters as hp
from sftbridge.backends.sagemaker.spec import METRIC_DEFINITIONS, make_job_spec
from sftbridge.config import RunConfig, load_config
from sftbridge.errors import ConfigError, RunDirError, UserError
from sftbridge.planning.hardware import PRICE_TABLE_DATE

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BUCKET = "sftbridge-test-bucket"
SEED_JOB = ROOT / "configs" / "llama2-7b-chat-qlora-sagemaker.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# The libraries a job must run at the submitter's versions (issue 11): the staged requirements pin them.
PINNED_IN_JOBS = (
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "bitsandbytes",
    "pydantic",
    "pyyaml",
    "huggingface-hub",
)
IMAGE = (
    "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
    "2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04"
)
RUN_PREFIX = "sftbridge/llama2-7b-chat-qlora-sagemaker"


@pytest.fixture(autouse=True)
def _in_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the shipped configs name their data relative to the checkout


@pytest.fixture
def aws(fake_aws: dict[str, str]) -> None:
    """conftest's fake AWS, the bucket, and the seed job's model.hf_token_secret (submit checks it)."""
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    boto3.client("secretsmanager", region_name="us-east-1").create_secret(
        Name="sftbridge/hf-token", SecretString="hf_stored"
    )


class Recorder:
    """A boto3 session that records the parameters of every AWS call made through it."""

    def __init__(self, region: str | None = "us-east-1") -> None:
        self.session = boto3.Session(region_name=region)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.session.events.register("provide-client-params.*.*", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.calls.append((model.name, params))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def only(self, name: str) -> dict[str, Any]:
        found = [params for call, params in self.calls if call == name]
        assert len(found) == 1, self.names()
        return found[0]


def seed_config(*overrides: str) -> RunConfig:
    return load_config(SEED_JOB, [f"backend.role={ROLE}", f"backend.bucket={BUCKET}", *overrides])


def submit(recorder: Recorder, *overrides: str) -> Any:
    from sftbridge.backends.sagemaker.backend import SageMakerBackend

    backend = SageMakerBackend(boto_session=recorder.session)
    return backend.submit(seed_config(*overrides), config_path=str(SEED_JOB), overrides=[], run_dir=None)


def s3_get(uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    body: bytes = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def toolkit_args(hyperparameters: dict[str, str], *, v2: bool = False) -> list[str]:
    """What the sagemaker-training toolkit passes the entry script (v2's SDK JSON-encodes values first)."""
    from sagemaker_training.mapping import to_cmd_args

    loaded = {}
    for key, value in hyperparameters.items():
        text = json.dumps(value) if v2 else value
        try:
            loaded[key] = json.loads(text)
        except ValueError:
            loaded[key] = text
    return [str(arg) for arg in to_cmd_args(loaded)]


def rebuilt(args: list[str]) -> RunConfig:
    from sftbridge.training.train import parse_args

    return load_config(None, parse_args(args)[1])


# -- hyperparameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_round_trips_through_hyperparameters(path: Path) -> None:
    config = load_config(path, ["backend.role=" + ROLE])
    hyperparameters = hp.to_hyperparameters(config)
    assert not hp.problems(hyperparameters)
    assert all(len(k) <= 256 and len(v) <= 256 for k, v in hyperparameters.items())
    assert all(not k.startswith("sagemaker_") for k in hyperparameters)
    assert rebuilt(hp.to_args(hyperparameters)) == config  # our own runner: the strings as sent
    assert rebuilt(toolkit_args(hyperparameters)) == config  # the toolkit, SDK v3 request
    assert rebuilt(toolkit_args(hyperparameters, v2=True)) == config  # the toolkit, SDK v2 request


def test_awkward_values_survive_every_runner() -> None:
    awkward = {
        "run_name": "x",
        "model": {"revision": "123", "trust_remote_code": True},
        "data": {
            "train_file": "d/train.jsonl",
            "validation_file": None,
            "system_prompt": 'Don\'t: answer.\n  Two lines, a tab\t, é, 😀, \\, "quotes" # no comment',
            "template": {"prompt": "Q: {question}", "completion": " {correct_answer}"},
        },
        "lora": {"target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
        "train": {"learning_rate": 1e-5, "checkpoint_dir": "-h"},
        # Strings YAML would read as a bool, a list or null (the schema's enumerations refuse them elsewhere).
        "backend": {"environment": {"A": "on", "B": "[not, a, list]", "C": "null", "D": "yes"}},
    }
    config = load_config(None, awkward)
    hyperparameters = hp.to_hyperparameters(config)
    assert hyperparameters["train.learning_rate"] == "1.0e-05"  # YAML 1.1 reads 1e-05 as a string
    assert hyperparameters["model.revision"] == '!!str "123"'
    for args in (
        hp.to_args(hyperparameters),
        toolkit_args(hyperparameters),
        toolkit_args(hyperparameters, v2=True),
    ):
        assert rebuilt(args) == config


def test_config_too_long_for_hyperparameters_ships_the_config_file(tmp_path: Path) -> None:
    source = tmp_path / "long.yaml"
    source.write_text(
        SEED_JOB.read_text(encoding="utf-8").replace(
            "system_prompt: Answer with", "system_prompt: " + "Be brief. " * 40 + "Answer with"
        ),
        encoding="utf-8",
    )
    config = load_config(source, [f"backend.role={ROLE}", "train.epochs=2"])
    spec = make_job_spec(config, config_path=str(source), region="us-east-1", image=IMAGE)
    assert spec.config_file == source
    assert spec.hyperparameters["config"] == "config/long.yaml"
    assert "data.system_prompt" not in spec.hyperparameters  # it comes from the file
    assert spec.hyperparameters["train.epochs"] == "2.0"  # overrides still travel as hyperparameters
    overrides = {k: v for k, v in spec.hyperparameters.items() if k != "config"}
    assert hp.round_trip(overrides, str(source)) == spec.config


def test_multi_gpu_or_several_instances_use_torchrun() -> None:
    def reserved(*overrides: str) -> dict[str, str]:
        return make_job_spec(
            seed_config(*overrides), config_path=None, region="us-east-1", image=IMAGE
        ).reserved

    assert "sagemaker_torch_distributed_enabled" not in reserved()
    assert reserved("backend.instance_type=ml.g5.12xlarge")["sagemaker_torch_distributed_enabled"] == "true"
    assert reserved("backend.instance_count=2")["sagemaker_instance_type"] == "ml.g5.2xlarge"
    assert "sagemaker_torch_distributed_enabled" not in reserved(
        "backend.instance_count=2", "backend.distribution=none"
    )


def test_fsdp_across_two_multi_gpu_instances_is_one_torchrun_job(aws: None) -> None:
    """train.fsdp on 2 x ml.g5.12xlarge: one job of 2 instances whose image runs the unchanged script under
    torchrun (the toolkit's TorchDistributedRunner supplies --nnodes 2 --nproc_per_node 4 --node_rank)."""
    recorder = Recorder()
    submit(recorder, "train.fsdp=true", "backend.instance_type=ml.g5.12xlarge", "backend.instance_count=2")
    sent = recorder.only("CreateTrainingJob")
    assert sent["ResourceConfig"] == {
        "InstanceType": "ml.g5.12xlarge",
        "InstanceCount": 2,
        "VolumeSizeInGB": 100,
    }
    hyperparameters = sent["HyperParameters"]
    assert hyperparameters["sagemaker_torch_distributed_enabled"] == "true"
    assert hyperparameters["sagemaker_instance_type"] == "ml.g5.12xlarge"
    job_args = toolkit_args({k: v for k, v in hyperparameters.items() if "sagemaker_" not in k})
    assert rebuilt(job_args).train.fsdp is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["backend.instance_count=1"],
            r"^train\.fsdp: 1 x ml\.g5\.2xlarge has 1 GPU, nothing to shard across",
        ),
        (
            ["backend.instance_type=ml.g5.12xlarge", "backend.distribution=none"],
            r"^train\.fsdp with backend\.distribution=none starts one process",
        ),
    ],
    ids=["one-gpu", "no-torchrun"],
)
def test_fsdp_that_cannot_shard_is_refused_before_any_upload(
    aws: None, overrides: list[str], message: str
) -> None:
    recorder = Recorder()
    with pytest.raises(UserError, match=message):
        submit(recorder, "train.fsdp=true", *overrides)
    assert not {"PutObject", "CreateTrainingJob"} & set(recorder.names())


TORCHRUN_ON_THE_SECOND_NODE = """
import json, sys
from sagemaker_training.torch_distributed import TorchDistributedRunner

runner = TorchDistributedRunner(
    "train.py", sys.argv[1:], {}, 4, "algo-1", ["algo-1", "algo-2"], "algo-2", "eth0", "ml.g5.12xlarge"
)
print(json.dumps(runner._create_command()))
"""


def test_the_toolkit_starts_every_node_under_torchrun_with_its_rank(tmp_path: Path) -> None:
    """What the image's toolkit (sagemaker-training, TorchDistributedRunner) runs on the second of two
    4-GPU instances: torchrun with the node count, GPUs per node, master and this node's rank; the entry
    script's arguments pass unchanged. (The toolkit reads SAGEMAKER_BASE_DIR at import: a subprocess.)"""
    result = subprocess.run(
        [sys.executable, "-c", TORCHRUN_ON_THE_SECOND_NODE, "--train.fsdp", "true"],
        env={**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    command = json.loads(result.stdout.splitlines()[-1])
    assert command == [
        "torchrun", "--nnodes", "2", "--nproc_per_node", "4", "--master_addr", "algo-1", "--master_port",
        "7777", "--node_rank", "1", "train.py", "--train.fsdp", "true",
    ]  # fmt: skip


# -- submit --------------------------------------------------------------------------------------------------


def test_submit_sends_the_planned_request(aws: None) -> None:
    from sftbridge.backends.sagemaker.backend import SageMakerBackend

    recorder = Recorder()
    job = submit(recorder)
    sent = recorder.only("CreateTrainingJob")
    root = f"s3://{BUCKET}/{RUN_PREFIX}/{job.id}"
    assert re.fullmatch(r"llama2-7b-chat-qlora-sagemaker-\d{14}", job.id)
    assert sent["AlgorithmSpecification"] == {
        "TrainingImage": IMAGE,
        "TrainingInputMode": "File",
        "MetricDefinitions": METRIC_DEFINITIONS,
    }
    assert sent["RoleArn"] == ROLE
    assert sent["ResourceConfig"] == {
        "InstanceType": "ml.g5.2xlarge",
        "InstanceCount": 1,
        "VolumeSizeInGB": 100,
    }
    assert sent["EnableManagedSpotTraining"] is True
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 6 * 3600, "MaxWaitTimeInSeconds": 12 * 3600}
    assert sent["CheckpointConfig"] == {"S3Uri": f"{root}/checkpoints", "LocalPath": "/opt/ml/checkpoints"}
    assert sent["OutputDataConfig"] == {
        "S3OutputPath": f"s3://{BUCKET}/{RUN_PREFIX}",
        "CompressionType": "GZIP",
    }
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in sent["InputDataConfig"]}
    assert channels == {name: f"{root}/input/{name}" for name in ("train", "test", "code")}
    assert sent["Environment"] == {"SFTBRIDGE_BACKEND": "sagemaker"}

    hyperparameters = sent["HyperParameters"]
    assert {k: v for k, v in hyperparameters.items() if k.startswith("sagemaker_")} == {
        "sagemaker_program": "train.py",
        "sagemaker_submit_directory": "/opt/ml/input/data/code",
        "sagemaker_container_log_level": "20",
        "sagemaker_region": "us-east-1",
    }
    assert hyperparameters["train.checkpoint_dir"] == "/opt/ml/checkpoints"
    assert hyperparameters["model.hf_token_secret"] == "sftbridge/hf-token"
    expected = seed_config("train.checkpoint_dir=/opt/ml/checkpoints")
    assert (
        rebuilt(toolkit_args({k: v for k, v in hyperparameters.items() if "sagemaker_" not in k})) == expected
    )

    # The dry run printed this very request (only the job name was still open).
    dry_run = SageMakerBackend(boto_session=recorder.session).dry_run(
        seed_config(), config_path=str(SEED_JOB), overrides=[]
    )
    planned = json.loads(
        dry_run.split("\nrequest:\n", 1)[1].replace("llama2-7b-chat-qlora-sagemaker-<YYYYmmddHHMMSS>", job.id)
    )
    for key, value in planned.items():
        assert sent[key] == value, key

    # Uploads: the data as it is, the unchanged entry script, the package, requirements without torch.
    assert s3_get(f"{root}/input/train/train.jsonl") == (ROOT / "data/sciq-sample/train.jsonl").read_bytes()
    assert s3_get(f"{root}/input/test/test.jsonl") == (ROOT / "data/sciq-sample/test.jsonl").read_bytes()
    assert s3_get(f"{root}/input/code/train.py") == (ROOT / "scripts/train.py").read_bytes()
    assert (
        s3_get(f"{root}/input/code/sftbridge/training/train.py")
        == (ROOT / "src/sftbridge/training/train.py").read_bytes()
    )
    requirements = s3_get(f"{root}/input/code/requirements.txt").decode().split()
    assert requirements == sorted(requirements)
    shipped = dict(line.split("==") for line in requirements)  # every line pinned
    for name in PINNED_IN_JOBS:  # exactly what is installed where the job was submitted
        assert shipped[name] == metadata.version(name), name
    assert "torch" not in shipped  # the image's CUDA build stays
    record = json.loads(s3_get(f"{root}/sftbridge-submission.json"))
    digest = hashlib.sha256((ROOT / "data/sciq-sample/train.jsonl").read_bytes()).hexdigest()
    assert record["inputs"]["train"] == {
        "source": "data/sciq-sample/train.jsonl",
        "s3_uri": f"{root}/input/train",
        "sha256": {"data/sciq-sample/train.jsonl": digest},
    }
    assert record["image"] == IMAGE


V2_SUBMIT = """
import json, sys
import boto3
from moto import mock_aws
from sftbridge.backends.sagemaker.backend import SageMakerBackend, sdk_version
from sftbridge.config import load_config

with mock_aws():
    boto3.client("s3").create_bucket(Bucket=sys.argv[2])
    session = boto3.Session(region_name="us-east-1")
    calls = []
    session.events.register("provide-client-params.sagemaker.*", lambda params, **_: calls.append(params))
    config = load_config(sys.argv[1], sys.argv[3:])
    backend = SageMakerBackend(boto_session=session)
    job = backend.submit(config, config_path=sys.argv[1], overrides=[], run_dir=None)
    request = next(c for c in calls if "AlgorithmSpecification" in c)
    print(json.dumps({"sdk": sdk_version(), "job": job.id, "request": request, "status": job.status()}))
"""


@pytest.mark.skipif(
    not os.environ.get("SFTBRIDGE_SAGEMAKER_V2_PATH"),
    reason="set SFTBRIDGE_SAGEMAKER_V2_PATH to a folder holding sagemaker<3: pip install --target DIR "
    "--no-deps sagemaker==2.257.7 'sagemaker-core<2' google-pasta pathos",
)
def test_sdk_v2_submits_the_same_job(aws_env: dict[str, str]) -> None:
    """With sagemaker<3 the HuggingFace estimator submits the same script, source and hyperparameters."""
    env = {**os.environ, "PYTHONPATH": os.environ["SFTBRIDGE_SAGEMAKER_V2_PATH"]}
    env["SAGEMAKER_SUPPRESS_V2_WARNING"] = "1"
    versions = ["backend.transformers_version=4.56.2", "backend.pytorch_version=2.8.0"]  # v2's newest image
    overrides = [f"backend.role={ROLE}", f"backend.bucket={BUCKET}", *versions]
    result = subprocess.run(
        [sys.executable, "-c", V2_SUBMIT, str(SEED_JOB), BUCKET, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["sdk"].startswith("2.") and out["status"] == "completed"
    sent = out["request"]
    assert sent["AlgorithmSpecification"]["TrainingImage"].endswith(
        "2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04"
    )
    assert sent["EnableManagedSpotTraining"] is True
    assert sent["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert {c["ChannelName"] for c in sent["InputDataConfig"]} == {"train", "test"}  # code: sourcedir.tar.gz
    hyperparameters = {k: json.loads(v) for k, v in sent["HyperParameters"].items()}  # v2 JSON-encodes them
    assert hyperparameters["sagemaker_program"] == "train.py"
    assert hyperparameters["sagemaker_submit_directory"].endswith("/source/sourcedir.tar.gz")
    ours = {k: v for k, v in hyperparameters.items() if not k.startswith("sagemaker_")}
    expected = seed_config(*versions, "train.checkpoint_dir=/opt/ml/checkpoints")
    assert rebuilt(toolkit_args(ours, v2=True)) == expected


def test_s3_data_is_used_as_it_is(aws: None) -> None:
    recorder = Recorder()
    job = submit(recorder, "data.train_file=s3://elsewhere/sciq/train.jsonl", "data.test_file=null")
    channels = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
        for c in recorder.only("CreateTrainingJob")["InputDataConfig"]
    }
    assert channels["train"] == "s3://elsewhere/sciq/train.jsonl"
    assert set(channels) == {"train", "code"}
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert not [k for k in keys if "/input/train/" in k]  # nothing uploaded for it
    assert job.id


def all_stored_objects() -> Iterator[bytes]:
    s3 = boto3.client("s3")
    for bucket in s3.list_buckets()["Buckets"]:
        for item in s3.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            yield s3.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()


def test_hf_token_appears_in_no_request(aws: None) -> None:
    assert os.environ["HF_TOKEN"] == FAKE_TOKEN  # set for the session by conftest
    recorder = Recorder()
    job = submit(recorder)
    assert "CreateTrainingJob" in recorder.names() and "PutObject" in recorder.names()
    assert FAKE_TOKEN not in json.dumps(recorder.calls, default=str)
    assert not [body for body in all_stored_objects() if FAKE_TOKEN.encode() in body]
    assert FAKE_TOKEN not in json.dumps(job.describe(), default=str)


def test_passing_hf_token_in_the_environment_is_an_explicit_opt_in(
    aws: None, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    submit(recorder, "backend.pass_hf_token=true")
    sent = recorder.only("CreateTrainingJob")
    assert sent["Environment"]["HF_TOKEN"] == FAKE_TOKEN
    assert FAKE_TOKEN not in json.dumps(sent["HyperParameters"])
    assert "DescribeTrainingJob" in caplog.text and "HF_TOKEN" in caplog.text  # the warning
    from sftbridge.backends.sagemaker.backend import SageMakerBackend

    printed = SageMakerBackend(boto_session=recorder.session).dry_run(
        seed_config("backend.pass_hf_token=true"), config_path=None, overrides=[]
    )
    assert FAKE_TOKEN not in printed and '"HF_TOKEN": "***"' in printed


def test_a_secret_in_a_config_value_is_refused(aws: None) -> None:
    recorder = Recorder()
    with pytest.raises(ConfigError, match=r"data\.system_prompt.*\$HF_TOKEN"):
        submit(recorder, f"data.system_prompt=use {FAKE_TOKEN}")
    assert "PutObject" not in recorder.names()


@pytest.mark.parametrize(
    ("setup", "overrides", "message"),
    [
        ("no-credentials", [], r"^no AWS credentials: run `aws configure`"),
        ("no-region", ["backend.region=null"], r"^backend\.region: no AWS region"),
        ("", ["backend.role=null"], r"^backend\.role: no execution role"),
        ("", ["backend.role=SageMakerRole"], r"^backend\.role: 'SageMakerRole' is not a role ARN"),
        ("", ["backend.instance_type=ml.g5.3xlarge"], r"^backend\.instance_type: 'ml\.g5\.3xlarge' is not"),
        ("", ["backend.bucket=no-such-bucket"], r"^backend\.bucket: s3://no-such-bucket does not exist"),
        ("", ["model.hf_token_secret=sftbridge/hf-tokn"], r"^model\.hf_token_secret: there is no secret"),
        (
            "",
            ["backend.secret_environment.WANDB_API_KEY=team/wandb"],
            r"^backend\.secret_environment\.WANDB_API_KEY: there is no secret 'team/wandb' in us-east-1; "
            r"fix the name, or create it: aws secretsmanager create-secret",
        ),
    ],
    ids=["credentials", "region", "role", "role-arn", "instance-type", "bucket", "hf-secret", "secret-env"],
)
def test_preflight_errors_come_before_any_upload(
    aws: None, monkeypatch: pytest.MonkeyPatch, setup: str, overrides: list[str], message: str
) -> None:
    if setup == "no-credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    if setup == "no-region":
        monkeypatch.delenv("AWS_DEFAULT_REGION")
    recorder = Recorder(region=None if setup == "no-region" else "us-east-1")
    with pytest.raises(UserError) as info:
        submit(recorder, *overrides)
    assert re.search(message, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)
    assert not {"PutObject", "CreateTrainingJob"} & set(recorder.names())


# -- status, logs --------------------------------------------------------------------------------------------


def test_status_of_a_failed_job_shows_the_reason(aws: None, tmp_path: Path) -> None:
    from moto.sagemaker.models import sagemaker_backends

    job = submit(Recorder())
    assert job.status() == "completed"  # moto creates jobs completed
    fake = sagemaker_backends["123456789012"]["us-east-1"].training_jobs[job.id]
    fake.training_job_status = fake.secondary_status = "Failed"
    fake.failure_reason = "AlgorithmError: CUDA out of memory"
    fake.billable_time_in_seconds = 321
    assert job.status() == "failed: AlgorithmError: CUDA out of memory"
    rows = dict(job.summary())
    assert rows["state"] == "Failed (Failed)"
    assert rows["failure"] == "AlgorithmError: CUDA out of memory"
    assert rows["billable"] == "321 s"
    assert rows["instance"] == "1 x ml.g5.2xlarge, spot"
    assert rows["console"].endswith(f"#/jobs/{job.id}")
    assert job.wait() == 1
    with pytest.raises(RunDirError, match="only a completed job"):
        job.fetch(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def now_ms() -> int:
    return int(time.time() * 1000)  # CloudWatch drops events older than 14 days


def test_logs_come_from_the_jobs_cloudwatch_streams(aws: None) -> None:
    job = submit(Recorder())
    logs = boto3.client("logs")
    assert list(job.logs()) == []  # no instance has logged yet
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    for host, lines in (("algo-1-1700000000", ["loading", "step 1"]), ("algo-2-1700000000", ["step 1"])):
        stream = f"{job.id}/{host}"
        logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream)
        logs.put_log_events(
            logGroupName="/aws/sagemaker/TrainingJobs",
            logStreamName=stream,
            logEvents=[{"timestamp": now_ms() + i, "message": line} for i, line in enumerate(lines)],
        )
    expected = ["[algo-1-1700000000] loading", "[algo-1-1700000000] step 1", "[algo-2-1700000000] step 1"]
    assert list(job.logs()) == expected
    assert list(job.logs(follow=True)) == expected  # the job has ended: following stops


# -- fetch ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run (the tiny model, 3 steps on the sample data the seed job submits) as the script writes it
    into SM_MODEL_DIR in a job, where the data paths are inside the input channels."""
    overrides = ["train.max_steps=3", "train.answer_metrics=false"]
    dest = train_in_root(overrides, tmp_path_factory.mktemp("opt_ml") / "model")
    manifest = json.loads((dest / "sftbridge.json").read_text())
    container = {
        manifest["config"]["data"]["train_file"]: "/opt/ml/input/data/train/train.jsonl",
        manifest["config"]["data"]["test_file"]: "/opt/ml/input/data/test/test.jsonl",
    }
    for key in ("train_file", "test_file"):
        manifest["config"]["data"][key] = container[manifest["config"]["data"][key]]
    manifest["data"]["sha256"] = {container[k]: v for k, v in manifest["data"]["sha256"].items()}
    (dest / "sftbridge.json").write_text(json.dumps(manifest, indent=2))
    return dest


def tar_gz(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


@pytest.mark.parametrize("compressed", [True, False], ids=["model.tar.gz", "uncompressed"])
def test_fetch_builds_a_run_directory_like_a_local_one(
    aws: None, model_dir: Path, tmp_path: Path, compressed: bool
) -> None:
    from sftbridge.inference.predictor import Predictor

    job = submit(Recorder(), f"backend.disable_output_compression={str(not compressed).lower()}")
    output = model_dir
    s3 = boto3.client("s3")
    job_root = f"{RUN_PREFIX}/{job.id}/output"
    if compressed:
        s3.put_object(Bucket=BUCKET, Key=f"{job_root}/model.tar.gz", Body=tar_gz(output))
    else:
        for path in output.rglob("*"):
            if path.is_file():
                s3.put_object(
                    Bucket=BUCKET, Key=f"{job_root}/model/{path.relative_to(output)}", Body=path.read_bytes()
                )

    run = job.fetch(tmp_path / "fetched")
    assert {p.relative_to(run) for p in run.rglob("*")} == {p.relative_to(output) for p in output.rglob("*")}
    assert {p.name for p in run.iterdir()} == {
        "COMPLETE",
        "adapter",
        "config.yaml",
        "metrics.jsonl",
        "report.html",
        "sftbridge.json",
    }
    manifest = json.loads((run / "sftbridge.json").read_text())
    assert manifest["backend"] == {"name": "sagemaker", "job_id": job.id}
    assert manifest["sagemaker"]["job_name"] == job.id
    assert manifest["sagemaker"]["image"] == IMAGE
    # The data paths point at the files as submitted again (so `sftbridge eval RUN` finds the test file).
    assert manifest["config"]["data"]["test_file"] == "data/sciq-sample/test.jsonl"
    assert load_config(run / "config.yaml").data.test_file == "data/sciq-sample/test.jsonl"
    digest = hashlib.sha256((ROOT / "data/sciq-sample/train.jsonl").read_bytes()).hexdigest()
    assert manifest["data"]["sha256"]["data/sciq-sample/train.jsonl"] == digest
    assert manifest["sagemaker"]["inputs"]["train"]["sha256"] == {"data/sciq-sample/train.jsonl": digest}
    # The inference wrapper loads it, and the adapter is the one the job wrote.
    answers = []
    for folder in (run, output):
        predictor = Predictor.from_run(folder, device="cpu")
        answers.append(
            predictor.generate([predictor.prompt("What gives skin its color?")], max_new_tokens=4)[0]
        )
    assert answers[0].token_ids and answers[0].token_ids == answers[1].token_ids


def test_fetch_refuses_a_malicious_archive(aws: None, tmp_path: Path) -> None:
    job = submit(Recorder())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    boto3.client("s3").put_object(
        Bucket=BUCKET, Key=f"{RUN_PREFIX}/{job.id}/output/model.tar.gz", Body=buffer.getvalue()
    )
    with pytest.raises(RunDirError, match=r"unsafe path"):
        job.fetch(tmp_path / "a" / "b" / "run")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "a" / "b" / "run").exists()


def malicious(tmp_path: Path, name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Path:
    archive = tmp_path / f"{abs(hash(name))}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        data = b"" if link else b"evil"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.mark.parametrize(
    ("name", "kind", "link"),
    [
        ("../evil", tarfile.REGTYPE, ""),
        ("ok/../../evil", tarfile.REGTYPE, ""),
        ("/tmp/evil", tarfile.REGTYPE, ""),
        ("link", tarfile.SYMTYPE, "/etc/passwd"),
        ("sub/link", tarfile.SYMTYPE, "../../outside"),
        ("hard", tarfile.LNKTYPE, "../outside"),
        ("dev", tarfile.CHRTYPE, ""),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-absolute", "symlink-out", "hardlink-out", "device"],
)
def test_safe_extract_refuses_escaping_members(tmp_path: Path, name: str, kind: bytes, link: str) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(RunDirError, match=r"refusing|outside|absolute|unsafe"):
        safe_extract(malicious(tmp_path, name, kind, link), dest)
    assert not dest.exists()


def test_safe_extract_keeps_links_inside(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("adapter/weights.bin")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("adapter/latest")
        link.type, link.linkname = tarfile.SYMTYPE, "weights.bin"
        tar.addfile(link)
    dest = safe_extract(archive, tmp_path / "dest")
    assert (dest / "adapter" / "latest").read_bytes() == b"abc"


# -- the CLI, against moto_server on 127.0.0.1 ---------------------------------------------------------------


def test_dry_run_prints_the_request_without_calling_aws(aws_env: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens there: any AWS call would fail
    result = cli("train", str(SEED_JOB), f"backend.role={ROLE}", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in (
        f"image         {IMAGE}",
        "instance      1 x ml.g5.2xlarge (1 GPU each), 100 GB disk",
        "spot          on; max run 6 h, max wait 12 h",
        "checkpoints   /opt/ml/checkpoints <-> s3://sagemaker-us-east-1-<account>/",
        f"cost          $1.515/hour on demand (us-east-1 list price, table of {PRICE_TABLE_DATE})",
        "--train.checkpoint_dir /opt/ml/checkpoints",
        "--model.hf_token_secret sftbridge/hf-token",
        "data/sciq-sample/train.jsonl (sha256 ",
    ):
        assert expected in out, expected
    request = json.loads(out.split("\nrequest:\n", 1)[1])
    assert request["EnableManagedSpotTraining"] is True
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["train", "test", "code"]
    assert FAKE_TOKEN not in out


@pytest.mark.slow
def test_cli_train_status_logs_fetch_eval(moto_server: str, model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "AWS_ENDPOINT_URL": moto_server}
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket=BUCKET)
    secrets = boto3.client("secretsmanager", endpoint_url=moto_server)
    secrets.create_secret(Name="sftbridge/hf-token", SecretString="hf_stored")  # as the config's comment says

    submitted = sftbridge(
        "train", str(SEED_JOB), f"backend.role={ROLE}", f"backend.bucket={BUCKET}", "--detach", env=env
    )
    assert submitted.returncode == 0, submitted.stderr
    assert "INFO" not in submitted.stderr  # the SDK's chatter stays behind `sftbridge -v`
    job = re.search(r"^job (\S+) \(sagemaker\)$", submitted.stdout, re.M)
    assert job, submitted.stdout
    job_name = job.group(1)
    assert f"#/jobs/{job_name}" in submitted.stdout

    status = sftbridge("status", job_name, env=env)
    assert status.returncode == 0, status.stderr
    assert "state     Completed (Completed)" in status.stdout

    logs = boto3.client("logs", endpoint_url=moto_server)
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    stream = f"{job_name}/algo-1-1700000000"
    logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream)
    logs.put_log_events(
        logGroupName="/aws/sagemaker/TrainingJobs",
        logStreamName=stream,
        logEvents=[{"timestamp": now_ms(), "message": "run directory: /opt/ml/model"}],
    )
    printed = sftbridge("logs", job_name, "--follow", env=env)
    assert printed.returncode == 0 and printed.stdout == "run directory: /opt/ml/model\n", printed.stderr

    s3.put_object(Bucket=BUCKET, Key=f"{RUN_PREFIX}/{job_name}/output/model.tar.gz", Body=tar_gz(model_dir))
    fetched = sftbridge("fetch", job_name, "--run-dir", str(tmp_path / "run"), env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert f"run directory: {tmp_path / 'run'}" in fetched.stdout

    evaluated = sftbridge("eval", str(tmp_path / "run"), "--limit", "3", "--no-base", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "data/sciq-sample/test.jsonl" in evaluated.stdout


def test_requirements_ranges_on_request() -> None:
    """backend.requirements=ranges ships the declared ranges instead of this machine's versions."""
    from sftbridge.backends.sagemaker.source import requirements

    ranges = requirements(pinned=False)
    assert "trl<2,>=1.16.0" in ranges and not any("==" in line for line in ranges)
    assert not any(line.startswith("torch") for line in ranges)
    assert seed_config("backend.requirements=ranges").backend.requirements == "ranges"


def test_image_torch_differing_from_this_machine_is_noted() -> None:
    spec = make_job_spec(
        seed_config("backend.pytorch_version=1.0.0"), config_path=None, region="us-east-1", image=IMAGE
    )
    assert any("the image's torch 1.0.0" in note for note in spec.notes)
    same = make_job_spec(
        seed_config(f"backend.pytorch_version={metadata.version('torch').split('+')[0]}"),
        config_path=None,
        region="us-east-1",
        image=IMAGE,
    )
    assert not any("the image's torch" in note for note in same.notes)


def test_a_jobs_trackers_are_installed_in_it() -> None:
    """train.report_to=[mlflow] ships mlflow and sagemaker-mlflow, pinned like the rest."""
    from sftbridge.backends.sagemaker.source import requirements

    spec = make_job_spec(
        seed_config("train.report_to=[mlflow]"), config_path=None, region="us-east-1", image=IMAGE
    )
    shipped = dict(line.split("==") for line in requirements(True, tuple(spec.extras)))
    for name in ("mlflow", "sagemaker-mlflow"):
        assert shipped[name] == metadata.version(name)
    assert "mlflow" not in dict(line.split("==") for line in requirements(True))


def test_a_dpo_job_ships_its_parent_run_and_carries_method_dpo(
    aws: None, short_run: Path, tmp_path: Path
) -> None:
    """DPO after SFT on SageMaker: the same script and request, train.method=dpo among the hyperparameters,
    and model.adapter's run uploaded as the ``parent`` channel, which the script then continues from."""
    from conftest import write_jsonl
    from sftbridge.backends.sagemaker.backend import SageMakerBackend
    from sftbridge.training.sagemaker_env import SageMakerEnv

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "q", "chosen": "a", "rejected": "a b c"}])
    config = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [
            f"backend.role={ROLE}",
            f"backend.bucket={BUCKET}",
            "backend.name=sagemaker",
            "train.method=dpo",
            f"model.adapter={short_run}",
            f"data.train_file={pairs}",
        ],
    )
    recorder = Recorder()
    job = SageMakerBackend(boto_session=recorder.session).submit(
        config, config_path=None, overrides=[], run_dir=None
    )
    sent = recorder.only("CreateTrainingJob")
    assert sent["HyperParameters"]["train.method"] == "dpo"
    assert sent["HyperParameters"]["model.adapter"] == str(short_run)
    root = f"s3://{BUCKET}/sftbridge/tiny-cpu/{job.id}"
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in sent["InputDataConfig"]}
    assert channels["parent"] == f"{root}/input/parent"
    for name in (
        "sftbridge.json",
        "COMPLETE",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert s3_get(f"{root}/input/parent/{name}") == (short_run / name).read_bytes()
    # In the job, SM_CHANNEL_PARENT (the channel's folder) becomes model.adapter.
    env = SageMakerEnv.from_environ({"SM_CHANNEL_PARENT": "/opt/ml/input/data/parent"})
    assert env.data_overrides(config) == {"model": {"adapter": "/opt/ml/input/data/parent"}}

    with pytest.raises(ConfigError, match=r"model.adapter: .*not a run directory"):
        SageMakerBackend(boto_session=recorder.session).submit(
            config.model_copy(update={"model": config.model.model_copy(update={"adapter": str(tmp_path)})}),
            config_path=None,
            overrides=[],
            run_dir=None,
        )
