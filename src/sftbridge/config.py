"""The one configuration schema: YAML in, ``KEY=VALUE`` overrides, every problem reported at once.

Defaults follow SageMaker JumpStart's Llama-2 fine-tuning where it has one, so a config that only names the
model and data reproduces the seed's job.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sftbridge.errors import ConfigError
from sftbridge.hf_names import ATTN_IMPLEMENTATIONS, HUB_KERNEL, LR_SCHEDULERS, OPTIMIZERS, check_name

BUILTIN_TINY_MODEL = "builtin:tiny-llama"
# An environment variable name, as the shell and SageMaker accept it.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Section(BaseModel):
    # inf and nan are no learning rate, dropout or temperature: refused like any other wrong value
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def template_fields(text: str) -> list[str]:
    """The ``{field}`` names a template string uses, in order (``{{`` escapes a brace). A field is a plain
    name: no format spec (``{question:>4000000000}`` would build a 4 GB string), no conversion, no nesting."""
    try:
        parsed = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(text)
            if name is not None
        ]
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from exc
    for name, spec, conversion in parsed:
        if spec or conversion:
            given = f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            raise ValueError(
                f"{given}: a field is filled as written; format specs and conversions are not "
                f"supported: write {{{name}}}"
            )
    return [name for name, _, _ in parsed]


class Template(_Section):
    """JumpStart-style template: each ``{field}`` is filled from the record."""

    prompt: str = Field(description="Text of the user turn, e.g. 'Answer briefly: {question}'.")
    completion: str = Field(description="Text of the assistant turn, e.g. '{correct_answer}'.")

    @field_validator("prompt", "completion")
    @classmethod
    def _parseable(cls, value: str) -> str:
        fields = template_fields(value)
        if any(not name.isidentifier() for name in fields):
            raise ValueError(f"field names must be plain identifiers, got {fields}")
        return value


# The seed's Q/A records, {"question": ..., "correct_answer": ...}, are this template.
QA_TEMPLATE = Template(prompt="{question}", completion="{correct_answer}")


class ModelSection(_Section):
    name_or_path: str = Field(
        BUILTIN_TINY_MODEL,
        description="Hub id, local folder, or builtin:tiny-llama (built locally, no download).",
    )
    revision: str | None = Field(None, description="Hub revision (commit) to pin; recorded in the run.")
    load_in_4bit: bool = Field(False, description="QLoRA: load the base in 4-bit nf4 with bitsandbytes.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Base weights dtype; auto = bf16/fp16 on a GPU, fp32 on the CPU."
    )
    attn_implementation: str | None = Field(
        None, description="sdpa, eager, flash_attention_2; None = default."
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code (only for a repository you trust)."
    )
    hf_token_secret: str | None = Field(
        None,
        description="AWS Secrets Manager secret (name or ARN) holding the Hugging Face token, read where the "
        "script runs (e.g. inside a SageMaker job); the token itself is never a config value.",
    )
    adapter: str | None = Field(
        None,
        description="A finished run folder to continue from: training starts from its adapter (same base "
        "model; its LoRA shape replaces the lora section), for more SFT on new data or DPO after SFT.",
    )

    @field_validator("attn_implementation")
    @classmethod
    def _attention(cls, value: str | None) -> str | None:
        if value is None or HUB_KERNEL.match(value):
            return value
        return check_name(value, ATTN_IMPLEMENTATIONS, "attention implementation")


class DataSection(_Section):
    train_file: str = Field(
        description="JSONL training data (a local path; relative to the working directory)."
    )
    validation_file: str | None = Field(None, description="JSONL validation data; None = split from train.")
    test_file: str | None = Field(None, description="JSONL test data for `sftbridge eval`.")
    format: Literal["auto", "qa", "template", "messages", "text"] = Field(
        "auto", description="auto: template if one is given, else detected from the first record's keys."
    )
    template: Template | None = Field(
        None, description="Inline JumpStart-style template; else template.json beside train_file is used."
    )
    system_prompt: str | None = Field(None, description="System turn added before every example.")
    chat_format: Literal["auto", "chat_template", "plain"] = Field(
        "auto",
        description="auto: the tokenizer's chat template when it has one, else plain prompt + completion.",
    )
    max_length: int = Field(1024, gt=0, description="Max tokens per example (JumpStart's max_input_length).")
    over_length: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What to do with examples over max_length; counts are reported either way."
    )
    # JumpStart's validation_split_ratio and train_data_split_seed.
    validation_split_ratio: float = Field(0.2, ge=0.0, lt=1.0, description="Share of train held out.")
    split_seed: int = Field(0, description="Seed of the train/validation split.")


class LoraSection(_Section):
    r: int = Field(8, gt=0, description="LoRA rank (JumpStart's lora_r).")
    alpha: int = Field(
        32, gt=0, description="LoRA alpha; effective scale alpha/r = 4 (JumpStart's lora_alpha)."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="JumpStart's lora_dropout.")
    # JumpStart (and PEFT's default for Llama) adapts the attention query and value projections only.
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Module names LoRA adapts; all seven Llama projections learn new facts better.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train (PEFT's bias).")


class TrainSection(_Section):
    epochs: float = Field(5.0, gt=0, description="Training epochs (JumpStart's default is 5).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = use epochs.")
    learning_rate: float = Field(1e-4, gt=0, description="JumpStart's default learning rate.")
    per_device_batch_size: int = Field(4, gt=0, description="JumpStart's per_device_train_batch_size.")
    per_device_eval_batch_size: int = Field(
        8, gt=0, description="Batch size of evaluation and answer metrics."
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Batches summed per optimizer step (effective batch = batch x this x GPUs)."
    )
    lr_scheduler: str = Field(
        "linear", description="transformers scheduler name (linear, cosine, constant...)."
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of the optimizer steps spent raising the learning rate from 0.",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm.")
    optim: str = Field("adamw_torch", description="transformers optimizer name; paged_adamw_8bit for QLoRA.")
    # Off by default: it costs ~30% speed; the 7B configs turn it on to fit activations on a 24 GB GPU.
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% slower."
    )
    # Off by default: DDP (a full copy per GPU) is faster while the model fits one GPU (README "Scaling out").
    fsdp: bool = Field(
        False,
        description="Shard weights, gradients and optimizer state across processes (FSDP2): for a model that "
        "does not fit one GPU. Needs >1 process (backend.num_processes, or a multi-GPU SageMaker instance).",
    )
    fsdp_offload: bool = Field(
        False,
        description="With train.fsdp: keep the shards in CPU RAM between uses (slower, less GPU memory)",
    )
    # Speed options, each measured on/off by benchmarks/harness.py; on by default only where it won.
    packing: bool = Field(False, description="Pack examples into max_length rows (TRL best-fit decreasing).")
    padding_free: bool = Field(False, description="Flatten a batch into one row; needs flash attention.")
    use_liger_kernel: bool = Field(
        False, description="Liger fused Triton kernels (GPU, pip install liger-kernel)."
    )
    # On: batches of similar lengths cut padding from 55% to 3% of the tokens on an instruction-like mix of
    # lengths and trained 2.2-2.65x the tokens/s of random batches (CPU, benchmarks/results/harness-cpu.md).
    # The first batch is the longest, so a run that will not fit fails at step 1, not mid-epoch.
    group_by_length: bool = Field(True, description="Batch examples of similar length: less padding.")
    logging_steps: int = Field(10, gt=0, description="Log (a progress line, metrics.jsonl) every N steps.")
    report_to: list[Literal["tensorboard", "trackio", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers that receive the logs, each an optional extra "
        "(pip install 'sftbridge[mlflow]'); [] = none.",
    )
    tracking_project: str = Field(
        "sftbridge", description="MLflow experiment, or W&B / Trackio project, the run is logged under."
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server: a URI, a folder, or a SageMaker managed MLflow server ARN "
        "(arn:aws:sagemaker:<region>:<account>:mlflow-tracking-server/<name>); None = MLFLOW_TRACKING_URI, "
        "else MLflow's default.",
    )
    checkpoint_dir: str | None = Field(
        None,
        description="Where checkpoints go; default: beside the run folder. Training resumes from the newest "
        "complete checkpoint found there (SageMaker: /opt/ml/checkpoints, synced to S3).",
    )
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps; None = once per epoch.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept; older ones are deleted.")
    eval_strategy: Literal["no", "epoch", "steps"] = Field(
        "epoch", description="When to evaluate on the validation data (none held out: never)."
    )
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (eval_strategy=steps).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU."
    )
    # Answer quality while it trains (training/answer_metrics.py, issue 15): the loss alone did not show that
    # JumpStart's defaults learned almost nothing and answered six times too long.
    answer_metrics: bool = Field(
        True,
        description="Score greedy answers to a fixed sample of questions while training (Q/A and template "
        "data): answer_exact_match, _contains, _mean_tokens, _eos_rate; a verdict at the end.",
    )
    answer_metrics_points: int = Field(
        10,
        gt=0,
        description="Evenly spaced points of the run that measure them; every epoch when fewer epochs.",
    )
    answer_metrics_samples: int = Field(
        32,
        gt=0,
        le=1024,
        description="Questions in the sample: validation ones, or training ones when nothing is held out.",
    )
    metric_for_best_model: Literal[
        "eval_loss", "answer_exact_match", "answer_contains", "answer_eos_rate"
    ] = Field("eval_loss", description="What early stopping and load_best_model_at_end compare.")
    load_best_model_at_end: bool = Field(
        False,
        description="The run's adapter is the best evaluation's by metric_for_best_model, not the last.",
    )
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop after this many evaluations without a better metric_for_best_model; None = off.",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0.0, description="The least change of metric_for_best_model that counts as an improvement."
    )
    # Preference tuning (training/dpo.py): TRL's DPOTrainer on {prompt|question, chosen, rejected} pairs.
    method: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: supervised fine-tuning on answers; dpo: preference tuning on chosen/rejected "
        "pairs.",
    )
    dpo_beta: float = Field(
        0.1,
        gt=0,
        description="DPO: how far the policy may move from the reference (TRL's beta); higher = closer.",
    )
    dpo_loss_type: Literal[
        "sigmoid",
        "hinge",
        "ipo",
        "robust",
        "bco_pair",
        "sppo_hard",
        "nca_pair",
        "apo_zero",
        "apo_down",
        "sigmoid_norm",
    ] = Field(
        "sigmoid", description="DPO: TRL's loss_type; sigmoid is the DPO paper's, ipo adds a squared margin."
    )
    dpo_rpo_alpha: float | None = Field(
        None,
        ge=0.0,
        description="DPO: weight of an SFT loss on the chosen answer beside the DPO loss (RPO; TRL's "
        "loss_type 'sft'): keeps the chosen answer likely while the rejected one is pushed down; None = off.",
    )
    dpo_label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="DPO: share of pairs assumed mislabelled (robust DPO, sigmoid loss)."
    )
    dpo_ld_alpha: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="DPO: LD-DPO's weight on answer tokens past the shorter answer's length; None = off.",
    )
    dpo_precompute_ref_log_probs: bool = Field(
        False,
        description="DPO: score every pair with the reference once before training (a forward less a step).",
    )

    @field_validator("fsdp_offload")
    @classmethod
    def _offload_needs_fsdp(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("fsdp"):
            raise ValueError("it offloads FSDP's shards: set train.fsdp=true too, or drop it")
        return value

    @model_validator(mode="after")
    def _keep_best(self) -> TrainSection:
        if self.eval_strategy == "no" and (self.load_best_model_at_end or self.early_stopping_patience):
            raise ValueError(
                "load_best_model_at_end and early_stopping_patience compare evaluations: set "
                "train.eval_strategy=epoch (or steps) and hold out validation data"
            )
        if self.load_best_model_at_end and (
            (self.eval_strategy == "epoch" and self.save_steps)
            or (self.eval_strategy == "steps" and self.save_steps != (self.eval_steps or self.logging_steps))
        ):
            raise ValueError(
                "load_best_model_at_end restores a checkpoint, so checkpoints must be written at every "
                "evaluation: with eval_strategy=epoch leave save_steps unset; with eval_strategy=steps set "
                "save_steps equal to eval_steps"
            )
        return self

    @model_validator(mode="after")
    def _dpo_batches(self) -> TrainSection:
        if self.method == "dpo" and (self.packing or self.padding_free):
            raise ValueError(
                "packing and padding_free are for SFT: DPO batches a chosen and a rejected sequence a pair; "
                "set train.packing=false and train.padding_free=false"
            )
        return self

    # Checked here, before any model loads, against committed copies of transformers' enumerations.
    @field_validator("optim")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        return check_name(value, OPTIMIZERS, "optimizer (OptimizerNames)")

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        return check_name(value, LR_SCHEDULERS, "scheduler (SchedulerType)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value  # train.report_to=mlflow on the command line

    @model_validator(mode="after")
    def _mlflow_uri_needs_mlflow(self) -> TrainSection:
        if self.mlflow_tracking_uri and "mlflow" not in self.report_to:
            raise ValueError("mlflow_tracking_uri is set but 'mlflow' is not in train.report_to; add it")
        return self


class BackendSection(_Section):
    name: str = Field("local", description="local, sagemaker, or a third-party backend's entry-point name.")
    num_processes: int = Field(1, gt=0, description="local: >1 launches torchrun with that many processes.")
    # Checked against the backend's `settings_model` when the config is loaded, then an instance of it.
    options: dict[str, Any] | SerializeAsAny[BaseModel] = Field(
        default_factory=dict, description="Settings of a third-party backend, as its settings_model defines."
    )
    # SageMaker (backend.name=sagemaker); the local backend ignores these.
    role: str | None = Field(
        None, description="SageMaker: execution role ARN the job runs as, arn:aws:iam::<account>:role/<name>."
    )
    region: str | None = Field(None, description="SageMaker: AWS region; None = the AWS profile's region.")
    bucket: str | None = Field(
        None,
        description="SageMaker: S3 bucket for data, code, checkpoints and output; None = the SDK's default "
        "bucket sagemaker-<region>-<account>.",
    )
    s3_prefix: str = Field(
        "sftbridge", description="SageMaker: key prefix in the bucket; a job's files go under it."
    )
    instance_type: str = Field(
        "ml.g5.2xlarge", description="SageMaker: training instance type; ml.g5.2xlarge = one 24 GB A10G."
    )
    instance_count: int = Field(
        1, gt=0, description="SageMaker: instances; > 1 (or a multi-GPU instance) runs under torchrun."
    )
    volume_size_gb: int = Field(
        100, gt=0, description="SageMaker: disk per instance; holds the base model download and checkpoints."
    )
    use_spot: bool = Field(
        False, description="SageMaker: managed spot training (cheaper; may be interrupted and resumed)."
    )
    # SageMaker's own limit is 28 days; a runaway 7B job should not get near it.
    max_run_hours: float = Field(
        24.0, gt=0, le=672, description="SageMaker: training time limit (MaxRuntimeInSeconds)."
    )
    max_wait_hours: float | None = Field(
        None,
        gt=0,
        le=672,
        description="SageMaker spot: limit including the wait for capacity; None = 2 x max_run_hours.",
    )
    checkpoint_s3_uri: str | None = Field(
        None,
        description="SageMaker: where /opt/ml/checkpoints is synced; None = under the job's own prefix. "
        "Point a new job at an old job's URI to resume it.",
    )
    image_uri: str | None = Field(
        None, description="SageMaker: training image; None = the Hugging Face PyTorch training image below."
    )
    # The newest Hugging Face training image the SDK lists; newer libraries come from requirements.txt.
    transformers_version: str = Field("5.3.0", description="Hugging Face training image: transformers.")
    pytorch_version: str = Field("2.9.0", description="Hugging Face training image: PyTorch.")
    py_version: str = Field("py312", description="Hugging Face training image: Python.")
    distribution: Literal["auto", "none", "torchrun"] = Field(
        "auto",
        description="SageMaker: auto = torchrun when instance_count > 1 or the instance has several GPUs.",
    )
    disable_output_compression: bool = Field(
        False, description="SageMaker: upload the run folder as files instead of model.tar.gz."
    )
    environment: dict[str, str] = Field(
        default_factory=dict,
        description="SageMaker: extra environment variables of the job; DescribeTrainingJob shows them, "
        "so no secrets here.",
    )
    secret_environment: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables the training script sets from AWS Secrets Manager where it runs, "
        "as NAME: secret name or ARN (e.g. WANDB_API_KEY: team/wandb); only the secret's name travels in a "
        "job request. The role running the script needs secretsmanager:GetSecretValue on each.",
    )
    pass_hf_token: bool = Field(
        False,
        description="SageMaker: copy the local HF_TOKEN into the job's environment, where "
        "DescribeTrainingJob shows it to anyone with read access; prefer model.hf_token_secret.",
    )
    # Pinned by default: a job that installs whatever is newest on the day it starts trains with code nobody
    # tested; the image's own torch is kept either way.
    requirements: Literal["pinned", "ranges"] = Field(
        "pinned",
        description="SageMaker: pinned = the job installs exactly the library versions installed where it is "
        "submitted; ranges = sftbridge's declared version ranges.",
    )

    @field_validator("options", mode="before")
    @classmethod
    def _mapping(cls, value: Any) -> Any:
        if not isinstance(value, dict | BaseModel):  # one clear error, not one per member of the union
            raise ValueError("must be a mapping of the backend's settings, key: value")
        return value

    @field_validator("secret_environment")
    @classmethod
    def _variable_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name (letters, digits, _)")
        return value

    @model_validator(mode="after")
    def _spot_wait(self) -> BackendSection:
        if self.max_wait_hours is not None and self.max_wait_hours < self.max_run_hours:
            raise ValueError(
                f"max_wait_hours ({self.max_wait_hours}) must be >= max_run_hours ({self.max_run_hours}): "
                "the spot time limit includes the training time"
            )
        return self


class GenerationSection(_Section):
    max_new_tokens: int = Field(256, gt=0, description="Longest answer generated, in tokens.")
    do_sample: bool = Field(False, description="False = greedy (deterministic evaluation).")
    temperature: float = Field(
        0.6, gt=0, description="Used when sampling; the seed's endpoint payload used 0.6."
    )
    top_p: float = Field(0.9, gt=0, le=1.0, description="Used when sampling; the seed's payload used 0.9.")
    top_k: int | None = Field(None, gt=0, description="Used when sampling: keep the k likeliest tokens.")
    repetition_penalty: float = Field(1.0, gt=0, description="Above 1 discourages repeating tokens; 1 = off.")


class RunConfig(_Section):
    """A whole fine-tuning run: what `sftbridge train` reads and what a run directory records."""

    run_name: str = Field(
        "sft", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Prefix of the run folder."
    )
    seed: int = Field(10, description="Training seed (JumpStart's default).")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    backend: BackendSection = Field(default_factory=BackendSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.train.eval_strategy == "steps" and self.train.eval_steps is None:
            raise ValueError("train.eval_steps is required when train.eval_strategy is 'steps'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "lora.r=16"]`` → a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=3")
        set_dotted(nested, key, parse_value(raw))
    return nested


def parse_flag_overrides(items: list[str]) -> dict[str, Any]:
    """The training script's overrides: ``--section.key value`` (SageMaker's hyperparameter form),
    ``--section.key=value`` or ``section.key=value`` → a nested dict."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(items):
        item = items[index]
        if (not item.startswith("--") and "=" not in item) or item == "--":
            raise ConfigError(f"argument {item!r}: expected --section.key value or section.key=value")
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            if index + 1 >= len(items):
                raise ConfigError(f"argument {item}: missing its value")
            index += 1
            value = items[index]
        set_dotted(overrides, key, parse_value(value))
        index += 1
    return overrides


def parse_value(raw: Any) -> Any:
    """A value given as text (``true``, ``1e-4``, ``[q_proj, v_proj]``, ``null``) parsed as YAML.

    Command-line overrides and SageMaker hyperparameters both arrive this way; a value that is not a string
    (SM_HPS is JSON) is returned as it is.
    """
    if not isinstance(raw, str):
        return raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw  # not YAML (e.g. an unbalanced bracket in a prompt): keep the string as written
    _check_size(value, Path(f"the value {raw[:40]!r}"))
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 3}}`` → ``{"train.epochs": 3}`` (the inverse of :func:`set_dotted`); lists and
    empty dicts are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


