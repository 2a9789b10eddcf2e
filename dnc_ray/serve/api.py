"""The HTTP face of the ingress: routes, bearer-token auth, a body size limit, OpenAI-style errors.

    POST /v1/solve             {question, context?, task?, strategy} -> answer, sub-questions, usage, cost
    POST /v1/chat/completions  OpenAI-compatible; models "decomposer", "solver", "pipeline"
    GET  /v1/models            the three models
    GET  /healthz              no auth, for load balancers and probes
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from dnc_ray.config import ServeAppConfig
from dnc_ray.serve.schema import (
    ChatRequest,
    ChatResponse,
    ModelList,
    SolveRequest,
    SolveResponse,
)

if TYPE_CHECKING:
    from dnc_ray.serve.app import Ingress

_BEARER = HTTPBearer(auto_error=False)
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 502: "upstream_error", 504: "timeout_error"}


def build_api(graph: Ingress, cfg: ServeAppConfig) -> FastAPI:
    """A FastAPI app whose routes call the ingress's pipeline methods."""
    api = FastAPI(title="dnc_ray", max_body_size=cfg.max_body_bytes)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _invalid_request)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_bearer_auth(cfg.auth_token_env))] if cfg.auth_token_env else [])

    @v1.post("/solve")
    async def solve(request: SolveRequest) -> SolveResponse:
        return await graph.solve(request)

    @v1.post("/chat/completions")
    async def chat_completions(request: ChatRequest) -> ChatResponse:
        return await graph.chat(request)

    @v1.get("/models")
    def models() -> ModelList:
        return graph.models()

    @api.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    api.include_router(v1)
    return api


def _bearer_auth(env_name: str):
    """A dependency that accepts only `Authorization: Bearer <the token in $env_name>`."""
    token = os.environ.get(env_name, "")
    if not token:
        raise RuntimeError(f"auth_token_env names {env_name}, but that environment variable is not set")

    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error body, so OpenAI clients surface the message."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON, 422 for JSON that breaks the schema; never echoes the input."""
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return error_response(400, "the request body is not valid JSON")
    fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
    return error_response(422, f"invalid request: {fields}")
