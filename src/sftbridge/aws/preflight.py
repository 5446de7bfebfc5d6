"""AWS pre-flight checks shared by training jobs (``backends/sagemaker/``) and endpoints
(``serving/deploy.py``).

Credentials, the account, and an S3 bucket that takes writes: each is checked before anything is uploaded or
created, and each failure is one line that names the setting to change. Callers pass their boto3 session and
the error class their command raises.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from sftbridge.errors import UserError

log = logging.getLogger(__name__)

ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")  # aws, aws-cn, aws-us-gov
ROLE_ARN_FORM = "arn:aws:iam::<12-digit account>:role/<name>"
NO_CREDENTIALS = (
    "no AWS credentials: run `aws configure` (or `aws sso login`), or set AWS_PROFILE, or AWS_ACCESS_KEY_ID "
    "and AWS_SECRET_ACCESS_KEY"
)


def reason(exc: Exception) -> str:
    """``Code: Message`` of a botocore ClientError; the text of anything else."""
    response = getattr(exc, "response", None)
    if response:
        error = response.get("Error", {})
        return f"{error.get('Code', '')}: {error.get('Message', '')}".strip(": ")
    return str(exc)


def require_role_arn(role: str, setting: str, error: type[UserError] = UserError) -> None:
    """A full role ARN: a bare role name would make the SDK call IAM to resolve it, which a job role lacks."""
    if not ROLE_ARN.match(role):
        raise error(f"{setting}: {role!r} is not a role ARN; write it in full, {ROLE_ARN_FORM}")


def require_credentials(session: Any, error: type[UserError] = UserError) -> None:
    if session.get_credentials() is None:
        raise error(NO_CREDENTIALS)


def account_id(session: Any, error: type[UserError] = UserError) -> str:
    """The caller's account (STS): the first call that proves the credentials are valid."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return str(session.client("sts").get_caller_identity()["Account"])
    except (BotoCoreError, ClientError) as exc:
        raise error(
            f"AWS rejected these credentials ({reason(exc)}); refresh them, e.g. `aws sso login`"
        ) from None


def default_bucket(region: str, account: str) -> str:
    return f"sagemaker-{region}-{account}"  # the SageMaker SDK's default bucket


def ensure_writable_bucket(
    session: Any,
    bucket: str,
    *,
    region: str,
    prefix: str,
    setting: str,
    create: bool,
    error: type[UserError] = UserError,
) -> None:
    """The bucket exists (created when ``create``, as the SDK does with its default bucket) and a probe object
    can be written under ``prefix`` and deleted. ``setting`` names what the user changes: ``--bucket``,
    ``backend.bucket``."""
    from botocore.exceptions import ClientError

    s3 = session.client("s3", region_name=region)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket") and create:
            # us-east-1 is the one region that refuses a LocationConstraint naming itself
            where = {} if region == "us-east-1" else {"LocationConstraint": region}
            s3.create_bucket(Bucket=bucket, **({"CreateBucketConfiguration": where} if where else {}))
            log.info("created the default bucket s3://%s", bucket)
        elif code in ("404", "NoSuchBucket"):
            raise error(
                f"{setting}: s3://{bucket} does not exist; create it (aws s3 mb s3://{bucket}) or leave "
                f"{setting} out to use SageMaker's default bucket"
            ) from None
        else:
            raise error(
                f"{setting}: s3://{bucket} is not accessible with these credentials ({reason(exc)}); use a "
                "bucket you own"
            ) from None
    probe = f"{prefix.strip('/')}/.sftbridge-write-check".lstrip("/")
    try:
        s3.put_object(Bucket=bucket, Key=probe, Body=b"")
        s3.delete_object(Bucket=bucket, Key=probe)
    except ClientError as exc:
        raise error(
            f"{setting}: cannot write to s3://{bucket}/{probe} ({reason(exc)}); use a bucket these "
            "credentials can write"
        ) from None


def check_secrets(
    session: Any, region: str, secrets: dict[str, str], error: type[UserError] = UserError
) -> None:
    """Each secret a job will read exists (DescribeSecret): a misspelt name fails here, not minutes into the
    job. ``secrets`` maps the setting that names it to the secret's name or ARN. A secret these credentials
    may not describe is left to the job's role, with a warning."""
    from botocore.exceptions import BotoCoreError, ClientError

    for setting, secret_id in secrets.items():
        where = secret_id.split(":")[3] if secret_id.startswith("arn:") else region  # an ARN names its region
        try:
            session.client("secretsmanager", region_name=where).describe_secret(SecretId=secret_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                raise error(
                    f"{setting}: there is no secret {secret_id!r} in {where}; fix the name, or create "
                    f"it: aws secretsmanager create-secret --region {where} --name {secret_id} "
                    "--secret-string VALUE"
                ) from None
            log.warning(
                "%s: cannot check secret %r with these credentials (%s); the job's role must read it",
                setting,
                secret_id,
                reason(exc),
            )
        except BotoCoreError as exc:
            log.warning("%s: cannot check secret %r (%s)", setting, secret_id, exc)
