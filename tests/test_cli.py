"""The real CLI: its output and exit codes in process (conftest.cli), end to end through subprocesses."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import FAKE_TOKEN, ROOT, SAMPLE_TRAIN, cli, write_jsonl
from conftest import run_cli as sftbridge

CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")


def test_help_lists_the_commands() -> None:
    from sftbridge.cli import COMMANDS

    result = cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "pydantic", "yaml", "boto3", "sagemaker")


@pytest.mark.parametrize(
    ("argv", "modules"),
    [
        (["--help"], {"sftbridge", "sftbridge.cli"}),  # no command's module at all
        (
            ["plan", "--help"],
            {
                "sftbridge",
                "sftbridge.cli",
                "sftbridge.cli.plan",
                "sftbridge.cli.options",
                "sftbridge.planning.estimate",
                "sftbridge.errors",
            }
            | {"sftbridge.planning", "sftbridge.planning.hardware", "sftbridge.planning.model_shapes"}
            | {"sftbridge.planning.fsdp"},
        ),
    ],
)
def test_help_loads_only_what_it_shows(argv: list[str], modules: set[str]) -> None:
    """`sftbridge --help` stays fast by importing nothing heavy (timed in benchmarks/harness.py)."""
    probe = (
        "import sys\nfrom sftbridge.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "import json\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('sftbridge', *HEAVY)]\n"
        "print(json.dumps(loaded), file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{probe}"], capture_output=True, text=True, cwd=ROOT
    )
    assert set(json.loads(result.stderr.strip().splitlines()[-1])) == modules


def test_the_training_script_configures_output_before_any_library_loads() -> None:
    """Importing the training script loads no ML library: ``main`` silences the libraries' loggers first, so
    an import-time warning (bitsandbytes on some CPUs) never reaches the user (tests/test_output.py)."""
    heavy = (*HEAVY, "bitsandbytes")
    probe = (
        "import json, sys, sftbridge.training.train\nprint(json.dumps([m for m in H if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", f"H = {heavy!r}\n{probe}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["pydantic", "yaml"]  # the config's own libraries only


def test_every_command_has_its_arguments() -> None:
    """The command table and the modules that define the arguments agree (each module, each command)."""
    from sftbridge.cli import COMMANDS, build_parser

    for command in COMMANDS:
        parser = build_parser(only=command)
        try:
            parsed = parser.parse_args([command])
        except SystemExit as exit_info:  # a required argument is missing
            assert exit_info.code == 2
        else:  # every argument is optional (`runs [DIR]`): the command runs as it is
            assert parsed.func is not None, command
        full = build_parser()
        subparsers = next(a for a in full._actions if a.dest == "command")
        assert subparsers.choices[command].get_default("func") is not None, command  # type: ignore[union-attr]


@pytest.mark.slow
def test_train_generate_eval_end_to_end(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", SAMPLE_TRAIN.read_text().splitlines()[:32])
    run_dir = tmp_path / "run"
    result = sftbridge(
        "train",
        CONFIG,
        f"data.train_file={train_file}",
        "train.epochs=2",
        "train.logging_steps=1",
        "--run-dir",
        str(run_dir),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run directory: {run_dir}" in result.stdout
    assert "[train] step=" in result.stdout and " loss=" in result.stdout  # the training log is streamed
    manifest = json.loads((run_dir / "sftbridge.json").read_text())
    assert manifest["backend"] == {"name": "local", "job_id": "local-run"}

    answer = sftbridge("generate", str(run_dir), "What gas do plants take in?", "--show-prompt")
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert "prompt: '<s>[INST] What gas do plants take in? [/INST]'" in answer.stdout

    out = tmp_path / "eval.json"
    evaluated = sftbridge("eval", str(run_dir), "--limit", "8", "--json", str(out))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "exact_match" in evaluated.stdout and "adapter" in evaluated.stdout
    result_json = json.loads(out.read_text())
    assert result_json["n"] == 8
    for side in ("adapter", "base"):
        assert set(result_json[side]) == {"exact_match", "contains", "mean_answer_tokens", "eos_rate"}
    assert FAKE_TOKEN not in result.stdout + result.stderr


def test_overrides_may_follow_options() -> None:
    """`preview CONFIG --json --n 1 data.max_length=40 ...`: overrides after options still apply."""
    result = cli("preview", CONFIG, "--json", "--n", "1", "data.max_length=40", "data.over_length=truncate")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout.splitlines()[0])["input_ids"]) == 40
    unknown = cli("preview", CONFIG, "--n", "1", "--bogus")
    assert unknown.returncode == 2 and "unrecognized arguments: --bogus" in unknown.stderr


def test_preview_json_matches_the_training_path(tokenizer: Any) -> None:
    result = cli("preview", CONFIG, "--n", "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2
    first = json.loads(SAMPLE_TRAIN.read_text().splitlines()[0])
    assert rows[0]["text"] == f"<s>[INST] {first['question']} [/INST] {first['correct_answer']} </s>"
    assert len(rows[0]["input_ids"]) == len(rows[0]["labels"])
    assert rows[0]["labels"][0] == -100 and rows[0]["labels"][-1] == tokenizer.eos_token_id


def test_preview_marks_the_trained_span() -> None:
    result = cli("preview", CONFIG, "--n", "1")
    assert result.returncode == 0, result.stderr
    first = json.loads(SAMPLE_TRAIN.read_text().splitlines()[0])
    assert f"[/INST]⟦ {first['correct_answer']} </s>⟧" in result.stdout


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d.joinpath("t.jsonl").write_text('{"question": "q?"}\n'), "t.jsonl line 1: missing field"),
        (lambda d: d.joinpath("t.jsonl").write_text("not json\n"), "t.jsonl line 1: invalid JSON"),
        (lambda d: d.joinpath("t.jsonl").write_bytes(b""), "t.jsonl: the file is empty"),
    ],
    ids=["missing-field", "invalid-json", "empty"],
)
def test_bad_data_exits_2_and_creates_nothing(tmp_path: Path, setup: Any, message: str) -> None:
    setup(tmp_path)
    result = cli(
        "train", CONFIG, f"data.train_file={tmp_path / 't.jsonl'}", "data.test_file=null", cwd=tmp_path
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_config_exits_2(tmp_path: Path) -> None:
    result = cli("train", CONFIG, "lora.r=0", "train.epoch=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "lora.r: Input should be greater than 0" in result.stderr
    assert "train.epoch: unknown key; did you mean 'epochs'?" in result.stderr


def test_unfinished_run_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sftbridge.json").write_text("{}")
    result = cli("generate", str(tmp_path), "hi")
    assert result.returncode == 2
    assert "did not finish" in result.stderr


def test_version_and_verbose_anywhere() -> None:
    from sftbridge import __version__

    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"sftbridge {__version__}\n"
    # -v after the command works like -v before it (it used to be "unrecognized arguments").
    late = cli("plan", CONFIG, "-v")
    assert late.returncode == 0, late.stderr


def test_small_things_a_newcomer_met(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A PEFT name for a key gets its sftbridge name; `runs --json | head` ends quietly."""
    from sftbridge.cli import main

    assert main(["config", "show", str(ROOT / "configs" / "tiny-cpu.yaml"), "lora.rank=8"]) == 2
    assert "lora.rank: unknown key; did you mean 'r'? valid keys: r, alpha" in capsys.readouterr().err
    for k in range(300):  # more JSON than a pipe holds, so that the writer meets the closed pipe
        run = tmp_path / "runs" / f"run-{k:03d}"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "epoch": 0.1}\n')
    piped = subprocess.run(
        f"{sys.executable} -m sftbridge.cli runs runs --json | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert piped.stdout == "[" and piped.stderr == "", piped.stderr
