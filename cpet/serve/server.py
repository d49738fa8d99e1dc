"""The HTTP server: OpenAI-compatible completions and chat, classification, runtime adapter loading, metrics.

``model`` in a request names an adapter, or the bare base by its served name (the vLLM / LoRAX convention).
Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both streamed with ``"stream": true``), ``POST /v1/classify``, and, with the bearer
token, ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` (vLLM's names). Limits: prompt and
output tokens, a bounded queue (429 when full), a per-request timeout (504).
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from fastapi import Request  # at module level: FastAPI resolves the handlers' (string) annotations here
from jinja2 import TemplateError  # what transformers' chat templates raise (raise_exception, syntax)

from .engine import Engine
from .registry import AdapterError, UnknownAdapterError
from .scheduler import ClassifyRequest, GenerationRequest, QueueFull, Scheduler


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for, and how long the server waits for it.

    Every count is an integer >= 1 and ``timeout_s`` a finite number of seconds > 0; anything else raises
    ValueError naming the field and the value, at construction (before any model or scheduler exists).
    """

    max_prompt_tokens: int = 1024
    max_tokens: int = 256
    max_queue: int = 64
    max_batch: int = 16
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_queue", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerLimits.{name} must be an integer >= 1, got {value!r}")
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"ServerLimits.timeout_s must be a finite number of seconds > 0, got {timeout!r}")


# OpenAI request fields CPET's sampler does not implement, with the values that leave the answer as CPET gives it
# (the first is the one to send); any other value is a 400, not silently ignored
UNSUPPORTED_FIELDS = {
    "top_p": (1, 1.0),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
}


MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 256  # OpenAI's API takes up to 4 stop sequences


