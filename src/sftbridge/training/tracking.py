"""Experiment tracking (``train.report_to``): transformers' own integrations, pointed where sftbridge wants.

The trainer's integration callbacks (TensorBoard, Trackio, MLflow, W&B) send every log, the metrics other
callbacks log included. This module only sets what they read before the trainer is built: where TensorBoard
writes (beside the checkpoints while training, copied into the run folder at the end), the MLflow tracking
server and experiment (a SageMaker managed MLflow ARN works through the ``sagemaker-mlflow`` plugin), the
W&B project. MLflow's run is opened here, around training *and* the final evaluation (the integration would
end it at the end of training and the final evaluation would start an unnamed second run); it carries the
resolved config as parameters and the run folder as a tag.
"""

from __future__ import annotations

import os
from pathlib import Path

from sftbridge.config import RunConfig

TENSORBOARD = "tensorboard"  # the folder of event files, beside the checkpoints and then in the run


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


def flat_params(config: RunConfig) -> dict[str, str]:
    """The resolved config as ``section.key`` parameters."""
    from sftbridge.config import flatten

    return {key: str(value) for key, value in flatten(config.to_dict()).items()}


def start(config: RunConfig, run_dir: Path, *, rank: int) -> None:
    """Open the MLflow run that training and the final evaluation log into (rank 0, mlflow tracked)."""
    if "mlflow" not in config.train.report_to or rank != 0:
        return
    import mlflow

    if config.train.mlflow_tracking_uri:
        mlflow.set_tracking_uri(config.train.mlflow_tracking_uri)
    mlflow.set_experiment(config.train.tracking_project)
    mlflow.start_run(run_name=config.run_name)
    mlflow.log_params({f"sftbridge.{k}": v for k, v in flat_params(config).items()})
    mlflow.set_tags(
        {"sftbridge.run_name": config.run_name, "sftbridge.run_dir": str(Path(run_dir).resolve())}
    )


def finish(config: RunConfig, *, rank: int) -> None:
    """End the MLflow run ``start`` opened (a run that raises is ended, as failed, when Python exits)."""
    if "mlflow" in config.train.report_to and rank == 0:
        import mlflow

        mlflow.end_run()
