"""The CreateTrainingJob request a job spec makes, and the `--dry-run` report of it."""

from __future__ import annotations

import json
from typing import Any

from sftbridge.backends.sagemaker.spec import CHECKPOINT_DIR, CODE_CHANNEL, ENTRY_SCRIPT, Channel, JobSpec
from sftbridge.planning.hardware import PRICE_TABLE_DATE, gpu_count


def request(spec: JobSpec, job_name: str, bucket: str, prefix: str) -> dict[str, Any]:
    """The CreateTrainingJob request the spec makes (S3 locations as the backend lays them out)."""
    root = "/".join(part for part in (f"s3://{bucket}", prefix.strip("/"), spec.base_job_name) if part)
    channels = [*spec.channels, Channel(CODE_CHANNEL, f"{ENTRY_SCRIPT} + sftbridge/ + requirements.txt")]
    backend = spec.backend
    req: dict[str, Any] = {
        "TrainingJobName": job_name,
        "AlgorithmSpecification": {
            "TrainingImage": spec.image,
            "TrainingInputMode": "File",
            "MetricDefinitions": spec.metric_definitions,
        },
        "RoleArn": backend.role,
        "HyperParameters": spec.all_hyperparameters(),
        "InputDataConfig": [
            {
                "ChannelName": c.name,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": c.s3_uri or f"{root}/{job_name}/input/{c.name}",
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "InputMode": "File",
            }
            for c in channels
        ],
        "OutputDataConfig": {
            "S3OutputPath": root,
            "CompressionType": "NONE" if backend.disable_output_compression else "GZIP",
        },
        "ResourceConfig": {
            "InstanceType": backend.instance_type,
            "InstanceCount": backend.instance_count,
            "VolumeSizeInGB": backend.volume_size_gb,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": spec.max_run_seconds},
        "CheckpointConfig": {
            "S3Uri": backend.checkpoint_s3_uri or f"{root}/{job_name}/checkpoints",
            "LocalPath": CHECKPOINT_DIR,
        },
        "Environment": {k: "***" if k == "HF_TOKEN" else v for k, v in spec.environment.items()},
        "EnableManagedSpotTraining": backend.use_spot,
    }
    if spec.max_wait_seconds:
        req["StoppingCondition"]["MaxWaitTimeInSeconds"] = spec.max_wait_seconds
    return req


def render(spec: JobSpec, req: dict[str, Any], sdk: str) -> str:
    """The dry-run report: a summary, then the full request as JSON."""
    backend = spec.backend
    gpus = gpu_count(backend.instance_type)
    price = spec.price_per_hour
    cost = (
        f"${price:.3f}/hour on demand (us-east-1 list price, table of {PRICE_TABLE_DATE})"
        if price is not None
        else f"unknown: {backend.instance_type} is not in the price table of {PRICE_TABLE_DATE}"
    )
    if backend.use_spot and price is not None:
        cost += "; spot is billed at the spot price, usually far less"
    wait = spec.max_wait_seconds
    lines = [
        "SageMaker training job (dry run: nothing uploaded, nothing submitted)",
        f"  job name      {req['TrainingJobName']}",
        f"  sdk           {sdk}",
        f"  image         {spec.image}",
        f"  role          {backend.role}",
        f"  instance      {backend.instance_count} x {backend.instance_type} ({gpus} GPU each), "
        f"{backend.volume_size_gb} GB disk",
        f"  launcher      {'torchrun' if spec.torchrun else 'python (one process)'}",
        f"  spot          {'on' if backend.use_spot else 'off'}; max run {backend.max_run_hours:g} h"
        + (f", max wait {wait / 3600:g} h" if wait else ""),
        f"  checkpoints   {CHECKPOINT_DIR} <-> {req['CheckpointConfig']['S3Uri']}",
        f"  output        {req['OutputDataConfig']['S3OutputPath']}/{req['TrainingJobName']}/output/"
        + ("model/" if backend.disable_output_compression else "model.tar.gz"),
        f"  cost          {cost}",
        "  channels",
    ]
    for channel in spec.channels:
        files = ", ".join(f"{p} (sha256 {plan_sha[:12]})" for p, plan_sha in channel.sha256.items())
        lines.append(f"    {channel.name:<11} {files or channel.source}")
    extras = "".join(f", sftbridge[{extra}]" for extra in spec.extras)
    lines.append(f"    {CODE_CHANNEL:<11} {ENTRY_SCRIPT} + sftbridge/ + requirements.txt{extras}")
    lines.append("  metrics         " + ", ".join(m["Name"] for m in spec.metric_definitions))
    lines.append(f"  hyperparameters ({len(req['HyperParameters'])} of 100)")
    lines += [f"    --{key} {value}" for key, value in req["HyperParameters"].items()]
    lines += [f"  note: {note}" for note in spec.notes]
    lines.append("request:")
    lines.append(json.dumps(req, indent=2))
    return "\n".join(lines)
