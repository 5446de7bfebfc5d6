"""Deploy a run to a SageMaker real-time endpoint on Hugging Face's vLLM image (or TGI); invoke; undeploy.

    sftbridge deploy RUN [--mode merged|adapter] [--base HUB_ID|s3://...] [--engine vllm|tgi]
                         [--instance-type ml.g5.2xlarge] [--role ARN] [--bucket B]
    sftbridge invoke ENDPOINT|http://HOST:PORT "question"
    sftbridge undeploy ENDPOINT

``deploy`` checks everything it can before any work (region, credentials, role, instance type, image, bucket
writable, name free; each a one-line error), then uploads ``model.tar.gz`` and a small record (the run's
manifest and tokenizer) to ``s3://BUCKET/PREFIX/NAME/`` and creates a model, an endpoint config and an
endpoint, all three named NAME and tagged with the record's location and the engine.

- ``--engine vllm`` (the default): the Hugging Face vLLM image (``huggingface-vllm`` in the SageMaker SDK's
  image URIs, newest version unless ``--image-version``; ``--image-uri`` overrides), configured through
  ``SM_VLLM_*`` variables, each one ``vllm serve`` flag (an empty value is a bare flag), and serving the
  model under the name NAME. The run's chat template travels as ``chat_template.jinja`` in the model data
  (``SM_VLLM_CHAT_TEMPLATE``), so the endpoint formats ``messages`` as training did.

  - ``--mode merged`` (the default): the adapter merged into 16-bit weights (``sftbridge merge``; a folder it
    wrote is taken as is) is the model data, ``SM_VLLM_MODEL=/opt/ml/model``.
  - ``--mode adapter``: the model data is the run's adapter, served as the LoRA module NAME
    (``SM_VLLM_ENABLE_LORA``, ``SM_VLLM_LORA_MODULES=NAME=/opt/ml/model``) on the base: a Hub id
    (``SM_VLLM_MODEL``; the run's own base unless ``--base``; a gated one would need a token, which
    sftbridge never sends: copy it to S3) or ``--base s3://BUCKET/PREFIX/`` (an uncompressed model folder,
    mounted as an additional model data source).

- ``--engine tgi``: Hugging Face's LLM image (TGI 3.3.6 at most, in maintenance since December 2025), merged
  weights, ``HF_MODEL_ID=/opt/ml/model``.

The weights come from S3 (or a public Hub repository), so no Hugging Face token is needed, and none is sent.

``invoke`` speaks the endpoint's engine (its ``sftbridge:engine`` tag; TGI for endpoints deployed before it
existed): OpenAI ``messages`` to vLLM (the endpoint's template formats them), the seed's payload
``{"inputs": "<s>[INST] ... [/INST]", "parameters": {...}}`` to TGI (formatted here with the run's template,
from the record or ``--run``). Given ``http://HOST:PORT`` it sends the same bodies to that server's
``/invocations`` (``sftbridge serve`` answers both). Either way the answer comes back as
``{"generated_text", "finish_reason"}``. ``undeploy`` deletes the endpoint, its config and its model (the
S3 objects stay).

The control plane goes through boto3's ``sagemaker`` client: sagemaker-core 2.27's resource classes fail
on moto's describe answers (empty ``VpcConfig``/``DataCaptureConfig``), which would leave this untestable
offline.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftbridge.aws import preflight as aws_checks
from sftbridge.errors import UserError
from sftbridge.inference.folder import ModelFolder
from sftbridge.planning.hardware import gpu_memory, instance_bf16
from sftbridge.runs import COMPLETE, MANIFEST
from sftbridge.serving import defaults

log = logging.getLogger(__name__)

RECORD_TAG = "sftbridge:record"  # s3://.../NAME/record/ : manifest + tokenizer, read by `invoke`
ENGINE_TAG = "sftbridge:engine"  # vllm or tgi: the API `invoke` speaks
ENGINES = ("vllm", "tgi")
MODES = ("merged", "adapter")
MODEL_DIR = "/opt/ml/model"  # where SageMaker unpacks model.tar.gz
BASE_CHANNEL = "base"  # --base s3://...: mounted at /opt/ml/additional-model-data-sources/base
CHAT_TEMPLATE = "chat_template.jinja"
VARIANT = "AllTraffic"
NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's endpoint/model name rule
WEIGHTS_SHARE_OF_GPU = 0.8  # the rest is the engine's KV cache and activations


class DeployError(UserError):
    """Something to fix before (or instead of) deploying; the message says what."""


@dataclass
class Target:
    """Where and how to deploy, after the pre-flight checks."""

    session: Any  # boto3.Session
    region: str
    account: str
    role: str
    bucket: str
    prefix: str
    name: str
    instance_type: str
    gpus: int
    gpu_memory_mib: int
    image_uri: str
    engine: str = "vllm"


# ---- pre-flight -----------------------------------------------------------------------------------------
def aws_session(region: str | None = None, run_backend: dict[str, Any] | None = None) -> tuple[Any, str]:
    """A boto3 session and its region; one-line errors when there are no credentials or no region."""
    import boto3

    region = region or (run_backend or {}).get("region")
    session = boto3.Session(region_name=region) if region else boto3.Session()
    if not session.region_name:
        raise DeployError("no AWS region: pass --region or set AWS_DEFAULT_REGION (e.g. us-east-1)")
    aws_checks.require_credentials(session, DeployError)
    return session, session.region_name


def gpu_info(instance_type: str, region: str) -> tuple[int, int]:
    """(GPUs, total GPU MiB) of a SageMaker instance type, from the SDK's table, else sftbridge's hardware
    table; DeployError if neither knows it."""
    from sagemaker.core import instance_types_gpu_info

    known = {
        name: (info["Count"], info["TotalGpuMemoryInMiB"])
        for name, info in instance_types_gpu_info.retrieve(region).items()
    }
    fallback = gpu_memory(instance_type)  # types the SDK's table lacks (g6, g6e, ...)
    if fallback is not None:
        known.setdefault(instance_type, fallback)
    if instance_type not in known:
        examples = ", ".join(sorted(known)[:6])
        raise DeployError(
            f"--instance-type {instance_type}: not a GPU instance type known in {region} "
            f"(the serving images need a GPU); e.g. {defaults.INSTANCE_TYPE}, {examples}"
        )
    return known[instance_type]


IMAGES = {"vllm": ("huggingface-vllm", "Hugging Face vLLM"), "tgi": ("huggingface-llm", "Hugging Face LLM")}


def serving_image(engine: str, region: str, instance_type: str, version: str | None = None) -> str:
    """The engine's Hugging Face inference image, from the SDK's image URIs (newest version it lists)."""
    from packaging.version import Version
    from sagemaker.core import image_uris

    framework, label = IMAGES[engine]
    if version is None:
        # image_uris.retrieve(framework, version=None) raises in sagemaker 3.27: pick the newest.
        versions = image_uris.config_for_framework(framework)["inference"]["versions"]
        version = str(max(versions, key=Version))
    try:
        return str(
            image_uris.retrieve(
                framework,
                region=region,
                version=version,
                instance_type=instance_type,
                image_scope="inference",
            )
        )
    except (ValueError, KeyError) as exc:
        raise DeployError(
            f"no {label} image for {region}, {instance_type}, version {version}: {exc}"
        ) from None


def _check_name_free(sm: Any, name: str) -> None:
    from botocore.exceptions import ClientError

    if not NAME.match(name):
        raise DeployError(
            f"--name {name}: use up to 63 letters, digits and hyphens, starting with a letter or digit"
        )
    checks = {
        "endpoint": ("describe_endpoint", "EndpointName"),
        "model": ("describe_model", "ModelName"),
        "endpoint config": ("describe_endpoint_config", "EndpointConfigName"),
    }
    for kind, (call, key) in checks.items():
        try:
            getattr(sm, call)(**{key: name})
        except ClientError:
            continue  # "Could not find ...": the name is free
        raise DeployError(
            f"a SageMaker {kind} named {name} already exists: choose --name, or `sftbridge undeploy {name}`"
        )


def preflight(
    *,
    name: str,
    instance_type: str = defaults.INSTANCE_TYPE,
    role: str | None = None,
    bucket: str | None = None,
    region: str | None = None,
    prefix: str = defaults.S3_PREFIX,
    engine: str = "vllm",
    image_version: str | None = None,
    image_uri: str | None = None,
    run_backend: dict[str, Any] | None = None,
) -> Target:
    """Every check that needs no upload, cheapest first; the default bucket is created if missing."""
    session, region = aws_session(region, run_backend)
    backend = run_backend or {}
    role = role or backend.get("role")
    if not role:
        raise DeployError(
            "no execution role: pass --role arn:aws:iam::<account>:role/<name> (a SageMaker execution "
            "role that can read the bucket), or set backend.role in the run's config"
        )
    aws_checks.require_role_arn(role, "--role", DeployError)
    gpus, memory = gpu_info(instance_type, region)
    image = image_uri or serving_image(engine, region, instance_type, image_version)
    account = aws_checks.account_id(session, DeployError)
    _check_name_free(session.client("sagemaker", region_name=region), name)
    chosen = bucket or backend.get("bucket")
    bucket = chosen or aws_checks.default_bucket(region, account)
    aws_checks.ensure_writable_bucket(
        session,
        bucket,
        region=region,
        prefix=prefix,
        setting="--bucket",
        create=not chosen,
        error=DeployError,
    )
    return Target(
        session,
        region,
        account,
        role,
        bucket,
        prefix.strip("/"),
        name,
        instance_type,
        gpus,
        memory,
        image,
        engine,
    )


# ---- deploy -----------------------------------------------------------------------------------------------
def default_name(run_name: str) -> str:
    from datetime import datetime

    stem = re.sub(r"[^a-zA-Z0-9]+", "-", f"sftbridge-{run_name}").strip("-")[:45].strip("-")
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def deploy(
    source: str | Path,
    *,
    name: str | None = None,
    engine: str = "vllm",
    mode: str = "merged",
    base: str | None = None,
    instance_type: str = defaults.INSTANCE_TYPE,
    instance_count: int = 1,
    role: str | None = None,
    bucket: str | None = None,
    region: str | None = None,
    prefix: str = defaults.S3_PREFIX,
    image_version: str | None = None,
    image_uri: str | None = None,
    dtype: str | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Deploy a run directory (merged here unless ``mode="adapter"``) or a merged folder; returns what was
    created."""
    from sftbridge.inference.merge import merge_run
    from sftbridge.runs import ADAPTER
    from sftbridge.serving.vllm import chat_template

    source = Path(source)
    opened = ModelFolder.open(source)  # every check generate does, before any AWS call
    merged = opened.is_merged
    run_backend = {} if merged else opened.run_config.backend.model_dump()
    name = name or default_name(opened.manifest.run_name or "run")
    if engine not in ENGINES or mode not in MODES:
        raise DeployError(
            f"--engine {engine} --mode {mode}: choose an engine of {ENGINES}, a mode of {MODES}"
        )
    if mode == "adapter":
        if engine != "vllm":
            raise DeployError(
                "--mode adapter: the adapter is served as a LoRA module by vLLM: use --engine vllm"
            )
        if merged:
            raise DeployError(f"--mode adapter: {source} is a merged folder; deploy the run directory")
        base = _adapter_base(opened, base)
    dtype = dtype or ("bfloat16" if instance_bf16(instance_type) else "float16")  # pre-Ampere: fp16
    target = preflight(
        name=name,
        instance_type=instance_type,
        role=role,
        bucket=bucket,
        region=region,
        prefix=prefix,
        engine=engine,
        image_version=image_version,
        image_uri=image_uri,
        run_backend=run_backend,
    )
    with tempfile.TemporaryDirectory(prefix="sftbridge-deploy-") as tmp:
        extra: dict[str, bytes] = {}
        if engine == "vllm":  # the run's prompt format, as vLLM's --chat-template
            extra[CHAT_TEMPLATE] = chat_template(opened.prompter).encode()
        if mode == "adapter":
            folder = source / ADAPTER
            extra[MANIFEST] = (source / MANIFEST).read_bytes()
        else:
            folder = source
            if not merged:
                log.info("merging %s into %s weights", source, dtype)
                folder = merge_run(source, Path(tmp) / "merged", dtype=dtype, device="auto")
            _check_fits(folder, target)
        model_data = _upload(folder, extra, target, Path(tmp), adapter=mode == "adapter")
    environment = (
        _vllm_environment(target, mode, base, dtype, opened)
        if engine == "vllm"
        else {
            "HF_MODEL_ID": MODEL_DIR,  # the unpacked model.tar.gz: no Hub download, no token
            "SM_NUM_GPUS": str(target.gpus),  # TGI shards the model over this many GPUs
        }
    )
    extra_sources = []
    if base is not None and base.startswith("s3://"):
        extra_sources = [
            {
                "ChannelName": BASE_CHANNEL,
                "S3DataSource": {
                    "S3Uri": base.rstrip("/") + "/",
                    "S3DataType": "S3Prefix",
                    "CompressionType": "None",
                },
            }
        ]
    result = _create(target, model_data, environment, extra_sources, instance_count, wait)
    return {**result, "engine": engine, "mode": mode, "environment": environment}


