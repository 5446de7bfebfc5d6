"""A submitted SageMaker training job: its status, its CloudWatch log, its output as a local run folder."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sftbridge.archive import safe_extract, safe_relative
from sftbridge.aws import preflight
from sftbridge.backends.sagemaker.spec import SPLIT_CHANNELS
from sftbridge.config import dump_config, validate_config
from sftbridge.errors import RunDirError, UserError
from sftbridge.inference.folder import ModelFolder
from sftbridge.runs import (
    CONFIG,
    MANIFEST,
    BackendRecord,
    RunManifest,
    is_complete,
    read_manifest,
    redact,
    staged,
    write_manifest,
)

log = logging.getLogger(__name__)

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
# Beside the job's output: what was uploaded, from where, with which sha256.
RECORD = "sftbridge-submission.json"
RUNNING = ("InProgress", "Stopping")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def record_uri(describe: dict[str, Any]) -> str:
    output = describe["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    return f"{output}/{describe['TrainingJobName']}/{RECORD}"


class SageMakerJob:
    """``id`` is the training job's name; every method asks SageMaker (nothing is kept locally)."""

    poll_seconds = 30.0

    def __init__(self, job_id: str, boto_session: Any, run_dir: Path | None = None) -> None:
        self.id = job_id
        self.boto = boto_session
        self.run_dir = run_dir
        self.region = boto_session.region_name

    @property
    def console_url(self) -> str:
        return (
            f"https://{self.region}.console.aws.amazon.com/sagemaker/home?region={self.region}"
            f"#/jobs/{self.id}"
        )

    def describe(self) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        try:
            describe: dict[str, Any] = self.boto.client("sagemaker").describe_training_job(
                TrainingJobName=self.id
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") == "ValidationException":  # SageMaker's answer for an unknown name
                raise UserError(
                    f"job {self.id}: not found in {self.region} ({error.get('Message')})"
                ) from None
            raise UserError(f"job {self.id}: {preflight.reason(exc)}") from None
        return describe

    def status(self) -> str:
        describe = self.describe()
        state = describe["TrainingJobStatus"]
        if state in RUNNING:
            return "running"
        if state == "Completed":
            return "completed"
        reason = describe.get("FailureReason") or ("stopped" if state == "Stopped" else "no reason given")
        return f"failed: {reason}"

    def summary(self) -> list[tuple[str, str]]:
        """What ``sftbridge status`` shows: state, secondary state, elapsed, billable time, failure reason."""
        d = self.describe()
        start = d.get("TrainingStartTime") or d["CreationTime"]
        end = d.get("TrainingEndTime") or datetime.now(timezone.utc)
        resources = d.get("ResourceConfig", {})
        rows = [
            ("job", self.id),
            ("state", f"{d['TrainingJobStatus']} ({d.get('SecondaryStatus', '?')})"),
            ("elapsed", _duration((end - start).total_seconds())),
            ("billable", f"{d['BillableTimeInSeconds']} s" if "BillableTimeInSeconds" in d else "-"),
            (
                "instance",
                f"{resources.get('InstanceCount', '?')} x {resources.get('InstanceType', '?')}"
                + (", spot" if d.get("EnableManagedSpotTraining") else ""),
            ),
            ("image", d.get("AlgorithmSpecification", {}).get("TrainingImage", "?")),
        ]
        if d.get("FailureReason"):
            rows.append(("failure", d["FailureReason"]))
        if d.get("ModelArtifacts", {}).get("S3ModelArtifacts") and d["TrainingJobStatus"] == "Completed":
            rows.append(("output", d["ModelArtifacts"]["S3ModelArtifacts"]))
        rows.append(("console", self.console_url))
        return rows

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The job's CloudWatch log lines; with ``follow``, new lines until the job ends."""
        client = self.boto.client("logs")
        tokens: dict[str, str | None] = {}
        while True:
            finished = (
                self.describe()["TrainingJobStatus"] not in RUNNING or not follow
            )  # also: does it exist
            streams = _streams(client, self.id)
            for stream in streams:
                prefix = f"[{stream.split('/', 1)[-1]}] " if len(streams) > 1 else ""
                for message in _events(client, stream, tokens):
                    yield prefix + message.rstrip("\n")
            if finished:
                return
            time.sleep(self.poll_seconds)

    def wait(self) -> int:
        for line in self.logs(follow=True):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return 0 if self.status() == "completed" else 1

    def fetch(self, dest: Path | None = None) -> Path:
        """Download the job's output into a run folder laid out like a local one; returns its path."""
        d = self.describe()
        if d["TrainingJobStatus"] != "Completed":
            raise RunDirError(f"job {self.id}: {self.status()}; only a completed job has a run to fetch")
        target = Path(dest or self.run_dir or Path("runs") / self.id)
        with staged(target) as staging:
            self._download(d, staging)
            if not is_complete(staging):
                raise RunDirError(
                    f"job {self.id}: its output holds no complete sftbridge run ({MANIFEST} and COMPLETE); "
                    "was it trained by sftbridge?"
                )
            # Every file as the job wrote it (the manifest's sha256s), before the run is published.
            ModelFolder.open(staging, verify="full", trust_remote_code=True)  # nothing is loaded here
            _annotate(staging, d, self._record(d))
        return target

    def _download(self, d: dict[str, Any], staging: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self._download_output(d, staging)
        except ClientError as exc:
            raise RunDirError(
                f"job {self.id}: cannot download its output {d['ModelArtifacts']['S3ModelArtifacts']} "
                f"({preflight.reason(exc)})"
            ) from None

    def _download_output(self, d: dict[str, Any], staging: Path) -> None:
        s3 = self.boto.client("s3")
        artifacts = d["ModelArtifacts"]["S3ModelArtifacts"]
        if d["OutputDataConfig"].get("CompressionType") == "NONE" or not artifacts.endswith(".tar.gz"):
            # Uncompressed output: the model folder's files under .../output/model/.
            prefix = artifacts.rstrip("/") + "/" if not artifacts.endswith(".tar.gz") else ""
            if not prefix:
                output = d["OutputDataConfig"]["S3OutputPath"].rstrip("/")
                prefix = f"{output}/{self.id}/output/model/"
            bucket, key_prefix = split_s3(prefix)
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
                for item in page.get("Contents", []):
                    relative = safe_relative(item["Key"][len(key_prefix) :], what="output object")
                    path = staging / relative
                    path.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, item["Key"], str(path))
            return
        bucket, key = split_s3(artifacts)
        with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
            archive = Path(tmp) / "model.tar.gz"
            s3.download_file(bucket, key, str(archive))
            safe_extract(archive, staging)

    def _record(self, d: dict[str, Any]) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(record_uri(d))
        try:
            body = self.boto.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError:
            log.warning("job %s: no %s beside its output; data sources are not recorded", self.id, RECORD)
            return None
        record: dict[str, Any] = json.loads(body)
        return record


def _streams(client: Any, job_name: str) -> list[str]:
    from botocore.exceptions import ClientError

    try:
        pages = client.get_paginator("describe_log_streams").paginate(
            logGroupName=LOG_GROUP, logStreamNamePrefix=f"{job_name}/"
        )
        return sorted(s["logStreamName"] for page in pages for s in page.get("logStreams", []))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return []  # no instance has started logging yet
        raise


def _events(client: Any, stream: str, tokens: dict[str, str | None]) -> Iterator[str]:
    while True:
        kwargs: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
        if tokens.get(stream):
            kwargs["nextToken"] = tokens[stream]
        page = client.get_log_events(**kwargs)
        for event in page.get("events", []):
            yield event["message"]
        token = page.get("nextForwardToken")
        if not page.get("events") or token == tokens.get(stream):
            tokens[stream] = token or tokens.get(stream)
            return
        tokens[stream] = token


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _annotate(run_dir: Path, d: dict[str, Any], record: dict[str, Any] | None) -> None:
    """Add the job to the manifest; point the config's data paths back at the files as submitted."""
    manifest = read_manifest(run_dir)
    if not isinstance(manifest, RunManifest):
        raise RunDirError(f"{run_dir}: the job's output is a {manifest.kind} folder, not a run")
    inputs = (record or {}).get("inputs", {})
    data = manifest.config.get("data", {})
    restored = {}
    for key, channel in SPLIT_CHANNELS.items():
        source = inputs.get(channel, {}).get("source")
        if source and data.get(key):
            restored[data[key]] = source
            data[key] = source
    trained = {restored.get(path, path): digest for path, digest in manifest.data.sha256.items()}
    manifest.data.sha256 = trained
    # The job hashed the files it trained on; they must be the ones hashed here when it was submitted.
    submitted = {
        path: digest for entry in inputs.values() for path, digest in entry.get("sha256", {}).items()
    }
    changed = sorted(path for path, digest in submitted.items() if trained.get(path, digest) != digest)
    if changed:
        log.warning("job %s trained on other data than was submitted: %s", d["TrainingJobName"], changed)
    manifest.backend = BackendRecord(name="sagemaker", job_id=d["TrainingJobName"])
    manifest.sagemaker = {
        "job_name": d["TrainingJobName"],
        "job_arn": d.get("TrainingJobArn"),
        "image": d.get("AlgorithmSpecification", {}).get("TrainingImage"),
        "instance_type": d.get("ResourceConfig", {}).get("InstanceType"),
        "instance_count": d.get("ResourceConfig", {}).get("InstanceCount"),
        "spot": bool(d.get("EnableManagedSpotTraining")),
        "billable_seconds": d.get("BillableTimeInSeconds"),
        "model_artifacts": d.get("ModelArtifacts", {}).get("S3ModelArtifacts"),
        "inputs": inputs,
        "data_as_submitted": not changed if submitted else None,
        "container_data_paths": {source: path for path, source in restored.items()},
        "submitted_from": (record or {}).get("git"),
        "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if restored:
        (run_dir / CONFIG).write_text(redact(dump_config(validate_config(manifest.config))), encoding="utf-8")
    write_manifest(run_dir, manifest)
