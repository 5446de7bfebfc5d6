"""SageMaker JumpStart's Llama-2 fine-tuning hyperparameters → an sftbridge config.

JumpStart records a fine-tuning job's hyperparameters as strings (``{"epoch": "5", "instruction_tuned":
"True"}``, or that inside DescribeTrainingJob's ``HyperParameters``). Each one here is either mapped onto a
config key or named with the reason it is not. A hyperparameter the JSON leaves out ran at JumpStart's
default, so that default is converted, not sftbridge's.

Sources:

- names, types, defaults and ranges: JumpStart's model spec of ``meta-textgeneration-llama-2-7b`` version
  3.0.0, as the SageMaker Python SDK's unit tests record it (aws/sagemaker-python-sdk,
  ``tests/unit/sagemaker/jumpstart/constants.py``, the spec
  ``js-gated-artifact-non-model-package-trainable-model``;
  the same defaults in ``tests/unit/sagemaker/jumpstart/estimator/test_estimator.py``);
- meanings: JumpStart's Llama-2 fine-tuning notebook (aws/amazon-sagemaker-examples,
  ``generative_ai/sm-jumpstart_foundation_llama_2_finetuning.ipynb``, "3. Supported Hyper-parameters for
  fine-tuning"; the ``\\n\\n### Response:\\n`` key in its evaluation cell).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sftbridge.errors import ConfigError

SPEC_SOURCE = "JumpStart model spec meta-textgeneration-llama-2-7b 3.0.0"
# JumpStart: "If -1, max_input_length is set to the minimum of 1024 and the maximum model length".
DEFAULT_MAX_INPUT_LENGTH = 1024
# The seed fine-tuned Llama 2 7B Chat; JumpStart's hyperparameters do not name the model.
DEFAULT_MODEL = "meta-llama/Llama-2-7b-chat-hf"

Kind = Literal["int", "float", "bool", "text"]


@dataclass(frozen=True)
class Hyperparameter:
    """One of JumpStart's hyperparameters: its type and default as the spec gives them, and where it goes."""

    name: str
    kind: Kind
    default: str
    key: str | None  # the sftbridge key it sets; None: not mapped
    note: str  # how it maps, or why it is not mapped
    minimum: float | None = None
    maximum: float | None = None


_UNMAPPED_CONTAINER = "JumpStart's container setting (which script its image runs), not a training setting"

# In the spec's order. Ranges are the spec's min/max; "text" options True/False are booleans here.
HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter(
        "int8_quantization",
        "bool",
        "False",
        None,
        "sftbridge has no 8-bit loading; its memory-saving load is 4-bit QLoRA: model.load_in_4bit=true",
    ),
    Hyperparameter(
        "enable_fsdp",
        "bool",
        "True",
        "train.fsdp",
        "FSDP2 shards across the GPUs of the job (backend.num_processes, or a multi-GPU SageMaker instance); "
        "with one GPU set train.fsdp=false (a 7B base fits one 24 GB GPU with model.load_in_4bit=true)",
    ),
    Hyperparameter("epoch", "int", "5", "train.epochs", "", 1, 1000),
    Hyperparameter("learning_rate", "float", "0.0001", "train.learning_rate", "", 1e-08, 1),
    Hyperparameter("lora_r", "int", "8", "lora.r", "", 1),
    Hyperparameter("lora_alpha", "int", "32", "lora.alpha", "", 1),
    Hyperparameter("lora_dropout", "float", "0.05", "lora.dropout", "", 0, 1),
    Hyperparameter(
        "instruction_tuned",
        "bool",
        "False",
        "data.format",
        "True: prompt/completion pairs (template.json beside the data, data.template, or Q/A records), loss "
        "on the completion; False: domain adaptation on raw text, data.format=text (JSONL with a 'text' "
        "field). JumpStart's fallback template (instruction/context/response) is not assumed: give a "
        "template.json or data.template",
    ),
    Hyperparameter(
        "chat_dataset",
        "bool",
        "False",
        "data.format",
        "True: conversations, data.format=messages (records with 'dialog' or 'messages'); decides over "
        "instruction_tuned",
    ),
    Hyperparameter(
        "add_input_output_demarcation_key",
        "bool",
        "True",
        None,
        "sftbridge renders prompt and completion through the model's chat template, whose [/INST] marks "
        "where the answer starts; to train with JumpStart's '\\n\\n### Response:\\n' key instead, end "
        "data.template.prompt with it",
    ),
    Hyperparameter("per_device_train_batch_size", "int", "4", "train.per_device_batch_size", "", 1, 1000),
    Hyperparameter("per_device_eval_batch_size", "int", "1", "train.per_device_eval_batch_size", "", 1, 1000),
    Hyperparameter(
        "max_train_samples",
        "int",
        "-1",
        None,
        "no such key: sftbridge trains on every record (JumpStart's -1); to use fewer, shorten the file",
        -1,
    ),
    Hyperparameter(
        "max_val_samples",
        "int",
        "-1",
        None,
        "no such key: sftbridge validates on every record (JumpStart's -1); to use fewer, shorten the file",
        -1,
    ),
    Hyperparameter("seed", "int", "10", "seed", "", 1, 1000),
    Hyperparameter(
        "max_input_length",
        "int",
        "-1",
        "data.max_length",
        f"-1 becomes {DEFAULT_MAX_INPUT_LENGTH} (JumpStart's rule). JumpStart truncates longer examples; "
        "sftbridge keeps its data.over_length=drop (a truncated answer loses its EOS) and reports the count",
        -1,
    ),
    Hyperparameter("validation_split_ratio", "float", "0.2", "data.validation_split_ratio", "", 0, 1),
    Hyperparameter("train_data_split_seed", "int", "0", "data.split_seed", "", 0),
    Hyperparameter(
        "preprocessing_num_workers",
        "text",
        "None",
        None,
        "no such key: sftbridge tokenizes in the training process",
    ),
    Hyperparameter("sagemaker_submit_directory", "text", "", None, _UNMAPPED_CONTAINER),
    Hyperparameter("sagemaker_program", "text", "", None, _UNMAPPED_CONTAINER),
    Hyperparameter("sagemaker_container_log_level", "text", "", None, _UNMAPPED_CONTAINER),
)
BY_NAME = {hp.name: hp for hp in HYPERPARAMETERS}


