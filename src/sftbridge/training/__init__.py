"""The training script's body (``train``: arguments and SageMaker's environment in, a run directory out), the
``SFTTrainer`` subclass and its callbacks (``trainer``), progress, answer metrics and trackers."""
