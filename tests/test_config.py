from pathlib import Path

import pytest

from sftbridge.config import RunConfig, dump_config, load_config, parse_overrides, validate_config
from sftbridge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_are_shipped() -> None:
    names = {path.name for path in CONFIGS}
    assert {"tiny-cpu.yaml", "llama2-7b-chat-qlora.yaml", "llama2-7b-chat-lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_config(path)
    assert (ROOT / config.data.train_file).is_file()
    # The resolved form round-trips: what a run records can be trained again.
    assert validate_config(__import__("yaml").safe_load(dump_config(config))) == config


def test_seed_job_config_is_the_seeds_job() -> None:
    config = load_config(ROOT / "configs" / "llama2-7b-chat-qlora.yaml")
    assert config.model.name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    assert config.model.load_in_4bit is True
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 32, 0.05)
    assert config.train.learning_rate == 1e-4


def test_defaults_follow_jumpstart() -> None:
    config = RunConfig.model_validate({"data": {"train_file": "x.jsonl"}})
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 32, 0.05)
    assert config.train.learning_rate == 1e-4
    assert config.train.epochs == 5
    assert config.train.per_device_batch_size == 4
    assert config.data.validation_split_ratio == 0.2


def test_overrides_parse_yaml_values() -> None:
    parsed = parse_overrides(
        [
            "train.epochs=3",
            "model.load_in_4bit=True",
            "lora.target_modules=[q_proj, v_proj]",
            "data.validation_file=null",
            "train.learning_rate=2.0e-4",
        ]
    )
    assert parsed == {
        "train": {"epochs": 3, "learning_rate": 2e-4},
        "model": {"load_in_4bit": True},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "data": {"validation_file": None},
    }


@pytest.mark.parametrize("raw", ["true", "True", "1"])
def test_booleans_parse_from_common_spellings(raw: str) -> None:
    config = load_config(None, ["data.train_file=x.jsonl", f"model.load_in_4bit={raw}"])
    assert config.model.load_in_4bit is True


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train_file: x.jsonl\n  max_lenght: 5\nlora:\n  r: 0\ntrain:\n  epochs: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "3 problem(s)" in message
    assert "data.max_lenght: unknown key; did you mean 'max_length'?" in message
    assert "lora.r: Input should be greater than 0 (got 0)" in message
    assert "train.epochs:" in message


def test_missing_required_key_and_unknown_section() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["trian.epochs=3"])
    assert "data: required" in str(info.value)
    assert "trian: unknown key; did you mean 'train'?" in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  train_file: x.jsonl\n  template: {prompt: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+: invalid YAML"):
        load_config(path)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.epochs"])


def test_template_with_unbalanced_brace_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"data\.template\.prompt"):
        load_config(
            None, ["data.train_file=x.jsonl", "data.template={prompt: 'Q {question', completion: '{a}'}"]
        )


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cpu", r"flash_attention_2: FlashAttention runs on CUDA GPUs only; use sdpa"),
        ("cuda", r"flash_attention_2: the flash-attn package is not installed \(pip install flash-attn"),
    ],
)
def test_flash_attention_is_refused_where_it_cannot_run(device: str, message: str) -> None:
    """Before anything loads; transformers would fail inside from_pretrained with an ImportError."""
    import importlib.util

    from sftbridge.config import ModelSection
    from sftbridge.models.loading import check_attention

    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=message):
        check_attention(ModelSection(attn_implementation="flash_attention_2"), device)
    check_attention(ModelSection(attn_implementation="sdpa"), device)
