"""The two SDK lines that submit the same job: v3's ``ModelTrainer`` and ``sagemaker<3``'s ``HuggingFace``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftbridge.backends.sagemaker.spec import CHECKPOINT_DIR, CODE_CHANNEL, ENTRY_SCRIPT, JobSpec
from sftbridge.errors import UserError


def submit_v3(spec: JobSpec, boto: Any, bucket: str, local: dict[str, Path]) -> str:
    """SDK v3: ``ModelTrainer`` with the image's own runner (no SourceCode drivers, see the module doc)."""
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.training.configs import (
        CheckpointConfig,
        Compute,
        InputData,
        MetricDefinition,
        OutputDataConfig,
        StoppingCondition,
    )
    from sagemaker.train.model_trainer import ModelTrainer

    backend = spec.backend
    trainer = ModelTrainer(
        sagemaker_session=Session(
            boto_session=boto, default_bucket=bucket, default_bucket_prefix=backend.s3_prefix or None
        ),
        role=backend.role,
        training_image=spec.image,
        base_job_name=spec.base_job_name,
        compute=Compute(
            instance_type=backend.instance_type,
            instance_count=backend.instance_count,
            volume_size_in_gb=backend.volume_size_gb,
            enable_managed_spot_training=backend.use_spot,
        ),
        stopping_condition=StoppingCondition(
            max_runtime_in_seconds=spec.max_run_seconds, max_wait_time_in_seconds=spec.max_wait_seconds
        ),
        # s3_uri None: the SDK puts it under the job's prefix, <base>/<job>/checkpoints.
        checkpoint_config=CheckpointConfig(s3_uri=backend.checkpoint_s3_uri, local_path=CHECKPOINT_DIR),
        output_data_config=OutputDataConfig(
            compression_type="NONE" if backend.disable_output_compression else "GZIP"
        ),
        hyperparameters=spec.all_hyperparameters(),
        environment=spec.environment,
    ).with_metric_definitions(
        [MetricDefinition(name=m["Name"], regex=m["Regex"]) for m in spec.metric_definitions]
    )
    inputs = [InputData(channel_name=name, data_source=str(path)) for name, path in local.items()]
    inputs += [InputData(channel_name=c.name, data_source=c.s3_uri) for c in spec.channels if c.s3_uri]
    trainer.train(input_data_config=inputs, wait=False, logs=False)
    job = trainer._latest_training_job  # the SDK's documented way to reach the job it created
    if job is None:
        raise UserError("SageMaker did not create the training job (no error was given)")
    return str(job.training_job_name)


def submit_v2(spec: JobSpec, boto: Any, bucket: str, local: dict[str, Path]) -> str:
    """``sagemaker<3``: the ``HuggingFace`` estimator with the same script, source and hyperparameters."""
    import sagemaker
    from sagemaker.huggingface import HuggingFace
    from sagemaker.utils import name_from_base

    backend = spec.backend
    session = sagemaker.Session(boto_session=boto, default_bucket=bucket)
    job_name = name_from_base(spec.base_job_name)
    prefix = "/".join(p for p in (backend.s3_prefix.strip("/"), spec.base_job_name) if p)
    root = f"s3://{bucket}/{prefix}"
    code = local.pop(CODE_CHANNEL)
    inputs = {
        name: session.upload_data(str(path), bucket=bucket, key_prefix=f"{prefix}/{job_name}/input/{name}")
        for name, path in local.items()
    }
    inputs.update({c.name: c.s3_uri for c in spec.channels if c.s3_uri})
    estimator = HuggingFace(
        entry_point=ENTRY_SCRIPT,
        source_dir=str(code),
        hyperparameters=spec.hyperparameters,  # v2 adds sagemaker_program/submit_directory itself
        image_uri=spec.image,
        transformers_version=backend.transformers_version,
        pytorch_version=backend.pytorch_version,
        py_version=backend.py_version,
        role=backend.role,
        instance_type=backend.instance_type,
        instance_count=backend.instance_count,
        volume_size=backend.volume_size_gb,
        use_spot_instances=backend.use_spot,
        max_run=spec.max_run_seconds,
        max_wait=spec.max_wait_seconds,
        checkpoint_s3_uri=backend.checkpoint_s3_uri or f"{root}/{job_name}/checkpoints",
        checkpoint_local_path=CHECKPOINT_DIR,
        output_path=root,
        code_location=root,
        disable_output_compression=backend.disable_output_compression,
        distribution={"torch_distributed": {"enabled": True}} if spec.torchrun else None,
        environment=spec.environment,
        metric_definitions=spec.metric_definitions,
        sagemaker_session=session,
        base_job_name=spec.base_job_name,
        disable_profiler=True,  # v2 turns the profiler and debugger on by default; v3 does not
        debugger_hook_config=False,
    )
    estimator.fit(inputs=inputs, job_name=job_name, wait=False, logs=False)
    return job_name