def _adapter_base(folder: ModelFolder, base: str | None) -> str:
    """The base the adapter is served on: --base (a Hub id or s3://), else the run's base if on the Hub."""
    from sftbridge.config import BUILTIN_TINY_MODEL

    model = folder.run_config.model
    base = base or model.name_or_path
    if base.startswith("s3://"):
        return base
    if base == BUILTIN_TINY_MODEL or Path(base).expanduser().exists() or base.count("/") != 1:
        raise DeployError(
            f"--mode adapter: the base {base!r} is not a Hub id; upload the base model folder to S3 and "
            "pass --base s3://BUCKET/PREFIX/ (or deploy --mode merged)"
        )
    if model.load_in_4bit:
        raise DeployError("--mode adapter: a QLoRA adapter is served on the 16-bit base: use --mode merged")
    return base


def _vllm_environment(
    target: Target, mode: str, base: str | None, dtype: str, folder: ModelFolder
) -> dict[str, str]:
    """``SM_VLLM_*`` variables: the image makes each a ``vllm serve`` flag (an empty value: a bare flag).

    As the image's entrypoint does it (aws/deep-learning-containers ``vllm/build_artifacts/
    sagemaker_entrypoint.sh``, and vLLM's own ``examples/online_serving/sagemaker-entrypoint.sh``): the prefix
    dropped, lower case, ``_`` to ``-``, the value appended only when non-empty.
    """
    environment = {
        "SM_VLLM_TENSOR_PARALLEL_SIZE": str(target.gpus),
        "SM_VLLM_DTYPE": dtype,
        "SM_VLLM_CHAT_TEMPLATE": f"{MODEL_DIR}/{CHAT_TEMPLATE}",
    }
    if mode == "merged":
        return {"SM_VLLM_MODEL": MODEL_DIR, "SM_VLLM_SERVED_MODEL_NAME": target.name, **environment}
    assert base is not None
    revision = folder.run_config.model.revision
    from_s3 = base.startswith("s3://")
    environment = {
        "SM_VLLM_MODEL": f"/opt/ml/additional-model-data-sources/{BASE_CHANNEL}" if from_s3 else base,
        # The base answers to NAME-base; the fine-tune (the LoRA module) to NAME, what `invoke` asks for.
        "SM_VLLM_SERVED_MODEL_NAME": f"{target.name}-base",
        "SM_VLLM_ENABLE_LORA": "",
        "SM_VLLM_LORA_MODULES": f"{target.name}={MODEL_DIR}",
        "SM_VLLM_MAX_LORA_RANK": str(max(folder.adapter_rank, 8)),  # vLLM's smallest rank bucket is 8
        "SM_VLLM_TOKENIZER": MODEL_DIR,  # the run's tokenizer, saved beside the adapter
        **environment,
    }
    if revision and not from_s3:
        environment["SM_VLLM_REVISION"] = str(revision)
    return environment


