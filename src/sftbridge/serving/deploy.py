"""Provisioning: deploy a run to a SageMaker real-time endpoint on Hugging Face's vLLM image (or TGI);
undeploy it.

    sftbridge deploy RUN [--mode merged|adapter] [--base HUB_ID|s3://...] [--engine vllm|tgi]
                         [--instance-type ml.g5.2xlarge] [--role ARN] [--bucket B]
    sftbridge deploy RUN [NAME=RUN ...] --mode adapter
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
  - several runs (``--mode adapter`` only; one base, one prompt format): one endpoint, one model, every
    adapter a LoRA module named after its run (or NAME), in ``/opt/ml/model/NAME/`` of the one model data;
    the base as ``NAME-base`` (NAME the endpoint's). The image's entrypoint passes each ``SM_VLLM_*``
    variable as one argument, so the modules cannot be one variable (vLLM would read ``a=X b=Y`` as one
    module): they are vLLM's ``--config`` file ``vllm_config.yaml`` in the model data
    (``SM_VLLM_CONFIG``), beside ``SM_VLLM_MAX_LORAS`` and ``SM_VLLM_MAX_LORA_RANK`` (the largest rank).
    The record is the first run's. ``invoke ENDPOINT --model NAME`` asks one adapter.

- ``--engine tgi``: Hugging Face's LLM image (TGI 3.3.6 at most, in maintenance since December 2025), merged
  weights, ``HF_MODEL_ID=/opt/ml/model``.

The weights come from S3 (or a public Hub repository), so no Hugging Face token is needed, and none is sent.

``undeploy`` deletes the endpoint, its config and its model (the S3 objects stay). ``invoke`` is the
endpoint client's (``endpoint.py``), which reads the record and the tags written here.

The control plane goes through boto3's ``sagemaker`` client: sagemaker-core 2.27's resource classes fail
on moto's describe answers (empty ``VpcConfig``/``DataCaptureConfig``), which would leave this untestable
offline.
"""

from __future__ import annotations

import logging
import re
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftbridge.aws import preflight as aws_checks
from sftbridge.inference.folder import ModelFolder
from sftbridge.planning.hardware import gpu_memory, instance_bf16
from sftbridge.runs import COMPLETE, MANIFEST
from sftbridge.serving import defaults
from sftbridge.serving.endpoint import ENGINE_TAG, RECORD_TAG, DeployError, aws_session

log = logging.getLogger(__name__)

ENGINES = ("vllm", "tgi")
MODES = ("merged", "adapter")
MODEL_DIR = "/opt/ml/model"  # where SageMaker unpacks model.tar.gz
BASE_CHANNEL = "base"  # --base s3://...: mounted at /opt/ml/additional-model-data-sources/base
CHAT_TEMPLATE = "chat_template.jinja"
VLLM_CONFIG = "vllm_config.yaml"  # vLLM's --config: the options with several values (--lora-modules)
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder in the model data, a vLLM model name
VARIANT = "AllTraffic"
NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's endpoint/model name rule
WEIGHTS_SHARE_OF_GPU = 0.8  # the rest is the engine's KV cache and activations


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
    check_bucket: bool = True,
) -> Target:
    """Every check that needs no upload, cheapest first; the default bucket is created if missing.
    ``check_bucket=False`` (a dry run) writes nothing: no bucket created, no probe object."""
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
    if check_bucket:
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
    source: str | Path | Mapping[str, str | Path],
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
    dry_run: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Deploy a run directory (merged here unless ``mode="adapter"``) or a merged folder, or with
    ``mode="adapter"`` several runs on one base (``{name: run}``: each a LoRA module); returns what was
    created. ``dry_run``: every check that writes nothing, then the requests it would send (model, endpoint
    config, endpoint) under ``"requests"``; nothing is merged, uploaded or created.

    An AWS error while uploading or creating is one DeployError naming the call; what was uploaded and
    created is removed again."""
    runs = _several(source, mode, trust_remote_code)  # before any AWS call
    if isinstance(source, Mapping):
        source = next(iter(source.values()))
    source = Path(source)
    opened = ModelFolder.open(source, trust_remote_code=trust_remote_code)
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
        check_bucket=not dry_run,
    )
    config_file = None  # vLLM's --config, with several runs' LoRA modules
    if engine == "vllm":
        environment, config_file = _vllm_environment(target, mode, base, dtype, opened, runs)
    else:
        environment = {
            "HF_MODEL_ID": MODEL_DIR,  # the unpacked model.tar.gz: no Hub download, no token
            "SM_NUM_GPUS": str(target.gpus),  # TGI shards the model over this many GPUs
        }
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
    model_data = f"s3://{target.bucket}/{target.prefix}/{target.name}/model.tar.gz"
    requests = _requests(target, model_data, environment, extra_sources, instance_count)
    summary = {
        "endpoint": target.name,
        "region": target.region,
        "image": target.image_uri,
        "instance_type": target.instance_type,
        "model_data": model_data,
        "record": requests["create_model"]["Tags"][0]["Value"],
        "engine": engine,
        "mode": mode,
        "environment": environment,
        "vllm_config": config_file,  # several runs' LoRA modules, at /opt/ml/model/vllm_config.yaml
    }
    if dry_run:
        return {**summary, "status": "dry run: nothing uploaded or created", "requests": requests}
    try:
        _upload_model(source, opened, target, mode=mode, dtype=dtype, runs=runs, config_file=config_file)
        status = _create(target, requests, wait)
    except aws_errors() as exc:
        _remove_uploads(target)
        call = getattr(exc, "operation_name", None) or "upload to S3"
        raise DeployError(
            f"deploy {target.name}: {call} failed ({aws_checks.reason(exc)}); nothing was left behind: the "
            f"uploads under s3://{target.bucket}/{target.prefix}/{target.name}/ were removed"
        ) from None
    return {**summary, "status": status}


def _several(
    source: str | Path | Mapping[str, str | Path], mode: str, trust_remote_code: bool
) -> dict[str, ModelFolder] | None:
    """Several runs, opened and checked as one endpoint's LoRA modules; None for one folder (a mapping of
    one is that folder: its adapter keeps the endpoint's name)."""
    from sftbridge.inference.adapters import check_shared_base
    from sftbridge.serving.vllm import shared_chat_template

    if not isinstance(source, Mapping) or len(source) == 1:
        return None
    if mode != "adapter":
        raise DeployError(
            f"{len(source)} runs: several runs share one endpoint as LoRA modules on their base: "
            "add --mode adapter (or deploy each alone)"
        )
    bad = [name for name in source if not ADAPTER_NAME.match(name)]
    if bad:
        raise DeployError(
            f"{', '.join(bad)}: an adapter's name becomes a folder and a model name: use letters, digits, "
            "'.', '_' and '-' (NAME=RUN)"
        )
    runs = {
        name: ModelFolder.open(path, trust_remote_code=trust_remote_code) for name, path in source.items()
    }
    check_shared_base(runs)
    shared_chat_template(runs)  # one endpoint, one chat template
    return runs


