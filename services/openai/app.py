"""The gateway's HTTP API (FastAPI): OpenAI's chat/completions, completions, embeddings and models,
each a call to the router's gRPC API (Generate / GenerateUnary / Embed) or the registry's Watch feed.

Errors leave as OpenAI error bodies with the HTTP status matching the router's gRPC status
(errors.py). A streamed completion first waits for the router's first message, so a bad request is a
plain 4xx answer, not a stream; errors after that arrive as one `data: {"error": …}` event. A client
that goes away mid-stream cancels the router call (Starlette cancels the body, `finally` cancels it);
one that goes away while a unary completion is generated cancels it too (Gateway.unary).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.exceptions import HTTPException as StarletteHTTPException

from maas.v1 import router_pb2, router_pb2_grpc
from services.openai import convert
from services.openai.catalog import ModelCatalog
from services.openai.config import GatewayConfig
from services.openai.errors import OpenAIError, from_grpc, invalid
from services.openai.observability import INFLIGHT_STREAMS, TOKENS, Observability
from services.openai.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from services.shared.channels import open_channel

log = logging.getLogger(__name__)
_HEALTH_TIMEOUT = 2.0


def _json(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


# Request headers handed on to the router as gRPC metadata: the tenant's key and its priority class.
FORWARDED_HEADERS = ("authorization", "x-maas-priority")


def forwarded_metadata(http: Request) -> tuple[tuple[str, str], ...]:
    return tuple((name, http.headers[name]) for name in FORWARDED_HEADERS if name in http.headers)


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content', 'str') → 'messages[0].content' (pydantic's union tags dropped)."""
    parts = ""
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            parts += f"[{item}]"
        elif item[:1].islower() and not any(c in item for c in "[-(") and item not in ("str", "int", "float", "bool"):
            parts += f".{item}" if parts else item
    return parts or None


