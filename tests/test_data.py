"""Data validation: every error names the file and line, before any model is loaded."""

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import write_jsonl
from sftbridge.config import DataSection
from sftbridge.data.loading import encode_split, load_data, split_records
from sftbridge.errors import DataError

GOOD = {"question": "What gas do plants take in?", "correct_answer": "carbon dioxide"}


def load(path: Path, **kwargs: Any) -> Any:
    return load_data(DataSection(train_file=str(path), validation_split_ratio=0.0, **kwargs))


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([json.dumps(GOOD), '{"question": "x", '], "line 2: invalid JSON"),
        ([json.dumps(GOOD), json.dumps({"question": "What?"})], "line 2: missing field 'correct_answer'"),
        ([json.dumps({**GOOD, "correct_answer": "  "})], "line 1: field 'correct_answer' is empty"),
        (
            [json.dumps({**GOOD, "correct_answer": ["a"]})],
            "line 1: field 'correct_answer' must be a string, got list",
        ),
        ([json.dumps(GOOD), "[1, 2]"], "line 2: expected a JSON object"),
    ],
    ids=["invalid-json", "missing-field", "empty-field", "wrong-type", "not-an-object"],
)
def test_record_errors_name_file_and_line(tmp_path: Path, lines: list[str], expected: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as info:
        load(path)
    assert f"{path} {expected}" in str(info.value)


def test_all_problems_listed_at_once(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(GOOD), "{bad", json.dumps({"question": "q"})])
    with pytest.raises(DataError) as info:
        load(path)
    assert "2 data problem(s)" in str(info.value)
    assert "line 2" in str(info.value) and "line 3" in str(info.value)


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "caf\xe9?", "correct_answer": "x"}\n')
    with pytest.raises(DataError, match=r"train.jsonl line 2: not UTF-8 \(byte 0xe9"):
        load(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load(tmp_path / "nope.jsonl")


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n").encode() * 2)
    assert len(load(path).train) == 2


def test_unknown_template_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    with pytest.raises(DataError, match=r"line 1: missing field 'topic'"):
        load(path, template={"prompt": "{question} ({topic})", "completion": "{correct_answer}"})


def test_jumpstart_layout_template_json_beside_the_data(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Name the gas", "response": "CO2"}])
    (tmp_path / "template.json").write_text(
        json.dumps(
            {
                "prompt": "Below is an instruction.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
                "completion": " {response}",
            }
        )
    )
    data = load(path)
    assert data.format == "template"
    assert data.template is not None and "{instruction}" in data.template.prompt
    assert data.template_source == str(tmp_path / "template.json")


def test_invalid_template_json(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    (tmp_path / "template.json").write_text('{"prompt": "x"}')
    with pytest.raises(DataError, match=r"template.json: completion: Field required"):
        load(path)


def test_formats_are_detected(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    dialog = {"dialog": chat["messages"]}
    assert load(write_jsonl(tmp_path / "a.jsonl", [GOOD])).format == "qa"
    assert load(write_jsonl(tmp_path / "b.jsonl", [chat])).format == "messages"
    assert load(write_jsonl(tmp_path / "c.jsonl", [dialog])).format == "messages"
    assert load(write_jsonl(tmp_path / "d.jsonl", [{"text": "Cells divide."}])).format == "text"
    with pytest.raises(
        DataError, match=r"e.jsonl line 1: cannot tell the data format from the keys \['foo'\]"
    ):
        load(write_jsonl(tmp_path / "e.jsonl", [{"foo": 1}]))


def test_conversation_must_end_with_the_assistant(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="line 1: the last turn of messages must be the assistant's answer"):
        load(path)


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"question": f"q{i}?", "correct_answer": str(i)} for i in range(50)]
    )
    data = load_data(DataSection(train_file=str(path), validation_split_ratio=0.2, split_seed=3))
    again = load_data(DataSection(train_file=str(path), validation_split_ratio=0.2, split_seed=3))
    assert (len(data.train), len(data.validation)) == (40, 10)
    assert [r.where for r in data.validation] == [r.where for r in again.validation]
    assert not {r.where for r in data.train} & {r.where for r in data.validation}
    assert split_records(data.train[:1], 0.5, 0) == (data.train[:1], [])


def test_sha256_recorded(tmp_path: Path) -> None:
    import hashlib

    path = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    assert load(path).sha256 == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.mark.parametrize(
    ("policy", "kept", "dropped", "truncated"), [("drop", 1, 1, 0), ("truncate", 2, 0, 1)]
)
def test_over_length_policies(
    tmp_path: Path, tokenizer: Any, policy: Any, kept: int, dropped: int, truncated: int
) -> None:
    long = {"question": "What? " * 40, "correct_answer": "an answer that goes on " * 10}
    data = load(write_jsonl(tmp_path / "train.jsonl", [GOOD, long]))
    fmt = data.prompt_format("chat_template", None)
    encoded, report = encode_split(data.train, fmt, tokenizer, 120, policy)
    assert (len(encoded), report.over_length, report.dropped, report.truncated) == (
        kept,
        1,
        dropped,
        truncated,
    )
    assert all(len(item.input_ids) <= 120 for item in encoded)


def test_over_length_error_names_the_line(tmp_path: Path, tokenizer: Any) -> None:
    data = load(
        write_jsonl(tmp_path / "train.jsonl", [GOOD, {"question": "Why? " * 80, "correct_answer": "x"}])
    )
    with pytest.raises(DataError, match=r"train.jsonl line 2: \d+ tokens, over data.max_length=64"):
        encode_split(data.train, data.prompt_format("chat_template", None), tokenizer, 64, "error")


def test_the_recorded_sha256_is_of_the_bytes_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A line appended while the run starts (here: while its records are checked) is not in the records,
    so it must not be in the recorded digest either."""
    import hashlib

    from sftbridge.config import DataSection
    from sftbridge.data import loading

    rows = [{"question": f"q{i}?", "correct_answer": f"a{i}"} for i in range(4)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    original = path.read_bytes()
    check = loading.check_record

    def appended_meanwhile(*args: Any, **kwargs: Any) -> list[str]:
        with path.open("a") as handle:
            handle.write('{"question": "late?", "correct_answer": "late"}\n')
        return check(*args, **kwargs)

    monkeypatch.setattr(loading, "check_record", appended_meanwhile)
    loaded = loading.load_data(DataSection(train_file=str(path), validation_split_ratio=0))
    assert len(loaded.train) == 4
    assert loaded.sha256 == {str(path): hashlib.sha256(original).hexdigest()}
