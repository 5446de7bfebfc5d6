"""The wire format of ``sftbridge serve``: request bodies, response bodies and server-sent event streams.

Request bodies are TGI's (``inputs`` + ``parameters``), checked strictly (unknown keys, wrong types and TGI
features this server lacks are 422s that say which field), and OpenAI's chat and text completions, checked as
vLLM checks them: known fields strictly, unknown fields accepted and ignored (and logged).

OpenAI parameters, as vLLM's server treats them:

- honoured: ``model`` (picks the run or the base among those served; 404 for another, but for TGI
  clients' placeholders ``tgi`` and ``dummy``), ``messages``
  (content as a string or a list of ``{"type": "text"}`` parts), ``prompt`` (a string or a list of
  strings: one choice each), ``max_tokens``, ``max_completion_tokens``, ``temperature`` (0 =
  greedy), ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``, ``stop``, ``stream``,
  ``stream_options.include_usage``, ``n`` (n answers; sampled ones get seeds ``seed``, ``seed+1``, ...),
  ``logprobs`` (the chosen tokens' log-probabilities; ``top_logprobs`` alternatives come back empty),
  ``echo`` (completions), ``response_format`` ``{"type": "text"}``;
- accepted and ignored: ``user``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
  ``response_format`` of type ``json_object``/``json_schema`` (no guided decoding here), ``top_logprobs``,
  ``parallel_tool_calls``, ``store``, ``metadata``, ``service_tier``, and any other field (vLLM ignores
  unknown fields with a warning; so does this server).

Responses and streams are shaped as TGI and OpenAI shape theirs, so that their clients parse them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sftbridge.inference.predictor import DetailedGeneration, Token

log = logging.getLogger(__name__)
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# TGI parameters this server does not implement; accepted only at their neutral value.
UNSUPPORTED = {
    "best_of": 1,
    "watermark": False,
    "typical_p": None,
    "top_n_tokens": None,
    "truncate": None,
    "frequency_penalty": None,
    "grammar": None,
}


class RequestError(Exception):
    """A request the server refuses: HTTP status, TGI's error_type, and a message that says why."""

    def __init__(self, status: int, message: str, error_type: str = "validation") -> None:
        super().__init__(message)
        self.status, self.error_type = status, error_type

    def tgi(self) -> dict[str, Any]:
        """TGI's error body: ``{"error": message, "error_type": kind}``."""
        return {"error": str(self), "error_type": self.error_type}

    @property
    def openai_status(self) -> int:
        """OpenAI's (and vLLM's) status: a request it cannot take is a 400, not TGI's 422."""
        return 400 if self.status == 422 else self.status

    def openai(self) -> dict[str, Any]:
        """OpenAI's error body, as its client reads it: ``{"error": {"message", "type", "param", "code"}}``;
        ``param`` is the field a validation message starts with (``max_tokens: ...``)."""
        message = str(self)
        head = message.split(":", 1)[0]
        param = head if ":" in message and head and " " not in head else None
        kind = {429: "rate_limit_error", 404: "not_found_error"}.get(self.status)
        kind = kind or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": self.openai_status}}


# ---- request bodies ------------------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "10" is not an int and 1 is not a bool; unknown keys are errors, not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # "temperature": Infinity