def aws_errors() -> tuple[type[Exception], ...]:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError, S3UploadFailedError)


def _upload_model(
    source: Path,
    opened: ModelFolder,
    target: Target,
    *,
    mode: str,
    dtype: str,
    runs: Mapping[str, ModelFolder] | None = None,
    config_file: str | None = None,
) -> None:
    """The model data (merged here from a run unless ``mode="adapter"``; several runs' adapters each in a
    folder of its name, with vLLM's ``config_file``) and the record, to S3."""
    from sftbridge.inference.merge import merge_run
    from sftbridge.runs import ADAPTER

    with tempfile.TemporaryDirectory(prefix="sftbridge-deploy-") as tmp:
        extra: dict[str, bytes] = {}
        if target.engine == "vllm":  # the run's prompt format, as vLLM's --chat-template
            extra[CHAT_TEMPLATE] = opened.prompter.chat_template().encode()
        subfolders: dict[str, Path] = {}
        if mode == "adapter":
            folder = source / ADAPTER
            extra[MANIFEST] = (source / MANIFEST).read_bytes()
            if config_file is not None:
                extra[VLLM_CONFIG] = config_file.encode()
            if runs is not None:
                subfolders = {name: run.path / ADAPTER for name, run in runs.items()}
        else:
            folder = source
            if not opened.is_merged:
                log.info("merging %s into %s weights", source, dtype)
                folder = merge_run(
                    source, Path(tmp) / "merged", dtype=dtype, device="auto", trust_remote_code=opened.trusted
                )
            _check_fits(folder, target)
        _upload(folder, extra, target, Path(tmp), adapter=mode == "adapter", subfolders=subfolders)