def _check_fits(folder: Path, target: Target) -> None:
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    budget = target.gpu_memory_mib * 2**20 * WEIGHTS_SHARE_OF_GPU
    if size > budget:
        raise DeployError(
            f"{folder}: {size / 2**30:.1f} GiB of weights do not fit {target.instance_type} "
            f"({target.gpus} GPU, {target.gpu_memory_mib / 1024:.0f} GiB, "
            f"{WEIGHTS_SHARE_OF_GPU:.0%} for weights); "
            "choose a larger --instance-type"
        )


def _upload(folder: Path, extra: dict[str, bytes], target: Target, tmp: Path, *, adapter: bool) -> str:
    """model.tar.gz (the folder's files and ``extra`` at the archive root, as the images read /opt/ml/model)
    and the record (what `invoke` formats with: the manifest, and the tokenizer beside it or, for an
    adapter, in ``adapter/`` as in a run directory), to S3."""
    s3 = target.session.client("s3", region_name=target.region)
    base = f"{target.prefix}/{target.name}"
    archive = tmp / "model.tar.gz"
    for file_name, data in extra.items():
        (tmp / file_name).write_bytes(data)
    files = [f for f in sorted(folder.iterdir()) if f.is_file() and f.name not in extra]
    files += [tmp / file_name for file_name in extra]
    # Safetensors barely compress: level 1 spends little time on them.
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for file in files:
            tar.add(file, arcname=file.name)
    log.info(
        "uploading %s (%.1f MiB) to s3://%s/%s/",
        archive.name,
        archive.stat().st_size / 2**20,
        target.bucket,
        base,
    )
    s3.upload_file(str(archive), target.bucket, f"{base}/model.tar.gz")
    for file in files:
        if file.name.endswith((".safetensors", ".safetensors.index.json")):
            continue
        inside = "adapter/" if adapter and file.name != MANIFEST else ""
        s3.upload_file(str(file), target.bucket, f"{base}/record/{inside}{file.name}")
    if adapter:  # the record of a run directory reads as a finished run
        s3.put_object(Bucket=target.bucket, Key=f"{base}/record/{COMPLETE}", Body=b"")
    return f"s3://{target.bucket}/{base}/model.tar.gz"


