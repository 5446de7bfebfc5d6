"""Deploy a run to a SageMaker real-time endpoint on Hugging Face's LLM container (TGI); invoke; undeploy.

    sftbridge deploy RUN --backend sagemaker [--instance-type ml.g5.2xlarge] [--role ARN] [--bucket B]
    sftbridge invoke ENDPOINT "question"
    sftbridge undeploy ENDPOINT

``deploy`` checks everything it can before any work (region, credentials, role, instance type, image, bucket
writable, name free; each a one-line error), merges the adapter into 16-bit weights (``sftbridge merge``; a
folder it wrote is taken as is), uploads ``model.tar.gz`` and a small record (the run's manifest and
tokenizer) to ``s3://BUCKET/PREFIX/NAME/``, then creates a model (the TGI image from the SageMaker SDK's
image URIs, ``HF_MODEL_ID=/opt/ml/model``), an endpoint config and an endpoint, all three named NAME and
tagged with the record's location. The weights come from S3, so the endpoint needs no Hugging Face token,
and none is sent.

``invoke`` formats the question with the run's own template (:meth:`Predictor.prompt`, with the tokenizer and
manifest from the record, or from ``--run``) and sends the seed's payload:
``{"inputs": "<s>[INST] ... [/INST]", "parameters": {...}}``. ``undeploy`` deletes the endpoint, its config
and its model (the S3 objects stay).

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
from sftbridge.planning.hardware import gpu_memory, instance_bf16
from sftbridge.serving import defaults

log = logging.getLogger(__name__)

RECORD_TAG = "sftbridge:record"  # s3://.../NAME/record/ : manifest + tokenizer, read by `invoke`
VARIANT = "AllTraffic"
NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's endpoint/model name rule
WEIGHTS_SHARE_OF_GPU = 0.8  # the rest is TGI's KV cache and activations


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
            f"(the TGI image needs a GPU); e.g. {defaults.INSTANCE_TYPE}, {examples}"
        )
    return known[instance_type]


def tgi_image(region: str, instance_type: str, version: str | None = None) -> str:
    """The Hugging Face LLM (TGI) inference image, from the SDK's image URIs (newest version it lists)."""
    from packaging.version import Version
    from sagemaker.core import image_uris

    if version is None:
        # image_uris.retrieve("huggingface-llm", version=None) raises in sagemaker 3.27: pick the newest.
        versions = image_uris.config_for_framework("huggingface-llm")["inference"]["versions"]
        version = str(max(versions, key=Version))
    try:
        return str(
            image_uris.retrieve(
                "huggingface-llm",
                region=region,
                version=version,
                instance_type=instance_type,
                image_scope="inference",
            )
        )
    except (ValueError, KeyError) as exc:
        raise DeployError(
            f"no Hugging Face LLM image for {region}, {instance_type}, version {version}: {exc}"
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
    tgi_version: str | None = None,
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
    image = tgi_image(region, instance_type, tgi_version)
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
    instance_type: str = defaults.INSTANCE_TYPE,
    instance_count: int = 1,
    role: str | None = None,
    bucket: str | None = None,
    region: str | None = None,
    prefix: str = defaults.S3_PREFIX,
    tgi_version: str | None = None,
    dtype: str | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Deploy a run directory (merged here) or a merged folder; returns what was created."""
    from sftbridge.inference.merge import merge_run, read_merged_manifest
    from sftbridge.runs import load_manifest

    source = Path(source)
    merged = read_merged_manifest(source)
    manifest = merged or load_manifest(source)
    run_backend = {} if merged else dict(manifest.get("config", {}).get("backend", {}))
    name = name or default_name(str(manifest.get("run_name") or "run"))
    target = preflight(
        name=name,
        instance_type=instance_type,
        role=role,
        bucket=bucket,
        region=region,
        prefix=prefix,
        tgi_version=tgi_version,
        run_backend=run_backend,
    )
    with tempfile.TemporaryDirectory(prefix="sftbridge-deploy-") as tmp:
        folder = source
        if not merged:
            dtype = dtype or ("bfloat16" if instance_bf16(instance_type) else "float16")  # pre-Ampere: fp16
            log.info("merging %s into %s weights", source, dtype)
            folder = merge_run(source, Path(tmp) / "merged", dtype=dtype, device="auto")
        _check_fits(folder, target)
        model_data = _upload(folder, target, Path(tmp))
    return _create(target, model_data, instance_count, wait)


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


def _upload(folder: Path, target: Target, tmp: Path) -> str:
    """model.tar.gz (files at the archive root, as TGI reads /opt/ml/model) and the record, to S3."""
    s3 = target.session.client("s3", region_name=target.region)
    base = f"{target.prefix}/{target.name}"
    archive = tmp / "model.tar.gz"
    # Safetensors barely compress: level 1 spends little time on them.
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for file in sorted(folder.iterdir()):
            if file.is_file():
                tar.add(file, arcname=file.name)
    log.info(
        "uploading %s (%.1f MiB) to s3://%s/%s/",
        archive.name,
        archive.stat().st_size / 2**20,
        target.bucket,
        base,
    )
    s3.upload_file(str(archive), target.bucket, f"{base}/model.tar.gz")
    for file in sorted(folder.iterdir()):
        if file.is_file() and not file.name.endswith((".safetensors", ".safetensors.index.json")):
            s3.upload_file(str(file), target.bucket, f"{base}/record/{file.name}")
    return f"s3://{target.bucket}/{base}/model.tar.gz"


def _create(target: Target, model_data: str, instance_count: int, wait: bool) -> dict[str, Any]:
    sm = target.session.client("sagemaker", region_name=target.region)
    record = model_data.rsplit("/", 1)[0] + "/record/"
    tags = [
        {"Key": RECORD_TAG, "Value": record},
        {"Key": "sftbridge:created-by", "Value": "sftbridge deploy"},
    ]
    environment = {
        "HF_MODEL_ID": "/opt/ml/model",  # the unpacked model.tar.gz: no Hub download, no token
        "SM_NUM_GPUS": str(target.gpus),  # TGI shards the model over this many GPUs
    }
    created: list[tuple[str, dict[str, str]]] = []
    try:
        sm.create_model(
            ModelName=target.name,
            PrimaryContainer={
                "Image": target.image_uri,
                "ModelDataUrl": model_data,
                "Environment": environment,
            },
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
def prompter(folder: str | Path) -> Any:
    """The one inference wrapper, for formatting only (no weights): a run, a merged folder, or a record."""
    from transformers import AutoTokenizer

    from sftbridge.inference.merge import read_merged_manifest
    from sftbridge.inference.predictor import Predictor
    from sftbridge.runs import ADAPTER, load_manifest

    folder = Path(folder)
    manifest = read_merged_manifest(folder)
    tokenizer_dir = folder
    if manifest is None:
        manifest, tokenizer_dir = load_manifest(folder), folder / ADAPTER
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return Predictor.from_manifest(None, tokenizer, manifest)


def _fetch_record(session: Any, region: str, endpoint: str) -> Path:
    """Download the endpoint's record (manifest + tokenizer) into the cache; its S3 prefix is a tag."""
    from botocore.exceptions import ClientError

    from sftbridge.training.tiny_model import cache_root

    sm = session.client("sagemaker", region_name=region)
    try:
        arn = sm.describe_endpoint(EndpointName=endpoint)["EndpointArn"]
    except ClientError as exc:
        raise DeployError(f"endpoint {endpoint} in {region}: {aws_checks.reason(exc)}") from None
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn).get("Tags", [])}
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
            s3.download_file(bucket, item["Key"], str(dest / item["Key"].rsplit("/", 1)[-1]))
    return dest


