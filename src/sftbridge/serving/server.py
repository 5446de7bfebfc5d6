"""A local HTTP endpoint over the one inference wrapper, speaking SageMaker's and TGI's API.

    sftbridge serve RUN [--host 127.0.0.1] [--port 8080]

Routes:

- SageMaker's container contract: ``GET /ping``, ``POST /invocations``.
- Text Generation Inference (what the seed's JumpStart endpoint ran): ``POST /generate``,
  ``POST /generate_stream`` (server-sent events), ``POST /`` (``"stream": true|false``, what
  ``huggingface_hub.InferenceClient(base_url=...)`` posts to), ``GET /info``, ``GET /health``.
- OpenAI-style ``POST /v1/chat/completions`` (non-streaming and streaming).

A request is ``{"inputs": str, "parameters": {...}}`` or ``{"messages": [...], "parameters": {...}}``.
``inputs`` that already start like the run's template (BOS, e.g. ``<s>[INST]``) are used as is; a plain
question, or a ``messages`` list, is formatted with the run's own template by :meth:`Predictor.prompt`.
Decoding follows TGI: greedy unless ``do_sample`` or a sampling parameter (``temperature`` != 1, ``top_p``
< 1, ``top_k``) is given; unspecified values come from the run's ``generation`` section.

One request uses the model at a time, in its own handler thread; the others wait their turn in arrival
order, at most ``max_queue`` of them, and more get 429 (TGI's "overloaded"). Every error is a JSON
``{"error": ..., "error_type": ...}`` with a 4xx/5xx status, and the server keeps serving. It binds
127.0.0.1 unless told otherwise and has no authentication. The request and response shapes are in
``wire.py``; this module is the model's turn-taking and the HTTP server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sftbridge.inference.predictor import DetailedGeneration, Predictor
from sftbridge.serving import defaults
from sftbridge.serving.wire import (
    MAX_STOP_SEQUENCES,
    SSE_HEADERS,
    ChatBody,
    ChatStream,
    GenerateBody,
    Parameters,
    RequestError,
    TgiStream,
    chat_response,
    generate_response,
    parse_body,
)

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    host: str = defaults.HOST
    port: int = defaults.PORT
    max_new_tokens_cap: int = defaults.MAX_NEW_TOKENS_CAP
    max_queue: int = defaults.MAX_QUEUE
    max_body_bytes: int = defaults.MAX_BODY_BYTES
    request_timeout_s: float = defaults.REQUEST_TIMEOUT_S


# ---- the model's turn ------------------------------------------------------------------------------------
class FairLock:
    """A lock handed over in arrival order (``threading.Lock`` is not fair), with a bound on waiters.

    A request runs the model in its own handler thread while holding it: with no other request about, that
    costs no thread hand-off at all.
    """

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._held = False

    def acquire(self, timeout: float) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            if len(self._waiters) >= self.max_waiting:
                raise RequestError(429, "Model is overloaded: too many requests queued", "overloaded")
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return
        with self._mutex:
            if turn.is_set():  # handed over just as the wait timed out
                return
            self._waiters.remove(turn)
        raise RequestError(503, f"no turn at the model within {timeout:.0f} s", "overloaded")

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()  # the lock passes straight to the next in line
            else:
                self._held = False


class Engine:
    """Turns a validated request into a prompt and decoding settings; one request uses the model at a time."""

    def __init__(self, predictor: Predictor, settings: ServeSettings) -> None:
        self.predictor = predictor
        self.settings = settings
        self.lock = FairLock(settings.max_queue)
        config = getattr(predictor.model, "config", None)
        self.max_total_tokens = int(getattr(config, "max_position_embeddings", 0) or 4096)
        self.template_heads = _template_heads(predictor)

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Wait for the model (429 when too many wait already); the tokenizer is used only inside too."""
        self.lock.acquire(self.settings.request_timeout_s)
        try:
            yield
        finally:
            self.lock.release()

    def decoding(self, params: Parameters) -> dict[str, Any]:
        """Keyword arguments for :meth:`Predictor.generate_details`, TGI's way, defaults from the run."""
        cap = self.settings.max_new_tokens_cap
        if params.max_new_tokens is not None and params.max_new_tokens > cap:
            raise RequestError(
                422, f"parameters.max_new_tokens: must be <= {cap} (got {params.max_new_tokens})"
            )
        defaults = self.predictor.generation
        decoding: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens or min(defaults.max_new_tokens, cap),
            "do_sample": params.sampling(defaults.do_sample),
            "stop": params.stop,
            "seed": params.seed,
            "prefill": params.details and params.decoder_input_details,
        }
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if getattr(params, name) is not None:
                decoding[name] = getattr(params, name)
        return decoding

    def prompt(self, body: GenerateBody, max_new_tokens: int) -> str:
        """Formatted inputs as they are; a plain question or a chat through the run's template (in a turn)."""
        try:
            if body.messages is not None:
                prompt = self.predictor.prompt([m.model_dump() for m in body.messages])
            elif any(str(body.inputs).startswith(head) for head in self.template_heads):
                prompt = str(body.inputs)
            else:
                prompt = self.predictor.prompt(str(body.inputs))
        except Exception as exc:  # the template rejected the conversation (e.g. roles not alternating)
            raise RequestError(422, f"cannot format the request with the run's template: {exc}") from None
        tokens = len(self.predictor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if tokens + max_new_tokens > self.max_total_tokens:
            raise RequestError(
                422,
                f"inputs tokens + max_new_tokens must be <= {self.max_total_tokens}. "
                f"Given: {tokens} inputs tokens and {max_new_tokens} max_new_tokens",
            )
        return prompt


def _template_heads(predictor: Predictor) -> list[str]:
    """How a fully formatted prompt starts: the tokenizer's BOS, and the template's text before a question."""
    marker = "SFTBRIDGE_QUESTION_MARKER"
    head = predictor.prompt(marker).split(marker)[0]
    bos = predictor.tokenizer.bos_token or ""
    return [text for text in {head, bos if bos and head.startswith(bos) else ""} if text.strip()]


# ---- HTTP ----------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's next request reuses the connection
    # One write per response (headers and body buffered together, flushed after each request or event),
    # sent at once: with Nagle's algorithm a second small write waits for the client's delayed ACK.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    server: InferenceServer
    timeout = 60  # seconds a client may take to send its request; frees the thread of a stalled one
    body_read = False

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.address_string(), format % args)

    # ---- routing
    def do_GET(self) -> None:
        routes = {"/ping": self._ping, "/health": self._ping, "/info": self._info}
        self._dispatch(routes, {"/", "/invocations", "/generate", "/generate_stream", "/v1/chat/completions"})

    def do_POST(self) -> None:
        routes = {
            "/": self._compat,
            "/invocations": self._compat,
            "/generate": lambda: self._generate(stream=False),
            "/generate_stream": lambda: self._generate(stream=True),
            "/v1/chat/completions": self._chat,
        }
        self._dispatch(routes, {"/ping", "/health", "/info"})

    def _dispatch(self, routes: dict[str, Any], other_method: set[str]) -> None:
        path = self.path.split("?", 1)[0]
        self.body_read = False  # the handler lives as long as the connection: reset per request
        try:
            if path in routes:
                routes[path]()
            elif path in other_method:
                raise RequestError(405, f"{self.command} {path}: method not allowed", "not_found")
            else:
                raise RequestError(404, f"{self.command} {path}: no such route", "not_found")
        except RequestError as exc:
            if self.command == "POST" and not self.body_read:
                self.close_connection = True  # an unread body must not be parsed as the next request
            self._send_json(exc.status, {"error": str(exc), "error_type": exc.error_type})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            log.info("client went away")
        except Exception as exc:  # a bug in a handler must not take the server down
            log.exception("request failed")
            self.close_connection = True
            self._send_json(500, {"error": f"internal error: {exc}", "error_type": "internal"})

    # ---- routes
    def _ping(self) -> None:
        self._send_json(200, {"status": "ok"})

    def _info(self) -> None:
        self._send_json(200, self.server.info())

    def _compat(self) -> None:
        """TGI's ``/`` and SageMaker's ``/invocations``: ``"stream"`` chooses; a list wraps the answer."""
        body = parse_body(self._read_body(), GenerateBody)
        if body.stream:
            self._stream(body, lambda write, prompt: TgiStream(write, body.parameters, prompt))
        else:
            prompt, result = self._generate_once(body)
            self._send_json(200, [generate_response(body.parameters, prompt, result)])

    def _generate(self, stream: bool) -> None:
        body = parse_body(self._read_body(), GenerateBody)
        if stream:
            self._stream(body, lambda write, prompt: TgiStream(write, body.parameters, prompt))
        else:
            prompt, result = self._generate_once(body)
            self._send_json(200, generate_response(body.parameters, prompt, result))

    def _chat(self) -> None:
        chat = parse_body(self._read_body(), ChatBody)
        body = chat.to_generate()
        model = chat.model or self.server.model_id
        if body.stream:
            self._stream(body, lambda write, prompt: ChatStream(write, model))
        else:
            _, result = self._generate_once(body)
            self._send_json(200, chat_response(result, model))

    # ---- plumbing
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise RequestError(411, "a request body with a Content-Length header is required") from None
        limit = self.server.settings.max_body_bytes
        if length > limit:
            self.close_connection = True
            if length <= 16 * limit:  # read it away, so the client gets to read the answer
                for start in range(0, length, 1 << 16):
                    self.rfile.read(min(1 << 16, length - start))
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {limit} bytes")
        self.body_read = True
        return self.rfile.read(length)

    def _generate_once(self, body: GenerateBody) -> tuple[str, DetailedGeneration]:
        engine = self.server.engine
        decoding = engine.decoding(body.parameters)
        with engine.turn():
            prompt = engine.prompt(body, decoding["max_new_tokens"])
            return prompt, self._call_model(prompt, decoding)

    def _call_model(self, prompt: str, decoding: dict[str, Any], on_token: Any = None) -> DetailedGeneration:
        try:
            return self.server.predictor.generate_details(prompt, on_token=on_token, **decoding)
        except (BrokenPipeError, ConnectionResetError):
            raise  # a streaming client left: generation stops here
        except Exception as exc:
            log.exception("generation failed")
            raise RequestError(500, f"generation failed: {exc}", "generation") from None

    def _stream(self, body: GenerateBody, make_stream: Callable[[Callable[[bytes], None], str], Any]) -> None:
        engine = self.server.engine
        decoding = engine.decoding(body.parameters)
        with engine.turn():
            prompt = engine.prompt(
                body, decoding["max_new_tokens"]
            )  # refusals before any event are plain JSON
            self.send_response(200)
            for name, value in SSE_HEADERS.items():
                self.send_header(name, value)
            self.send_header("Connection", "close")  # the stream's end is the connection's end
            self.end_headers()
            self.close_connection = True

            def write(event: bytes) -> None:
                self.wfile.write(event)
                self.wfile.flush()

            stream = make_stream(write, prompt)
            try:
                result = self._call_model(prompt, decoding, on_token=stream.token)
            except RequestError as exc:
                stream.error(exc)  # the status line is gone: the error is the stream's last event
                return
            stream.finish(result)

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class InferenceServer(ThreadingHTTPServer):
    # Handler threads are joined by server_close: one killed inside torch at interpreter exit aborts the
    # process ("terminate called without an active exception").
    daemon_threads = False
    block_on_close = True
    request_queue_size = 128  # listen backlog: a burst of connections waits instead of being dropped

    def __init__(self, predictor: Predictor, settings: ServeSettings, source: str = "") -> None:
        super().__init__((settings.host, settings.port), Handler)
        self.predictor = predictor
        self.settings = settings
        self.source = source
        self.engine = Engine(predictor, settings)
        self.model_id = source or "sftbridge"
        self._connections: set[Any] = set()  # open client sockets, closed by server_close
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening, let the generation in progress end, close idle keep-alive connections, then join
        the handler threads."""
        self.socket.close()
        with contextlib.suppress(Exception), self.engine.turn():
            pass
        with self._connections_lock:
            still_open = list(self._connections)
        for connection in still_open:  # unblocks handler threads waiting for a next request
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        super().server_close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def info(self) -> dict[str, Any]:
        """TGI's /info fields that apply, plus what this endpoint serves."""
        model = self.predictor.model
        parameter = next(model.parameters(), None)
        total = self.engine.max_total_tokens
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
            "model_device_type": str(getattr(model, "device", "cpu")).split(":")[0],
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.settings.max_queue + 1,
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": total - 1,
            "max_total_tokens": total,
            "max_client_batch_size": 1,
            "validation_workers": 1,
            "router": "sftbridge",
            "version": _version(),
            "sha": None,
            "docker_label": None,
            "sftbridge": {
                "max_new_tokens_cap": self.settings.max_new_tokens_cap,
                "max_queue": self.settings.max_queue,
                "prompt_format": self.predictor.prompt_format.to_dict(),
                "generation": self.predictor.generation.model_dump(),
            },
        }


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("sftbridge")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return None


def load_predictor(path: str | Path, device: str = "auto") -> Predictor:
    """A run directory, or a folder written by ``sftbridge merge``."""
    from sftbridge.inference.merge import is_merged, load_merged

    return load_merged(path, device=device) if is_merged(path) else Predictor.from_run(path, device=device)


def make_server(
    predictor: Predictor, settings: ServeSettings | None = None, source: str = ""
) -> InferenceServer:
    """A server bound and ready; call ``serve_forever()`` (port 0 picks a free port: see ``.url``)."""
    return InferenceServer(predictor, settings or ServeSettings(), source)