def errors_to_openai(handler):
    """Every endpoint: router statuses and our own errors as OpenAI bodies; a bug is a 500 with an incident id."""

    @functools.wraps(handler)
    async def guarded(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except OpenAIError as exc:
            return _json(exc)
        except grpc.aio.AioRpcError as exc:
            return _json(from_grpc(exc.code(), exc.details(), exc.trailing_metadata()))
        except Exception:  # the caller gets an incident id, the log the traceback
            incident = uuid.uuid4().hex[:12]
            log.exception("unhandled error", extra={"incident": incident})
            return _json(OpenAIError(500, f"internal error (incident {incident})", type="server_error"))

    return guarded


class Gateway:
    """The router and registry channels and what the endpoints do with them."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.router_channel = open_channel(config.router, config.server.max_message_bytes, config.server.tls)
        self.registry_channel = open_channel(config.registry, config.server.max_message_bytes, config.server.tls)
        self.router = router_pb2_grpc.RouterStub(self.router_channel)
        self.health = health_pb2_grpc.HealthStub(self.router_channel)
        self.catalog = ModelCatalog(self.registry_channel)

    async def close(self) -> None:
        await self.catalog.stop()
        await self.router_channel.close()
        await self.registry_channel.close()

    async def unary(self, request: router_pb2.GenerateRequest, http: Request) -> router_pb2.GenerateResponse:
        """GenerateUnary, cancelled when the HTTP client goes away first (its sequence slot is freed)."""
        call = self.router.GenerateUnary(
            request, timeout=self.config.default_timeout, metadata=forwarded_metadata(http)
        )
        answer, gone = asyncio.ensure_future(_result(call)), asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                call.cancel()
                raise OpenAIError(499, "the client went away", type="cancelled", code="cancelled")
            response = answer.result()
        finally:
            gone.cancel()
            answer.cancel()
        _count_tokens(response.routed.model, response.usage)
        return response

    async def stream(
        self, request: router_pb2.GenerateRequest, kind: str, include_usage: bool, metadata: tuple = ()
    ) -> StreamingResponse:
        call = self.router.Generate(request, timeout=self.config.default_timeout, metadata=metadata)
        messages = call.__aiter__()
        try:
            first = await anext(messages, None)
        except BaseException:
            call.cancel()
            raise
        if first is None:
            raise OpenAIError(502, "the router ended the stream without an answer", type="server_error")
        body = self._events(call, messages, first, convert.StreamChunks(kind, include_usage))
        return StreamingResponse(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @staticmethod
    async def _events(call, messages, message, chunks: convert.StreamChunks):
        INFLIGHT_STREAMS.inc()
        try:
            yield _sse(chunks.first(message.routed))
            finish, usage = 0, None
            while message is not None:
                if message.text:
                    yield _sse(chunks.text(message.text))
                finish = message.finish_reason or finish
                if message.HasField("usage"):
                    usage = message
                message = await anext(messages, None)
            yield _sse(chunks.finish(finish))
            if usage is not None:
                _count_tokens(chunks.routed_model, usage.usage)
                if chunks.include_usage:
                    yield _sse(chunks.usage(usage.usage))
            yield b"data: [DONE]\n\n"
        except grpc.aio.AioRpcError as exc:
            yield _sse(from_grpc(exc.code(), exc.details()).body())
        finally:
            call.cancel()  # a no-op when the stream ended; stops generation when the client went away
            INFLIGHT_STREAMS.dec()

    async def ready(self) -> bool:
        try:
            answer = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=_HEALTH_TIMEOUT)
        except grpc.aio.AioRpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING


async def _result(call):
    return await call


async def _disconnected(http: Request) -> None:
    """Returns when the client disconnects (the body was read already: the next message says so)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _count_tokens(model: str, usage: router_pb2.Usage) -> None:
    TOKENS.labels(model or "unknown", "prompt").inc(usage.prompt_tokens)
    TOKENS.labels(model or "unknown", "completion").inc(usage.completion_tokens)


def create_app(config: GatewayConfig) -> FastAPI:
    state: dict[str, Gateway] = {}

    @asynccontextmanager
    async def lifespan(_app):
        gateway = state["gateway"] = Gateway(config)  # channels belong to the serving event loop
        gateway.catalog.start()
        try:
            yield
        finally:
            await gateway.close()

    # FastAPI's own OpenTelemetry spans/metrics (newer versions) off: Observability does it for every route,
    # the same way across versions, and one server span per request is enough.
    app = FastAPI(
        title="MaaS Mesh OpenAI-compatible API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _json(invalid(None, f"the request body is not valid JSON: {first.get('msg', '')}"))
        param = _param(tuple(first.get("loc", ())))
        return _json(invalid(param, first.get("msg", "invalid request")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _json(OpenAIError(exc.status_code, str(exc.detail), type=kind))

    @app.post("/v1/chat/completions")
    @errors_to_openai
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        request = convert.chat_request(body, config.default_chat_model)
        gateway = state["gateway"]
        if body.stream:
            return await gateway.stream(
                request,
                "chat",
                bool(body.stream_options and body.stream_options.include_usage),
                forwarded_metadata(http),
            )
        return JSONResponse(convert.chat_response(await gateway.unary(request, http)))

    @app.post("/v1/completions")
    @errors_to_openai
    async def completions(body: CompletionRequest, http: Request):
        request = convert.completion_request(body, config.default_chat_model)
        gateway = state["gateway"]
        if body.stream:
            return await gateway.stream(
                request,
                "text",
                bool(body.stream_options and body.stream_options.include_usage),
                forwarded_metadata(http),
            )
        return JSONResponse(convert.completion_response(await gateway.unary(request, http)))

    @app.post("/v1/embeddings")
    @errors_to_openai
    async def embeddings(body: EmbeddingRequest, http: Request):
        request = convert.embed_request(body, config.default_embedding_model)
        response = await state["gateway"].router.Embed(
            request, timeout=config.default_timeout, metadata=forwarded_metadata(http)
        )
        return JSONResponse(convert.embeddings_response(response, body))

    def _catalog() -> ModelCatalog:
        catalog = state["gateway"].catalog
        if not catalog.synced.is_set():
            raise OpenAIError(
                503,
                "the model list is not available yet (the registry has not been reached)",
                type="service_unavailable_error",
                code="unavailable",
            )
        return catalog

    @app.get("/v1/models")
    @errors_to_openai
    async def list_models():
        return JSONResponse({"object": "list", "data": _catalog().entries()})

    @app.get("/v1/models/{model_id:path}")
    @errors_to_openai
    async def get_model(model_id: str):
        for entry in _catalog().entries():
            if entry["id"] == model_id:
                return JSONResponse(entry)
        raise OpenAIError(
            404,
            f"model {model_id!r} not found (GET /v1/models lists them)",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if await state["gateway"].ready():
            return {"status": "ready"}
        return JSONResponse({"status": "router not serving", "router": config.router}, status_code=503)

    return Observability(app, config.limits)
