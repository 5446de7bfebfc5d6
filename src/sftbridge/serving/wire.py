"""The wire format of ``sftbridge serve``: request bodies, response bodies and server-sent event streams.

Request bodies are TGI's (``inputs`` + ``parameters``) and OpenAI's chat completions (``messages``), checked
strictly (unknown keys, wrong types and TGI features this server lacks are 422s that say which field).
Responses and streams are shaped as TGI and OpenAI shape theirs, so that their clients parse them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sftbridge.inference.predictor import DetailedGeneration, Token

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
    "adapter_id": None,
}


class RequestError(Exception):
    """A request the server refuses: HTTP status, TGI's error_type, and a message that says why."""

    def __init__(self, status: int, message: str, error_type: str = "validation") -> None:
        super().__init__(message)
        self.status, self.error_type = status, error_type


# ---- request bodies ------------------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "10" is not an int and 1 is not a bool; unknown keys are errors, not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)


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
    adapter_id: str | None = None

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


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


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


class ChatBody(_Body):
    messages: list[Message]
    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0)  # OpenAI: 0 = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int | None = Field(None, ge=1, le=1)
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _valid(self) -> ChatBody:
        _check_messages(self.messages)
        return self

    def to_generate(self) -> GenerateBody:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        greedy = self.temperature == 0
        parameters = Parameters(
            max_new_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=None if greedy else self.temperature,
            top_p=None if greedy else self.top_p,
            do_sample=False if greedy else None,
            seed=self.seed,
            stop=stop,
            details=True,
        )
        return GenerateBody(messages=self.messages, parameters=parameters, stream=self.stream)


def _check_messages(messages: list[Message]) -> None:
    if not messages:
        raise ValueError("messages must not be empty")
    if messages[-1].role != "user":
        raise ValueError('the last message must be the user\'s ("role": "user")')
    if not messages[-1].content.strip():
        raise ValueError("the last user message must not be empty")


def parse_body(raw: bytes, model: type[_Body]) -> Any:
    """JSON bytes → a validated body, or RequestError with every problem named."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestError(422, "; ".join(_describe(error) for error in exc.errors())) from None


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


def chat_response(result: DetailedGeneration, model: str) -> dict[str, Any]:
    completion = len(result.tokens)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text.strip()},
                "logprobs": None,
                "finish_reason": "length" if result.finish_reason == "length" else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
        },
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
        self.write(_sse({"error": str(error), "error_type": error.error_type}))


class ChatStream:
    """OpenAI chat.completion.chunk events, ending with ``data: [DONE]``."""

    def __init__(self, write: Callable[[bytes], None], model: str) -> None:
        self.write, self.model = write, model
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.started, self.held = False, ""  # whitespace waits for more text: the content is stripped

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
        self.write(_sse({**body, "choices": [choice]}, b"data: "))

    def token(self, token: Token) -> None:
        text = self.held + ("" if token.special else token.text)
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.held = text[len(body) :]
        if body:
            self._chunk({"content": body} if self.started else {"role": "assistant", "content": body}, None)
            self.started = True

    def finish(self, result: DetailedGeneration) -> None:
        finish = "length" if result.finish_reason == "length" else "stop"
        self._chunk({} if self.started else {"role": "assistant", "content": ""}, finish)
        self.write(_sse(b"[DONE]", b"data: "))

    def error(self, error: RequestError) -> None:
        self.write(_sse({"error": str(error), "error_type": error.error_type}, b"data: "))
