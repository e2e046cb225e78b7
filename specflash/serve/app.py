"""The HTTP API: an OpenAI-compatible FastAPI app over one `Engine`.

Routes: POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET
/v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus text). With an
API key, /v1/* needs `Authorization: Bearer <key>`; /health and /metrics stay open
for probes and scrapers. Every error body has the OpenAI shape; user mistakes are
4xx, never 500.

The event loop only moves bytes: a request body is read up to `max_body_bytes` (the
bytes that arrive, whatever Content-Length says), then parsed, checked and tokenized
on a worker thread, after cheap bounds on its size (`max_messages`,
`max_prompt_chars`), so that one large request never holds up the others.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..runtime.config import DecodeConfig
from ..errors import SpecflashError
from ..runtime.pipeline import Pipeline
from . import protocol as P
from .engine import Engine, Job, QueueFullError
from .stats import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger("specflash.serve")


@dataclass
class ServeSettings:
    model_name: str  # the id clients send as `model` and /v1/models lists
    draft: str = "none"
    aliases: tuple[str, ...] = ()  # more accepted `model` values
    api_key: str | None = None
    max_concurrency: int = 8
    max_queue: int = 256
    default_max_tokens: int = 512
    torch_threads: int | None = None  # intra-op threads of the decoding thread (None: leave as is)
    max_body_bytes: int = 4 * 1024 * 1024  # request bodies, counted as they arrive (413 beyond)
    max_messages: int = 4096  # messages of one chat request
    # Characters of one prompt (chat: all message contents together); None: CHARS_PER_TOKEN
    # per token of the model's context, more than any prompt that fits in it.
    max_prompt_chars: int | None = None
    # True: each request in its own target forward, round-robin (`serve --exact`: exactly
    # the solo tokens); False: one batched forward per step for every running request.
    exact: bool = False
    prefill_chunk: int = 128  # batched: most prompt tokens a request prefills per step


CHARS_PER_TOKEN = 16  # English averages about 4 characters per token, code about 3


def prompt_char_limit(settings: ServeSettings, max_context: int) -> tuple[int, str]:
    """The prompt character limit and how it was set, for error messages."""
    if settings.max_prompt_chars is not None:
        return settings.max_prompt_chars, "the server's --max-prompt-chars"
    return CHARS_PER_TOKEN * max_context, f"{CHARS_PER_TOKEN} per token of the model's {max_context:,}-token context"


class BodyTooLarge(StarletteHTTPException):
    """A request body past the limit, raised while it is being read."""

    def __init__(self, limit: int, size: int | None = None):
        if size is None:
            message = f"the request body is larger than this server's limit of {limit:,} bytes (serve --max-body-mb)"
        else:
            message = (f"the request body has {size:,} bytes; this server's limit is {limit:,} bytes "
                       "(serve --max-body-mb)")
        super().__init__(413, message)


class SSEResponse(StreamingResponse):
    """Server-sent events that stop (and run the generator's cleanup) as soon as the
    client disconnects, whatever ASGI spec version the server speaks."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away while we were sending
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
            group.cancel_scope.cancel()


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(pipe: Pipeline, settings: ServeSettings, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app; the engine's worker thread starts and stops with the app."""
    metrics = engine.metrics if engine is not None else ServerMetrics(pipe.block_size)
    engine = engine or Engine(pipe, settings.max_concurrency, settings.max_queue, metrics, settings.torch_threads,
                              batched=not settings.exact, prefill_chunk=settings.prefill_chunk)
    target = pipe.target
    created = P.now()
    names = {settings.model_name, *settings.aliases}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="specflash", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)
    app.state.engine = engine
    app.state.settings = settings

    # ------------------------------------------------------------ errors
    def error_response(err: P.ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(P.ApiError)
    async def _api_error(request: Request, exc: P.ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(P.validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: f"no route {request.method} {request.url.path}",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        message = messages.get(exc.status_code, str(exc.detail))
        codes = {404: "not_found", 413: "request_too_large"}
        return JSONResponse(P.error_body(message, code=codes.get(exc.status_code)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    # ---------------------------------------------------------- helpers
    def check_model(model: str | None) -> None:
        if model is not None and model not in names:
            raise P.ApiError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r}",
                             param="model", code="model_not_found")

    max_chars, chars_note = prompt_char_limit(settings, target.max_context)

    def encode(prompt: str | list[dict[str, str]] | list[int], chat: bool, param: str) -> list[int]:
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            return list(prompt)  # token ids
        try:
            with engine.tokenizer_lock:
                return pipe.encode(prompt, chat=chat)
        except SpecflashError as exc:
            raise P.bad(param, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template that rejects the roles
            raise P.bad(param, f"the {param} could not be tokenized: {type(exc).__name__}: {exc}") from None

    def prepare(raw: bytes, chat: bool) -> tuple[P.Sampling, list[int], DecodeConfig]:
        """Parse, check and tokenize one request (on a worker thread: this is the slow part)."""
        body = P.parse_json(raw)
        if chat:
            P.check_message_count(body, settings.max_messages)
            req = P.parse_request(P.ChatCompletionRequest, body)
        else:
            req = P.parse_request(P.CompletionRequest, body)
        check_model(req.model)
        sampling = P.check_sampling(req)
        if chat:
            param = "messages"
            prompt = P.chat_messages(req, max_chars, chars_note)
        else:
            param = "prompt"
            prompt = P.completion_prompt(req, target.vocab_rows, max_chars, chars_note)
        prompt_ids = encode(prompt, chat, param)
        max_tokens = P.resolve_max_tokens(sampling, len(prompt_ids), target.max_context,
                                          settings.default_max_tokens, param)
        try:
            config = DecodeConfig(max_new_tokens=max_tokens, temperature=sampling.temperature,
                                  top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed)
        except SpecflashError as exc:
            raise P.bad(None, str(exc)) from None
        return sampling, prompt_ids, config

    async def accept(request: Request, chat: bool) -> tuple[P.Sampling, list[int], Job]:
        """Read the body, prepare it off the event loop, queue the job."""
        chunks = []
        try:
            async for chunk in request.stream():  # GuardMiddleware stops it past max_body_bytes
                chunks.append(chunk)
        except ClientDisconnect:
            raise P.ApiError(400, "the client went away before sending the whole body") from None
        sampling, prompt_ids, config = await run_in_threadpool(prepare, b"".join(chunks), chat)
        job = Job(prompt_ids, config, sampling.stop, loop=asyncio.get_running_loop())
        submit(job)
        return sampling, prompt_ids, job

    def submit(job: Job) -> None:
        if not engine.alive:
            raise P.ApiError(503, "the decoding worker is not running", code="unavailable")
        try:
            engine.submit(job)
        except QueueFullError as exc:
            raise P.ApiError(503, f"the server is busy ({exc}); retry later", code="server_busy",
                             headers={"Retry-After": "1"}) from None

    def spec_stats(job: Job) -> dict[str, Any]:
        return {"draft": settings.draft, "block_size": pipe.block_size, "verify_steps": job.verify_steps,
                "drafted_tokens": job.drafted, "accepted_tokens": job.accepted,
                "acceptance_rate": job.accepted / job.drafted if job.drafted else None, "mean_tau": job.tau}

    async def collect(job: Job, request: Request) -> None:
        """Wait for `job` to finish; cancel it if the client goes away meanwhile."""

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)
            engine.cancel(job)

        watcher = asyncio.ensure_future(watch())
        try:
            async for event in job.events():
                if event.error is not None:
                    raise P.ApiError(event.status, event.error)
        finally:
            watcher.cancel()
            engine.cancel(job)  # a no-op when the job finished

    async def stream_events(job: Job, make_chunk, first_chunk: dict | None, include_usage: bool,
                            usage_chunk) -> AsyncIterator[str]:
        try:
            if first_chunk is not None:
                yield _sse(first_chunk)
            async for event in job.events():
                if event.error is not None:
                    yield _sse(P.error_body(event.error, "server_error" if event.status >= 500
                                            else "invalid_request_error"))
                    break
                if event.text or event.finish_reason is not None:
                    chunk = make_chunk(event.text, event.finish_reason)
                    if event.finish_reason is not None:
                        chunk["speculative"] = spec_stats(job)
                    yield _sse(chunk)
            if include_usage and job.finish_reason in ("stop", "length"):
                yield _sse(usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(job)  # a no-op when the job finished; frees the slot when the client left

    # ----------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "down", "model": settings.model_name,
                "running": engine.num_running, "waiting": engine.num_waiting}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "specflash",
                "max_model_len": target.max_context, "draft": settings.draft, "block_size": pipe.block_size}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        sampling, prompt_ids, job = await accept(request, chat=True)
        rid, ts, model = P.new_id("chatcmpl"), P.now(), settings.model_name

        if sampling.stream:
            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                delta = {"content": text} if text else {}
                return {"id": rid, "object": "chat.completion.chunk", "created": ts, "model": model,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            first = {"id": rid, "object": "chat.completion.chunk", "created": ts, "model": model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}

            def usage_chunk() -> dict[str, Any]:
                return {"id": rid, "object": "chat.completion.chunk", "created": ts, "model": model, "choices": [],
                        "usage": P.usage(len(prompt_ids), job.num_tokens)}

            return SSEResponse(stream_events(job, chunk, first, sampling.include_usage, usage_chunk))

        await collect(job, request)
        return {"id": rid, "object": "chat.completion", "created": ts, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text}, "logprobs": None,
                             "finish_reason": job.finish_reason}],
                "usage": P.usage(len(prompt_ids), job.num_tokens), "speculative": spec_stats(job)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        sampling, prompt_ids, job = await accept(request, chat=False)
        rid, ts, model = P.new_id("cmpl"), P.now(), settings.model_name

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": ts, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if sampling.stream:
            def usage_chunk() -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": ts, "model": model, "choices": [],
                        "usage": P.usage(len(prompt_ids), job.num_tokens)}

            return SSEResponse(stream_events(job, chunk, None, sampling.include_usage, usage_chunk))

        await collect(job, request)
        response = chunk(job.text, job.finish_reason)
        response["usage"] = P.usage(len(prompt_ids), job.num_tokens)
        response["speculative"] = spec_stats(job)
        return response

    return app


ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


class GuardMiddleware:
    """Plain ASGI middleware (it must not buffer or wrap the event streams): refuses
    bodies over the size limit (413: at once when Content-Length says so, else as soon
    as the bytes read pass it, chunked bodies included) and /v1/* requests without the
    API key (401), and counts every answer by route and status."""

    def __init__(self, app, settings: ServeSettings, metrics: ServerMetrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def send_counting(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        limit = self.settings.max_body_bytes
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length", "")
        error = None
        if length.isdigit() and int(length) > limit:
            error = P.ApiError(413, str(BodyTooLarge(limit, int(length)).detail), code="request_too_large")
        elif path.startswith("/v1/") and self.settings.api_key and \
                not _authorized(headers.get("authorization", ""), self.settings.api_key):
            error = P.ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        try:
            if error is not None:
                response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
                await response(scope, receive, send_counting)
            else:
                await self.app(scope, receive_limited, send_counting)
        finally:
            self.metrics.http_requests.labels(route=route, status=status["code"]).inc()


def _authorized(header: str, api_key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
