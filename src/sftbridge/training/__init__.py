"""The training script's body (``train``: arguments and SageMaker's environment in, a run directory out), the
``SFTTrainer`` subclass and its callbacks (``trainer``), model and tokenizer loading (``modeling``) and the
built-in tiny model (``tiny_model``)."""