MAX_CONFIG_VALUES = 100_000  # a config has a few hundred; YAML aliases nested 9 deep expand to billions


def _check_size(raw: Any, path: Path) -> None:
    """Refuse a document that expands (through aliases: ``&a [*b, *b, ...]``) beyond MAX_CONFIG_VALUES,
    counting at most that many: what would exhaust memory downstream is stopped here, in milliseconds."""
    pending, seen = [raw], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{path}: expands to over {MAX_CONFIG_VALUES} values (YAML aliases, *name, repeat what they "
                "point to); write the values out"
            )
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
        _check_size(raw, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    return raw


# Given a backend name, the pydantic model of its ``backend.options`` (None: an untyped dict); raises
# ConfigError for an unknown name. The caller hands it in (``backends.options_model``), so validating a config
# imports no backend.
OptionsModel = Callable[[str], "type[BaseModel] | None"]


def load_config(
    path: str | Path | None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    options_model: OptionsModel | None = None,
) -> RunConfig:
    """Read a YAML config, apply overrides, validate. Raises ConfigError listing every problem."""
    raw = read_yaml(path) if path is not None else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        raw = deep_merge(raw, overrides)
    return validate_config(
        raw, source=str(path) if path is not None else "config", options_model=options_model
    )


def validate_config(
    raw: dict[str, Any], source: str = "config", *, options_model: OptionsModel | None = None
) -> RunConfig:
    settings, problems = _backend_settings(raw, options_model) if options_model else (None, [])
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()] + problems
    if problems:
        listing = "\n".join(f"  {problem}" for problem in problems)
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n{listing}")
    if settings is not None:
        config.backend.options = settings
    return config