def _remove_uploads(target: Target) -> None:
    """Delete what :func:`_upload` wrote (a failed deploy leaves nothing behind); a failure is only logged."""
    s3 = target.session.client("s3", region_name=target.region)
    prefix = f"{target.prefix}/{target.name}/"
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=target.bucket, Key=item["Key"])
    except aws_errors() as exc:
        log.warning("could not remove s3://%s/%s (%s)", target.bucket, prefix, aws_checks.reason(exc))


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
    target: Target,
    mode: str,
    base: str | None,
    dtype: str,
    folder: ModelFolder,
    runs: Mapping[str, ModelFolder] | None = None,
) -> tuple[dict[str, str], str | None]:
    """``SM_VLLM_*`` variables: :func:`~sftbridge.serving.vllm.launch_options` with SageMaker's paths (the
    model data at /opt/ml/model, an S3 base as an additional model data source), on every GPU; and the
    text of vLLM's ``--config`` file at /opt/ml/model/vllm_config.yaml that holds several runs' modules
    (None for one run)."""
    from sftbridge.serving.vllm import as_config_file, as_sagemaker_environment, launch_options

    from_s3 = base is not None and base.startswith("s3://")
    if mode == "merged":
        model = MODEL_DIR
    else:
        assert base is not None
        model = f"/opt/ml/additional-model-data-sources/{BASE_CHANNEL}" if from_s3 else base
    options = launch_options(
        folder,
        merged=mode == "merged",
        name=target.name,
        model=model,
        weights=MODEL_DIR if runs is None else f"{MODEL_DIR}/{next(iter(runs))}",
        chat_template=f"{MODEL_DIR}/{CHAT_TEMPLATE}",
        revision=None if mode == "merged" or from_s3 else folder.run_config.model.revision,
        adapters=None if runs is None else {name: (run, f"{MODEL_DIR}/{name}") for name, run in runs.items()},
    )
    options.update({"tensor-parallel-size": str(target.gpus), "dtype": dtype})
    environment = as_sagemaker_environment(options, config_file=f"{MODEL_DIR}/{VLLM_CONFIG}")
    return environment, as_config_file(options)


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


def _upload(
    folder: Path,
    extra: dict[str, bytes],
    target: Target,
    tmp: Path,
    *,
    adapter: bool,
    subfolders: Mapping[str, Path] | None = None,
) -> str:
    """model.tar.gz (the folder's files and ``extra`` at the archive root, as the images read /opt/ml/model,
    or, given ``subfolders``, each of those in a folder of its name and only ``extra`` at the root) and the
    record (what `invoke` formats with: the manifest, and ``folder``'s tokenizer beside it or, for an
    adapter, in ``adapter/`` as in a run directory), to S3."""
    s3 = target.session.client("s3", region_name=target.region)
    base = f"{target.prefix}/{target.name}"
    archive = tmp / "model.tar.gz"
    for file_name, data in extra.items():
        (tmp / file_name).write_bytes(data)
    files = [f for f in sorted(folder.iterdir()) if f.is_file() and f.name not in extra]
    files += [tmp / file_name for file_name in extra]
    members = {file.name: file for file in files} if not subfolders else {n: tmp / n for n in extra}
    for name, subfolder in (subfolders or {}).items():
        members.update({f"{name}/{f.name}": f for f in sorted(subfolder.iterdir()) if f.is_file()})
    # Safetensors barely compress: level 1 spends little time on them.
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for arcname, file in members.items():
            tar.add(file, arcname=arcname)
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


def _requests(
    target: Target,
    model_data: str,
    environment: dict[str, str],
    extra_sources: list[dict[str, Any]],
    instance_count: int,
) -> dict[str, dict[str, Any]]:
    """The three SageMaker calls a deploy makes, call name -> its arguments (what ``--dry-run`` prints)."""
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
    variant = {
        "VariantName": VARIANT,
        "ModelName": target.name,
        "InstanceType": target.instance_type,
        "InitialInstanceCount": instance_count,
        # Loading 7B+ weights takes minutes; SageMaker's default health-check wait is shorter.
        "ContainerStartupHealthCheckTimeoutInSeconds": 900,
        "ModelDataDownloadTimeoutInSeconds": 1200,
    }
    return {
        "create_model": {
            "ModelName": target.name,
            "PrimaryContainer": container,
            "ExecutionRoleArn": target.role,
            "Tags": tags,
        },
        "create_endpoint_config": {
            "EndpointConfigName": target.name,
            "ProductionVariants": [variant],
            "Tags": tags,
        },
        "create_endpoint": {"EndpointName": target.name, "EndpointConfigName": target.name, "Tags": tags},
    }


def _create(target: Target, requests: dict[str, dict[str, Any]], wait: bool) -> str:
    """Send the requests in order (a failure deletes what was created before it); the endpoint's status."""
    sm = target.session.client("sagemaker", region_name=target.region)
    undo = {
        "create_model": ("delete_model", {"ModelName": target.name}),
        "create_endpoint_config": ("delete_endpoint_config", {"EndpointConfigName": target.name}),
    }
    created: list[tuple[str, dict[str, str]]] = []
    try:
        for call, arguments in requests.items():
            getattr(sm, call)(**arguments)
            if call in undo:
                created.append(undo[call])
    except Exception:
        for call, arguments in reversed(created):  # leave nothing half-made behind
            getattr(sm, call)(**arguments)
        raise
    status: str = sm.describe_endpoint(EndpointName=target.name)["EndpointStatus"]
    if wait:
        log.info("waiting for endpoint %s to be InService (usually 5-15 minutes)", target.name)
        sm.get_waiter("endpoint_in_service").wait(
            EndpointName=target.name, WaiterConfig={"Delay": 30, "MaxAttempts": 120}
        )
        status = sm.describe_endpoint(EndpointName=target.name)["EndpointStatus"]
    return status


# ---- undeploy ----------------------------------------------------------------------------------------------
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
