"""The corpus of broken inputs in tests/bad_inputs/: each gives a clear error naming the file and line (or the
key), exit code 2, and leaves no run directory. Runs the real CLI entry point in-process (validation happens
before any subprocess or model load)."""

from pathlib import Path

import pytest

from conftest import ROOT, cli

CORPUS = Path(__file__).parent / "bad_inputs"
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")

DATA_CASES = {
    "invalid_json.jsonl": "invalid_json.jsonl line 2: invalid JSON",
    "missing_field.jsonl": "missing_field.jsonl line 2: missing field 'correct_answer'",
    "empty_answer.jsonl": "empty_answer.jsonl line 1: field 'correct_answer' is empty",
    "wrong_type.jsonl": "wrong_type.jsonl line 1: field 'correct_answer' must be a string, got list",
    "non_utf8.jsonl": "non_utf8.jsonl line 2: not UTF-8 (byte 0xe9",
    "empty.jsonl": "empty.jsonl: the file is empty",
    "not_an_object.jsonl": "not_an_object.jsonl line 1: expected a JSON object",
    "bad_role.jsonl": "bad_role.jsonl line 1: messages[1] needs a role in",
    "no_assistant.jsonl": "no_assistant.jsonl line 1: the last turn of messages must be the assistant",
    "unknown_format.jsonl": "unknown_format.jsonl line 1: cannot tell the data format",
    "template_missing_field/train.jsonl": "train.jsonl line 1: missing field 'context'",
}
CONFIG_CASES = {
    "bad_config.yaml": [
        "5 problem(s)",
        "model.load_in_4bit: Input should be a valid boolean",
        "data.max_lenght: unknown key; did you mean 'max_length'?",
        "lora.r: Input should be greater than 0 (got -1)",
        "train.epochs: Input should be a valid number",
        "train.learning_rate: Input should be a valid number",
    ],
    "invalid_yaml.yaml": ["invalid_yaml.yaml line 4: invalid YAML"],
}


def test_corpus_size() -> None:
    """Every file in the corpus has a case here (the note reports the count)."""
    files = {
        str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file() and p.name != "template.json"
    }
    assert files == set(DATA_CASES) | set(CONFIG_CASES) | {"accepted_bom_crlf.jsonl"}


def run_cli(args: list[str], where: Path) -> tuple[int, str]:
    result = cli(*args, cwd=where)
    return result.returncode, result.stderr


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_data(name: str, tmp_path: Path) -> None:
    code, err = run_cli(["train", TINY, f"data.train_file={CORPUS / name}", "data.test_file=null"], tmp_path)
    assert code == 2
    assert DATA_CASES[name] in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config(name: str, tmp_path: Path) -> None:
    code, err = run_cli(["train", str(CORPUS / name)], ROOT)
    assert code == 2
    for expected in CONFIG_CASES[name]:
        assert expected in err
    assert not (tmp_path / "runs").exists()


def test_ten_megabyte_line(tmp_path: Path) -> None:
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"question": "' + "why " * (10 << 18) + '", "correct_answer": "x"}\n')
    code, err = run_cli(["train", TINY, f"data.train_file={huge}", "data.test_file=null"], tmp_path)
    assert code == 2
    assert "huge.jsonl line 1: 10.0 MB on one line (the limit is 4 MB)" in err
    assert not (tmp_path / "runs").exists()


def test_bom_and_crlf_are_read_not_refused(tokenizer: object) -> None:
    """A UTF-8 BOM and Windows line endings are common in hand-edited files: they load as the same records."""
    from sftbridge.config import DataSection
    from sftbridge.data.loading import load_data

    data = load_data(
        DataSection(train_file=str(CORPUS / "accepted_bom_crlf.jsonl"), validation_split_ratio=0)
    )
    assert [r.values["correct_answer"] for r in data.train] == ["water", "carbon dioxide"]
