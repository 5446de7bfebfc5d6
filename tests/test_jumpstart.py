"""`sftbridge config from-jumpstart`: JumpStart's Llama-2 fine-tuning hyperparameters become a config."""

import json
from pathlib import Path
from typing import Any

import pytest

from sftbridge.cli import main
from sftbridge.config import load_config
from sftbridge.errors import ConfigError
from sftbridge.jumpstart import HYPERPARAMETERS, convert, read_hyperparameters

# Every default of JumpStart's meta-textgeneration-llama-2-7b spec 3.0.0 in JumpStart's form (all strings),
# as the SageMaker Python SDK's tests record the estimator being created with them (test_estimator.py).
JUMPSTART_DEFAULTS = {
    "int8_quantization": "False",
    "enable_fsdp": "True",
    "epoch": "5",
    "learning_rate": "0.0001",
    "lora_r": "8",
    "lora_alpha": "32",
    "lora_dropout": "0.05",
    "instruction_tuned": "False",
    "chat_dataset": "False",
    "add_input_output_demarcation_key": "True",
    "per_device_train_batch_size": "4",
    "per_device_eval_batch_size": "1",
    "max_train_samples": "-1",
    "max_val_samples": "-1",
    "seed": "10",
    "max_input_length": "-1",
    "validation_split_ratio": "0.2",
    "train_data_split_seed": "0",
    "preprocessing_num_workers": "None",
}


def write(tmp_path: Path, hyperparameters: dict[str, Any]) -> Path:
    path = tmp_path / "hyperparameters.json"
    path.write_text(json.dumps(hyperparameters))
    return path


def test_every_spec_hyperparameter_is_mapped_or_has_a_reason() -> None:
    assert set(JUMPSTART_DEFAULTS) <= {hp.name for hp in HYPERPARAMETERS}
    for hp in HYPERPARAMETERS:
        assert hp.key is not None or hp.note, hp.name


def test_the_seeds_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The seed set only epoch, instruction_tuned and chat_dataset in JumpStart's console (its write-up does
    not show the values; its data is Q/A records with a prompt template, which is instruction tuning and not
    a chat dataset); everything else ran at JumpStart's defaults, which the console records with them."""
    seed_job = {**JUMPSTART_DEFAULTS, "epoch": "3", "instruction_tuned": "True", "chat_dataset": "False"}
    out = tmp_path / "seed.yaml"
    code = main(["config", "from-jumpstart", str(write(tmp_path, seed_job)), "--out", str(out)])
    assert code == 0
    config = load_config(out)
    assert config.train.epochs == 3
    assert config.data.format == "auto"  # a template.json beside the data, or the seed's Q/A records
    assert config.model.name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 32, 0.05)
    assert (config.train.learning_rate, config.train.per_device_batch_size) == (1e-4, 4)
    assert config.train.per_device_eval_batch_size == 1  # JumpStart's, not sftbridge's 8
    assert (config.data.max_length, config.data.validation_split_ratio, config.data.split_seed) == (
        1024,
        0.2,
        0,
    )
    assert config.seed == 10
    text = out.read_text()
    assert "epochs: 3  # JumpStart epoch=3" in text
    assert 'format: "auto"  # JumpStart instruction_tuned=True, chat_dataset=False' in text
    err = capsys.readouterr().err
    for name in (
        "int8_quantization",
        "add_input_output_demarcation_key",
        "max_train_samples",
        "max_val_samples",
        "preprocessing_num_workers",
    ):
        assert f"not converted: {name}=" in err
        assert f"#   {name}=" in text
    assert config.train.fsdp is True  # JumpStart shards with FSDP by default
    assert "not converted: enable_fsdp" not in err


@pytest.mark.parametrize(
    ("instruction_tuned", "chat_dataset", "fmt"),
    [
        ("True", "False", "auto"),
        ("False", "False", "text"),
        ("True", "True", "messages"),
        ("False", "True", "messages"),
    ],
)
def test_dataset_kind(instruction_tuned: str, chat_dataset: str, fmt: str) -> None:
    hps = {"instruction_tuned": instruction_tuned, "chat_dataset": chat_dataset}
    assert convert(hps, train_file="t.jsonl").values["data.format"] == fmt


def test_absent_hyperparameters_take_jumpstarts_defaults() -> None:
    """JumpStart's instruction_tuned default is False: a job that did not set it trained on raw text."""
    result = convert({}, train_file="t.jsonl")
    assert result.values["data.format"] == "text"
    assert result.values["train.per_device_eval_batch_size"] == 1
    assert result.origin("train.epochs") == "JumpStart epoch (JumpStart's default 5)"
    assert result.unmapped == []  # nothing given that could not be converted


def test_describe_training_job_form_and_quoted_values(tmp_path: Path) -> None:
    """`aws sagemaker describe-training-job` output, values JSON-encoded once more (as the SDK may)."""
    path = write(
        tmp_path,
        {
            "HyperParameters": {
                "epoch": '"2"',
                "lora_r": '"16"',
                "sagemaker_program": '"transfer_learning.py"',
            }
        },
    )
    hyperparameters = read_hyperparameters(path)
    assert hyperparameters == {"epoch": "2", "lora_r": "16", "sagemaker_program": "transfer_learning.py"}
    result = convert(hyperparameters, train_file="t.jsonl")
    assert (result.values["train.epochs"], result.values["lora.r"]) == (2, 16)
    assert result.unmapped[0][0] == "sagemaker_program"


def test_bad_values_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        convert({"epoch": "five", "lora_dropout": "1.5", "instruction_tuned": "yes"}, train_file="t.jsonl")
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "epoch: must be an integer (got 'five')" in message
    assert "lora_dropout: must be <= 1 (got '1.5')" in message
    assert "instruction_tuned: must be 'True' or 'False' (got 'yes')" in message


def test_unknown_and_unsupported_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {"int8_quantization": "True", "epochs": "3", "validation_split_ratio": "1"})
    assert main(["config", "from-jumpstart", str(path)]) == 2  # JumpStart allows a ratio of 1; sftbridge not
    assert "data.validation_split_ratio" in capsys.readouterr().err
    path = write(tmp_path, {"int8_quantization": "True", "epochs": "3"})
    assert main(["config", "from-jumpstart", str(path)]) == 0
    text = capsys.readouterr().out
    assert (
        "#   epochs=3: not a hyperparameter of JumpStart model spec meta-textgeneration-llama-2-7b 3.0.0"
        in text
    )
    assert "#   int8_quantization=True: sftbridge has no 8-bit loading" in text
