"""The HTTP side: OpenAI's routes over the decoding loop, every refusal in OpenAI's error shape, and `serve`.

Handlers validate a request, encode its prompt and resolve its settings (a mistake is a 400 that never reaches
the batch), submit it to the scheduler and relay its events: one JSON body, or server-sent events ending with
`data: [DONE]`. A client that goes away cancels its job, whether it was streaming or waiting for a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import secrets
import signal
import socket
import sys
import threading
import time
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from layerskip import api
from layerskip.distributed import rank, world_size
from layerskip.errors import LayerSkipError
from layerskip.generation import GenerationConfig
from layerskip.generation.config import check_batching
from layerskip.loading import LoadedModel
from layerskip.serve import replicas
from layerskip.serve.metrics import ServerMetrics
from layerskip.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest, Reply
from layerskip.serve.scheduler import Delta, Finished, Job, Refused, Scheduler

DEFAULT_MAX_MODEL_LEN = 2048  # a KV cache row per slot of this many tokens, unless the model's context is shorter
CANCEL_BACKSTOP_SECONDS = 5  # after the grace period and the loop's own ending, uvicorn cancels what still runs
RETRY_AFTER_SECONDS = 1
API_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How the server listens and how much it takes on; checked on construction (before the model loads)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8      # sequences decoding together
    max_queue: int = 64          # requests waiting beyond a full batch; more get 429
    max_model_len: int | None = None  # prompt + new tokens of a request; None: DEFAULT_MAX_MODEL_LEN or the context
    api_key: str | None = None   # required as `Authorization: Bearer <key>` on /v1 when set
    max_speculative_batch: int | None = None  # BatchEngine's; None: the model's stored value
    prefill_chunk: int = 256     # a longer prompt joins in rounds of this many tokens (0: in one), BatchEngine's
    max_body_bytes: int = 1 << 20
    shutdown_grace_seconds: float = 10.0  # running requests may finish this long after Ctrl-C / SIGTERM

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise LayerSkipError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_batch_size < 1:
            raise LayerSkipError(f"--max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue < 0:
            raise LayerSkipError(f"--max_queue must be at least 0, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise LayerSkipError(f"--max_model_len must be at least 2, got {self.max_model_len}")
        if self.api_key is not None and not self.api_key:
            raise LayerSkipError("--api_key must not be empty")
        if self.prefill_chunk < 0:
            raise LayerSkipError(f"--prefill_chunk must be >= 0 (0: a prompt in one pass), got {self.prefill_chunk}")
        check_batching(max_speculative_batch=self.max_speculative_batch)


def engine_settings(loaded: LoadedModel, settings: ServerSettings) -> dict[str, Any]:
    """The BatchEngine the server decodes with (every rank's alike under tensor parallelism)."""
    return dict(slots=settings.max_batch_size, capacity=model_len(loaded, settings),
                max_speculative_batch=api.speculative_batch_limit(loaded, settings.max_speculative_batch),
                prefill_chunk=settings.prefill_chunk)


def model_len(loaded: LoadedModel, settings: ServerSettings) -> int:
    context = loaded.config.max_position_embeddings
    if settings.max_model_len is None:
        return min(DEFAULT_MAX_MODEL_LEN, context)
    if settings.max_model_len > context:
        raise LayerSkipError(f"--max_model_len {settings.max_model_len} is over the context of model "
                             f"'{loaded.name}', {context} tokens")
    return settings.max_model_len


class Service:
    """The routes' work: a request to a job, and the job's events to a response."""

    def __init__(self, loaded: LoadedModel, options: dict[str, Any], scheduler: Scheduler, max_model_len: int):
        self.loaded, self.options, self.scheduler, self.max_model_len = loaded, options, scheduler, max_model_len
        self.started = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.loaded.name:
            raise APIError(404, f"model '{model}' is not served here; this server serves '{self.loaded.name}'",
                           param="model", code="model_not_found")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.loaded.name, "object": "model", "created": self.started, "owned_by": "layerskip",
                "max_model_len": self.max_model_len}

    def budget(self, body: GenerationRequest, prompt_tokens: int, prompt_field: str) -> int:
        """The request's new tokens: as asked, or the server's --max_steps cut to the context; within the context."""
        asked = body.max_new_tokens
        room = self.max_model_len - prompt_tokens
        if asked is None and room >= 1:
            return min(int(self.options["max_steps"]), room)
        if asked is not None and asked <= room:
            return asked
        if asked is None:
            problem = f"the prompt is {prompt_tokens} tokens, which leaves no room for new tokens in"
        else:
            problem = (f"the prompt is {prompt_tokens} tokens and max_tokens is {asked}: {prompt_tokens + asked} in "
                       "all, over")
        raise APIError(400, f"{problem} this server's context of {self.max_model_len} tokens: shorten the prompt"
                       + (" or lower max_tokens" if asked is not None else ""), param=prompt_field,
                       code="context_length_exceeded")

    def prompt_ids(self, body: GenerationRequest) -> list[int]:
        """Chat: the conversation through the model's chat template; text: the prompt as it is, or its token ids."""
        loaded = self.loaded
        if isinstance(body, ChatCompletionRequest):
            if not loaded.tokenizer.has_chat_template:
                raise APIError(400, f"model '{loaded.name}' has no chat template: use /v1/completions")
            return api.encode_prompt(loaded, body.conversation(), chat=True)
        if isinstance(body.prompt, str):
            return api.encode_prompt(loaded, body.prompt, chat=False)
        return api.encode_prompt(loaded, None, prompt_ids=body.prompt)

    async def complete(self, request: Request, body: GenerationRequest) -> Response:
        self.check_model(body.model)
        chat = isinstance(body, ChatCompletionRequest)
        loaded = self.loaded
        try:
            prompt_ids = self.prompt_ids(body)
            options = body.generation_options(self.options, self.budget(body, len(prompt_ids),
                                                                        "messages" if chat else "prompt"))
            config = GenerationConfig.from_options(options).resolved(loaded.config.num_hidden_layers, loaded.defaults,
                                                                     loaded.config.vocab_size)
            stops = api.stop_settings(loaded, config)
            job = self.scheduler.submit(prompt_ids, api.strategy_for(loaded, config), config.sampler(loaded.device),
                                        stops, stream=body.stream, config=config)
        except LayerSkipError as error:
            raise APIError.from_layerskip(error) from None
        except Refused as refusal:
            busy = refusal.status == 429
            raise APIError(refusal.status, str(refusal), code="queue_full" if busy else None,
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)} if busy else None) from None
        reply = Reply(chat=chat, model=loaded.name)
        if body.stream:
            return StreamingResponse(self.events(job, reply, body.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self.whole(request, job, reply)

    async def whole(self, request: Request, job: Job, reply: Reply) -> Response:
        """The job's result as one body; the job is cancelled if the client disconnects first."""
        watcher = asyncio.create_task(self.cancel_on_disconnect(request, job))
        try:
            event = await job.events.get()
        finally:
            watcher.cancel()
            self.scheduler.cancel(job)  # a no-op once it ended; else (this handler cancelled) frees its slot
        if not isinstance(event, Finished):
            raise APIError(event.status, event.message)
        return JSONResponse(reply.body(event.result))

    async def cancel_on_disconnect(self, request: Request, job: Job) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.scheduler.cancel(job)

    async def events(self, job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events of a job; the job is cancelled if the stream ends early (the client went away)."""
        try:
            if reply.chat:
                yield sse(reply.chunk("", role=True))
            while True:
                event = await job.events.get()
                if isinstance(event, Delta):
                    yield sse(reply.chunk(event.text))
                    continue
                if isinstance(event, Finished):
                    yield sse(reply.chunk(result=event.result))
                    if include_usage:
                        yield sse(reply.usage_chunk(event.result))
                else:
                    yield sse(APIError(event.status, event.message).body())
                break
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(job)


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def validation_error(error: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the first problem, named by its field."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    param = ".".join(str(part) for part in first["loc"] if part != "body") or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object"
    elif first["type"] == "extra_forbidden":
        message = f"unknown field '{param}'"
    elif first["type"] == "missing":
        message = f"'{param}' is required"
    elif param:
        message = f"{param}: {message}"
    return APIError(400, message, param=param)


class CountResponses:
    """requests_total{endpoint, status} for the API's endpoints, whatever answered (a route or a middleware)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in API_ENDPOINTS:
            return await self.app(scope, receive, send)

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint=scope["path"], status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


class RequireKey:
    """401 on /v1 without `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


class LimitBody:
    """413 for a request body over `limit` bytes, declared or sent; the body is read here and handed on whole."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        chunks, size, more = [], 0, True
        too_large = declared.isdigit() and int(declared) > self.limit
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away mid-body
            size += len(message.get("body", b""))
            too_large = too_large or size > self.limit
            if not too_large:  # past the limit the rest is read only to be dropped, so the client hears the 413
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        if too_large:
            error = APIError(413, f"the request body is over this server's limit of {self.limit} bytes",
                             code="request_too_large")
            return await error_response(error)(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(loaded: LoadedModel, options: dict[str, Any], settings: ServerSettings = ServerSettings(), *,
               decoding_thread: bool = True) -> FastAPI:
    """The server's ASGI app for a loaded model. `options`: the generation defaults (GenerationConfig options, as
    `layerskip generate` takes them); each request's own settings override them. The decoding loop runs from the
    app's startup to its shutdown, on a thread of its own; without `decoding_thread` the caller runs it
    (app.state.scheduler.run()), as serve() does."""
    if loaded.tokenizer is None:
        raise LayerSkipError(f"model '{loaded.name}' ships no tokenizer: the server needs one to read and write text")
    max_model_len = model_len(loaded, settings)
    GenerationConfig.from_options(options).resolved(loaded.config.num_hidden_layers, loaded.defaults,
                                                    loaded.config.vocab_size)  # bad defaults fail now, not per request
    metrics = ServerMetrics()
    scheduler = Scheduler(loaded.model, metrics, max_queue=settings.max_queue, **engine_settings(loaded, settings),
                          announce=replicas.announce if world_size() > 1 else None)
    service = Service(loaded, options, scheduler, max_model_len)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if decoding_thread:
            scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="layerskip", description="OpenAI-compatible completions on self-speculative decoding",
                  lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    @app.exception_handler(APIError)
    async def refused(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(error).__name__}"))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await service.complete(request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await service.complete(request, body)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.alive
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(LimitBody, limit=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(RequireKey, key=settings.api_key)
    app.add_middleware(CountResponses, metrics=metrics)  # outermost: it counts the others' refusals too
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a LayerSkipError saying why not (address in use, unknown host)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise LayerSkipError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


class Server(uvicorn.Server):
    """uvicorn's server for an app of create_app. On shutdown (Ctrl-C, SIGTERM, should_exit) running requests get
    the grace period to finish; then the decoding loop ends them itself, so each gets a 503 (a stream: an error
    event and [DONE]) instead of uvicorn cancelling its task (a traceback in the log)."""

    def __init__(self, app: FastAPI, settings: ServerSettings, **config: Any):
        grace = settings.shutdown_grace_seconds
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=math.ceil(grace) + CANCEL_BACKSTOP_SECONDS,
                                        **config))
        self.scheduler, self.grace = app.state.scheduler, grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        async def end_requests_after_grace() -> None:
            await asyncio.sleep(self.grace)
            await asyncio.to_thread(self.scheduler.stop)

        ending = asyncio.create_task(end_requests_after_grace())
        try:
            await super().shutdown(sockets)  # returns once every connection closed
        finally:
            ending.cancel()


def serve(loaded: LoadedModel, options: dict[str, Any], settings: ServerSettings) -> None:
    """Serve until Ctrl-C or SIGTERM: HTTP on a thread of its own, the decoding loop on this thread, the one that
    loaded the model (Scheduler says why). Under torchrun rank 0 serves, and the others replay its engine calls
    (replicas.py)."""
    if rank() > 0:
        replicas.follow(loaded, engine_settings(loaded, settings))
        return
    app = create_app(loaded, options, settings, decoding_thread=False)
    scheduler: Scheduler = app.state.scheduler
    sock = listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    server = Server(app, settings, log_level="info")

    def run_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            scheduler.stop()  # the HTTP side is gone (shut down, or failed to start): so is the loop

    http = threading.Thread(target=run_http, name="layerskip-http")
    handlers = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        print(f"layerskip: serving {loaded.name} on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr,
              flush=True)
        scheduler.run()
    finally:
        server.should_exit = True  # a loop that failed takes the HTTP side down with it
        http.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
