"""What a SageMaker training job will be, worked out offline: what ``--dry-run`` prints and ``submit`` runs.

No AWS call happens here; the backend (``sagemaker.py``) resolves the region and the image and does the
calls. Everything a user can get wrong in the config is caught here, before anything is uploaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftbridge.aws import preflight
from sftbridge.backends.sagemaker import hyperparameters as hp
from sftbridge.config import ENV_NAME, RunConfig, load_config
from sftbridge.environment import BACKEND
from sftbridge.errors import ConfigError, DataError
from sftbridge.planning.hardware import PRICE_TABLE_DATE, gpu_count, price_per_hour
from sftbridge.runs import SECRET_ENV_VARS, sha256_file

CHECKPOINT_DIR = "/opt/ml/checkpoints"  # SageMaker syncs this folder with CheckpointConfig.S3Uri
CODE_CHANNEL = "code"
# The toolkit in the Hugging Face image copies this folder to /opt/ml/code and runs the entry script there.
SUBMIT_DIRECTORY = f"/opt/ml/input/data/{CODE_CHANNEL}"
ENTRY_SCRIPT = "train.py"
SPLIT_CHANNELS = {"train_file": "train", "validation_file": "validation", "test_file": "test"}
PARENT_CHANNEL = "parent"  # model.adapter's run folder (training.sagemaker_env reads SM_CHANNEL_PARENT)
MLFLOW_ARN = re.compile(r"^arn:aws[a-z-]*:sagemaker:([a-z0-9-]+):\d{12}:mlflow-tracking-server/[\w-]+$")

_NUMBER = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
# What the console and CloudWatch chart: each regex captures one value from the lines training/progress.py
# prints when not on a terminal ("[train] step=20/150 epoch=0.67 loss=2.346 lr=9.87e-05 ..."). The test
# tests/test_sagemaker_metrics.py runs the real script's output through them.
METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": rf"\[train\] .*\bloss={_NUMBER}"},
    {"Name": "train:learning_rate", "Regex": rf"\[train\] .*\blr={_NUMBER}"},
    {"Name": "train:grad_norm", "Regex": rf"\[train\] .*\bgrad_norm={_NUMBER}"},
    {"Name": "train:tokens_per_second", "Regex": rf"\[train\] .*\btokens/s={_NUMBER}"},
    {"Name": "train:epoch", "Regex": rf"\[train\] .*\bepoch={_NUMBER}"},
    {"Name": "eval:loss", "Regex": rf"\[eval\] .*\beval_loss={_NUMBER}"},
    # DPO (train.method=dpo): the chosen answers' reward margin over the rejected ones, the share they win
    {"Name": "train:rewards_margin", "Regex": rf"\[train\] .*\bmargin={_NUMBER}"},
    {"Name": "train:rewards_accuracy", "Regex": rf"\[train\] .*\breward_acc={_NUMBER}"},
    # The answer metrics (training/answer_metrics.py) measured while training, each on its own [metrics]
    # line; only that line counts (a line with eval_answer_* or base_answer_* is not charted twice).
    *(
        {"Name": f"answer:{name}", "Regex": rf"\[metrics\] .*\banswer_{name}={_NUMBER}"}
        for name in ("exact_match", "contains", "mean_tokens", "eos_rate")
    ),
]


@dataclass
class Channel:
    """One input channel: local files to upload, or an S3 URI used as it is."""

    name: str
    source: str  # as the config names it
    files: list[Path] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)  # local path -> digest
    root: Path | None = None  # files keep their paths below it in the channel (a run folder); None: flat

    @property
    def s3_uri(self) -> str | None:
        return self.source if self.source.startswith("s3://") else None


@dataclass
class JobSpec:
    config: RunConfig  # as submitted, with train.checkpoint_dir pointing at CHECKPOINT_DIR
    base_job_name: str
    region: str
    image: str
    hyperparameters: dict[str, str]  # the config; the script reads these
    reserved: dict[str, str]  # sagemaker_*: read by the toolkit in the image, never passed to the script
    channels: list[Channel]
    environment: dict[str, str]
    torchrun: bool
    config_file: Path | None = None  # shipped only when hyperparameters alone cannot carry the config
    # sftbridge's optional extras the job installs besides qlora: one per tracker in train.report_to.
    extras: list[str] = field(default_factory=list)
    metric_definitions: list[dict[str, str]] = field(default_factory=lambda: list(METRIC_DEFINITIONS))
    notes: list[str] = field(default_factory=list)

    @property
    def backend(self) -> Any:
        return self.config.backend

    @property
    def max_run_seconds(self) -> int:
        return round(self.backend.max_run_hours * 3600)

    @property
    def max_wait_seconds(self) -> int | None:
        if not self.backend.use_spot:
            return None
        hours = self.backend.max_wait_hours or min(2 * self.backend.max_run_hours, 672.0)
        return round(hours * 3600)

    @property
    def price_per_hour(self) -> float | None:
        return price_per_hour(self.backend.instance_type, self.backend.instance_count)

    def all_hyperparameters(self) -> dict[str, str]:
        return {**self.hyperparameters, **self.reserved}


def base_job_name(run_name: str) -> str:
    """A training-job name stem: SageMaker allows [a-zA-Z0-9-] and 63 characters, 15 go to the timestamp."""
    return re.sub(r"[^A-Za-z0-9-]", "-", run_name)[:48].rstrip("-") or "sftbridge"


def check_backend(config: RunConfig, region: str | None, instance_types: set[str] | None) -> None:
    """The offline pre-flight checks, in the order a user fixes them; raises the first as a one-line error."""
    backend = config.backend
    if not region:
        raise ConfigError(
            "backend.region: no AWS region; set backend.region=us-east-1 (or AWS_DEFAULT_REGION, or a region "
            "in ~/.aws/config)"
        )
    if not backend.role:
        raise ConfigError(
            "backend.role: no execution role; set backend.role=arn:aws:iam::<account>:role/<name> (a role "
            "that SageMaker may assume, with access to the bucket)"
        )
    preflight.require_role_arn(backend.role, "backend.role", ConfigError)
    if instance_types and backend.instance_type not in instance_types:
        near = sorted(t for t in instance_types if t.split(".")[1:2] == backend.instance_type.split(".")[1:2])
        hint = f" ({', '.join(near[:6])}...)" if near else " (e.g. ml.g5.2xlarge)"
        raise ConfigError(
            f"backend.instance_type: {backend.instance_type!r} is not a SageMaker training instance type; "
            f"pick one SageMaker trains on{hint}"
        )
    if config.train.fsdp:  # the job would start, load the base and only then refuse (training/fsdp.py)
        gpus = gpu_count(backend.instance_type) * backend.instance_count
        if gpus < 2:
            raise ConfigError(
                f"train.fsdp: {backend.instance_count} x {backend.instance_type} has {gpus} GPU, nothing to "
                "shard across: pick a multi-GPU backend.instance_type (ml.g5.12xlarge: 4 x A10G) or "
                "backend.instance_count>1, or train.fsdp=false"
            )
        if backend.distribution == "none":
            raise ConfigError(
                "train.fsdp with backend.distribution=none starts one process: set backend.distribution=auto "
                "(torchrun across every GPU of every instance)"
            )
    bad_env = [name for name in backend.environment if not ENV_NAME.match(name)]
    if bad_env:
        raise ConfigError(f"backend.environment: {bad_env[0]!r} is not a valid environment variable name")


def make_job_spec(config: RunConfig, *, config_path: str | None, region: str, image: str) -> JobSpec:
    """The job for ``config``: hyperparameters, channels, environment. Raises ConfigError/DataError."""
    notes: list[str] = []
    if config.train.checkpoint_dir not in (None, CHECKPOINT_DIR):
        notes.append(
            f"train.checkpoint_dir {config.train.checkpoint_dir} becomes {CHECKPOINT_DIR} in the job"
        )
    job_config = config.model_copy(
        update={"train": config.train.model_copy(update={"checkpoint_dir": CHECKPOINT_DIR})}
    )
    torchrun = config.backend.distribution == "torchrun" or (
        config.backend.distribution == "auto"
        and (config.backend.instance_count > 1 or gpu_count(config.backend.instance_type) > 1)
    )
    reserved = {
        "sagemaker_program": ENTRY_SCRIPT,
        "sagemaker_submit_directory": SUBMIT_DIRECTORY,
        "sagemaker_container_log_level": "20",
        "sagemaker_region": region,
    }
    if torchrun:  # read by the PyTorch layer of the Hugging Face image: it launches the script with torchrun
        reserved.update(
            sagemaker_torch_distributed_enabled="true", sagemaker_instance_type=config.backend.instance_type
        )
    hyperparameters, config_file = _hyperparameters(job_config, config_path, budget=100 - len(reserved))
    if config_file is not None:
        notes.append(f"the config is too long for hyperparameters alone: {config_file.name} is shipped too")
    spec = JobSpec(
        config=job_config,
        base_job_name=base_job_name(config.run_name),
        region=region,
        image=image,
        hyperparameters=hyperparameters,
        reserved=reserved,
        channels=_channels(config),
        environment=_environment(config, notes),
        torchrun=torchrun,
        config_file=config_file,
        extras=list(config.train.report_to),
        notes=notes,
    )
    _refuse_secrets(spec)
    _notes(spec)
    return spec


def _hyperparameters(
    config: RunConfig, config_path: str | None, budget: int
) -> tuple[dict[str, str], Path | None]:
    """All of the config as hyperparameters; where they exceed the limits, the config file plus the diff."""
    full = hp.to_hyperparameters(config)
    problems = hp.problems(full, budget)
    if not problems:
        _check_round_trip(full, None, config)
        return full, None
    if config_path is not None:
        file_config = load_config(config_path)
        diff = hp.to_hyperparameters(config, base=file_config)
        diff["config"] = f"config/{Path(config_path).name}"
        if not hp.problems(diff, budget):
            _check_round_trip(diff, config_path, config)
            return diff, Path(config_path)
    raise ConfigError(f"cannot pass the config as SageMaker hyperparameters: {'; '.join(problems)}")


def _check_round_trip(hyperparameters: dict[str, str], config_file: str | None, config: RunConfig) -> None:
    overrides = {k: v for k, v in hyperparameters.items() if k != "config"}
    rebuilt = hp.round_trip(overrides, config_file)
    differing = sorted(hp.diff(config.to_dict(), rebuilt.to_dict()))
    if differing:  # a bug, not a user error: say which keys so it can be fixed
        raise ConfigError(f"hyperparameters do not reproduce the config at {', '.join(differing)}")


def _channels(config: RunConfig) -> list[Channel]:
    channels = []
    for key, name in SPLIT_CHANNELS.items():
        source = getattr(config.data, key)
        if not source:
            continue
        channel = Channel(name, source)
        if not source.startswith("s3://"):
            path = Path(source)
            if not path.is_file():
                raise DataError(f"data.{key}: {source}: file not found")
            channel.files.append(path)
            template = path.parent / "template.json"
            if name == "train" and config.data.template is None and template.is_file():
                channel.files.append(template)  # the script looks for it beside the training file
            channel.sha256 = {str(p): sha256_file(p) for p in channel.files}
        channels.append(channel)
    if config.model.adapter:
        channels.append(_parent_channel(config))
    return channels


def _parent_channel(config: RunConfig) -> Channel:
    """model.adapter's run, checked here as the job will check it, uploaded as the ``parent`` channel: what
    opening it needs (manifest, COMPLETE, adapter/); the script points model.adapter at the channel
    (``training.sagemaker_env``)."""
    from sftbridge.runs import ADAPTER, COMPLETE, MANIFEST
    from sftbridge.training.continuation import open_parent

    parent = open_parent(config)
    assert parent is not None
    run = parent.path
    files = [run / MANIFEST, run / COMPLETE, *sorted(p for p in (run / ADAPTER).rglob("*") if p.is_file())]
    return Channel(PARENT_CHANNEL, str(run), files, {str(p): sha256_file(p) for p in files}, root=run)


def _environment(config: RunConfig, notes: list[str]) -> dict[str, str]:
    environment = {BACKEND: "sagemaker", **config.backend.environment}
    uri = config.train.mlflow_tracking_uri
    if uri:
        # The job logs to the same server; a SageMaker managed one is reached through the sagemaker-mlflow
        # plugin (the mlflow extra) with the job's role, which needs sagemaker-mlflow:* on that server.
        environment.setdefault("MLFLOW_TRACKING_URI", uri)
        environment.setdefault("MLFLOW_EXPERIMENT_NAME", config.train.tracking_project)
        arn = MLFLOW_ARN.match(uri)
        if uri.startswith("arn:") and not arn:
            raise ConfigError(
                f"train.mlflow_tracking_uri: {uri!r} is not a SageMaker MLflow tracking server ARN "
                "(arn:aws:sagemaker:<region>:<account>:mlflow-tracking-server/<name>)"
            )
        if arn and arn.group(1) != (config.backend.region or arn.group(1)):
            notes.append(f"the MLflow server is in {arn.group(1)}, the job in {config.backend.region}")
        if not arn and not uri.startswith(("http://", "https://", "databricks")):
            notes.append(f"train.mlflow_tracking_uri {uri} is a path inside the job: lost when it ends")
    given = set(environment) | set(config.backend.secret_environment)
    if "wandb" in config.train.report_to and not {"WANDB_API_KEY", "WANDB_MODE"} & given:
        # wandb.init in a job without a key fails at the start of training, after the model has loaded.
        notes.append(
            "train.report_to has wandb but the job has no WANDB_API_KEY: give it one from Secrets Manager "
            "(backend.secret_environment.WANDB_API_KEY=<secret>; the job's role needs "
            "secretsmanager:GetSecretValue), or set backend.environment.WANDB_MODE=offline (the run's files "
            "stay in the job)"
        )
    if config.backend.pass_hf_token:
        token = os.environ.get("HF_TOKEN")
        if not token:
            raise ConfigError(
                "backend.pass_hf_token: HF_TOKEN is not set here; set it, or use model.hf_token_secret"
            )
        environment["HF_TOKEN"] = token
        notes.append(
            "HF_TOKEN goes into the job's environment (backend.pass_hf_token): anyone who may call "
            "DescribeTrainingJob in this account can read it; model.hf_token_secret avoids that"
        )
    return environment


def _refuse_secrets(spec: JobSpec) -> None:
    """No secret from this machine's environment may reach a hyperparameter or an environment variable."""
    fields = {f"hyperparameter {k}": f"{k}={v}" for k, v in spec.all_hyperparameters().items()}
    fields.update({f"backend.environment.{k}": v for k, v in spec.environment.items() if k != "HF_TOKEN"})
    for name in SECRET_ENV_VARS:
        secret = os.environ.get(name, "")
        if len(secret) < 8:
            continue
        for where, text in fields.items():
            if secret in text:
                raise ConfigError(
                    f"{where} contains the value of ${name}; secrets never go into a job request"
                )


def _notes(spec: JobSpec) -> None:
    model = spec.config.model
    from_hub = not model.name_or_path.startswith(("builtin:", "s3://", "/"))
    if from_hub and not model.hf_token_secret and not spec.config.backend.pass_hf_token:
        spec.notes.append(
            f"{model.name_or_path} is downloaded inside the job without a token; for a gated model set "
            "model.hf_token_secret=<Secrets Manager secret> (the role needs secretsmanager:GetSecretValue)"
        )
    local_torch = _installed_torch()
    image_torch = spec.backend.pytorch_version if not spec.backend.image_uri else None
    if local_torch and image_torch and _major_minor(local_torch) != _major_minor(image_torch):
        spec.notes.append(
            f"the job trains with the image's torch {image_torch}, this machine has {local_torch}: the other "
            "libraries are pinned to this machine's versions, torch stays the image's CUDA build"
        )
    if spec.price_per_hour is None:
        spec.notes.append(
            f"no price for {spec.backend.instance_type} in the price table ({PRICE_TABLE_DATE})"
        )


def _installed_torch() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])
