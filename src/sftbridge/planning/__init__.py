"""``sftbridge plan``'s model: memory, time and cost estimates (``estimate``), GPUs and SageMaker instance
prices (``hardware``), and model shapes read from a config alone (``model_shapes``)."""
