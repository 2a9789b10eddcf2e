"""The HTTP face of the ingress: routes, bearer-token auth, a body size limit, OpenAI-style errors.

    POST /v1/solve             {question, context?, task?, strategy, stream?} -> answer, sub-questions, usage, cost
    POST /v1/chat/completions  OpenAI-compatible; models "decomposer", "solver", "pipeline"; stream, n
    POST /v1/completions       OpenAI-compatible; models "decomposer", "solver"; stream, n
    GET  /v1/models            the three models
    GET  /healthz              no auth, for load balancers and probes

Auth and the body limit are checked first, before the body is parsed (`Guard`): with auth on, every
route but /healthz needs the token, /docs and /openapi.json included. Error bodies never repeat what
the request sent.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dnc_ray.config import ServeAppConfig
from dnc_ray.infra import console
from dnc_ray.serve.schema import (
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    SolveRequest,
    SolveResponse,
    error_body,
    unsupported_fields,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Graph(Protocol):
    """What the routes call: the ingress of serve/app.py."""

    async def solve(self, request: SolveRequest) -> SolveResponse: ...
    def solve_events(self, request: SolveRequest) -> AsyncIterator[str]: ...
    async def chat(self, request: ChatRequest) -> ChatResponse: ...
    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[str]: ...
    async def completion(self, request: CompletionRequest) -> CompletionResponse: ...
    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[str]: ...
    def models(self) -> ModelList: ...


def build_api(graph: Graph, cfg: ServeAppConfig) -> FastAPI:
    """A FastAPI app whose routes call the ingress's methods."""
    api = FastAPI(title="dnc_ray")
    api.add_middleware(Guard, token=_token(cfg.auth_token_env), max_body_bytes=cfg.max_body_bytes)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _invalid_request)

    @api.post("/v1/solve")
    async def solve(request: SolveRequest):
        _refuse_unsupported(request)
        if request.stream:
            return sse(graph.solve_events(request))
        return await graph.solve(request)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        _refuse_unsupported(request)
        if request.stream:
            return sse(await graph.chat_stream(request))
        return await graph.chat(request)

    @api.post("/v1/completions")
    async def completions(request: CompletionRequest):
        _refuse_unsupported(request)
        if request.stream:
            return sse(await graph.completion_stream(request))
        return await graph.completion(request)

    @api.get("/v1/models")
    def models() -> ModelList:
        return graph.models()

    @api.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return api


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events; each item of `events` is one whole event ("data: ...\\n\\n")."""
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error body, so OpenAI clients surface the message."""
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


class Guard:
    """ASGI middleware: the bearer token (when auth is on) and the body size, before anything else."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].endswith("/healthz"):
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), {}

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_noting_status)
        finally:  # the one line a request gets on `dnc serve`'s terminal
            console.say(f"[serve] {scope['method']} {scope['path']} {status.get('code', '-')} "
                        f"{1000 * (time.monotonic() - started):.0f} ms")

    async def _guarded(self, scope, receive, send):
        if self.token is not None and not self._authorized(scope):
            response = error_response(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        body, more = [], True
        while more:  # read the whole (small) body first: a too-large one gets a JSON 413, never parsed
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.max_body_bytes:
                return await error_response(413, f"request body over max_body_bytes ({self.max_body_bytes})")(
                    scope, receive, send)
        return await self.app(scope, _replay(b"".join(body), receive), send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, credentials = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials, self.token.encode())


def _replay(body: bytes, receive):
    """A receive() that hands over the buffered body once, then waits on the real one (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _token(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    token = os.environ.get(env_name, "")
    if not token:
        raise RuntimeError(f"auth_token_env names {env_name}, but that environment variable is not set")
    return token


def _refuse_unsupported(request) -> None:
    why = unsupported_fields(request.model_extra)
    if why is not None:
        raise HTTPException(400, why)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON, 422 for JSON that breaks the schema; names fields, never values."""
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return error_response(400, "the request body is not valid JSON")
    fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors[:5])
    return error_response(422, f"invalid request: {fields}")
