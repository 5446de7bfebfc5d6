"""The backend layer (its protocol, capabilities and typed settings) and the SageMaker container contract
the training script reads. tests/test_third_party_backend.py drives an installed third-party backend."""

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from conftest import write_jsonl
from sftbridge.backends import Backend, available_backends, get_backend, options_model
from sftbridge.backends.local import LocalBackend
from sftbridge.config import dump_config, load_config, validate_config
from sftbridge.errors import ConfigError, DataError
from sftbridge.training.train import SageMakerEnv, parse_args, resolve_config


def test_local_backend_is_registered() -> None:
    assert "local" in available_backends()
    assert isinstance(get_backend("local"), Backend)


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown backend 'nope'; available: .*local"):
        get_backend("nope")


class ThirdPartySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queue: str
    region: str = "moon-1"
    nodes: int = Field(1, gt=0)


class ThirdPartyBackend:
    """The smallest complete backend: it names itself, its settings and what it cannot do."""

    name = "thirdparty"
    settings_model = ThirdPartySettings
    supports_dry_run = False
    supports_detach = False
    supports_job_lookup = False

    def submit(self, config: Any, *, config_path: Any, overrides: Any, run_dir: Any) -> Any:
        raise NotImplementedError  # never called here

    def dry_run(self, config: Any, *, config_path: Any, overrides: Any) -> str:
        raise NotImplementedError

    def job(self, job_id: str, *, region: str | None = None) -> Any:
        raise NotImplementedError


class IncompleteBackend:  # written against the old protocol: submit only
    name = "incomplete"

    def submit(self, config: Any, *, config_path: Any, overrides: Any, run_dir: Any) -> Any:
        raise NotImplementedError


@pytest.fixture
def entry_points(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Registers this module's backends under ``sftbridge.backends``; records every look-up of the group."""
    group = [
        metadata.EntryPoint(name=name, value=f"{__name__}:{cls}", group="sftbridge.backends")
        for name, cls in (("thirdparty", "ThirdPartyBackend"), ("incomplete", "IncompleteBackend"))
    ]
    lookups: list[str] = []
    real = metadata.entry_points

    def entry_points(**kw: Any) -> Any:
        if kw.get("group") != "sftbridge.backends":
            return real(**kw)
        lookups.append(kw["group"])
        return group

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    return lookups


def test_third_party_backend_from_entry_point(entry_points: list[str]) -> None:
    assert "thirdparty" in available_backends()
    assert isinstance(get_backend("thirdparty"), ThirdPartyBackend)


def test_an_incomplete_backend_is_told_what_it_lacks(entry_points: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        get_backend("incomplete")
    assert str(error.value) == (
        f"backend 'incomplete' ({__name__}.IncompleteBackend) does not implement the Backend protocol: "
        "it lacks dry_run, job, settings_model, supports_detach, supports_dry_run, supports_job_lookup"
    )


def test_builtin_backends_declare_their_capabilities() -> None:
    from sftbridge.backends.sagemaker.backend import SageMakerBackend

    local, sagemaker = get_backend("local"), get_backend("sagemaker")
    assert isinstance(sagemaker, SageMakerBackend)
    assert (local.supports_dry_run, local.supports_detach, local.supports_job_lookup) == (False,) * 3
    assert (sagemaker.supports_dry_run, sagemaker.supports_detach, sagemaker.supports_job_lookup) == (
        True,
    ) * 3
    assert local.settings_model is None and sagemaker.settings_model is None


def test_typed_settings_are_validated_at_config_load(entry_points: list[str]) -> None:
    config = load_config(
        None,
        ["data.train_file=x.jsonl", "backend.name=thirdparty", "backend.options.queue=q"],
        options_model=options_model,
    )
    assert config.backend.options == ThirdPartySettings(queue="q")
    assert "options:\n    queue: q\n    region: moon-1\n    nodes: 1\n" in dump_config(config)
    round_trip = validate_config(config.to_dict(), options_model=options_model)
    assert round_trip.backend.options == config.backend.options

    with pytest.raises(ConfigError) as error:
        load_config(
            None,
            ["backend.name=thirdparty", "backend.options.regoin=mars", "backend.options.nodes=0", "lora.r=0"],
            options_model=options_model,
        )
    assert str(error.value).splitlines() == [
        "config: 5 problem(s):",
        "  data: required, but not set",
        "  lora.r: Input should be greater than 0 (got 0)",
        "  backend.options.regoin: unknown key; did you mean 'region'? valid keys: queue, region, nodes",
        "  backend.options.queue: required, but not set",
        "  backend.options.nodes: Input should be greater than 0 (got 0)",
    ]


def test_an_unknown_backend_is_a_config_problem(entry_points: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(
            None,
            ["data.train_file=x.jsonl", "backend.name=nope", "backend.options=3"],
            options_model=options_model,
        )
    assert str(error.value).splitlines() == [
        "config: 2 problem(s):",
        "  backend.options: must be a mapping of the backend's settings, key: value (got 3)",
        "  backend.name: unknown backend 'nope'; available: incomplete, local, sagemaker, thirdparty",
    ]


def test_builtin_backends_take_no_plugin_lookup(entry_points: list[str]) -> None:
    """Loading a config for local or sagemaker imports no third-party backend; their options stay a dict."""
    for name in ("local", "sagemaker"):
        overrides = ["data.train_file=x.jsonl", f"backend.name={name}", "backend.options.a=1"]
        config = load_config(None, overrides, options_model=options_model)
        assert config.backend.options == {"a": 1}
    assert entry_points == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "c.yaml", "--dry-run"],
            "error: --dry-run: backend 'local' has no dry run; drop --dry-run",
        ),
        (
            ["train", "c.yaml", "--detach"],
            "error: --detach: backend 'local' cannot detach (its job ends with this command); drop --detach",
        ),
        (
            ["logs", "job-1", "--backend", "local"],
            "error: sftbridge logs --backend local: backend 'local' cannot look up a job by its id",
        ),
    ],
)
def test_a_missing_capability_names_the_flag_and_the_backend(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sftbridge.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(
        "data:\n  train_file: missing.jsonl\n"
    )  # refused before the data is read
    assert main(argv) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "runs").exists()


