"""train.report_to: what each tracker received, read back from its own local store.

One short run logs to all four trackers at once, as a user would run it (the training script in its own
process: Trackio fixes its folder, and W&B its mode, when first imported). Each store is then read with the
tracker's own reader: TensorBoard's event files, an MLflow store, Trackio's SQLite storage, and the records
of W&B's offline run (read with W&B's own protobuf).
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT
from sftbridge.config import dump_config, load_config
from sftbridge.training.tracking import PARAMS_TAG, TENSORBOARD

TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")
PROJECT = "sftbridge-test"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3-step tiny run reported to every tracker; its run folder and where each tracker stored it."""
    missing = [name for name in TRACKERS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"needs the tracker extras: pip install 'sftbridge[{','.join(missing)}]'")
    tmp = tmp_path_factory.mktemp("tracked")
    config = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [
            "run_name=tracked",
            "train.max_steps=3",
            "train.logging_steps=1",
            "train.answer_metrics=false",  # its own logs are tested with it; here: the trackers
            f"train.report_to={json.dumps(list(TRACKERS))}",
            f"train.tracking_project={PROJECT}",
            f"train.mlflow_tracking_uri=sqlite:///{tmp / 'mlflow.db'}",  # mlflow 3 refuses a new file store
        ],
    )
    config_file = tmp / "config.yaml"
    config_file.write_text(dump_config(config), encoding="utf-8")
    env = {
        **os.environ,
        "TRACKIO_DIR": str(tmp / "trackio"),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp),
        "WANDB_SILENT": "true",
    }
    for name in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        env.pop(name, None)
    run = tmp / "run"
    command = [sys.executable, "-m", "sftbridge.training.train", "--config", str(config_file), "--run-dir"]
    result = subprocess.run(
        [*command, str(run)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"run": run, "tmp": tmp, "env": env, "mlflow_uri": config.train.mlflow_tracking_uri}


def test_tensorboard_event_files_hold_the_losses_and_the_parameters(tracked: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tracked["run"] / TENSORBOARD).rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    text = events.Tensors(f"{PARAMS_TAG}/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| sftbridge.config.lora.r | 16 |" in text
    assert f"| sftbridge.run_dir | {tracked['run'].resolve()} |" in text


def test_mlflow_holds_one_named_run_with_parameters_and_metrics(tracked: dict[str, Any]) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracked["mlflow_uri"])
    runs = mlflow.search_runs(experiment_names=[PROJECT], output_format="list")
    assert len(runs) == 1  # the final summary did not start a second, unnamed run
    run = runs[0]
    assert run.info.run_name == "tracked"
    params = run.data.params
    assert params["sftbridge.config.lora.r"] == "16"
    assert params["sftbridge.config.train.max_steps"] == "3"
    assert params["sftbridge.base_model.name_or_path"] == "builtin:tiny-llama"
    manifest = json.loads((tracked["run"] / "sftbridge.json").read_text())
    for path, digest in manifest["data"]["sha256"].items():
        assert params[f"sftbridge.data.sha256.{path}"] == digest
    assert params["sftbridge.data.train.total"] == "240"
    assert params["sftbridge.versions.transformers"] == manifest["versions"]["transformers"]
    assert run.data.tags["sftbridge.run_dir"] == str(tracked["run"].resolve())
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]


def test_trackio_local_store_holds_the_run(tracked: dict[str, Any]) -> None:
    # Trackio reads TRACKIO_DIR when imported: read it back in a process that sees the run's folder.
    read = (
        "import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
        f"p = {PROJECT!r}; "
        "print(json.dumps({'runs': S.get_runs(p), 'config': S.get_run_config(p, 'tracked'), "
        "'logs': S.get_logs(p, 'tracked')}, default=str))"
    )
    result = subprocess.run(
        [sys.executable, "-c", read], capture_output=True, text=True, env=tracked["env"], timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stored = json.loads(result.stdout.strip().splitlines()[-1])
    assert stored["runs"] == ["tracked"]
    assert stored["config"]["sftbridge.config.lora.r"] == "16"
    assert stored["config"]["sftbridge.run_dir"] == str(tracked["run"].resolve())
    losses = [log for log in stored["logs"] if "train/loss" in log]
    assert [log["train/global_step"] for log in losses] == [1, 2, 3]


def test_wandb_offline_run_holds_config_and_history(tracked: dict[str, Any]) -> None:
    from wandb.proto import wandb_internal_pb2

    (log,) = tracked["tmp"].glob("wandb/offline-run-*/run-*.wandb")
    records = [wandb_internal_pb2.Record.FromString(data) for data in read_wandb_log(log)]
    (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert run.display_name == "tracked" and run.project == PROJECT
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert config["sftbridge.config.lora.r"] == "16"
    assert config["sftbridge.run_dir"] == str(tracked["run"].resolve())
    steps = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            if "train/loss" in row:
                steps.append(row["train/global_step"])
    assert steps == [1, 2, 3]


def read_wandb_log(path: Path) -> list[bytes]:
    """The records of W&B's transaction log (``run-ID.wandb``): a 7-byte file header (":W&B", magic 0xBEE1,
    version 0), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (CRC32, length,
    type: 1 full, 2 first, 3 middle, 4 last); a block's tail too short for a header is zero padding."""
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            break  # preallocated zeros at the end
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records
