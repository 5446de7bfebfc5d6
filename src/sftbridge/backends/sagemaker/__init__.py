"""The SageMaker training backend: ``backend`` (submit, dry run), ``job`` (status, logs, fetch),
``spec`` (what a job will run, checked before anything is uploaded), ``request`` (the CreateTrainingJob
request), ``sdk`` (the SDK v3/v2 calls), ``source`` (the staged code channel), ``hyperparameters`` (config to
and from ``--section.key value``)."""
