"""One opener for model folders: every command refuses a damaged run or merged folder in the same one line,
before any model loads; manifests are typed, versioned, and the ones version 1 wrote still read.

No weights are trained here: the folders are written by hand, as training and merge lay them out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.numpy import save_file

from sftbridge.cli import main
from sftbridge.errors import RunDirError
from sftbridge.inference.folder import ModelFolder
from sftbridge.runs import MANIFEST_VERSION, MergedManifest, RunManifest, read_manifest

CONFIG = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"train_file": "data/x.jsonl"}}
PROMPT = {"format": "qa", "chat_format": "chat_template", "template": None, "system_prompt": None}


def version_1_run(folder: Path) -> Path:
    """A finished run as sftbridge wrote it before manifests were typed (version 1: no `kind`)."""
    (folder / "adapter").mkdir(parents=True)
    manifest = {
        "manifest_version": 1,
        "run_name": "tiny",
        "base_model": {"name_or_path": "builtin:tiny-llama", "revision": None, "load_in_4bit": False},
        "prompt_format": PROMPT,
        "generation": {"max_new_tokens": 16},
        "config": CONFIG,
        "data": {"sha256": {"data/x.jsonl": "ab" * 32}, "train": {"total": 3}},
        "seed": 10,
        "metrics": {"train_loss": 1.5, "global_step": 3, "eval_loss": None},
    }
    (folder / "sftbridge.json").write_text(json.dumps(manifest))
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (folder / "adapter" / "tokenizer_config.json").write_text("{}")
    save_file({"lora_A": __import__("numpy").zeros((4, 8), dtype="float32")}, folder / "adapter" / "x.tmp")
    (folder / "adapter" / "x.tmp").rename(folder / "adapter" / "adapter_model.safetensors")
    (folder / "COMPLETE").write_text("done\n")
    return folder


def merged_manifest(source_run: str) -> MergedManifest:
    """What `sftbridge merge` records for a merge of ``source_run``."""
    return MergedManifest.model_validate(
        {
            "source_run": source_run,
            "base_model": {"name_or_path": "builtin:tiny-llama"},
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
            "dtype": "float32",
            "prompt_format": PROMPT,
            "generation": {},
            "merged_at": "2026-12-06T00:00:00+00:00",
        }
    )


def test_a_version_1_manifest_reads_as_a_typed_run(tmp_path: Path) -> None:
    folder = ModelFolder.open(version_1_run(tmp_path / "run"))
    assert folder.kind == "run" and not folder.is_merged
    manifest = folder.run
    assert isinstance(manifest, RunManifest) and manifest.manifest_version == MANIFEST_VERSION
    assert manifest.metrics.global_step == 3 and manifest.data.train == {"total": 3}
    assert folder.run_config.model.name_or_path == "builtin:tiny-llama"
    assert folder.prompt_format.chat_format == "chat_template"
    assert folder.generation.max_new_tokens == 16 and folder.adapter_rank == 4


def test_a_merged_manifest_round_trips(tmp_path: Path) -> None:
    from sftbridge.runs import write_manifest

    merged = merged_manifest("/runs/tiny")
    write_manifest(tmp_path, merged)
    assert read_manifest(tmp_path) == merged
    assert json.loads((tmp_path / "sftbridge.json").read_text())["kind"] == "merged"


def damage(kind: str, run: Path) -> str:
    """Damage ``run`` one way; the one line every command must print."""
    weights = run / "adapter" / "adapter_model.safetensors"
    if kind == "unfinished":
        (run / "COMPLETE").unlink()
        return f"error: {run}: the run did not finish (no COMPLETE marker); train again or resume it"
    if kind == "truncated":
        size = weights.stat().st_size
        weights.write_bytes(weights.read_bytes()[: size - 16])
        described = f"its header describes {size}"
        return f"error: {weights}: truncated ({size - 16} bytes, {described}); train or merge again"
    if kind == "no weights":
        weights.unlink()
        return f"error: {weights}: missing; the run folder is incomplete, train again"
    if kind == "no tokenizer":
        (run / "adapter" / "tokenizer_config.json").unlink()
        missing = run / "adapter" / "tokenizer_config.json"
        return f"error: {missing}: missing; the run folder is incomplete, train again"
    if kind == "bad manifest":
        manifest = json.loads((run / "sftbridge.json").read_text())
        manifest["prompt_format"]["chat_format"] = "jinja"
        (run / "sftbridge.json").write_text(json.dumps(manifest))
        return (
            f"error: {run / 'sftbridge.json'}: prompt_format.chat_format: Input should be 'chat_template' or "
            "'plain' (1 problem(s)); the manifest was edited or damaged, train or merge again"
        )
    if kind == "newer manifest":
        manifest = json.loads((run / "sftbridge.json").read_text())
        manifest["manifest_version"] = MANIFEST_VERSION + 1
        (run / "sftbridge.json").write_text(json.dumps(manifest))
        return (
            f"error: {run / 'sftbridge.json'}: manifest_version {MANIFEST_VERSION + 1} was written by a "
            f"newer sftbridge (this one reads up to {MANIFEST_VERSION}); upgrade sftbridge"
        )
    assert kind == "link outside"
    outside = run.parent / "secret.txt"
    outside.write_text("not yours")
    os.symlink(outside, run / "eval-test.json")
    return (
        f"error: {run / 'eval-test.json'}: a link to {outside}, outside the folder; replace it with the file "
        "itself (cp -L) or remove it"
    )


COMMANDS: list[list[str]] = [
    ["generate", "{run}", "Why?"],
    ["eval", "{run}", "--data", "x.jsonl"],
    ["serve", "{run}", "--port", "0"],
    ["serve", "{run}", "--engine", "vllm", "--dry-run"],
    ["merge", "{run}", "--out", "{out}"],
    ["deploy", "{run}", "--role", "arn:aws:iam::123456789012:role/x"],
]


@pytest.mark.parametrize(
    "kind",
    [
        "unfinished",
        "truncated",
        "no weights",
        "no tokenizer",
        "bad manifest",
        "newer manifest",
        "link outside",
    ],
)
def test_every_command_refuses_a_damaged_folder_in_one_line(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = version_1_run(tmp_path / "run")
    expected = damage(kind, run)
    for command in COMMANDS:
        argv = [word.format(run=run, out=tmp_path / "merged") for word in command]
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.strip().splitlines() == [expected], argv
        assert captured.out == "" and not (tmp_path / "merged").exists()


def test_a_record_without_weights_opens_for_formatting_only(tmp_path: Path) -> None:
    run = version_1_run(tmp_path / "run")
    (run / "adapter" / "adapter_model.safetensors").unlink()
    assert ModelFolder.open(run, weights=False).generation.max_new_tokens == 16
    with pytest.raises(RunDirError, match="missing; the run folder is incomplete"):
        ModelFolder.open(run)


def test_merge_refuses_a_merged_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sftbridge.runs import write_manifest

    merged = tmp_path / "merged"
    merged.mkdir()
    write_manifest(merged, merged_manifest(str(tmp_path / "run")))
    (merged / "config.json").write_text("{}")
    (merged / "tokenizer_config.json").write_text("{}")
    save_file({"w": __import__("numpy").zeros((2, 2), dtype="float32")}, merged / "model.safetensors")
    assert main(["merge", str(merged), "--out", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {merged}: a merged model folder, not a run"


def test_serve_says_a_taken_port_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The folder and the port are checked first: this folder's weights would not even load."""
    import socket

    run = version_1_run(tmp_path / "run")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(run), "--port", str(port)]) == 2
    taken_error = "[Errno 98] Address already in use"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --host 127.0.0.1 --port {port}: cannot listen ({taken_error}); try --port 0"
    ]