def _create(
    target: Target,
    model_data: str,
    environment: dict[str, str],
    extra_sources: list[dict[str, Any]],
    instance_count: int,
    wait: bool,
) -> dict[str, Any]:
    sm = target.session.client("sagemaker", region_name=target.region)
    record = model_data.rsplit("/", 1)[0] + "/record/"
    tags = [
        {"Key": RECORD_TAG, "Value": record},
        {"Key": ENGINE_TAG, "Value": target.engine},
        {"Key": "sftbridge:created-by", "Value": "sftbridge deploy"},
    ]
    container: dict[str, Any] = {
        "Image": target.image_uri,
        "ModelDataUrl": model_data,
        "Environment": environment,
    }
    if extra_sources:
        container["AdditionalModelDataSources"] = extra_sources
    created: list[tuple[str, dict[str, str]]] = []
    try:
        sm.create_model(
            ModelName=target.name,
            PrimaryContainer=container,
            ExecutionRoleArn=target.role,
            Tags=tags,
        )
        created.append(("delete_model", {"ModelName": target.name}))
        sm.create_endpoint_config(
            EndpointConfigName=target.name,
            ProductionVariants=[
                {
                    "VariantName": VARIANT,
                    "ModelName": target.name,
                    "InstanceType": target.instance_type,
                    "InitialInstanceCount": instance_count,
                    # Loading 7B+ weights takes minutes; SageMaker's default health-check wait is shorter.
                    "ContainerStartupHealthCheckTimeoutInSeconds": 900,
                    "ModelDataDownloadTimeoutInSeconds": 1200,
                }
            ],
            Tags=tags,
        )
        created.append(("delete_endpoint_config", {"EndpointConfigName": target.name}))
        sm.create_endpoint(EndpointName=target.name, EndpointConfigName=target.name, Tags=tags)
    except Exception:
        for call, args in reversed(created):  # leave nothing half-made behind
            getattr(sm, call)(**args)
        raise
    status = sm.describe_endpoint(EndpointName=target.name)["EndpointStatus"]
    if wait:
        log.info("waiting for endpoint %s to be InService (usually 5-15 minutes)", target.name)
        sm.get_waiter("endpoint_in_service").wait(
            EndpointName=target.name, WaiterConfig={"Delay": 30, "MaxAttempts": 120}
        )
        status = sm.describe_endpoint(EndpointName=target.name)["EndpointStatus"]
    return {
        "endpoint": target.name,
        "status": status,
        "region": target.region,
        "image": target.image_uri,
        "instance_type": target.instance_type,
        "model_data": model_data,
        "record": record,
    }


