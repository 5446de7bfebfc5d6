"""The model's one thread: requests queue here, and concurrent greedy ones are generated as one batch.

The HTTP server runs on an asyncio event loop; the model and its tokenizer are used only in this worker's
thread (a fast tokenizer used from two threads at once fails with "Already borrowed"). A request becomes a
:class:`Job` for the predictor of the model it names (several adapters on one base: one predictor each,
sharing the weights). The worker takes the next job; when it can be batched (greedy, no stop sequences, no
prefill, not streamed) it also takes the compatible jobs already queued (same predictor, so same adapter:
each answer is the one that adapter gives alone), and, once others are arriving, waits up to
``batch_window_s`` for more, up to ``max_batch_size``. A lone request is run at once: batching costs it
nothing. Jobs it cannot batch run alone, in arrival order.

At most ``max_queue`` jobs wait for the worker; more get 429 (TGI's "overloaded"), and one still waiting
after ``request_timeout_s`` gets 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sftbridge.inference.predictor import DetailedGeneration, Predictor, Token
from sftbridge.serving.wire import RequestError

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected: its generation stops at the next token."""


@dataclass(eq=False)
class Job:
    """One generation: how to make its prompt (in the worker: it tokenizes), its decoding, the predictor
    (model and adapter) that answers it, and where the answer goes (a future, or for a stream an event
    queue of ("start", prompt), ("token", Token), ("done", result) and ("error", RequestError))."""

    make_prompt: Callable[[], str]
    decoding: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    predictor: Predictor
    future: asyncio.Future[tuple[str, DetailedGeneration]] | None = None
    events: asyncio.Queue[tuple[str, Any]] | None = None
    deadline: float = 0.0
    gone: bool = False  # set by the HTTP side when the client left: the job is dropped or stopped
    prompt: str = field(default="", init=False)

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        """Jobs with the same key can share one batched generate; None: this one runs alone."""
        d = self.decoding
        if self.events is not None or d["do_sample"] or d["stop"] or d["prefill"]:
            return None
        return (id(self.predictor), d["max_new_tokens"], d.get("repetition_penalty"))

    # ---- answers, posted to the event loop's thread
    def emit(self, kind: str, value: Any) -> None:
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def resolve(self, result: DetailedGeneration) -> None:
        if self.events is not None:
            self.emit("done", result)
        elif self.future is not None:
            self.loop.call_soon_threadsafe(_set_result, self.future, (self.prompt, result))

    def fail(self, error: RequestError) -> None:
        if self.events is not None:
            self.emit("error", error)
        elif self.future is not None:
            self.loop.call_soon_threadsafe(_set_exception, self.future, error)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


class ModelWorker:
    """The thread that runs the model, batching what it can (see the module's docstring)."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        batch_window_s: float,
        max_queue: int,
        request_timeout_s: float,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.batches: list[int] = []  # size of each generate call, for /info and the tests
        self.dropped = 0  # jobs whose client left before or while they ran: no generation spent on them
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()  # taken from the queue but not batchable with the batch in hand
        self._waiting = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sftbridge-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the jobs already queued, then end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout=self.request_timeout_s)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise RequestError(429, "Model is overloaded: too many requests queued", "overloaded")
            self._waiting += 1
        job.deadline = time.monotonic() + self.request_timeout_s
        self._jobs.put(job)

    # ---- the worker's side
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            with self._lock:
                self._waiting -= len(batch)
            now = time.monotonic()
            ready = []
            for job in batch:
                if job.gone:  # the client left while it waited: nothing to answer
                    self.dropped += 1
                elif now > job.deadline:
                    job.fail(
                        RequestError(503, "no turn at the model within the request timeout", "overloaded")
                    )
                else:
                    ready.append(job)
            if ready:
                try:
                    self._generate(ready)
                except Exception as exc:  # a bug here must not end the thread that all requests wait on
                    log.exception("generation failed")
                    for job in ready:
                        job.fail(RequestError(500, f"generation failed: {exc}", "generation"))

    def _take(self, timeout: float | None) -> Job | None:
        """The next job (held ones first); None when the queue stays empty for ``timeout`` seconds."""
        if self._held:
            return self._held.popleft()
        try:
            job = self._jobs.get(timeout=timeout) if timeout != 0 else self._jobs.get_nowait()
        except queue.Empty:
            return None
        if job is None:  # the stop signal: what is queued before it still runs
            self._stopping = True
        return job

    def _next_batch(self) -> list[Job]:
        first = self._take(timeout=0 if self._stopping else None)
        if first is None:
            return []
        key = first.batch_key
        if key is None:
            return [first]
        batch, skipped = [first], list[Job]()
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch_size:
            # Wait for more only once a second request shows there is load; a lone request goes at once.
            wait = max(deadline - time.monotonic(), 0.0) if len(batch) + len(skipped) > 1 else 0.0
            job = self._take(timeout=wait)
            if job is None:
                if self._stopping or (self._jobs.empty() and not self._held):
                    break
                continue
            if job.batch_key == key:
                batch.append(job)
            else:
                skipped.append(job)
                if len(skipped) > self.max_batch_size:
                    break
        self._held.extendleft(reversed(skipped))
        return batch

    def _prompts(self, jobs: list[Job]) -> list[Job]:
        """Format each job's prompt; a job whose request is refused here gets its error and is dropped."""
        ready = []
        for job in jobs:
            try:
                job.prompt = job.make_prompt()
            except RequestError as exc:
                job.fail(exc)
                continue
            ready.append(job)
        return ready

    def _generate(self, jobs: list[Job]) -> None:
        jobs = self._prompts(jobs)
        if not jobs:
            return
        if jobs[0].batch_key is None:
            self._generate_one(jobs[0])
            return
        # Batchable, even alone: plain generate() is cheaper per token than generate_details' streamer.
        decoding = {k: v for k, v in jobs[0].decoding.items() if k not in ("stop", "seed", "prefill")}
        self.batches.append(len(jobs))
        results = jobs[0].predictor.generate_details_batch(
            [job.prompt for job in jobs], abandoned=lambda: all(job.gone for job in jobs), **decoding
        )
        if all(job.gone for job in jobs):
            self.dropped += len(jobs)
            log.info("clients went away: %d answers dropped", len(jobs))
            return
        for job, result in zip(jobs, results, strict=True):
            job.resolve(result)

    def _generate_one(self, job: Job) -> None:
        job.emit("start", job.prompt)  # a stream's refusals came before: now its status line can go

        def on_token(token: Token) -> None:
            if job.gone:
                raise ClientGone
            job.emit("token", token)

        self.batches.append(1)
        try:
            result = job.predictor.generate_details(job.prompt, on_token=on_token, **job.decoding)
        except ClientGone:
            self.dropped += 1
            log.info("client went away")
            return
        except Exception as exc:
            log.exception("generation failed")
            job.fail(RequestError(500, f"generation failed: {exc}", "generation"))
            return
        job.resolve(result)