def test_a_folder_runs_no_code_of_its_own_unless_the_user_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Someone hands you a run whose config trusts remote code: that is ignored (said in one line), so no code
    of its base runs; an auto_map in the folder's own configs is refused before anything loads.
    --trust-remote-code is the user's own say."""
    run = version_1_run(tmp_path / "run")
    manifest = json.loads((run / "sftbridge.json").read_text())
    manifest["config"]["model"]["trust_remote_code"] = True
    (run / "sftbridge.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        folder = ModelFolder.open(run)
    assert not folder.trusted
    assert (
        "its config sets model.trust_remote_code=true; ignored, so no code from its base model" in caplog.text
    )
    assert ModelFolder.open(run, trust_remote_code=True).trusted

    (run / "adapter" / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": "x.Tok"}})
    )
    for command in COMMANDS:
        argv = [word.format(run=run, out=tmp_path / "merged") for word in command]
        assert main(argv) == 2, argv
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {run / 'adapter' / 'tokenizer_config.json'}: maps its classes"), argv


def test_recorded_files_are_checked_at_open(tmp_path: Path) -> None:
    """A run records the sha256 and size of every adapter file; a changed one is named at open."""
    from sftbridge.runs import file_records

    run = version_1_run(tmp_path / "run")
    manifest = json.loads((run / "sftbridge.json").read_text())
    manifest["files"] = {k: v.model_dump() for k, v in file_records(run, run / "adapter").items()}
    (run / "sftbridge.json").write_text(json.dumps(manifest))
    assert set(ModelFolder.open(run).manifest.files) == {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer_config.json",
    }
    weights = run / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x01\x02\x03\x04"  # same size, a valid header: only the hash tells
    weights.write_bytes(bytes(data))
    with pytest.raises(RunDirError) as refused:
        ModelFolder.open(run)
    assert str(refused.value) == (
        f"{weights}: its sha256 differs from the one the manifest records; train or fetch again"
    )


def test_a_handed_in_run_cannot_make_generate_run_its_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe's case: a copied run whose manifest says trust_remote_code and names a base folder with an
    auto_map to a module of theirs. generate refuses to load it, and the module never runs."""
    marker = tmp_path / "the-module-ran"
    base = tmp_path / "their-base"
    base.mkdir()
    (base / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    auto_map = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (base / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    run = version_1_run(tmp_path / "run")
    manifest = json.loads((run / "sftbridge.json").read_text())
    manifest["config"]["model"] = {"name_or_path": str(base), "trust_remote_code": True}
    (run / "sftbridge.json").write_text(json.dumps(manifest))

    assert main(["generate", str(run), "Why?", "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: model.name_or_path: cannot load {str(base)!r}")
    assert not marker.exists()
