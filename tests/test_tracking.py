"""train.report_to: what the trackers that run offline here received, read back from their own stores."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from sftbridge.training.tracking import TENSORBOARD


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("tensorboard", "mlflow")),
    reason="needs the tensorboard and mlflow extras: pip install 'sftbridge[tensorboard,mlflow]'",
)
def test_tensorboard_and_mlflow_receive_the_run(
    tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sftbridge.training.train import train

    for name in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # mlflow 3 refuses a new file store
    config = tiny_config(
        run_name="tracked",
        train__max_steps=3,
        train__answer_metrics=False,  # its own logs are tested with it; here: the trackers
        train__report_to=["tensorboard", "mlflow"],
        train__tracking_project="sftbridge-test",
        train__mlflow_tracking_uri=store,
    )
    run = train(config, tmp_path / "run")
    for name in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)  # set by tracking.prepare for this process's integrations

    # TensorBoard: the event files moved into the run folder hold train/loss for every logged step.
    events = EventAccumulator(str(next((run / TENSORBOARD).rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]

    # MLflow: one run named after the config, holding its parameters, the run folder and the metrics.
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["sftbridge-test"], output_format="list")
    assert len(runs) == 1  # the final summary did not start a second, unnamed run
    tracked = runs[0]
    assert tracked.info.run_name == "tracked"
    assert tracked.data.params["sftbridge.lora.r"] == "8"
    assert tracked.data.params["sftbridge.train.max_steps"] == "3"
    assert tracked.data.tags["sftbridge.run_dir"] == str((tmp_path / "run").resolve())
    history = mlflow.MlflowClient().get_metric_history(tracked.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