@dataclass
class Mapped:
    name: str
    given: str | None  # as the JSON had it; None: JumpStart's default was used
    key: str
    value: Any


@dataclass
class Conversion:
    """The config values (dotted keys), what each came from, and what was left out and why."""

    values: dict[str, Any] = field(default_factory=dict)
    mapped: list[Mapped] = field(default_factory=list)
    unmapped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, value, reason)

    def origin(self, key: str) -> str:
        """``epoch=3`` / ``epoch (JumpStart's default 5)``: where a key's value came from, for a comment."""
        parts = []
        for m in self.mapped:
            if m.key == key:
                default = BY_NAME[m.name].default
                parts.append(
                    f"{m.name}={m.given}"
                    if m.given is not None
                    else f"{m.name} (JumpStart's default {default})"
                )
        return "JumpStart " + ", ".join(parts) if parts else ""


def read_hyperparameters(path: str | Path) -> dict[str, str]:
    """A JumpStart hyperparameter JSON: ``{"epoch": "5", ...}`` or DescribeTrainingJob's output."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if isinstance(raw, dict) and isinstance(raw.get("HyperParameters"), dict):
        raw = raw["HyperParameters"]  # `aws sagemaker describe-training-job` output
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: expected a JSON object of hyperparameters, {{"epoch": "5", ...}}')
    return {str(name): _unquote(value) for name, value in raw.items()}


def _unquote(value: Any) -> str:
    """The SageMaker SDK may JSON-encode a value once more (``"\\"5\\""``); JumpStart's values are text."""
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError:
            return text
        return decoded if isinstance(decoded, str) else text
    return text


def convert(hyperparameters: dict[str, str], *, train_file: str, model: str = DEFAULT_MODEL) -> Conversion:
    """Map JumpStart hyperparameters onto config values. Raises ConfigError listing every bad value."""
    given = dict(hyperparameters)
    result = Conversion(values={"model.name_or_path": model, "data.train_file": train_file})
    parsed: dict[str, Any] = {}
    problems = []
    for hp in HYPERPARAMETERS:
        raw = given.pop(hp.name, None)
        if raw is None and hp.key is None:
            continue  # not given and not mapped: nothing to say
        try:
            parsed[hp.name] = _parse(hp, raw if raw is not None else hp.default)
        except ValueError as exc:
            problems.append(f"{hp.name}: {exc} (got {raw!r})")
            continue
        if hp.key is None:
            result.unmapped.append((hp.name, raw or "", hp.note))
        elif hp.name not in ("instruction_tuned", "chat_dataset"):
            value = parsed[hp.name]
            if hp.name == "max_input_length" and value == -1:
                value = DEFAULT_MAX_INPUT_LENGTH
            result.values[hp.key] = value
            result.mapped.append(Mapped(hp.name, raw, hp.key, value))
    for name, raw in given.items():
        result.unmapped.append((name, raw, f"not a hyperparameter of {SPEC_SOURCE}"))
    if problems:
        listing = "\n".join(f"  {problem}" for problem in problems)
        raise ConfigError(f"JumpStart hyperparameters: {len(problems)} problem(s):\n{listing}")
    if "instruction_tuned" in parsed or "chat_dataset" in parsed:
        fmt = (
            "messages"
            if parsed.get("chat_dataset")
            else "auto"
            if parsed.get("instruction_tuned")
            else "text"
        )
        result.values["data.format"] = fmt
        for name in ("instruction_tuned", "chat_dataset"):
            result.mapped.append(Mapped(name, hyperparameters.get(name), "data.format", fmt))
    return result


def _parse(hp: Hyperparameter, raw: str) -> Any:
    text = raw.strip()
    value: Any
    if hp.kind == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError("must be 'True' or 'False'")
        return text.lower() == "true"
    if hp.kind == "text":
        return text
    try:
        value = int(text) if hp.kind == "int" else float(text)
    except ValueError:
        raise ValueError(f"must be {'an integer' if hp.kind == 'int' else 'a number'}") from None
    if hp.minimum is not None and value < hp.minimum:
        raise ValueError(f"must be >= {hp.minimum:g}")
    if hp.maximum is not None and value > hp.maximum:
        raise ValueError(f"must be <= {hp.maximum:g}")
    return value
