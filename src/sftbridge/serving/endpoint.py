"""The endpoint client: ``sftbridge invoke ENDPOINT|http://HOST:PORT "question"``.

``invoke`` speaks the endpoint's engine (its ``sftbridge:engine`` tag; TGI for endpoints deployed before it
existed): OpenAI ``messages`` to vLLM (the endpoint's template formats them), the seed's payload
``{"inputs": "<s>[INST] ... [/INST]", "parameters": {...}}`` to TGI (formatted here with the run's template,
from the endpoint's record, which ``deploy`` uploaded beside the model data, or ``--run``). Given
``http://HOST:PORT`` it sends the same bodies to that server's ``/invocations`` (``sftbridge serve`` answers
both). Either way the answer comes back as ``{"generated_text", "finish_reason"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftbridge.aws import preflight as aws_checks
from sftbridge.errors import UserError
from sftbridge.inference.folder import ModelFolder

RECORD_TAG = "sftbridge:record"  # s3://.../NAME/record/ : manifest + tokenizer, read by `invoke`
ENGINE_TAG = "sftbridge:engine"  # vllm or tgi: the API `invoke` speaks


def aws_session(region: str | None = None, run_backend: dict[str, Any] | None = None) -> tuple[Any, str]:
    """A boto3 session and its region; one-line errors when there are no credentials or no region."""
    import boto3

    region = region or (run_backend or {}).get("region")
    session = boto3.Session(region_name=region) if region else boto3.Session()
    if not session.region_name:
        raise DeployError("no AWS region: pass --region or set AWS_DEFAULT_REGION (e.g. us-east-1)")
    aws_checks.require_credentials(session, DeployError)
    return session, session.region_name


class DeployError(UserError):
    """Something to fix before (or instead of) deploying; the message says what."""


def _endpoint_tags(session: Any, region: str, endpoint: str) -> dict[str, str]:
    from botocore.exceptions import ClientError

    sm = session.client("sagemaker", region_name=region)
    try:
        arn = sm.describe_endpoint(EndpointName=endpoint)["EndpointArn"]
    except ClientError as exc:
        raise DeployError(f"endpoint {endpoint} in {region}: {aws_checks.reason(exc)}") from None
    return {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn).get("Tags", [])}


def _fetch_record(session: Any, region: str, endpoint: str, tags: dict[str, str]) -> Path:
    """Download the endpoint's record (manifest + tokenizer) into the cache; its S3 prefix is a tag."""
    from sftbridge.models.builtin import cache_root

    if RECORD_TAG not in tags:
        raise DeployError(
            f"endpoint {endpoint} was not deployed by sftbridge: pass --run RUN for its template, or --raw"
        )
    bucket, _, prefix = tags[RECORD_TAG].removeprefix("s3://").partition("/")
    s3 = session.client("s3", region_name=region)
    dest = cache_root() / "endpoints" / region / endpoint
    dest.mkdir(parents=True, exist_ok=True)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            file = dest / item["Key"].removeprefix(prefix).lstrip("/")
            file.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(file))
    return dest


def _settings(folder: ModelFolder, overrides: dict[str, Any]) -> Any:
    """The run's generation settings with the caller's overrides; temperature or top_p given: sampling."""
    settings = folder.generation.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if overrides.get("temperature") is not None or overrides.get("top_p") is not None:
        settings.do_sample = True
    return settings


