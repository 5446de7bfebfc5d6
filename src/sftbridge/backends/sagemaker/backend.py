"""The SageMaker backend: the unchanged training script as a Hugging Face training job.

The job runs the Hugging Face PyTorch training image. Its runner, the ``sagemaker-training`` toolkit, copies
the ``code`` channel (``train.py`` + the ``sftbridge`` package + ``requirements.txt``), installs the
requirements and runs ``python train.py --section.key value ...`` (under torchrun on several GPUs or
instances), with the data channels, ``SM_MODEL_DIR`` and ``/opt/ml/checkpoints`` in place.

With SDK v3 the job is built by ``ModelTrainer`` without its ``SourceCode`` drivers: those write every
hyperparameter into a shell file as ``export SM_HP_<KEY>=...``, and a key with a dot (``train.epochs``)
aborts the job before the script starts. With ``sagemaker<3`` the ``HuggingFace`` estimator submits the
same script, source and hyperparameters. ``sagemaker`` and ``boto3`` are imported only in here.

Layout in S3, under ``s3://<bucket>/<s3_prefix>/<run_name>/<job>/``: ``input/<channel>/``, ``checkpoints/``,
``output/model.tar.gz`` and ``sftbridge-submission.json`` (data sources and their sha256).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from sftbridge.aws import preflight
from sftbridge.backends.sagemaker.job import SageMakerJob, record_uri, split_s3
from sftbridge.backends.sagemaker.request import render, request
from sftbridge.backends.sagemaker.sdk import submit_v2, submit_v3
from sftbridge.backends.sagemaker.source import stage_channels, stage_source
from sftbridge.backends.sagemaker.spec import CODE_CHANNEL, JobSpec, check_backend, make_job_spec
from sftbridge.config import RunConfig
from sftbridge.errors import ConfigError, UserError
from sftbridge.runs import git_state

log = logging.getLogger(__name__)


def sdk_version() -> str:
    try:
        return metadata.version("sagemaker")
    except metadata.PackageNotFoundError:
        raise ConfigError(
            "backend sagemaker needs the SageMaker SDK: pip install 'sftbridge[sagemaker]'"
        ) from None


class _SpuriousRegionWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No region provided" not in record.getMessage()  # the SDK uses the session's region


@contextmanager
def quiet_sdk() -> Iterator[None]:
    """The SDK logs every config lookup at INFO; show that only with ``sftbridge -v``."""
    if logging.getLogger("sftbridge").isEnabledFor(logging.INFO):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("sagemaker", "sagemaker.config")]
    levels = [logger.level for logger in loggers]
    region_filter = _SpuriousRegionWarning()
    utils = logging.getLogger("sagemaker.core.utils.utils")
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    utils.addFilter(region_filter)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        utils.removeFilter(region_filter)


class SageMakerBackend:
    name = "sagemaker"
    settings_model = None  # its settings are the built-in backend.* keys (role, instance_type, ...)
    supports_dry_run = True
    supports_detach = True
    supports_job_lookup = True

    def __init__(self, boto_session: Any | None = None) -> None:
        self._boto = boto_session  # tests pass one; otherwise a session for backend.region is made

    def session(self, region: str | None) -> Any:
        import boto3

        return self._boto or boto3.Session(region_name=region)

    def job(self, job_id: str, *, region: str | None = None) -> SageMakerJob:
        """An existing job by name (for ``sftbridge status/logs/fetch``)."""
        boto = self.session(region)
        preflight.require_credentials(boto)
        if not boto.region_name:
            raise ConfigError("no AWS region: pass --region, or set AWS_DEFAULT_REGION")
        return SageMakerJob(job_id, boto)

    def spec(self, config: RunConfig, config_path: str | None, boto: Any) -> JobSpec:
        region = config.backend.region or boto.region_name
        check_backend(config, region, _instance_types())
        return make_job_spec(config, config_path=config_path, region=region, image=_image(config, region))

    def dry_run(self, config: RunConfig, *, config_path: str | None, overrides: list[str]) -> str:
        """The job request, printed, with nothing uploaded and no AWS call."""
        with quiet_sdk():
            spec = self.spec(config, config_path, self.session(config.backend.region))
        bucket = config.backend.bucket or f"sagemaker-{spec.region}-<account>"
        job_name = f"{spec.base_job_name}-<YYYYmmddHHMMSS>"
        req = request(spec, job_name, bucket, config.backend.s3_prefix)
        return render(spec, req, sdk=f"sagemaker {sdk_version()}")

    def submit(
        self, config: RunConfig, *, config_path: str | None, overrides: list[str], run_dir: Path | None
    ) -> SageMakerJob:
        boto = self.session(config.backend.region)
        preflight.require_credentials(boto)  # the pre-flight checks come before anything is uploaded
        with quiet_sdk():
            spec = self.spec(config, config_path, boto)
        for note in spec.notes:
            log.warning("%s", note)
        secrets = {f"backend.secret_environment.{k}": v for k, v in config.backend.secret_environment.items()}
        if config.model.hf_token_secret:
            secrets["model.hf_token_secret"] = config.model.hf_token_secret
        preflight.check_secrets(boto, spec.region, secrets, error=ConfigError)
        bucket = config.backend.bucket or preflight.default_bucket(spec.region, preflight.account_id(boto))
        preflight.ensure_writable_bucket(
            boto,
            bucket,
            region=spec.region,
            prefix=config.backend.s3_prefix,
            setting="backend.bucket",
            create=not config.backend.bucket,
            error=ConfigError,
        )
        version = sdk_version()
        with tempfile.TemporaryDirectory(prefix="sftbridge-sagemaker-") as tmp:
            pinned = config.backend.requirements == "pinned"
            code = stage_source(
                Path(tmp) / CODE_CHANNEL, spec.config_file, pinned=pinned, extras=tuple(spec.extras)
            )
            channels = stage_channels(Path(tmp) / "data", spec.channels)
            submit = submit_v3 if int(version.split(".")[0]) >= 3 else submit_v2
            try:
                with quiet_sdk():
                    job_name = submit(spec, boto, bucket, {**channels, CODE_CHANNEL: code})
            except Exception as exc:
                error = _one_line(exc)
                if error is exc:
                    raise
                raise error from exc
        job = SageMakerJob(job_name, boto, run_dir=run_dir)
        _write_record(job, spec, version, config_path)
        log.info("submitted %s: %s", job_name, job.console_url)
        return job


def _instance_types() -> set[str] | None:
    """SageMaker's training instance types, from botocore's service model (offline)."""
    try:
        import botocore.session

        model = botocore.session.get_session().get_service_model("sagemaker")
        return set(model.shape_for("TrainingInstanceType").enum)
    except Exception:  # an older botocore without the shape: leave the check to SageMaker
        return None


def _image(config: RunConfig, region: str) -> str:
    backend = config.backend
    if backend.image_uri:
        return backend.image_uri
    sdk_version()
    try:
        from sagemaker.core import image_uris
    except ImportError:  # sagemaker<3
        from sagemaker import image_uris
    try:
        image: str = image_uris.retrieve(
            "huggingface",
            region=region,
            version=backend.transformers_version,
            py_version=backend.py_version,
            instance_type=backend.instance_type,
            image_scope="training",
            base_framework_version=f"pytorch{backend.pytorch_version}",
        )
    except ValueError as exc:
        raise ConfigError(
            f"backend.transformers_version/pytorch_version/py_version: no Hugging Face training image for "
            f"transformers {backend.transformers_version}, PyTorch {backend.pytorch_version}, "
            f"{backend.py_version} in {region} ({exc}); pick listed versions or set backend.image_uri"
        ) from None
    return image


def _write_record(job: SageMakerJob, spec: JobSpec, version: str, config_path: str | None) -> None:
    """What fetch needs later, on any machine: where each channel came from and its sha256."""
    from botocore.exceptions import ClientError

    describe = job.describe()
    uris = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
        for c in describe.get("InputDataConfig", [])
    }
    record = {
        "job_name": job.id,
        "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sdk": f"sagemaker {version}",
        "image": spec.image,
        "config_path": config_path,
        "config_file_shipped": spec.config_file is not None,
        "inputs": {
            c.name: {"source": c.source, "s3_uri": uris.get(c.name), "sha256": c.sha256}
            for c in spec.channels
        },
        "git": git_state(),
    }
    bucket, key = split_s3(record_uri(describe))
    try:
        job.boto.client("s3").put_object(Bucket=bucket, Key=key, Body=json.dumps(record, indent=2).encode())
    except ClientError as exc:  # the job runs regardless; only fetch's notes on the data are lost
        log.warning("job %s: could not write s3://%s/%s (%s)", job.id, bucket, key, exc)


def _one_line(exc: Exception) -> Exception:
    """The SDK's and AWS's refusals as one-line user errors; anything else (a bug) unchanged."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        return UserError(f"AWS refused the job: {preflight.reason(exc)}")
    # The SDK reports bad settings (and a role it finds lacking) as ValueError / RoleValidationError.
    if isinstance(exc, BotoCoreError | ValueError) or type(exc).__name__ == "RoleValidationError":
        text = " ".join(str(exc).split())
        return UserError(f"the SageMaker SDK refused the job: {type(exc).__name__}: {text[:500]}")
    return exc
