"""`sftbridge config show|init|schema`: every key from the one schema, a starter that loads, a JSON Schema."""

import json
from pathlib import Path

import pytest

from conftest import ROOT
from sftbridge.cli import DESCRIPTION, build_parser, main
from sftbridge.cli.config import REQUIRED, json_schema, schema_keys, starter_config
from sftbridge.config import RunConfig, load_config
from sftbridge.errors import ConfigError


def test_show_lists_every_key_with_type_default_and_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    keys = {k.key: k for k in schema_keys()}
    for section in ("model", "data", "lora", "train", "backend", "generation"):
        assert f"[{section}]" in out
        for name in RunConfig.model_fields[section].annotation.model_fields:  # type: ignore[union-attr]
            assert f"{section}.{name}" in keys
            assert f"{section}.{name} " in out
    epochs = keys["train.epochs"]
    assert (epochs.type, epochs.default) == ("float", 5.0)
    assert "Training epochs (JumpStart's default is 5)." in out
    assert keys["data.train_file"].default is REQUIRED
    assert keys["data.format"].type == "'auto' | 'qa' | 'template' | 'messages' | 'text'"
    assert keys["lora.target_modules"].default == ["q_proj", "v_proj"]
    assert {"data.template.prompt", "data.template.completion"} <= set(keys)
    undescribed = [k.key for k in keys.values() if not k.description]
    assert not undescribed, f"give these fields a description in config.py: {undescribed}"


def test_show_json_and_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--json"]) == 0
    rows = {row["key"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["lora.r"] == {
        "key": "lora.r",
        "type": "int",
        "default": 8,
        "description": "LoRA rank (JumpStart's lora_r).",
        "required": False,
    }
    assert rows["data.train_file"]["required"] is True

    config = str(ROOT / "configs" / "tiny-cpu.yaml")
    assert main(["config", "show", config, "train.epochs=7", "--json"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved == load_config(config, ["train.epochs=7"]).to_dict()
    assert resolved["train"]["epochs"] == 7
    assert main(["config", "show", config]) == 0
    assert "epochs: 7" not in capsys.readouterr().out  # no override this time: the file's own value


def test_init_writes_a_config_that_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "starter.yaml"
    assert main(["config", "init", str(target), "--train-file", "data/sciq-sample/train.jsonl"]) == 0
    text = target.read_text()
    config = load_config(target)
    assert config.to_dict() == load_config(None, ["data.train_file=data/sciq-sample/train.jsonl"]).to_dict()
    for section in ("model:", "data:", "lora:", "train:", "backend:", "generation:"):
        assert f"\n{section}\n" in text
    assert "  # Training epochs (JumpStart's default is 5). [float]\n  epochs: 5.0\n" in text
    assert "# (required) JSONL training data" in text
    assert main(["config", "init", str(target)]) == 2  # never overwrites without --force
    assert "already exists" in capsys.readouterr().err
    assert main(["config", "init", str(target), "--force", "--model", "meta-llama/Llama-2-7b-chat-hf"]) == 0
    assert load_config(target).model.name_or_path == "meta-llama/Llama-2-7b-chat-hf"


def test_starter_has_every_key_but_the_sub_keys_of_an_unset_block() -> None:
    import yaml

    def flat(tree: dict, prefix: str = "") -> set[str]:
        keys = set()
        for key, value in tree.items():
            is_section = isinstance(value, dict) and bool(value)  # {}: backend.options, backend.environment
            keys |= flat(value, f"{prefix}{key}.") if is_section else {prefix + key}
        return keys

    written = flat(yaml.safe_load(starter_config(train_file="x.jsonl")))
    expected = {k.key for k in schema_keys() if not k.key.startswith("data.template.")}
    assert written == expected  # data.template is null, so its prompt/completion are not written


def test_committed_json_schema_is_the_schema() -> None:
    committed = (ROOT / "configs" / "schema.json").read_text()
    fix = "configs/schema.json is stale; regenerate it: sftbridge config schema --out configs/schema.json"
    assert committed == json_schema(), fix


def test_json_schema_checks_the_shipped_configs() -> None:
    """Editors validate with this schema: the shipped configs pass it and a typo fails it."""
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    schema = json.loads(json_schema())
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError, match="epoch"):
        jsonschema.validate({"data": {"train_file": "x"}, "train": {"epoch": 3}}, schema)


def test_unknown_key_names_config_show() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.train_file=x.jsonl", "train.epoch=3"])
    assert "train.epoch: unknown key; did you mean 'epochs'?" in str(info.value)
    assert "(every key: sftbridge config show)" in str(info.value)


def test_help_points_to_config_show() -> None:
    assert "sftbridge config show" in DESCRIPTION
    for command in ("train", "preview", "plan"):
        parser = build_parser(only=command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]  # type: ignore[union-attr]
        assert "sftbridge config show" in " ".join(sub.format_help().split()), command
