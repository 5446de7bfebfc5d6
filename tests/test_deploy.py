"""`deploy` / `invoke` / `undeploy` against moto: real boto3 and SageMaker SDK calls, no AWS."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import FAKE_TOKEN

moto = pytest.importorskip("moto")
pytest.importorskip("sagemaker")

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account
ROLE = f"arn:aws:iam::{ACCOUNT}:role/SageMakerExecution"
BUCKET = f"sagemaker-{REGION}-{ACCOUNT}"  # the SDK's default bucket
INSTANCE = "ml.g4dn.xlarge"  # moto 5.2's instance list predates ml.g5: a T4 GPU it knows
QUESTION = "What pigment produced by skin cells gives human skin, hair, and eyes much of their color?"
IMAGE = re.compile(
    rf"^763104351884\.dkr\.ecr\.{REGION}\.amazonaws\.com/huggingface-pytorch-tgi-inference:[\w.-]+-tgi[\d.]+-gpu-"
)


class Recorder:
    """Every AWS request our code makes: operation, parameters, and the raw request."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[str] = []

    def params(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.calls.append((model.name, dict(params)))

    def request(self, request: Any, **_: Any) -> None:
        body = request.body if isinstance(request.body, (bytes, str)) else b""
        self.raw.append(f"{request.url} {dict(request.headers)} {body!r}")

    def of(self, operation: str) -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == operation]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Recorder]:
    """Fake credentials, a region, the SDK's telemetry off, moto in-process; records every request."""
    import boto3

    config = tmp_path / "sagemaker-config.yaml"
    config.write_text(
        "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"
    )
    monkeypatch.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", str(config))
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    recorder = Recorder()
    real_session = boto3.Session

    def session(*args: Any, **kwargs: Any) -> Any:  # the real Session, with listeners attached
        created = real_session(*args, **kwargs)
        created.events.register("provide-client-params.*.*", recorder.params)
        created.events.register("request-created.*.*", recorder.request)
        return created

    monkeypatch.setattr(boto3, "Session", session)
    with moto.mock_aws():
        yield recorder


def s3_objects(bucket: str = BUCKET) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", region_name=REGION)
    listing = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listing}


def set_endpoint_answer(answer: Any) -> None:
    """moto's endpoint-results API: what the next invoke of an endpoint returns."""
    import requests

    results = {"region": REGION, "results": [{"Body": json.dumps(answer), "ContentType": "application/json"}]}
    assert requests.post(
        "http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results", json=results, timeout=10
    ).ok


def test_deploy_invoke_undeploy(aws: Recorder, trained_run: Path) -> None:
    import boto3
    from botocore.exceptions import ClientError

    from sftbridge.inference.predictor import Predictor
    from sftbridge.serving.deploy import deploy, invoke, undeploy

    result = deploy(trained_run, name="tiny-endpoint", instance_type=INSTANCE, role=ROLE)
    model_data = f"s3://{BUCKET}/sftbridge/endpoints/tiny-endpoint/model.tar.gz"
    assert result["status"] == "InService" and result["model_data"] == model_data

    # The requests, as sent (moto's describe drops the environment).
    (model,) = aws.of("CreateModel")
    assert IMAGE.match(model["PrimaryContainer"]["Image"]), model["PrimaryContainer"]["Image"]
    assert model["PrimaryContainer"]["ModelDataUrl"] == model_data
    assert model["PrimaryContainer"]["Environment"] == {"HF_MODEL_ID": "/opt/ml/model", "SM_NUM_GPUS": "1"}
    assert model["ExecutionRoleArn"] == ROLE
    (config,) = aws.of("CreateEndpointConfig")
    (variant,) = config["ProductionVariants"]
    assert variant["ModelName"] == "tiny-endpoint" and variant["InstanceType"] == INSTANCE
    assert variant["InitialInstanceCount"] == 1
    (endpoint,) = aws.of("CreateEndpoint")
    assert endpoint["EndpointConfigName"] == "tiny-endpoint"
    record_tag = {
        "Key": "sftbridge:record",
        "Value": f"s3://{BUCKET}/sftbridge/endpoints/tiny-endpoint/record/",
    }
    assert record_tag in endpoint["Tags"]
    # Nothing was created before the checks: credentials, image, name and bucket come first.
    names = [name for name, _ in aws.calls]
    assert names.index("GetCallerIdentity") < names.index("PutObject") < names.index("CreateModel")

    # What SageMaker would unpack into /opt/ml/model: a plain model folder in 16-bit weights.
    objects = s3_objects()
    with tarfile.open(fileobj=io.BytesIO(objects["sftbridge/endpoints/tiny-endpoint/model.tar.gz"])) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert {"config.json", "model.safetensors", "tokenizer.json", "sftbridge.json"} <= set(members)
    assert not any("/" in name for name in members)
    assert json.loads(members["config.json"])["dtype"] == "float16"  # a T4 has no bf16
    record = {key.rsplit("/", 1)[1] for key in objects if "/record/" in key}
    assert {"sftbridge.json", "tokenizer.json"} <= record and not any(".safetensors" in k for k in record)

    # invoke: the seed's payload, formatted with the run's own template.
    set_endpoint_answer([{"generated_text": " melanin ", "details": {"finish_reason": "eos_token"}}])
    request, answer = invoke("tiny-endpoint", QUESTION)
    predictor = Predictor.from_run(trained_run, device="cpu")
    assert request == {
        "inputs": predictor.prompt(QUESTION),
        "parameters": {
            "max_new_tokens": predictor.generation.max_new_tokens,
            "do_sample": False,
            "details": True,
        },
    }
    assert request["inputs"].startswith("<s>[INST] ")
    assert answer["generated_text"] == " melanin "
    (sent,) = aws.of("InvokeEndpoint")
    assert json.loads(sent["Body"]) == request and sent["ContentType"] == "application/json"

    # The Hugging Face token went nowhere: not in a request, not in an uploaded file.
    assert not any(FAKE_TOKEN in str(params) for _, params in aws.calls)
    assert not any(FAKE_TOKEN in raw for raw in aws.raw)
    assert not any(FAKE_TOKEN.encode() in data for data in [*objects.values(), *members.values()])

    assert undeploy("tiny-endpoint") == [
        "endpoint tiny-endpoint",
        "endpoint config tiny-endpoint",
        "model tiny-endpoint",
    ]
    sm = boto3.client("sagemaker", region_name=REGION)
    with pytest.raises(ClientError):
        sm.describe_endpoint(EndpointName="tiny-endpoint")
    with pytest.raises(ClientError):
        sm.describe_endpoint_config(EndpointConfigName="tiny-endpoint")
    with pytest.raises(ClientError):
        sm.describe_model(ModelName="tiny-endpoint")