# ---- invoke / undeploy -------------------------------------------------------------------------------------
def _endpoint_tags(session: Any, region: str, endpoint: str) -> dict[str, str]:
    from botocore.exceptions import ClientError

    sm = session.client("sagemaker", region_name=region)
    try:
        arn = sm.describe_endpoint(EndpointName=endpoint)["EndpointArn"]
    except ClientError as exc:
        raise DeployError(f"endpoint {endpoint} in {region}: {aws_checks.reason(exc)}") from None
    return {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn).get("Tags", [])}


def _fetch_record(session: Any, region: str, endpoint: str, tags: dict[str, str]) -> Path:
    """Download the endpoint's record (manifest + tokenizer) into the cache; its S3 prefix is a tag."""
    from sftbridge.models.builtin import cache_root

    if RECORD_TAG not in tags:
        raise DeployError(
            f"endpoint {endpoint} was not deployed by sftbridge: pass --run RUN for its template, or --raw"
        )
    bucket, _, prefix = tags[RECORD_TAG].removeprefix("s3://").partition("/")
    s3 = session.client("s3", region_name=region)
    dest = cache_root() / "endpoints" / region / endpoint
    dest.mkdir(parents=True, exist_ok=True)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            file = dest / item["Key"].removeprefix(prefix).lstrip("/")
            file.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(file))
    return dest


