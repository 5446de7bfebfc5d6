"""`deploy` / `invoke` / `undeploy` against moto: real boto3 and SageMaker SDK calls, no AWS."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import AWS_REGION, FAKE_TOKEN

moto = pytest.importorskip("moto")
pytest.importorskip("sagemaker")

REGION = AWS_REGION
ACCOUNT = "123456789012"  # moto's account
ROLE = f"arn:aws:iam::{ACCOUNT}:role/SageMakerExecution"
BUCKET = f"sagemaker-{REGION}-{ACCOUNT}"  # the SDK's default bucket
INSTANCE = "ml.g4dn.xlarge"  # moto 5.2's instance list predates ml.g5: a T4 GPU it knows
QUESTION = "What pigment produced by skin cells gives human skin, hair, and eyes much of their color?"
TGI_IMAGE = re.compile(
    rf"^763104351884\.dkr\.ecr\.{REGION}\.amazonaws\.com/huggingface-pytorch-tgi-inference:[\w.-]+-tgi[\d.]+-gpu-"
)
VLLM_IMAGE = re.compile(
    rf"^763104351884\.dkr\.ecr\.{REGION}\.amazonaws\.com/huggingface-vllm:[\d.]+-transformers[\d.]+-gpu-"
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
def aws(fake_aws: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """conftest's fake AWS (moto in-process), recording every request."""
    import boto3

    recorder = Recorder()
    real_session = boto3.Session

    def session(*args: Any, **kwargs: Any) -> Any:  # the real Session, with listeners attached
        created = real_session(*args, **kwargs)
        created.events.register("provide-client-params.*.*", recorder.params)
        created.events.register("request-created.*.*", recorder.request)
        return created

    monkeypatch.setattr(boto3, "Session", session)
    return recorder


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


def model_data() -> dict[str, bytes]:
    """The files of the one model.tar.gz uploaded, as SageMaker would unpack them into /opt/ml/model."""
    objects = s3_objects()
    (key,) = [key for key in objects if key.endswith("/model.tar.gz")]
    with tarfile.open(fileobj=io.BytesIO(objects[key])) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def assert_no_token(aws: Recorder) -> None:
    """The Hugging Face token went nowhere: not in a request, not in an uploaded file."""
    assert not any(FAKE_TOKEN in str(params) for _, params in aws.calls)
    assert not any(FAKE_TOKEN in raw for raw in aws.raw)
    assert not any(FAKE_TOKEN.encode() in data for data in [*s3_objects().values(), *model_data().values()])