class ServingError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def create_app(engine: Engine, *, served_name: str = "cpet-base", api_key: str | None = None,
               limits: ServerLimits = ServerLimits()):
    """The FastAPI application around ``engine`` (a scheduler thread starts with it)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = CollectorRegistry()
    queue_depth = Gauge("cpet_queue_depth", "requests waiting", registry=metrics)
    batch_size = Histogram("cpet_batch_size", "sequences per step", registry=metrics,
                           buckets=(1, 2, 4, 8, 16, 32, 64))
    tokens = Counter("cpet_generated_tokens", "tokens generated", registry=metrics)
    tokens_per_s = Gauge("cpet_tokens_per_second", "tokens per second over the last step", registry=metrics)
    latency = Histogram("cpet_request_seconds", "request latency", ["adapter", "kind"], registry=metrics)
    errors = Counter("cpet_request_errors", "refused or failed requests", ["status"], registry=metrics)

    def on_step(rows: int, new: int, seconds: float) -> None:
        batch_size.observe(rows)
        tokens.inc(new)
        tokens_per_s.set(new / max(seconds, 1e-6))  # the step's own time, not the idle time before it

    scheduler = Scheduler(engine, max_queue=limits.max_queue, max_batch=limits.max_batch, on_step=on_step)
    app = FastAPI(title="CPET", description="Many task adapters on one compressed base")
    app.state.scheduler, app.state.engine = scheduler, engine

    @app.on_event("shutdown")
    def _shutdown() -> None:
        scheduler.close()

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError):
        errors.labels(str(exc.status)).inc()
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}},
                            status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own errors (an unknown path: 404, a wrong method: 405) in the same JSON error body and
        counted, instead of its ``{"detail": ...}``; its headers (``Allow`` on a 405) kept."""
        errors.labels(str(exc.status_code)).inc()
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": exc.status_code}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        """Any other failure in a handler: the same JSON error body as every error (OpenAI clients parse it) and
        counted, instead of Starlette's plain-text 500."""
        errors.labels("500").inc()
        message = f"the server failed on this call: {type(exc).__name__}: {exc}"
        return JSONResponse({"error": {"message": message, "type": "server_error", "code": 500}}, status_code=500)

    # the most a request body may hold: its prompts at a generous 64 bytes a token, a full queue of them, plus room
    # for the rest; read past that, one request held the event loop (every other client waited) and gigabytes
    body_limit = (1 << 20) + 64 * limits.max_prompt_tokens * limits.max_queue

    async def body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > body_limit:
            raise ServingError(413, f"the request body is {int(declared)} bytes, over the server's {body_limit} "
                                    "(--max-prompt-tokens and --max-queue set it)")
        raw = bytearray()  # (bytes += would copy the whole body on every chunk)
        async for chunk in request.stream():  # counted as it arrives: a body without a length is bounded too
            raw += chunk
            if len(raw) > body_limit:
                raise ServingError(413, f"the request body is over the server's {body_limit} bytes "
                                        "(--max-prompt-tokens and --max-queue set it)")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServingError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ServingError(400, "the request body must be a JSON object")
        return data

    def unknown_model(name) -> ServingError:
        return ServingError(404, f"unknown model {name!r}; known: {[served_name, *sorted(engine.registry.names())]}",
                            "not_found_error")

    def adapter_of(data: dict) -> str | None:
        name = data.get("model")
        if name is None or name == served_name:
            return None
        if not isinstance(name, str):
            raise unknown_model(name)
        try:  # a use of the adapter, now: the LRU must not evict it as unused while the request waits in the queue
            engine.registry.get(name)
        except UnknownAdapterError:
            raise unknown_model(name) from None
        return name

    def integer(data: dict, key: str, default: int, low: int, high: int) -> int:
        value = default if data.get(key) is None else data[key]  # null means the default, as OpenAI reads it
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ServingError(400, f"{key} must be an integer in {low}..{high}, got {value!r}")
        return value

    def prompt_ids(text: str) -> list[int]:
        if not isinstance(text, str):
            raise ServingError(400, "the prompt must be a string")
        # a text far past the limit is refused from its head's tokens, not tokenised whole on the event loop
        head = text[:64 * (limits.max_prompt_tokens + 1)]
        ids = engine.tokenizer(head, add_special_tokens=False)["input_ids"]
        if len(head) < len(text) and len(ids) <= limits.max_prompt_tokens:  # tokens of 64+ characters: all of it
            ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > limits.max_prompt_tokens:
            counted = f"{len(ids)}" if len(head) == len(text) else f"at least {len(ids)}"
            raise ServingError(400, f"the prompt has {counted} tokens, over the limit of {limits.max_prompt_tokens} "
                                    "(--max-prompt-tokens)")
        return ids or [engine.tokenizer.eos_token_id or 0]

    def submit(request) -> None:
        try:
            scheduler.submit(request)
        except QueueFull as exc:
            raise ServingError(429, str(exc), "rate_limit_error") from None
        queue_depth.set(scheduler.waiting)

    def check_input_count(count: int) -> None:
        """A call of more inputs than the queue holds could never be served: 400, not 429 (which clients retry)."""
        if count > limits.max_queue:
            raise ServingError(400, f"this call holds {count} inputs and the server queues at most "
                                    f"{limits.max_queue} (--max-queue): send at most {limits.max_queue} per call")

    def submit_all(requests: list) -> None:
        """Submit requests that answer one call: if one is refused, the ones already queued are cancelled."""
        check_input_count(len(requests))
        try:
            for r in requests:
                submit(r)
        except ServingError:
            for r in requests:
                r.cancelled = True
            raise

    async def wait_all(requests: list, http: Request | None = None) -> list[dict]:
        """The results of requests that answer one call, all within one timeout (they run side by side); when one
        fails, the others are cancelled: nobody reads their answers any more."""
        deadline = time.monotonic() + limits.timeout_s
        try:
            return [await wait(r, deadline, http) for r in requests]
        except ServingError:
            for r in requests:
                r.cancelled = True
            raise

    async def wait(request, deadline: float | None = None, http: Request | None = None):
        """The request's result, awaited on the event loop: no worker thread is held for it (a thread per waiting
        request would exhaust the pool that /health and /metrics need). With ``http``, a client that went away
        cancels the request (the scheduler frees its row at the next step)."""
        deadline = time.monotonic() + limits.timeout_s if deadline is None else deadline
        try:
            await _answered(request, deadline, http)
            return request.future.result(timeout=0)
        except FutureTimeout:
            request.cancelled = True
            raise ServingError(504, f"the request did not finish within {limits.timeout_s:g} s", "timeout") from None
        except ClientGone:  # nobody reads this answer: it is logged and counted as the client's cancellation
            raise ServingError(499, "the client closed the connection before the answer", "cancelled") from None
        except UnknownAdapterError as exc:
            raise ServingError(404, str(exc), "not_found_error") from None
        except (AdapterError, ValueError) as exc:
            raise ServingError(400, str(exc)) from None
        except Exception as exc:  # the model failed on this batch: a JSON error (and a stream's error event)
            raise ServingError(500, f"the request failed: {type(exc).__name__}: {exc}", "server_error") from None

    def streamed(data: dict) -> bool:
        value = data.get("stream")
        if value is not None and not isinstance(value, bool):  # "false", a non-empty string, would stream
            raise ServingError(400, f"stream must be true or false, got {value!r}")
        return bool(value)

    def generation(data: dict, text: str) -> GenerationRequest:
        # Every field is checked here, before the request joins a batch: a value that failed inside the scheduler
        # would fail the whole running batch, other clients' requests included.
        if data.get("n") not in (None, 1):  # one choice per prompt: more would be silently missing
            raise ServingError(400, f"n must be 1 (CPET answers one choice per prompt), got {data.get('n')!r}")
        for key, neutral in UNSUPPORTED_FIELDS.items():  # a field that would change the answer is not ignored
            if data.get(key) not in (None, *neutral):
                raise ServingError(400, f"{key} is not supported by CPET's server (got {data[key]!r}); leave it out "
                                        f"or send {neutral[0]!r}")
        stop = [] if data.get("stop") is None else data["stop"]  # `or []` would let 0, false or {} pass as "none"
        stop = [stop] if isinstance(stop, str) else stop  # OpenAI's API takes one string or a list of them
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ServingError(400, f"stop must be a string or a list of non-empty strings, got {stop!r}")
        # as OpenAI's API: every stop string is checked at every decoded token of the shared batch's thread
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ServingError(400, f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                                    f"characters, got {len(stop)} of up to {max(map(len, stop))}")
        temperature = 0.0 if data.get("temperature") is None else data["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ServingError(400, f"temperature must be in [0, 2], got {temperature!r}")
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64):
            raise ServingError(400, f"seed must be an integer in 0..2**64-1 (torch's generator range), got {seed!r}")
        if data.get("max_tokens") is not None and data.get("max_completion_tokens") is not None:
            raise ServingError(400, "give max_tokens or max_completion_tokens (its newer name), not both")
        key = "max_tokens" if data.get("max_completion_tokens") is None else "max_completion_tokens"
        # the default (16, as OpenAI's legacy completions) stays within the server's --max-tokens: a client that
        # leaves max_tokens out must not get a 400 for a value it never sent
        ids, max_tokens = prompt_ids(text), integer(data, key, min(16, limits.max_tokens), 1, limits.max_tokens)
        try:  # past the context, a model with learned positions fails the whole batch (IndexError)
            engine.check_generation_fits(len(ids), max_tokens)
        except ValueError as exc:
            raise ServingError(400, str(exc)) from None
        return GenerationRequest(ids, adapter_of(data), max_tokens, float(temperature), seed, tuple(stop))

    def stream(http: Request, request: GenerationRequest, chunk, observed: tuple[str, str, float]):
        """The request's text as server-sent events; ``observed`` (adapter, kind, start) labels its latency, which
        a stream that ends normally records as a non-streamed answer does."""
        async def events():
            # The status line has gone out with the first chunk, so a failure from here on is told as an error
            # event (OpenAI's stream format), and the request gives up its batch slot.
            try:
                async for piece in pieces(http, request, limits.timeout_s):
                    yield f"data: {json.dumps(chunk(piece, None))}\n\n"
                if request.cancelled:  # the client left: nobody reads the end
                    return
                result = await wait(request)
            except queue.Empty:
                request.cancelled = True
                error = ServingError(504, f"no new token within {limits.timeout_s:g} s", "timeout")
            except ServingError as exc:
                request.cancelled = True
                error = exc
            else:
                adapter, kind, start = observed  # answered: recorded before the client can read the end
                latency.labels(adapter, kind).observe(time.perf_counter() - start)
                yield f"data: {json.dumps(chunk('', result['finish_reason']))}\n\n"
                yield "data: [DONE]\n\n"
                return
            finally:  # closed mid-stream (the ASGI server cancelled the response): free the row all the same
                if not request.future.done():
                    request.cancelled = True
            errors.labels(str(error.status)).inc()
            detail = {"message": error.message, "type": error.kind, "code": error.status}
            yield f"data: {json.dumps({'error': detail})}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok", "base_id": engine.base_id, "adapters": len(engine.registry),
                "running": len(scheduler.running), "queued": scheduler.waiting}

    @app.get("/metrics")
    async def prometheus():
        queue_depth.set(scheduler.waiting)
        return PlainTextResponse(generate_latest(metrics).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": served_name, "object": "model", "created": created, "owned_by": "cpet", "root": served_name}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "cpet", "root": served_name,
                  "parent": served_name} for name in sorted(engine.registry.names())]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        data = await body(request)
        prompts = data.get("prompt", "")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts:
            raise ServingError(400, "prompt must be a string or a non-empty list of strings")
        model, start, rid = data.get("model", served_name), time.perf_counter(), f"cmpl-{uuid.uuid4().hex[:24]}"
        if not all(isinstance(p, str) for p in prompts):  # token arrays are not taken
            raise ServingError(400, "prompt must be a string or a non-empty list of strings")
        check_input_count(len(prompts))  # before any prompt is tokenised
        requests = [generation(data, p) for p in prompts]
        if streamed(data):
            if len(requests) != 1:
                raise ServingError(400, "streaming takes one prompt")
            submit(requests[0])
            return stream(request, requests[0], lambda text, reason: {
                "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]},
                (str(model), "completion", start))
        submit_all(requests)
        results = await wait_all(requests, request)
        latency.labels(str(model), "completion").observe(time.perf_counter() - start)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                            for i, r in enumerate(results)],
                "usage": _usage(results)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        data = await body(request)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ServingError(400, "messages must be a non-empty list of {role, content} objects")
        model, start, rid = data.get("model", served_name), time.perf_counter(), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            text = chat_prompt(engine.tokenizer, messages)
        except TemplateError as exc:  # the model's template refuses these messages (a system role, alternation)
            raise ServingError(400, f"the model's chat template refuses these messages: {exc}") from None
        r = generation(data, text)
        if streamed(data):  # checked before the request is queued: a refused call must not generate anyway
            submit(r)
            return stream(request, r, lambda text, reason: {
                "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": text} if text else {},
                             "finish_reason": reason}]}, (str(model), "chat", start))
        submit(r)
        result = await wait(r, http=request)
        latency.labels(str(model), "chat").observe(time.perf_counter() - start)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"]}],
                "usage": _usage([result])}

    @app.post("/v1/classify")
    async def classify(request: Request):
        data = await body(request)
        name = adapter_of(data)
        if name is None:
            raise ServingError(400, "classification needs an adapter in model (the bare base has no labels)")
        try:  # checked here: in the scheduler it would fail the whole batch
            engine.classifier_meta(name)
        except UnknownAdapterError:  # unloaded, or evicted by another call's load, since adapter_of found it: the
            raise unknown_model(name) from None  # model is not there, a 404 as adapter_of's (a KeyError: else a 500)
        except ValueError as exc:
            raise ServingError(400, str(exc)) from None
        texts = data.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ServingError(400, "input must be a string or a non-empty list of strings")
        # no token limit (only the body's bytes): the text is cut as the adapter was trained (PromptTemplate's
        # characters, then the adapter's own max_prompt_tokens, the text losing its end), as `cpet eval` scores it
        start = time.perf_counter()
        check_input_count(len(texts))
        requests = [ClassifyRequest(name, text) for text in texts]
        submit_all(requests)
        results = await wait_all(requests, request)
        latency.labels(name, "classify").observe(time.perf_counter() - start)
        return {"object": "list", "model": name, "data": [{"index": i, **r} for i, r in enumerate(results)]}

    def admin(request: Request) -> None:
        if api_key is None:
            raise ServingError(403, "runtime adapter loading is off: start the server with --api-key", "permission")
        if request.headers.get("authorization") != f"Bearer {api_key}":
            raise ServingError(401, "this call needs the server's bearer token (Authorization: Bearer ...)",
                               "authentication_error")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        admin(request)
        data = await body(request)
        name, path = data.get("lora_name"), data.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise ServingError(400, "give lora_name and lora_path (strings)")
        if name == served_name:
            raise ServingError(400, f"{name!r} is the base's name")
        try:
            start = time.perf_counter()
            adapter = await _in_thread(engine.registry.load, name, path)
        except AdapterError as exc:
            raise ServingError(400, str(exc)) from None
        except OSError as exc:  # an unreadable file: the caller's path, not the server, is at fault
            raise ServingError(400, f"cannot read adapter {path}: {exc}") from None
        return {"lora_name": name, "rank": adapter.rank, "modules": len(adapter.lora),
                "load_ms": (time.perf_counter() - start) * 1000}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        admin(request)
        data = await body(request)
        if not isinstance(data.get("lora_name"), str):
            raise ServingError(400, "give lora_name (a string)")
        try:
            engine.registry.unload(data.get("lora_name"))
        except UnknownAdapterError as exc:
            raise ServingError(404, str(exc), "not_found_error") from None
        return {"lora_name": data.get("lora_name"), "unloaded": True}

    return app


