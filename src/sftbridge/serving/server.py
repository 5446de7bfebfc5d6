"""A local HTTP endpoint over the one inference wrapper: FastAPI on uvicorn, speaking SageMaker's, TGI's and
OpenAI's API.

    sftbridge serve RUN [NAME=RUN ...] [--host 127.0.0.1] [--port 8080] [--max-batch-size 32]

Each run is served under its folder's name (or NAME), and the base, adapters off, as ``<first>-base``
(``inference.adapters``: one base in memory however many adapters). A request picks its model with OpenAI's
``model`` field, or on the TGI routes (``/generate``, ``/``, ``/invocations`` with a TGI body) with TGI's
``parameters.adapter_id``; without one it gets the first run. ``GET /v1/models`` lists them all.

Routes:

- SageMaker's container contract: ``GET /ping``, ``POST /invocations`` (a TGI body, or as vLLM's image
  does, an OpenAI chat body with ``messages`` or a completions body with ``prompt``).
- Text Generation Inference (what the seed's JumpStart endpoint ran): ``POST /generate``,
  ``POST /generate_stream`` (server-sent events), ``POST /`` (``"stream": true|false``, what
  ``huggingface_hub.InferenceClient(base_url=...)`` posts to), ``GET /info``, ``GET /health``.
- OpenAI: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming too), ``GET /v1/models``.

A TGI request is ``{"inputs": str, "parameters": {...}}`` or ``{"messages": [...], "parameters": {...}}``.
``inputs`` that already hold the run's template (e.g. ``<s>[INST] q [/INST] ``) are normalised to what
training rendered (:meth:`Prompter.raw`); a plain question, or a ``messages`` list, is formatted with the
run's own template.
Decoding follows TGI: greedy unless ``do_sample`` or a sampling parameter (``temperature`` != 1, ``top_p``
< 1, ``top_k``) is given; unspecified values come from the run's ``generation`` section. OpenAI completions
take the prompt as is (after BOS, as vLLM does); which OpenAI parameters are honoured is in ``wire.py``.

Concurrent greedy requests are generated as one batch (``batching.py``). Every error is a JSON
``{"error": ..., "error_type": ...}`` with a 4xx/5xx status. It binds 127.0.0.1 unless told otherwise and has
no authentication. uvicorn logs one access line per request and shuts down gracefully on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

# FastAPI reads the routes' annotations, so these are module-level imports (the ``serve`` extra).
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from sftbridge.inference.predictor import BASE, DetailedGeneration, Predictor
from sftbridge.serving import defaults
from sftbridge.serving.batching import Job, ModelWorker
from sftbridge.serving.wire import (
    MAX_STOP_SEQUENCES,
    SSE_HEADERS,
    ChatBody,
    ChatStream,
    CompletionBody,
    GenerateBody,
    Parameters,
    RequestError,
    TgiStream,
    chat_response,
    completion_response,
    generate_response,
    parse_body,
)

log = logging.getLogger(__name__)
BACKLOG = 256  # listen backlog: a burst of connections waits instead of being dropped
# OpenAI "model" values that name no model: TGI ignores the field, its docs send "tgi", and huggingface_hub's
# InferenceClient sends "dummy" when given a base_url. They get the default model, as TGI answers them.
PLACEHOLDER_MODELS = frozenset({"tgi", "dummy"})


@dataclass
class ServeSettings:
    host: str = defaults.HOST
    port: int = defaults.PORT
    max_new_tokens_cap: int = defaults.MAX_NEW_TOKENS_CAP
    max_queue: int = defaults.MAX_QUEUE
    max_body_bytes: int = defaults.MAX_BODY_BYTES
    request_timeout_s: float = defaults.REQUEST_TIMEOUT_S
    max_batch_size: int = defaults.MAX_BATCH_SIZE
    batch_window_s: float = defaults.BATCH_WINDOW_S


class Engine:
    """Turns a validated request for one served model into a prompt and decoding settings."""

    def __init__(self, name: str, predictor: Predictor, settings: ServeSettings) -> None:
        self.name = name
        self.predictor = predictor
        self.settings = settings
        config = getattr(predictor.model, "config", None)
        self.max_total_tokens = int(getattr(config, "max_position_embeddings", 0) or 4096)
        self.prompter = predictor.prompter

    def decoding(self, params: Parameters, *, openai: bool = False) -> dict[str, Any]:
        """Keyword arguments for :meth:`Predictor.generate_details`, TGI's way, defaults from the run;
        ``openai``: refusals name OpenAI's field (``max_tokens``), not TGI's."""
        cap = self.settings.max_new_tokens_cap
        if params.max_new_tokens is not None and params.max_new_tokens > cap:
            field = "max_tokens" if openai else "parameters.max_new_tokens"
            raise RequestError(422, f"{field}: must be <= {cap} (got {params.max_new_tokens})")
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
        """A chat or a plain question through the run's template; formatted inputs normalised as training
        rendered them (:meth:`Prompter.raw`: the seed's ``[/INST] `` with its trailing space answers as
        ``[/INST]`` does)."""
        try:
            if body.messages is not None:
                prompt = self.prompter.chat([m.plain() for m in body.messages])
            else:
                prompt = self.prompter.raw(str(body.inputs))
        except Exception as exc:  # the template rejected the conversation (e.g. roles not alternating)
            raise RequestError(422, f"cannot format the request with the run's template: {exc}") from None
        return self.checked(prompt, max_new_tokens)

    def raw(self, text: str, max_new_tokens: int) -> str:
        """An OpenAI completions prompt: used as is, after BOS when the tokenizer adds one (as vLLM does)."""
        return self.checked(self.prompter.completion(text), max_new_tokens)

    def checked(self, prompt: str, max_new_tokens: int) -> str:
        tokens = len(self.predictor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if tokens + max_new_tokens > self.max_total_tokens:
            raise RequestError(
                422,
                f"inputs tokens + max_new_tokens must be <= {self.max_total_tokens}. "
                f"Given: {tokens} inputs tokens and {max_new_tokens} max_new_tokens",
            )
        return prompt


# ---- the application -------------------------------------------------------------------------------------
class Service:
    """What the routes share: a request engine per served model, the model's worker thread and the
    settings. The first model is the default."""

    def __init__(self, models: Mapping[str, Predictor], settings: ServeSettings) -> None:
        self.settings = settings
        self.engines = {name: Engine(name, predictor, settings) for name, predictor in models.items()}
        self.engine = next(iter(self.engines.values()))
        self.worker = ModelWorker(
            max_batch_size=settings.max_batch_size,
            batch_window_s=settings.batch_window_s,
            max_queue=settings.max_queue,
            request_timeout_s=settings.request_timeout_s,
        )

    def pick(self, name: str | None, field: str) -> Engine:
        """The engine of the model a request names (the default when it names none, or a placeholder); 404
        for another."""
        if name is None or name in PLACEHOLDER_MODELS:
            return self.engine
        engine = self.engines.get(name)
        if engine is None:
            raise RequestError(
                404,
                f"{field}: no model {name!r} here; it serves {', '.join(self.engines)}",
                "not_found",
            )
        return engine

    async def read(self, request: Request) -> bytes:
        """The body, with Content-Length or chunked, at most max_body_bytes (413 beyond)."""
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is None and "chunked" not in request.headers.get("transfer-encoding", "").lower():
            raise RequestError(411, "a request body with a Content-Length header is required")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise RequestError(413, f"body of over {limit} bytes exceeds the limit of {limit} bytes")
        return bytes(data)

    async def generate(
        self, request: Request, engine: Engine, make_prompt: Callable[[], str], decoding: dict[str, Any]
    ) -> tuple[str, DetailedGeneration]:
        """One answer. A client that disconnects first has its job dropped (still queued) or stopped (at its
        next token): the worker's time goes to the clients still waiting."""
        loop = asyncio.get_running_loop()
        job = Job(make_prompt, decoding, loop, engine.predictor, future=loop.create_future())
        self.worker.submit(job)
        assert job.future is not None
        left = asyncio.ensure_future(_disconnected(request))
        try:
            waiting: set[asyncio.Future[Any]] = {job.future, left}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                raise RequestError(499, "the client closed the request", "cancelled")
            return job.future.result()
        finally:
            left.cancel()
            if not job.future.done():  # the client left, or a sibling answer of its request failed
                job.gone = True

    async def answers(
        self, request: Request, engine: Engine, jobs: list[tuple[Callable[[], str], dict[str, Any]]]
    ) -> list[tuple[str, DetailedGeneration]]:
        """Several answers of one request (``n``, a list of prompts): if one fails (a full queue: 429), the
        others are dropped too, since the client gets the error and none of them."""
        tasks = [asyncio.ensure_future(self.generate(request, engine, *job)) for job in jobs]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def stream(
        self,
        engine: Engine,
        make_prompt: Callable[[], str],
        decoding: dict[str, Any],
        make_events: Callable[[Any, str], Any],
    ) -> Any:
        """Refusals before the first event are plain JSON; later errors are the stream's last event."""
        loop = asyncio.get_running_loop()
        job = Job(make_prompt, decoding, loop, engine.predictor, events=asyncio.Queue())
        self.worker.submit(job)
        assert job.events is not None
        kind, value = await job.events.get()
        if kind == "error":
            raise value
        prompt = value

        async def events() -> AsyncIterator[bytes]:
            out: list[bytes] = []
            writer = make_events(out.append, prompt)
            assert job.events is not None
            try:
                while True:
                    kind, value = await job.events.get()
                    if kind == "token":
                        writer.token(value)
                    elif kind == "done":
                        writer.finish(value)
                    else:
                        writer.error(value)
                    if out:
                        yield b"".join(out)
                        out.clear()
                    if kind != "token":
                        return
            finally:
                job.gone = True  # the client left (or the stream ended): generation stops at its next token

        return StreamingResponse(events(), headers=SSE_HEADERS)

    @staticmethod
    def tgi_prompt(engine: Engine, body: GenerateBody, decoding: dict[str, Any]) -> Callable[[], str]:
        return lambda: engine.prompt(body, decoding["max_new_tokens"])

    async def tgi(self, request: Request, body: GenerateBody, wrap: bool) -> Any:
        engine = self.pick(body.parameters.adapter_id, "parameters.adapter_id")
        decoding = engine.decoding(body.parameters)
        if body.stream:
            return await self.stream(
                engine,
                self.tgi_prompt(engine, body, decoding),
                decoding,
                lambda write, prompt: TgiStream(write, body.parameters, prompt),
            )
        prompt, result = await self.generate(
            request, engine, self.tgi_prompt(engine, body, decoding), decoding
        )
        answer = generate_response(body.parameters, prompt, result)
        return [answer] if wrap else answer

    async def chat(self, request: Request, chat: ChatBody) -> Any:
        body = chat.to_generate()
        engine = self.pick(chat.model, "model")
        decoding = engine.decoding(body.parameters, openai=True)
        model = engine.name
        if body.stream:
            return await self.stream(
                engine,
                self.tgi_prompt(engine, body, decoding),
                decoding,
                lambda write, prompt: ChatStream(write, model, chat.include_usage),
            )
        answers = await self.answers(
            request,
            engine,
            [(self.tgi_prompt(engine, body, decoding), _nth(decoding, i)) for i in range(chat.n)],
        )
        return chat_response([result for _, result in answers], model, chat.logprobs)

    async def complete(self, request: Request, body: CompletionBody) -> Any:
        parameters = body.parameters(body.max_tokens or 16, details=True)  # 16: OpenAI's default
        engine = self.pick(body.model, "model")
        decoding = engine.decoding(parameters, openai=True)
        model = engine.name

        def raw(text: str) -> Callable[[], str]:
            return lambda: engine.raw(text, decoding["max_new_tokens"])

        if body.stream:
            if len(body.prompts) > 1 or body.n > 1:
                raise RequestError(422, "streaming takes one prompt and n = 1")
            return await self.stream(
                engine,
                raw(body.prompts[0]),
                decoding,
                lambda write, prompt: ChatStream(write, model, body.include_usage, completion=True),
            )
        answers = await self.answers(
            request, engine, [(raw(text), _nth(decoding, i)) for text in body.prompts for i in range(body.n)]
        )
        results = [answers[k * body.n : (k + 1) * body.n] for k in range(len(body.prompts))]
        return completion_response(
            body.prompts, [[result for _, result in choices] for choices in results], model, body
        )


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read before: what comes now is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(models: Mapping[str, Predictor], settings: ServeSettings) -> Any:
    """The FastAPI application over the routes below for ``name -> predictor`` (the first the default); its
    lifespan starts and stops the model's worker."""
    service = Service(models, settings)
    app = FastAPI(title="sftbridge", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.worker = service, service.worker
    app.add_exception_handler(RequestError, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _no_route)  # type: ignore[arg-type]
    app.include_router(routes)
    return app


@asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    worker: ModelWorker = app.state.worker
    worker.start()
    yield
    await asyncio.to_thread(worker.stop)  # uvicorn has let the requests in flight finish


async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    """A refusal in the shape the client's API expects: OpenAI's on its routes (and on /invocations given an
    OpenAI body), TGI's elsewhere."""
    if getattr(request.state, "openai", False) or request.url.path.startswith("/v1/"):
        return JSONResponse(exc.openai(), status_code=exc.openai_status)
    return JSONResponse(exc.tgi(), status_code=exc.status)


async def _no_route(request: Request, exc: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: " + (
        "method not allowed" if exc.status_code == 405 else "no such route"
    )
    return await _refused(request, RequestError(exc.status_code, message, "not_found"))


# ---- the routes ------------------------------------------------------------------------------------------
routes = APIRouter()


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


@routes.api_route("/ping", methods=["GET", "HEAD"])  # HEAD: what load balancers and curl -I ask
@routes.api_route("/health", methods=["GET", "HEAD"])
async def ping() -> dict[str, str]:
    return {"status": "ok"}


@routes.get("/info")
async def info(request: Request) -> dict[str, Any]:
    return _info(_service(request))


@routes.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """Every served model, as vLLM lists them: an adapter's ``parent`` is the base it runs on."""
    service = _service(request)
    base = next((e.name for e in service.engines.values() if e.predictor.adapter == BASE), None)
    cards = [
        {
            "id": engine.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sftbridge",
            "root": engine.name,
            "parent": base if engine.predictor.adapter not in (None, BASE) else None,
            "max_model_len": engine.max_total_tokens,
        }
        for engine in service.engines.values()
    ]
    return {"object": "list", "data": cards}


@routes.post("/")
async def compat(request: Request) -> Any:
    service = _service(request)
    return await service.tgi(request, parse_body(await service.read(request), GenerateBody), wrap=True)


@routes.post("/invocations")
async def invocations(request: Request) -> Any:
    """SageMaker's route: a TGI body (``inputs``/``parameters``), else OpenAI's, as vLLM's image does."""
    service = _service(request)
    raw = await service.read(request)
    try:
        keys = set(json.loads(raw)) if raw.lstrip().startswith(b"{") else set()
    except (UnicodeDecodeError, json.JSONDecodeError):
        keys = set()
    if not keys & {"inputs", "parameters"} and "messages" in keys:
        request.state.openai = True
        return await service.chat(request, parse_body(raw, ChatBody))
    if not keys & {"inputs", "parameters"} and "prompt" in keys:
        request.state.openai = True
        return await service.complete(request, parse_body(raw, CompletionBody))
    return await service.tgi(request, parse_body(raw, GenerateBody), wrap=True)


@routes.post("/generate")
async def generate(request: Request) -> Any:
    return await _tgi_route(request, stream=False)


@routes.post("/generate_stream")
async def generate_stream(request: Request) -> Any:
    return await _tgi_route(request, stream=True)


async def _tgi_route(request: Request, *, stream: bool) -> Any:
    """TGI's /generate and /generate_stream: the route, not the body, says whether to stream."""
    service = _service(request)
    body = parse_body(await service.read(request), GenerateBody)
    body.stream = stream
    return await service.tgi(request, body, wrap=False)


@routes.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    service = _service(request)
    return await service.chat(request, parse_body(await service.read(request), ChatBody))


@routes.post("/v1/completions")
async def completions(request: Request) -> Any:
    service = _service(request)
    return await service.complete(request, parse_body(await service.read(request), CompletionBody))


def _nth(decoding: dict[str, Any], i: int) -> dict[str, Any]:
    """The decoding of the i-th of n answers: sampled ones get seed + i (a fresh random seed without one)."""
    if i == 0 or not decoding["do_sample"]:
        return decoding
    return {**decoding, "seed": None if decoding["seed"] is None else decoding["seed"] + i}


def _info(service: Service) -> dict[str, Any]:
    """TGI's /info fields that apply, plus what this endpoint serves."""
    predictor, settings, model_id = service.engine.predictor, service.settings, service.engine.name
    model = predictor.model
    parameter = next(model.parameters(), None)
    total = service.engine.max_total_tokens
    return {
        "model_id": model_id,
        "model_sha": None,
        "model_dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
        "model_device_type": str(getattr(model, "device", "cpu")).split(":")[0],
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": settings.max_queue + settings.max_batch_size,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": total - 1,
        "max_total_tokens": total,
        "max_client_batch_size": 1,
        "max_batch_size": settings.max_batch_size,
        "validation_workers": 1,
        "router": "sftbridge",
        "version": _version(),
        "sha": None,
        "docker_label": None,
        "sftbridge": {
            "max_new_tokens_cap": settings.max_new_tokens_cap,
            "max_queue": settings.max_queue,
            "max_batch_size": settings.max_batch_size,
            "prompt_format": predictor.prompt_format.to_record().model_dump(),
            "generation": predictor.generation.model_dump(),
            "models": list(service.engines),
        },
    }


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("sftbridge")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return None


# ---- running it ------------------------------------------------------------------------------------------
def listen(settings: ServeSettings) -> socket.socket:
    """A socket bound and listening on the settings' host and port (OSError if it cannot be): ``serve``
    binds it before the model loads, so a taken port is said at once."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((settings.host, settings.port))
        listener.listen(BACKLOG)  # from now on connections wait for uvicorn, none is refused
    except OSError:
        listener.close()
        raise
    return listener


class LocalServer:
    """uvicorn serving the app on a socket bound at construction (port 0 picks a free one: see ``url``):
    one predictor served as ``source``, or ``name -> predictor`` (the first the default)."""

    def __init__(
        self,
        models: Predictor | Mapping[str, Predictor],
        settings: ServeSettings,
        source: str = "",
        log_config: Any = None,
        listener: socket.socket | None = None,
    ) -> None:
        import uvicorn

        self.settings = settings
        if isinstance(models, Predictor):  # one model, served as ``source``
            models = {source or "sftbridge": models}
        self.app = create_app(models, settings)
        self.socket = listener or listen(settings)
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            self.app,
            log_config=log_config,  # None: uvicorn's loggers (access lines included) go to the root logger
            access_log=True,
            timeout_keep_alive=60,
            timeout_graceful_shutdown=int(settings.request_timeout_s),
            backlog=BACKLOG,
        )
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    @property
    def worker(self) -> ModelWorker:
        worker: ModelWorker = self.app.state.worker
        return worker

    def serve(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM (uvicorn's handlers: requests in flight finish)."""
        self.uvicorn.run(sockets=[self.socket])

    def start(self) -> LocalServer:
        """Serve in a background thread (tests, benchmarks); returns once it accepts connections."""
        self._thread = threading.Thread(target=self.serve, name="sftbridge-uvicorn", daemon=True)
        self._thread.start()
        while not self.uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server failed to start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)