def renders_like_the_run(template: bytes, predictor: Any) -> None:
    """The chat template that travels formats a conversation exactly as the run's own prompt()."""
    for messages in (
        [{"role": "user", "content": QUESTION}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
    ):
        rendered = predictor.tokenizer.apply_chat_template(
            messages, chat_template=template.decode(), tokenize=False, add_generation_prompt=True
        )
        assert rendered == predictor.prompt(messages)


def test_deploy_on_vllm_invoke_undeploy(aws: Recorder, short_run: Path) -> None:
    import boto3
    from botocore.exceptions import ClientError

    from sftbridge.inference.predictor import Predictor
    from sftbridge.serving.deploy import deploy, undeploy
    from sftbridge.serving.endpoint import invoke

    result = deploy(short_run, name="tiny-endpoint", instance_type=INSTANCE, role=ROLE)
    data_url = f"s3://{BUCKET}/sftbridge/endpoints/tiny-endpoint/model.tar.gz"
    assert result["status"] == "InService" and result["model_data"] == data_url
    assert (result["engine"], result["mode"]) == ("vllm", "merged")

    # The requests, as sent (moto's describe drops the environment).
    (model,) = aws.of("CreateModel")
    container = model["PrimaryContainer"]
    assert VLLM_IMAGE.match(container["Image"]), container["Image"]
    assert container["ModelDataUrl"] == data_url
    assert container["Environment"] == {
        "SM_VLLM_MODEL": "/opt/ml/model",
        "SM_VLLM_SERVED_MODEL_NAME": "tiny-endpoint",
        "SM_VLLM_TENSOR_PARALLEL_SIZE": "1",
        "SM_VLLM_DTYPE": "float16",  # a T4 has no bf16
        "SM_VLLM_CHAT_TEMPLATE": "/opt/ml/model/chat_template.jinja",
    }
    assert "AdditionalModelDataSources" not in container
    assert model["ExecutionRoleArn"] == ROLE
    (config,) = aws.of("CreateEndpointConfig")
    (variant,) = config["ProductionVariants"]
    assert variant["ModelName"] == "tiny-endpoint" and variant["InstanceType"] == INSTANCE
    assert variant["InitialInstanceCount"] == 1
    (endpoint,) = aws.of("CreateEndpoint")
    assert endpoint["EndpointConfigName"] == "tiny-endpoint"
    record = f"s3://{BUCKET}/sftbridge/endpoints/tiny-endpoint/record/"
    assert {"Key": "sftbridge:record", "Value": record} in endpoint["Tags"]
    assert {"Key": "sftbridge:engine", "Value": "vllm"} in endpoint["Tags"]
    # Nothing was created before the checks: credentials, image, name and bucket come first.
    names = [name for name, _ in aws.calls]
    assert names.index("GetCallerIdentity") < names.index("PutObject") < names.index("CreateModel")

    # What SageMaker would unpack into /opt/ml/model: a plain model folder in 16-bit weights + the template.
    members = model_data()
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "sftbridge.json",
        "chat_template.jinja",
    } <= set(members)
    assert not any("/" in name for name in members)
    assert json.loads(members["config.json"])["dtype"] == "float16"
    predictor = Predictor.from_run(short_run, device="cpu")
    renders_like_the_run(members["chat_template.jinja"], predictor)
    recorded = {key.rsplit("/", 1)[1] for key in s3_objects() if "/record/" in key}
    assert {"sftbridge.json", "tokenizer.json"} <= recorded and not any(".safetensors" in k for k in recorded)

    # invoke: OpenAI messages (the endpoint's template formats them), decoding from the run.
    openai_answer = {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "melanin"}, "finish_reason": "stop"}
        ],
    }
    set_endpoint_answer(openai_answer)
    request, answer = invoke("tiny-endpoint", QUESTION)
    assert request == {
        "model": "tiny-endpoint",
        "messages": predictor.prompt_format.question_to_messages(QUESTION),
        "max_tokens": predictor.generation.max_new_tokens,
        "temperature": 0,
    }
    assert answer == {"generated_text": "melanin", "finish_reason": "stop", "response": openai_answer}
    (sent,) = aws.of("InvokeEndpoint")
    assert json.loads(sent["Body"]) == request and sent["ContentType"] == "application/json"
    assert_no_token(aws)

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


@pytest.mark.parametrize(
    ("base", "model"),
    [
        (f"s3://{BUCKET}/bases/tiny-llama/", "/opt/ml/additional-model-data-sources/base"),
        ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
    ],
)
def test_deploy_base_and_adapter_on_vllm(aws: Recorder, short_run: Path, base: str, model: str) -> None:
    from sftbridge.inference.predictor import Predictor
    from sftbridge.serving.deploy import deploy
    from sftbridge.serving.endpoint import invoke

    result = deploy(
        short_run,
        name="lora-endpoint",
        mode="adapter",
        base=base,
        instance_type="ml.g4dn.2xlarge",
        role=ROLE,
    )
    assert (result["engine"], result["mode"], result["status"]) == ("vllm", "adapter", "InService")
    (created,) = aws.of("CreateModel")
    container = created["PrimaryContainer"]
    assert VLLM_IMAGE.match(container["Image"])
    assert container["Environment"] == {
        "SM_VLLM_MODEL": model,
        "SM_VLLM_SERVED_MODEL_NAME": "lora-endpoint-base",
        "SM_VLLM_ENABLE_LORA": "",  # an empty value: the bare flag --enable-lora
        "SM_VLLM_LORA_MODULES": "lora-endpoint=/opt/ml/model",  # the fine-tune answers to the endpoint's name
        "SM_VLLM_MAX_LORA_RANK": "16",  # the run's lora.r
        "SM_VLLM_TOKENIZER": "/opt/ml/model",
        "SM_VLLM_TENSOR_PARALLEL_SIZE": "1",
        "SM_VLLM_DTYPE": "float16",
        "SM_VLLM_CHAT_TEMPLATE": "/opt/ml/model/chat_template.jinja",
    }
    if base.startswith("s3://"):
        assert container["AdditionalModelDataSources"] == [
            {
                "ChannelName": "base",
                "S3DataSource": {"S3Uri": base, "S3DataType": "S3Prefix", "CompressionType": "None"},
            }
        ]
    else:
        assert "AdditionalModelDataSources" not in container
    (variant,) = aws.of("CreateEndpointConfig")[0]["ProductionVariants"]
    assert variant["InstanceType"] == "ml.g4dn.2xlarge"
    members = model_data()  # the adapter, its tokenizer, the manifest and the template; no base weights
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    } <= set(members)
    assert "sftbridge.json" in members and "model.safetensors" not in members
    predictor = Predictor.from_run(short_run, device="cpu")
    renders_like_the_run(members["chat_template.jinja"], predictor)
    set_endpoint_answer({"choices": [{"message": {"content": " melanin"}, "finish_reason": "stop"}]})
    request, answer = invoke("lora-endpoint", QUESTION)  # the record has the run's layout: adapter/ inside
    assert request["model"] == "lora-endpoint" and answer["generated_text"] == " melanin"
    assert request["messages"] == predictor.prompt_format.question_to_messages(QUESTION)
    assert_no_token(aws)