class Parameters(_Body):
    max_new_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)
    do_sample: bool | None = None
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    return_full_text: bool | None = None
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = Field(None, ge=0, lt=2**64)
    best_of: int | None = None
    watermark: bool | None = None
    typical_p: float | None = None
    top_n_tokens: int | None = None
    truncate: int | None = None
    frequency_penalty: float | None = None
    grammar: Any = None
    adapter_id: str | None = None  # TGI's multi-LoRA parameter: the served model (run or base) to answer

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop sequences must not be empty strings")
        return value

    @model_validator(mode="after")
    def _supported(self) -> Parameters:
        for name, neutral in UNSUPPORTED.items():
            if getattr(self, name) not in (None, neutral):
                raise ValueError(f"{name} is a TGI parameter this server does not support")
        return self

    def sampling(self, default: bool) -> bool:
        """TGI samples when asked to, or when any sampling parameter is set to a non-neutral value."""
        warpers = (
            (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
        )
        return (default if self.do_sample is None else self.do_sample) or warpers


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # OpenAI's participant name: accepted and ignored, as vLLM's templates mostly do

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if isinstance(part, dict) and part.get("type") != "text":
                    raise ValueError(f"content part of type {part.get('type')!r}: this model takes text only")
        return value

    def text(self) -> str:
        """The content as one string: text parts joined with newlines, as vLLM's chat utils join them."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)

    def plain(self) -> dict[str, str]:
        """The message as the run's template takes it (``developer``: OpenAI's newer name for ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class GenerateBody(_Body):
    inputs: str | None = None
    messages: list[Message] | None = None
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _one_source(self) -> GenerateBody:
        if (self.inputs is None) == (self.messages is None):
            raise ValueError('give either "inputs" (a string) or "messages" (a list), not both')
        if self.inputs is not None and not self.inputs.strip():
            raise ValueError("inputs must not be empty")
        if self.messages is not None:
            _check_messages(self.messages)
        return self


class _OpenAIBody(BaseModel):
    """Known fields strict; unknown ones accepted and ignored with a log line, as vLLM's server does."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0)  # OpenAI: 0 = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None  # vLLM's extra; -1 or 0 = off
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extra
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=16)
    # accepted and ignored (see the module's docstring)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _note_ignored(self) -> _OpenAIBody:
        if self.model_extra:
            log.warning("ignoring unsupported OpenAI fields: %s", ", ".join(sorted(self.model_extra)))
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            log.warning("response_format %r ignored: no guided decoding", self.response_format.get("type"))
        return self

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences (got {len(value)})")
        return value

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def parameters(self, max_new_tokens: int | None, details: bool) -> Parameters:
        """TGI-style parameters: temperature 0 is greedy; top_k <= 0 is off."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        greedy = self.temperature == 0
        top_k = self.top_k if self.top_k is not None and self.top_k > 0 else None
        return Parameters(
            max_new_tokens=max_new_tokens,
            temperature=None if greedy else self.temperature,
            top_p=None if greedy else self.top_p,
            top_k=None if greedy else top_k,
            repetition_penalty=self.repetition_penalty,
            do_sample=False if greedy else None,
            seed=self.seed,
            stop=stop,
            details=details,
        )


class ChatBody(_OpenAIBody):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _valid(self) -> ChatBody:
        _check_messages(self.messages)
        return self

    def to_generate(self) -> GenerateBody:
        parameters = self.parameters(self.max_completion_tokens or self.max_tokens, details=True)
        return GenerateBody(messages=self.messages, parameters=parameters, stream=self.stream)


class CompletionBody(_OpenAIBody):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # completions: an int (alternatives; 0 = chosen only)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts or not all(p.strip() for p in prompts):
            raise ValueError("prompt must not be empty")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def _check_messages(messages: list[Message]) -> None:
    if not messages:
        raise ValueError("messages must not be empty")
    if messages[-1].role != "user":
        raise ValueError('the last message must be the user\'s ("role": "user")')
    if not messages[-1].text().strip():
        raise ValueError("the last user message must not be empty")


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes → a validated body, or RequestError with every problem named."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    except ValueError as exc:  # an integer of thousands of digits: Python's int-parsing limit
        raise RequestError(400, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}")
    _check_text(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestError(422, "; ".join(_describe(error) for error in exc.errors())) from None


def _check_text(data: Any) -> None:
    """Every string is text the tokenizer can take: JSON's \\ud800 escapes allow a lone surrogate, which no
    UTF-8 encoder takes."""
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    400, "malformed JSON: a string holds a lone surrogate (\\ud800-\\udfff)"
                ) from None
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown parameter"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


# ---- response shapes ------------------------------------------------------------------------------------
def _token(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def generate_response(params: Parameters, prompt: str, result: DetailedGeneration) -> dict[str, Any]:
    """TGI's /generate answer."""
    response: dict[str, Any] = {
        "generated_text": prompt + result.text if params.return_full_text else result.text
    }
    if params.details:
        response["details"] = {
            "finish_reason": result.finish_reason,
            "generated_tokens": len(result.tokens),
            "seed": result.seed,
            "prefill": [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in result.prefill],
            "tokens": [_token(t) for t in result.tokens],
        }
    return response


def _finish(result: DetailedGeneration) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(prompt_tokens: int, results: list[DetailedGeneration]) -> dict[str, int]:
    completion = sum(len(r.tokens) for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def chat_logprobs(tokens: list[Token]) -> dict[str, Any]:
    """OpenAI chat's logprobs: the chosen tokens (special ones left out); no alternatives."""
    return {
        "content": [
            {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()), "top_logprobs": []}
            for t in tokens
            if not t.special
        ]
    }


def chat_response(results: list[DetailedGeneration], model: str, logprobs: bool = False) -> dict[str, Any]:
    """OpenAI's chat.completion: one choice per answer."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": result.text.strip()},
                "logprobs": chat_logprobs(result.tokens) if logprobs else None,
                "finish_reason": _finish(result),
            }
            for i, result in enumerate(results)
        ],
        "usage": _usage(results[0].prompt_tokens, results),
    }


def completion_response(
    prompts: list[str], results: list[list[DetailedGeneration]], model: str, body: Any
) -> dict[str, Any]:
    """OpenAI's text_completion: ``n`` choices per prompt, in prompt order."""
    choices: list[dict[str, Any]] = []
    for prompt, answers in zip(prompts, results, strict=True):
        for result in answers:
            text = (prompt if body.echo else "") + result.text
            tokens = [t for t in result.tokens if not t.special]
            offsets, at = [], len(prompt) if body.echo else 0
            for token in tokens:
                offsets.append(at)
                at += len(token.text)
            logprobs = None
            if body.logprobs is not None:
                logprobs = {
                    "tokens": [t.text for t in tokens],
                    "token_logprobs": [t.logprob for t in tokens],
                    "top_logprobs": [{} for _ in tokens],
                    "text_offset": offsets,
                }
            choices.append(
                {"index": len(choices), "text": text, "logprobs": logprobs, "finish_reason": _finish(result)}
            )
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(
            sum(answers[0].prompt_tokens for answers in results), [r for a in results for r in a]
        ),
    }


def _sse(data: Any, field: bytes = b"data:") -> bytes:
    """One server-sent event. TGI writes ``data:{...}``; OpenAI ``data: {...}`` and ``data: [DONE]``."""
    return field + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


class TgiStream:
    """TGI's generate_stream events: one per token; the last also carries generated_text (and details).

    A token goes out when the next one is chosen, so that the final one can be marked final, as TGI does.
    """

    def __init__(self, write: Callable[[bytes], None], params: Parameters, prompt: str) -> None:
        self.write, self.params, self.prompt = write, params, prompt
        self.pending: Token | None = None
        self.index = 0

    def token(self, token: Token) -> None:
        if self.pending is not None:
            self.index += 1
            self.write(
                _sse(
                    {
                        "index": self.index,
                        "token": _token(self.pending),
                        "generated_text": None,
                        "details": None,
                    }
                )
            )
        self.pending = token

    def finish(self, result: DetailedGeneration) -> None:
        details = None
        if self.params.details:
            details = {
                "finish_reason": result.finish_reason,
                "generated_tokens": len(result.tokens),
                "seed": result.seed,
                "input_length": result.prompt_tokens,
            }
        text = self.prompt + result.text if self.params.return_full_text else result.text
        last = self.pending or result.tokens[-1]
        self.write(
            _sse({"index": self.index + 1, "token": _token(last), "generated_text": text, "details": details})
        )

    def error(self, error: RequestError) -> None:
        self.write(_sse(error.tgi()))


class ChatStream:
    """OpenAI chat.completion.chunk events (text_completion ones with ``completion=True``), ending with
    ``data: [DONE]``; with ``stream_options.include_usage`` a last chunk carries the usage, as OpenAI's."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        model: str,
        include_usage: bool = False,
        completion: bool = False,
    ) -> None:
        self.write, self.model, self.include_usage, self.completion = write, model, include_usage, completion
        prefix = "cmpl" if completion else "chatcmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.started, self.held = False, ""  # chat: whitespace waits for more text, the content is stripped

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None) -> None:
        if self.completion:
            kind = "text_completion"
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        else:
            kind = "chat.completion.chunk"
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        self.write(_sse({**body, "choices": [choice]}, b"data: "))

    def token(self, token: Token) -> None:
        if self.completion:
            if not token.special and token.text:
                self._chunk(token.text, None)
            return
        text = self.held + ("" if token.special else token.text)
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.held = text[len(body) :]
        if body:
            self._chunk({"content": body} if self.started else {"role": "assistant", "content": body}, None)
            self.started = True

    def finish(self, result: DetailedGeneration) -> None:
        if self.completion:
            self._chunk("", _finish(result))
        else:
            self._chunk({} if self.started else {"role": "assistant", "content": ""}, _finish(result))
        if self.include_usage:
            kind = "text_completion" if self.completion else "chat.completion.chunk"
            usage = _usage(result.prompt_tokens, [result])
            body = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
            self.write(_sse({**body, "choices": [], "usage": usage}, b"data: "))
        self.write(_sse(b"[DONE]", b"data: "))

    def error(self, error: RequestError) -> None:
        self.write(_sse(error.openai(), b"data: "))