def test_cli_deploys_a_merged_folder(
    aws: Recorder, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sftbridge.cli import main
    from sftbridge.inference.merge import merge_run

    merged = merge_run(trained_run, tmp_path / "merged", dtype="bfloat16", device="cpu")
    args = [
        "deploy",
        str(merged),
        "--instance-type",
        "ml.p3.2xlarge",
        "--role",
        ROLE,
        "--name",
        "cli-endpoint",
    ]
    assert main([*args, "--bucket", "my-models", "--prefix", "team/llm"]) == 2  # no such bucket
    assert "--bucket: s3://my-models does not exist" in capsys.readouterr().err
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("endpoint cli-endpoint: InService (ml.p3.2xlarge, us-east-1)")
    assert 'sftbridge invoke cli-endpoint "your question"' in out
    assert not aws.of("CreateModel")[0]["PrimaryContainer"]["Environment"].get("HF_TOKEN")

    set_endpoint_answer([{"generated_text": " melanin "}])
    assert main(["invoke", "cli-endpoint", QUESTION]) == 0
    assert capsys.readouterr().out == "melanin\n"
    assert (
        main(["deploy", str(merged), "--instance-type", INSTANCE, "--role", ROLE, "--name", "cli-endpoint"])
        == 2
    )
    assert "named cli-endpoint already exists" in capsys.readouterr().err
    assert main(["undeploy", "cli-endpoint"]) == 0
    assert capsys.readouterr().out.count("deleted ") == 3
    assert main(["undeploy", "cli-endpoint"]) == 2
    assert "endpoint cli-endpoint in us-east-1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "args", "message"),
    [
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, {}, "error: no AWS credentials: "),
        ({"AWS_DEFAULT_REGION": None}, {}, "error: no AWS region: pass --region or set AWS_DEFAULT_REGION"),
        ({}, {"--role": None}, "error: no execution role: pass --role arn:aws:iam::<account>:role/<name>"),
        (
            {},
            {"--role": "SageMakerExecution"},
            "error: --role: 'SageMakerExecution' is not a role ARN",
        ),
        (
            {},
            {"--instance-type": "ml.m5.xlarge"},
            "error: --instance-type ml.m5.xlarge: not a GPU instance type",
        ),
        ({}, {"--instance-type": "ml.g9.huge"}, "error: --instance-type ml.g9.huge: not a GPU instance type"),
        ({}, {"--name": "bad_name"}, "error: --name bad_name: use up to 63 letters, digits and hyphens"),
        ({}, {"--tgi-version": "0.0.1"}, "error: no Hugging Face LLM image for us-east-1"),
    ],
)
def test_preflight_errors_are_one_line_and_come_before_any_upload(
    aws: Recorder,
    trained_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str | None],
    args: dict[str, str | None],
    message: str,
) -> None:
    from sftbridge.cli import main

    for name, value in change.items():
        if value is None:
            monkeypatch.delenv(name)
    options = {"--instance-type": INSTANCE, "--role": ROLE, "--name": "tiny", **args}
    argv = ["deploy", str(trained_run)] + [
        part for k, v in options.items() if v is not None for part in (k, v)
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not {"PutObject", "CreateMultipartUpload", "CreateModel"} & {name for name, _ in aws.calls}


def test_a_bucket_that_cannot_be_written_is_refused_before_upload(
    aws: Recorder, trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto enforces IAM here: a user whose policy denies s3:PutObject."""
    import boto3
    from moto.core import set_initial_no_auth_action_count

    from sftbridge.serving.deploy import DeployError, deploy

    def as_restricted_user() -> None:
        iam = boto3.client("iam", region_name=REGION)
        boto3.client("s3", region_name=REGION).create_bucket(Bucket="read-only-bucket")
        iam.create_user(UserName="deployer")
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*"},
            ],
        }
        iam.put_user_policy(UserName="deployer", PolicyName="no-writes", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="deployer")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(DeployError, match=r"--bucket: cannot write to s3://read-only-bucket/"):
            deploy(trained_run, name="tiny", instance_type=INSTANCE, role=ROLE, bucket="read-only-bucket")
        assert "CreateModel" not in {name for name, _ in aws.calls}

    set_initial_no_auth_action_count(4)(as_restricted_user)()