def test_local_command_uses_torchrun_for_several_processes() -> None:
    config = load_config(None, ["data.train_file=x.jsonl", "backend.num_processes=2"])
    command = LocalBackend().command(config, "c.yaml", ["train.epochs=1"], Path("runs/x"))
    assert command[1:5] == ["-m", "sftbridge.training.torchrun", "--standalone", "--nproc_per_node=2"]
    assert command[-5:] == ["--config", "c.yaml", "--run-dir", "runs/x", "train.epochs=1"]


def test_script_arguments_in_sagemaker_form() -> None:
    args, overrides = parse_args(
        [
            "--config",
            "c.yaml",
            "--train.epochs",
            "3",
            "--model.load_in_4bit",
            "True",
            "--lora.target_modules",
            "[q_proj, v_proj]",
            "--data.test_file=null",
        ]
    )
    assert args.config == "c.yaml"
    assert overrides == {
        "train": {"epochs": 3},
        "model": {"load_in_4bit": True},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "data": {"test_file": None},
    }
    with pytest.raises(ConfigError, match="missing its value"):
        parse_args(["--train.epochs"])


def test_sagemaker_environment_is_read(tmp_path: Path) -> None:
    """Channels replace the data paths, SM_MODEL_DIR is the run directory, SM_HPS supplies the settings."""
    train_channel = tmp_path / "input" / "data" / "train"
    write_jsonl(train_channel / "sciq.jsonl", [{"question": "q?", "correct_answer": "a"}])
    (train_channel / "template.json").write_text(
        json.dumps({"prompt": "{question}", "completion": "{correct_answer}"})
    )
    test_channel = tmp_path / "input" / "data" / "test"
    write_jsonl(test_channel / "test.jsonl", [{"question": "q?", "correct_answer": "a"}])
    config_file = tmp_path / "code" / "c.yaml"
    config_file.parent.mkdir()
    config_file.write_text("data:\n  train_file: data/train.jsonl\n")
    environ = {
        "SM_CHANNEL_TRAIN": str(train_channel),
        "SM_CHANNEL_TEST": str(test_channel),
        "SM_MODEL_DIR": str(tmp_path / "model"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / "output"),
        "SM_HPS": json.dumps({"config": str(config_file), "train.epochs": 2, "model.load_in_4bit": "true"}),
    }
    config, run_dir = resolve_config([], SageMakerEnv.from_environ(environ))
    assert config.data.train_file == str(train_channel / "sciq.jsonl")
    assert config.data.test_file == str(test_channel / "test.jsonl")
    assert config.train.epochs == 2 and config.model.load_in_4bit is True
    assert run_dir == tmp_path / "model"


def test_ambiguous_channel_is_an_error(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / name, [{"text": "x"}])
    env = SageMakerEnv(channels={"TRAIN": tmp_path})
    with pytest.raises(DataError, match=r"expected one \.jsonl file, found"):
        env.data_overrides(load_config(None, ["data.train_file=other.jsonl"]))


def test_local_job_relays_a_progress_bar_as_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Carriage returns pass through: a bar redraws its line on the user's terminal instead of printing one
    line per refresh (a text-mode pipe turns every \\r into a newline)."""
    import subprocess
    import sys

    from sftbridge.backends.local import LocalJob

    script = "import sys; sys.stdout.write('bar 1/2\\rbar 2/2\\r\\ndone\\n')"
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    job = LocalJob(process, tmp_path / "run", "local-test")
    assert job.wait() == 0
    assert capsys.readouterr().out == "bar 1/2\rbar 2/2\r\ndone\n"