def _settings(folder: ModelFolder, overrides: dict[str, Any]) -> Any:
    """The run's generation settings with the caller's overrides; temperature or top_p given: sampling."""
    settings = folder.generation.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if overrides.get("temperature") is not None or overrides.get("top_p") is not None:
        settings.do_sample = True
    return settings


def payload(
    folder: ModelFolder | None, question: str, *, raw: bool = False, **overrides: Any
) -> dict[str, Any]:
    """The seed's request body (TGI): the question in the run's template, decoding from the run's defaults.
    Without a folder (a local server, no --run), the plain question: the server formats it itself."""
    if folder is None:
        given = {k: v for k, v in overrides.items() if v is not None}
        if "temperature" in given or "top_p" in given:
            given["do_sample"] = True
        return {"inputs": question, "parameters": {**given, "details": True}}
    settings = _settings(folder, overrides)
    parameters: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
    if settings.do_sample:  # TGI samples whenever these are present, so they go only with sampling
        parameters.update(temperature=settings.temperature, top_p=settings.top_p)
    parameters["details"] = True
    return {"inputs": question if raw else folder.prompter.question(question), "parameters": parameters}


def openai_payload(
    folder: ModelFolder | None, question: str, model: str | None, *, raw: bool = False, **overrides: Any
) -> dict[str, Any]:
    """An OpenAI chat body (vLLM): the question as the run's user turn; the endpoint's chat template does the
    rest (the run's system prompt included). Decoding from the run's defaults; temperature 0 is greedy."""
    messages = (
        [{"role": "user", "content": question}]
        if raw or folder is None
        else folder.prompt_format.question_to_messages(question)
    )
    body: dict[str, Any] = {"messages": messages}
    if model:
        body["model"] = model
    if folder is None:
        options = {k: v for k, v in overrides.items() if v is not None}
        if "max_new_tokens" in options:
            body["max_tokens"] = options.pop("max_new_tokens")
        return {**body, **options}
    settings = _settings(folder, overrides)
    body["max_tokens"] = settings.max_new_tokens
    if settings.do_sample:
        body.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        body["temperature"] = 0
    return body


def answer_of(response: Any) -> dict[str, Any]:
    """The same shape from either engine: ``{"generated_text", "finish_reason"}``."""
    if isinstance(response, list) and response:
        response = response[0]
    if not isinstance(response, dict):
        raise DeployError(f"unexpected answer: {str(response)[:200]}")
    if "choices" in response:  # OpenAI (vLLM, or sftbridge serve's /invocations)
        choice = response["choices"][0]
        text = choice.get("message", {}).get("content") if "message" in choice else choice.get("text")
        return {"generated_text": text or "", "finish_reason": choice.get("finish_reason")}
    if "generated_text" in response:  # TGI: eos_token / stop_sequence / length, as OpenAI names them
        reason = (response.get("details") or {}).get("finish_reason")
        finish = {"eos_token": "stop", "stop_sequence": "stop"}.get(str(reason), reason)
        return {"generated_text": response["generated_text"], "finish_reason": finish}
    raise DeployError(f"unexpected answer: {json.dumps(response)[:200]}")