def payload(predictor: Any, question: str, *, raw: bool = False, **overrides: Any) -> dict[str, Any]:
    """The seed's request body: the question in the run's template, decoding from the run's defaults."""
    settings = predictor.generation.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if overrides.get("temperature") is not None or overrides.get("top_p") is not None:
        settings.do_sample = True
    parameters: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
    if settings.do_sample:  # TGI samples whenever these are present, so they go only with sampling
        parameters.update(temperature=settings.temperature, top_p=settings.top_p)
    parameters["details"] = True
    return {"inputs": question if raw else predictor.prompt(question), "parameters": parameters}


def invoke(
    endpoint: str,
    question: str,
    *,
    region: str | None = None,
    run: str | Path | None = None,
    raw: bool = False,
    **overrides: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send one question; returns (request body, response) with the response's first element."""
    from botocore.exceptions import ClientError

    session, region = aws_session(region)
    predictor = prompter(run if run else _fetch_record(session, region, endpoint))
    body = payload(predictor, question, raw=raw, **overrides)
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
        answer = json.loads(raw_answer)
    except json.JSONDecodeError:
        raise DeployError(
            f"invoke {endpoint}: the endpoint answered non-JSON: {raw_answer[:200]!r}"
        ) from None
    return body, answer[0] if isinstance(answer, list) and answer else answer


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