def _backend_settings(raw: dict[str, Any], options_model: OptionsModel) -> tuple[BaseModel | None, list[str]]:
    """``backend.options`` validated against the model ``options_model`` gives for the backend, or the
    problems."""
    section = raw.get("backend")
    section = section if isinstance(section, dict) else {}
    name = section.get("name", BackendSection.model_fields["name"].default)
    if not isinstance(name, str):
        return None, []  # a name of the wrong type is reported by the schema
    try:
        model = options_model(name)
    except ConfigError as exc:
        return None, [f"backend.name: {exc}"]
    options = section.get("options", {})
    if model is None or not isinstance(options, dict):
        return None, []  # an untyped backend keeps its dict; a non-mapping is reported by the schema
    prefix = ("backend", "options")
    problems = []
    if model.model_config.get("extra") != "allow":  # a typo ignored is a setting silently lost
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        for key in options:
            if key not in known:
                problems.append(f"{'.'.join((*prefix, str(key)))}: unknown key{_suggest((key,), model)}")
        options = {key: value for key, value in options.items() if key in known}
    try:
        return model.model_validate(options), problems
    except ValidationError as exc:
        return None, problems + [_describe(error, model, prefix) for error in exc.errors()]


def _describe(error: Any, root: type[BaseModel] | None = None, prefix: tuple[str, ...] = ()) -> str:
    """One validation error as ``dotted.key: problem``; ``root`` is the model at ``prefix``."""
    loc = ".".join(str(part) for part in (*prefix, *error["loc"])) or "(top level)"
    if error["type"] == "extra_forbidden":
        hint = "every key: sftbridge config show"
        return f"{loc}: unknown key{_suggest(error['loc'], root or RunConfig)} ({hint})"
    if error["type"] == "missing":
        return f"{loc}: required, but not set"
    message = error["msg"].removeprefix("Value error, ")
    return f"{loc}: {message} (got {error['input']!r})"


def _suggest(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is None:
        return ""
    valid = list(model.model_fields)
    given = str(loc[-1])
    known = KNOWN_AS.get(given)
    close = [known] if known in valid else difflib.get_close_matches(given, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return f"{hint} valid keys: {', '.join(valid)}"


# Names other tools (PEFT, transformers, JumpStart) give to sftbridge's keys, beyond any spelling distance.
KNOWN_AS = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "num_train_epochs": "epochs",
    "epoch": "epochs",
    "max_seq_length": "max_length",
    "per_device_train_batch_size": "per_device_batch_size",
    "batch_size": "per_device_batch_size",
    "model_name_or_path": "name_or_path",
    "model_id": "name_or_path",
}


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