STREAM_POLL_S = 0.02  # how often a stream with no new token looks at its queue and at the client


async def pieces(http: Request, request: GenerationRequest, timeout_s: float):
    """The text pieces of a streamed ``request`` as the scheduler sends them, until its end (or its error).

    Before each piece it asks the ASGI server whether the client is still there: when it is gone the request is
    cancelled (the scheduler frees its batch slot at the next step) and the pieces stop. Starlette cancels a
    stream itself where the server reports the disconnect to ``receive`` (ASGI spec < 2.4, uvicorn's HTTP today);
    from spec 2.4 on it waits for a send to fail, which a server need not do, so the stream checks too. Polling
    the scheduler's queue, instead of blocking on it in a worker thread, keeps the event loop free and lets a
    cancellation close the stream at once.
    Raises ``queue.Empty`` when no piece came within ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if await http.is_disconnected():
            request.cancelled = True
            return
        try:
            piece = request.events.get_nowait()
        except queue.Empty:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(STREAM_POLL_S)
            continue
        if piece is None:
            return
        deadline = time.monotonic() + timeout_s
        yield piece


WAIT_POLL_S = 0.1  # how often a non-streamed request's wait looks at the client


class ClientGone(Exception):
    """The client of a non-streamed request closed its connection before the answer."""


async def _answered(request, deadline: float, http: Request | None) -> None:
    """Return once ``request.future`` is done; ``concurrent.futures.TimeoutError`` at ``deadline`` (monotonic
    seconds); :class:`ClientGone`, the request cancelled, when the client went away (``http``). The future is
    wrapped, never cancelled, so the scheduler can always set its result."""
    waiter = asyncio.wrap_future(request.future)
    # a waiter left behind (timeout, client gone) may still get the request's error: read it when it comes, or
    # asyncio logs "Future exception was never retrieved" for every failed request
    waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
    while not waiter.done():
        left = deadline - time.monotonic()
        if left <= 0:
            raise FutureTimeout()
        await asyncio.wait({waiter}, timeout=min(left, WAIT_POLL_S))  # never cancels the waiter itself
        if not waiter.done() and http is not None and await http.is_disconnected():
            request.cancelled = True
            raise ClientGone()


async def _in_thread(func, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(func, *args)


def _usage(results: list[dict]) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The tokenizer's chat template when it has one, else ``role: content`` lines and ``assistant:``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in messages) + "assistant:"


def serve_in_thread(app, host: str = "127.0.0.1") -> tuple[str, "callable"]:
    """Run ``app`` with uvicorn on a free port in a background thread (tests, benchmarks): returns its URL, once it
    answers ``/health``, and a function that stops it."""
    import socket
    import threading

    import httpx
    import uvicorn

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return url, stop


__all__ = ["create_app", "ServerLimits", "chat_prompt", "serve_in_thread"]
