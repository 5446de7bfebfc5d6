"""Experiment tracking (``train.report_to``): transformers' own integrations, pointed where sftbridge wants.

The trainer's integration callbacks (TensorBoard, Trackio, MLflow, W&B) send every log, the metrics other
callbacks log included. This module sets what they read before the trainer is built: where TensorBoard
writes (beside the checkpoints while training, copied into the run folder at the end), the MLflow tracking
server and experiment (a SageMaker managed MLflow ARN works through the ``sagemaker-mlflow`` plugin), the
W&B project. The integrations log TrainingArguments; ``RunParams`` adds what sftbridge knows of the run, in
each tracker's own place for parameters: the resolved config, the manifest's summary (base model, data
digests and sizes, library versions, device, backend, git commit) and the run folder, as ``sftbridge.*``.
MLflow's run is opened here, around training *and* the final evaluation (the integration would end it at
the end of training and the final evaluation would start an unnamed second run); W&B's is closed here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sftbridge.config import RunConfig, flatten

TENSORBOARD = "tensorboard"  # the folder of event files, beside the checkpoints and then in the run
PARAMS_TAG = "sftbridge/params"  # TensorBoard's text entry holding the parameters
# MLflow refuses a parameter value over 6000 characters (a long system prompt or template could be).
MAX_VALUE_CHARS = 6000


def prepare(config: RunConfig, live_dir: Path) -> None:
    """Set the environment the integrations read; call before the trainer is built."""
    trackers, project = config.train.report_to, config.train.tracking_project
    if "tensorboard" in trackers:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(live_dir / TENSORBOARD)
    if "mlflow" in trackers:
        if config.train.mlflow_tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = config.train.mlflow_tracking_uri
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", project)
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_PROJECT", project)


def run_params(description: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """What the trackers record of a run: its description (the manifest as known before training, config
    included) flattened to ``sftbridge.section.key`` strings, plus the run folder."""
    params = {"sftbridge.run_dir": str(Path(run_dir).resolve())}
    for key, value in flatten(description).items():
        if value is not None:
            params[f"sftbridge.{key}"] = str(value)[:MAX_VALUE_CHARS]
    return params


def start(config: RunConfig, *, rank: int) -> None:
    """Open the MLflow run that training and the final evaluation log into (rank 0, mlflow tracked)."""
    if "mlflow" not in config.train.report_to or rank != 0:
        return
    import mlflow

    if config.train.mlflow_tracking_uri:
        mlflow.set_tracking_uri(config.train.mlflow_tracking_uri)
    mlflow.set_experiment(config.train.tracking_project)
    mlflow.start_run(run_name=config.run_name)


def finish(config: RunConfig, *, rank: int) -> None:
    """End the MLflow run ``start`` opened and the W&B run the integration left open (a run that raises is
    ended, as failed, when Python exits)."""
    if rank != 0:
        return
    if "mlflow" in config.train.report_to:
        import mlflow

        mlflow.end_run()
    if "wandb" in config.train.report_to:
        import wandb

        wandb.finish()


class RunParams(TrainerCallback):
    """Logs ``run_params`` to every tracker in ``train.report_to`` when training begins.

    Add it after the trainer is built: the integrations' own ``on_train_begin`` (which opens their runs and
    TensorBoard's writer) has then run first.
    """

    def __init__(self, trainer: Any, trackers: list[str], params: dict[str, str]) -> None:
        self.trainer, self.trackers, self.params = trainer, trackers, params

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if "tensorboard" in self.trackers:
            from transformers.integrations import TensorBoardCallback

            for callback in self.trainer.callback_handler.callbacks:
                if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                    rows = "\n".join(f"| {key} | {value} |" for key, value in self.params.items())
                    callback.tb_writer.add_text(PARAMS_TAG, "| parameter | value |\n|---|---|\n" + rows)
        if "mlflow" in self.trackers:
            import mlflow

            mlflow.log_params(self.params)
            mlflow.set_tags({"sftbridge.run_dir": self.params["sftbridge.run_dir"]})
        if "trackio" in self.trackers:
            import trackio

            trackio.config.update(self.params)  # after trackio.init, the run's plain dict
        if "wandb" in self.trackers:
            import wandb

            wandb.config.update(self.params, allow_val_change=True)