def payload(
    folder: ModelFolder | None,
    question: str,
    *,
    raw: bool = False,
    adapter: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The seed's request body (TGI): the question in the run's template, decoding from the run's defaults.
    Without a folder (a local server, no --run), the plain question: the server formats it itself.
    ``adapter``: the served model to answer, as TGI's ``parameters.adapter_id``."""
    chosen = {"adapter_id": adapter} if adapter else {}
    if folder is None:
        given = {k: v for k, v in overrides.items() if v is not None}
        if "temperature" in given or "top_p" in given:
            given["do_sample"] = True
        return {"inputs": question, "parameters": {**given, **chosen, "details": True}}
    settings = _settings(folder, overrides)
    parameters: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
    if settings.do_sample:  # TGI samples whenever these are present, so they go only with sampling
        parameters.update(temperature=settings.temperature, top_p=settings.top_p)
    parameters.update(chosen)
    parameters["details"] = True
    return {"inputs": question if raw else folder.prompter.question(question), "parameters": parameters}


def openai_payload(
    folder: ModelFolder | None, question: str, model: str | None, *, raw: bool = False, **overrides: Any
) -> dict[str, Any]:
    """An OpenAI chat body (vLLM): the question as the run's user turn; the endpoint's chat template does the
    rest (the run's system prompt included). Decoding from the run's defaults; temperature 0 is greedy."""
    messages = (
        [{"role": "user", "content": question}]
        if raw or folder is None
        else folder.prompt_format.question_to_messages(question)
    )
    body: dict[str, Any] = {"messages": messages}
    if model:
        body["model"] = model
    if folder is None:
        options = {k: v for k, v in overrides.items() if v is not None}
        if "max_new_tokens" in options:
            body["max_tokens"] = options.pop("max_new_tokens")
        return {**body, **options}
    settings = _settings(folder, overrides)
    body["max_tokens"] = settings.max_new_tokens
    if settings.do_sample:
        body.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        body["temperature"] = 0
    return body


def answer_of(response: Any) -> dict[str, Any]:
    """The same shape from either engine: ``{"generated_text", "finish_reason"}``."""
    if isinstance(response, list) and response:
        response = response[0]
    if not isinstance(response, dict):
        raise DeployError(f"unexpected answer: {str(response)[:200]}")
    if "choices" in response:  # OpenAI (vLLM, or sftbridge serve's /invocations)
        choice = response["choices"][0]
        text = choice.get("message", {}).get("content") if "message" in choice else choice.get("text")
        return {"generated_text": text or "", "finish_reason": choice.get("finish_reason")}
    if "generated_text" in response:  # TGI: eos_token / stop_sequence / length, as OpenAI names them
        reason = (response.get("details") or {}).get("finish_reason")
        finish = {"eos_token": "stop", "stop_sequence": "stop"}.get(str(reason), reason)
        return {"generated_text": response["generated_text"], "finish_reason": finish}
    raise DeployError(f"unexpected answer: {json.dumps(response)[:200]}")


def invoke(
    endpoint: str,
    question: str,
    *,
    region: str | None = None,
    run: str | Path | None = None,
    raw: bool = False,
    engine: str | None = None,
    model: str | None = None,
    **overrides: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send one question to a SageMaker endpoint or a server's URL in its engine's API; returns (request
    body, answer) with the answer as :func:`answer_of` shapes it (the whole response under ``"response"``).
    ``model`` picks one of several served models (an adapter's name, or ``<first>-base``): OpenAI's
    ``model``, TGI's ``parameters.adapter_id``; by default an endpoint's own name (its adapter, for a
    one-adapter deploy), or a local server's first run."""
    if endpoint.startswith(("http://", "https://")):
        engine = engine or "vllm"  # sftbridge serve speaks both; OpenAI needs no template here
        folder = ModelFolder.open(run, weights=False) if run else None
        body = _body(engine, folder, question, model, raw, overrides)
        response = _post_local(endpoint, body)
    else:
        session, region = aws_session(region)
        tags = _endpoint_tags(session, region, endpoint)
        engine = engine or tags.get(ENGINE_TAG, "tgi")  # endpoints deployed before vLLM ran TGI
        if run:
            folder = ModelFolder.open(run, weights=False)
        elif engine == "tgi" or RECORD_TAG in tags:
            folder = ModelFolder.open(_fetch_record(session, region, endpoint, tags), weights=False)
        else:
            folder = None
        # vLLM serves a one-adapter deploy's fine-tune under the endpoint's name; a TGI endpoint, no adapters.
        default = endpoint if engine == "vllm" else None
        body = _body(engine, folder, question, model or default, raw, overrides)
        response = _invoke_endpoint(session, region, endpoint, body)
    return body, {**answer_of(response), "response": response}


def _body(
    engine: str,
    folder: ModelFolder | None,
    question: str,
    model: str | None,
    raw: bool,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    if engine == "tgi":
        return payload(folder, question, raw=raw, adapter=model, **overrides)
    return openai_payload(folder, question, model, raw=raw, **overrides)


def _post_local(url: str, body: dict[str, Any]) -> Any:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url.rstrip("/") + "/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise DeployError(f"invoke {url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeployError(f"invoke {url}: {exc}") from None


def _invoke_endpoint(session: Any, region: str, endpoint: str, body: dict[str, Any]) -> Any:
    from botocore.exceptions import ClientError

    runtime = session.client("sagemaker-runtime", region_name=region)
    try:
        response = runtime.invoke_endpoint(
            EndpointName=endpoint,
            Body=json.dumps(body),
            ContentType="application/json",
            Accept="application/json",
        )
    except ClientError as exc:
        raise DeployError(f"invoke {endpoint}: {aws_checks.reason(exc)}") from None
    raw_answer = response["Body"].read()
    try:
        return json.loads(raw_answer)
    except json.JSONDecodeError:
        raise DeployError(
            f"invoke {endpoint}: the endpoint answered non-JSON: {raw_answer[:200]!r}"
        ) from None