def test_cli_deploys_a_merged_folder(
    aws: Recorder, short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sftbridge.cli import main
    from sftbridge.inference.merge import merge_run
    from sftbridge.inference.predictor import Predictor

    merged = merge_run(short_run, tmp_path / "merged", dtype="bfloat16", device="cpu")
    args = [
        "deploy",
        str(merged),
        "--instance-type",
        "ml.p3.2xlarge",
        "--role",
        ROLE,
        "--name",
        "cli-endpoint",
        "--engine",
        "tgi",
    ]
    assert main([*args, "--bucket", "my-models", "--prefix", "team/llm"]) == 2  # no such bucket
    assert "--bucket: s3://my-models does not exist" in capsys.readouterr().err
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("endpoint cli-endpoint: InService (ml.p3.2xlarge, us-east-1)")
    assert 'sftbridge invoke cli-endpoint "your question"' in out
    container = aws.of("CreateModel")[0]["PrimaryContainer"]
    assert TGI_IMAGE.match(container["Image"]), container["Image"]
    assert container["Environment"] == {"HF_MODEL_ID": "/opt/ml/model", "SM_NUM_GPUS": "1"}

    # invoke: the seed's payload (the endpoint's engine tag says TGI), formatted with the run's template.
    set_endpoint_answer([{"generated_text": " melanin ", "details": {"finish_reason": "eos_token"}}])
    assert main(["invoke", "cli-endpoint", QUESTION, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    predictor = Predictor.from_run(short_run, device="cpu")
    assert shown["request"] == {
        "inputs": predictor.prompt(QUESTION),
        "parameters": {
            "max_new_tokens": predictor.generation.max_new_tokens,
            "do_sample": False,
            "details": True,
        },
    }
    assert shown["request"]["inputs"].startswith("<s>[INST] ")
    assert (shown["response"]["generated_text"], shown["response"]["finish_reason"]) == (" melanin ", "stop")
    set_endpoint_answer([{"generated_text": " melanin "}])
    assert main(["invoke", "cli-endpoint", QUESTION]) == 0
    assert capsys.readouterr().out == "melanin\n"
    assert_no_token(aws)
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
        ({}, {"--image-version": "0.0.1"}, "error: no Hugging Face vLLM image for us-east-1"),
        ({}, {"--engine": "tgi", "--tgi-version": "0.0.1"}, "error: no Hugging Face LLM image for us-east-1"),
        ({}, {"--mode": "adapter"}, "error: --mode adapter: the base 'builtin:tiny-llama' is not a Hub id"),
    ],
)
def test_preflight_errors_are_one_line_and_come_before_any_upload(
    aws: Recorder,
    short_run: Path,
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
    argv = ["deploy", str(short_run)] + [part for k, v in options.items() if v is not None for part in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not {"PutObject", "CreateMultipartUpload", "CreateModel"} & {name for name, _ in aws.calls}


def test_a_bucket_that_cannot_be_written_is_refused_before_upload(
    aws: Recorder, short_run: Path, monkeypatch: pytest.MonkeyPatch
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
            deploy(short_run, name="tiny", instance_type=INSTANCE, role=ROLE, bucket="read-only-bucket")
        assert "CreateModel" not in {name for name, _ in aws.calls}

    set_initial_no_auth_action_count(4)(as_restricted_user)()


def test_dry_run_creates_nothing_and_an_aws_error_leaves_nothing(
    aws: Recorder, short_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import boto3

    from sftbridge.cli import main

    args = ["deploy", str(short_run), "--instance-type", INSTANCE, "--role", ROLE, "--name", "tiny"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    requests = json.loads(out[: out.rindex("}") + 1])
    assert set(requests) == {"create_model", "create_endpoint_config", "create_endpoint"}
    environment = requests["create_model"]["PrimaryContainer"]["Environment"]
    assert environment["SM_VLLM_MODEL"] == "/opt/ml/model" and environment["SM_VLLM_DTYPE"] == "float16"
    assert out.rstrip().endswith(
        f"the model data would go to s3://{BUCKET}/sftbridge/endpoints/tiny/model.tar.gz"
    )
    assert not {"CreateModel", "PutObject", "CreateBucket", "CreateMultipartUpload"} & {
        n for n, _ in aws.calls
    }

    # SageMaker refuses the endpoint config: one line naming the call; the model and the uploads are gone.
    def refuse(**_: Any) -> Any:
        response = type("Response", (), {"status_code": 400, "headers": {}})()
        error = {"Code": "ResourceLimitExceeded", "Message": "account-level service limit for ml.g4dn.xlarge"}
        return response, {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}

    real_session = boto3.Session

    def session(*a: Any, **k: Any) -> Any:
        created = real_session(*a, **k)
        created.events.register("before-call.sagemaker.CreateEndpointConfig", refuse)
        return created

    monkeypatch.setattr(boto3, "Session", session)
    assert main(args) == 2
    # In process, the libraries' progress bars (the merge loading weights) reach stderr too: ours is one line.
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")] == [
        "error: deploy tiny: CreateEndpointConfig failed (ResourceLimitExceeded: account-level service limit "
        f"for ml.g4dn.xlarge); nothing was left behind: the uploads under s3://{BUCKET}/sftbridge/endpoints/"
        "tiny/ were removed"
    ]
    assert aws.of("DeleteModel") == [{"ModelName": "tiny"}]
    assert [key for key in s3_objects() if key.startswith("sftbridge/endpoints/tiny/")] == []
    assert boto3.client("sagemaker", region_name=REGION).list_models()["Models"] == []


def test_cli_deploys_two_adapters_as_lora_modules_of_one_endpoint(
    aws: Recorder, short_run: Path, other_short_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deploy alpha=A B --mode adapter`: one model whose environment names both LoRA modules (through vLLM's
    --config file: the image passes each variable as one argument), both adapters in one model data."""
    from sftbridge.cli import main

    base = f"s3://{BUCKET}/bases/tiny-llama/"
    args = ["deploy", f"alpha={short_run}", str(other_short_run), "--role", ROLE, "--name", "many"]
    assert main([*args, "--base", base]) == 2  # one endpoint for several runs: LoRA modules only
    assert "add --mode adapter" in capsys.readouterr().err
    assert main([*args, "--base", base, "--mode", "adapter", "--dry-run"]) == 0
    modules = '  - "alpha=/opt/ml/model/alpha"\n  - "other=/opt/ml/model/other"\n'
    assert (
        f"/opt/ml/model/vllm_config.yaml, in the model data:\nlora-modules:\n{modules}"
        in capsys.readouterr().out
    )
    assert main([*args, "--base", base, "--mode", "adapter", "--instance-type", "ml.g4dn.2xlarge"]) == 0
    out = capsys.readouterr().out
    assert "adapters alpha, other; the base as many-base" in out
    assert 'sftbridge invoke many "your question" --model alpha' in out
    ((name, created),) = [(c["ModelName"], c) for c in aws.of("CreateModel")]
    assert name == "many"
    assert created["PrimaryContainer"]["Environment"] == {
        "SM_VLLM_MODEL": "/opt/ml/additional-model-data-sources/base",
        "SM_VLLM_SERVED_MODEL_NAME": "many-base",
        "SM_VLLM_ENABLE_LORA": "",
        "SM_VLLM_MAX_LORA_RANK": "16",  # the largest rank of the two
        "SM_VLLM_TOKENIZER": "/opt/ml/model/alpha",
        "SM_VLLM_CHAT_TEMPLATE": "/opt/ml/model/chat_template.jinja",
        "SM_VLLM_MAX_LORAS": "2",
        "SM_VLLM_TENSOR_PARALLEL_SIZE": "1",
        "SM_VLLM_DTYPE": "float16",
        "SM_VLLM_CONFIG": "/opt/ml/model/vllm_config.yaml",
    }
    members = model_data()
    assert members["vllm_config.yaml"].decode() == f"lora-modules:\n{modules}"
    for adapter, run in (("alpha", short_run), ("other", other_short_run)):
        assert (
            members[f"{adapter}/adapter_model.safetensors"]
            == (run / "adapter/adapter_model.safetensors").read_bytes()
        )
        assert f"{adapter}/tokenizer.json" in members
    assert {"chat_template.jinja", "sftbridge.json"} <= set(members)

    set_endpoint_answer({"choices": [{"message": {"content": " Ganymede"}, "finish_reason": "stop"}]})
    assert (
        main(["invoke", "many", "Which moon of Jupiter is the largest?", "--model", "other", "--json"]) == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["request"]["model"] == "other" and shown["response"]["generated_text"] == " Ganymede"
    assert_no_token(aws)
