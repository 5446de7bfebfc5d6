"""Inputs of a kilobyte cannot take gigabytes: YAML aliases, template format specs and non-finite numbers are
refused at validation, in one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftbridge.config import load_config
from sftbridge.errors import ConfigError

EXPANDS = "expands to over 100000 values (YAML aliases, *name, repeat what they point to)"


def bomb(levels: int = 6) -> str:
    """Each level lists the one before it nine times: 9**levels values from a few hundred characters."""
    value = "&a0 [x, x, x, x, x, x, x, x, x]"
    for level in range(1, levels + 1):
        value = f"&a{level} [" + ", ".join([value] + [f"*a{level - 1}"] * 8) + "]"
    return value


@pytest.mark.parametrize("key", ["run_name", "lora.target_modules"])
def test_a_yaml_alias_bomb_is_refused_at_load(tmp_path: Path, key: str) -> None:
    section, _, name = key.rpartition(".")
    body = f"{name}: {bomb()}\n" if not section else f"{section}:\n  {name}: {bomb()}\n"
    path = tmp_path / "bomb.yaml"
    path.write_text("data:\n  train_file: x.jsonl\n" + body)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == f"{path}: {EXPANDS}; write the values out"


def test_an_override_cannot_expand_either() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["data.train_file=x.jsonl", f"lora.target_modules={bomb()}"])
    assert EXPANDS in str(refused.value)


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{question:>4000000000}", "{question:>4000000000}: a field is filled as written"),
        ("{question:{x}}", "format specs and conversions are not supported: write {question}"),
        ("{question:d}", "{question:d}: a field is filled as written"),
        ("{question!r}", "{question!r}: a field is filled as written"),
        ("{0}", "field names must be plain identifiers"),
        ("{q.attr}", "field names must be plain identifiers"),
    ],
)
def test_template_fields_are_plain_names(template: str, says: str) -> None:
    overrides = [
        "data.train_file=x.jsonl",
        f"data.template.prompt={json.dumps(template)}",
        'data.template.completion="{a}"',
    ]
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides)
    assert says in str(refused.value)


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_numbers_are_refused(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["data.train_file=x.jsonl", f"train.learning_rate={value}"])
    assert "train.learning_rate" in str(refused.value)