def invoke(
    endpoint: str,
    question: str,
    *,
    region: str | None = None,
    run: str | Path | None = None,
    raw: bool = False,
    engine: str | None = None,
    **overrides: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send one question to a SageMaker endpoint or a server's URL in its engine's API; returns (request
    body, answer) with the answer as :func:`answer_of` shapes it (the whole response under ``"response"``)."""
    if endpoint.startswith(("http://", "https://")):
        engine = engine or "vllm"  # sftbridge serve speaks both; OpenAI needs no template here
        folder = ModelFolder.open(run, weights=False) if run else None
        body = _body(engine, folder, question, None, raw, overrides)
        response = _post_local(endpoint, body)
    else:
        session, region = aws_session(region)
        tags = _endpoint_tags(session, region, endpoint)
        engine = engine or tags.get(ENGINE_TAG, "tgi")  # endpoints deployed before vLLM ran TGI
        if run:
            folder = ModelFolder.open(run, weights=False)
        elif engine == "tgi" or RECORD_TAG in tags:
            folder = ModelFolder.open(_fetch_record(session, region, endpoint, tags), weights=False)
        else:
            folder = None
        body = _body(engine, folder, question, endpoint, raw, overrides)
        response = _invoke_endpoint(session, region, endpoint, body)
    return body, {**answer_of(response), "response": response}


def _body(
    engine: str,
    folder: ModelFolder | None,
    question: str,
    model: str | None,
    raw: bool,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    if engine == "tgi":
        return payload(folder, question, raw=raw, **overrides)
    return openai_payload(folder, question, model, raw=raw, **overrides)


def _post_local(url: str, body: dict[str, Any]) -> Any:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url.rstrip("/") + "/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise DeployError(f"invoke {url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeployError(f"invoke {url}: {exc}") from None


def _invoke_endpoint(session: Any, region: str, endpoint: str, body: dict[str, Any]) -> Any:
    from botocore.exceptions import ClientError

    runtime = session.client("sagemaker-runtime", region_name=region)
    try:
        response = runtime.invoke_endpoint(
            EndpointName=endpoint,
            Body=json.dumps(body),
            ContentType="application/json",
            Accept="application/json",
        )
    except ClientError as exc:
        raise DeployError(f"invoke {endpoint}: {aws_checks.reason(exc)}") from None
    raw_answer = response["Body"].read()
    try:
        return json.loads(raw_answer)
    except json.JSONDecodeError:
        raise DeployError(
            f"invoke {endpoint}: the endpoint answered non-JSON: {raw_answer[:200]!r}"
        ) from None


def undeploy(endpoint: str, *, region: str | None = None) -> list[str]:
    """Delete the endpoint, its endpoint config and its model(s); returns what was deleted."""
    from botocore.exceptions import ClientError

    session, region = aws_session(region)
    sm = session.client("sagemaker", region_name=region)
    try:
        config_name = sm.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    except ClientError as exc:
        raise DeployError(f"endpoint {endpoint} in {region}: {aws_checks.reason(exc)}") from None
    try:
        variants = sm.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"]
    except ClientError:
        variants = []  # the config is already gone: delete what remains
    deleted = []
    sm.delete_endpoint(EndpointName=endpoint)
    deleted.append(f"endpoint {endpoint}")
    try:
        sm.delete_endpoint_config(EndpointConfigName=config_name)
        deleted.append(f"endpoint config {config_name}")
    except ClientError as exc:
        log.warning("endpoint config %s: %s", config_name, aws_checks.reason(exc))
    for model in sorted({v["ModelName"] for v in variants}):
        try:
            sm.delete_model(ModelName=model)
            deleted.append(f"model {model}")
        except ClientError as exc:
            log.warning("model %s: %s", model, aws_checks.reason(exc))
    return deleted
