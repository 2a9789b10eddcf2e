"""A scripted OpenAI-compatible server on 127.0.0.1: the stand-in for a paid teacher API.

    with StubServer(reply=lambda messages: "The answer is: 7", latency_s=0.1) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")

A request with `stream: true` gets the same answer as OpenAI stream chunks, one per word.
`fail(request_index, messages)` may return an HTTP status (429, 500, ...) to fail that request with
an OpenAI-style error body (with a `retry-after` header when `retry_after_s` is set), `GARBAGE` to
answer 200 with JSON that has no choices, `GARBAGE_TEXT` to answer 200 with a body that is not JSON,
or `RESET` to drop the connection in the middle of the reply.
Per-minute request and token limits (429 with Retry-After past them) and the files and batches API
(`batch_delay_s` until a batch completes, `fail_line` to fail lines of it): stub_batch_api.py.
Run it standalone for dry runs and benchmarks:

    python -m dnc_ray.testing.stub_server --port 8001 --latency-s 0.2
    python -m dnc_ray.testing.stub_server --reply self-ask   # self-ask prompts answered by a script (self_ask_reply)
    python -m dnc_ray.testing.stub_server --requests-per-minute 600 --rate-window-s 1 --batch-delay-s 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dnc_ray.method.prompts import FOLLOW_UP_INSTRUCTION, SELF_ASK_INSTRUCTION
from dnc_ray.testing.stub_batch_api import BatchAPI, RateGate

GARBAGE = "garbage"
GARBAGE_TEXT = "garbage-text"
RESET = "reset"

Reply = Callable[[list[dict]], str]
Fail = Callable[[int, list[dict]], "int | str | None"]


def _default_reply(messages: list[dict]) -> str:
    return "The answer is: 42"


SELF_ASK_FOLLOW_UPS = 2  # follow-ups `self_ask_reply` asks before its final answer


def self_ask_reply(messages: list[dict]) -> str:
    """A reply that follows the self-ask protocol by a fixed script; other prompts get the default reply.

    A self-ask turn (the prompt starts with the method's SELF_ASK_INSTRUCTION) is answered
    "Follow up: ...?" until the transcript (the prompt's last block, from its "Question: ") holds
    SELF_ASK_FOLLOW_UPS "Follow up:" lines, then "So the final answer is: 7"; a follow-up question
    (FOLLOW_UP_INSTRUCTION) is answered "7". A self_ask row thus takes 2 * SELF_ASK_FOLLOW_UPS + 1 requests.
    """
    content = messages[-1].get("content") if messages else None
    if not isinstance(content, str):
        return _default_reply(messages)
    if content.startswith(SELF_ASK_INSTRUCTION):
        transcript = content.rsplit("\n\nQuestion: ", 1)[-1]  # after the examples (each opens with "Question:")
        asked = sum(line.startswith("Follow up:") for line in transcript.splitlines())
        if asked < SELF_ASK_FOLLOW_UPS:
            opening = "Yes.\n" if asked == 0 else ""
            return f"{opening}Follow up: What is step {asked + 1}?"
        return "So the final answer is: 7"
    if content.startswith(FOLLOW_UP_INSTRUCTION):
        return "7"
    return _default_reply(messages)


REPLIES: dict[str, Reply] = {"fixed": _default_reply, "self-ask": self_ask_reply}


def _words(text: object) -> int:
    return len(text.split()) if isinstance(text, str) else 0


@dataclass
class StubServer:
    reply: Reply = _default_reply
    latency_s: float = 0.0
    fail: Fail | None = None
    model: str = "stub-teacher"
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    retry_after_s: float | None = None  # sent as `retry-after` with every error status
    requests_per_minute: int | None = None  # limits answered with 429 + retry-after (stub_batch_api.RateGate)
    tokens_per_minute: int | None = None
    rate_window_s: float = 60.0  # the limits' buckets hold this many seconds' worth
    batch_delay_s: float = 0.0  # seconds a batch stays in_progress before it completes
    fail_line: Callable[[str, list[dict]], "int | None"] | None = None  # (custom_id, messages) -> status to fail a batch line
    batch_max_requests: int | None = None  # batches with more lines fail validation
    hold: Callable[[int, list[dict]], bool] | None = None  # (index, messages) -> keep the request waiting while True

    requests: list[list[dict]] = field(default_factory=list, init=False)
    headers: dict[str, str] = field(default_factory=dict, init=False)
    max_in_flight_seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.rate = RateGate(self.requests_per_minute, self.tokens_per_minute, self.rate_window_s)
        self.batch_api = BatchAPI(self)
        self.app = self._build_app()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="dnc-ray stub OpenAI server")

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "dnc-ray"}]}

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            body = await request.json()
            messages = body.get("messages", [])
            refused = self.rate.check(messages, body.get("max_tokens") or body.get("max_completion_tokens") or 0)
            if refused is not None:
                return refused
            with self._lock:
                index = len(self.requests)
                self.requests.append(messages)
                self.headers = dict(request.headers)
                self._in_flight += 1
                self.max_in_flight_seen = max(self.max_in_flight_seen, self._in_flight)
            try:
                while self.hold and self.hold(index, messages):
                    await asyncio.sleep(0.05)
                if self.latency_s > 0:
                    await asyncio.sleep(self.latency_s)
                answer = self._answer(index, messages, body.get("model", self.model))
                if body.get("stream") and isinstance(answer, dict) and "choices" in answer:
                    usage = (body.get("stream_options") or {}).get("include_usage", False)
                    return StreamingResponse(_chunks(answer, usage), media_type="text/event-stream")
                return answer
            finally:
                with self._lock:
                    self._in_flight -= 1

        self.batch_api.install(app)
        return app

    def _answer(self, index: int, messages: list[dict], model: str) -> JSONResponse | dict:
        outcome = self.fail(index, messages) if self.fail else None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()), "model": model}
        if outcome == GARBAGE:
            return head
        if outcome == GARBAGE_TEXT:
            return Response("<html>502 Bad Gateway</html>", media_type="application/json")
        if outcome == RESET:
            return StreamingResponse(_drop_mid_reply(), media_type="application/json")
        if outcome is not None:
            error = {"message": f"stub failure {outcome} for request {index}", "type": "stub_error", "param": None, "code": str(outcome)}
            headers = {"retry-after": f"{self.retry_after_s:g}"} if self.retry_after_s is not None else None
            return JSONResponse({"error": error}, status_code=int(outcome), headers=headers)
        return self.completion(messages, model, head)

    def completion(self, messages: list[dict], model: str, head: dict | None = None) -> dict:
        """The reply to `messages` as a chat completion (usage counted in words)."""
        head = head or {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                        "created": int(time.time()), "model": model}
        text = self.reply(messages)
        prompt_tokens = sum(_words(m.get("content")) for m in messages)
        completion_tokens = _words(text)
        return {
            **head,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    # -- lifecycle -----------------------------------------------------------------------------
    def _bind(self) -> tuple[uvicorn.Server, socket.socket]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1)
        return uvicorn.Server(config), sock

    def start(self, timeout_s: float = 10.0) -> "StubServer":
        self._server, sock = self._bind()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stub server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._server = self._thread = None

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C."""
        server, sock = self._bind()
        print(f"stub OpenAI server on {self.base_url} (model {self.model}, latency {self.latency_s}s)", flush=True)
        server.run(sockets=[sock])

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _chunks(answer: dict, include_usage: bool):
    """A whole answer as OpenAI stream chunks: the role, one chunk per word, the finish, the usage."""
    head = {k: answer[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

    def chunk(delta: dict, finish: str | None = None) -> str:
        return f"data: {json.dumps(head | {'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for word in re.findall(r"\s*\S+", answer["choices"][0]["message"]["content"]):
        yield chunk({"content": word})
    yield chunk({}, "stop")
    if include_usage:
        yield f"data: {json.dumps(head | {'choices': [], 'usage': answer['usage']})}\n\n"
    yield "data: [DONE]\n\n"


async def _drop_mid_reply():
    """The start of a reply, then the server drops the connection (the client sees it cut mid-body)."""
    yield b'{"id": "chatcmpl-'
    raise ConnectionResetError("stub: connection dropped mid-reply")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency-s", type=float, default=0.0, help="seconds each request waits before answering")
    parser.add_argument("--model", default="stub-teacher")
    parser.add_argument("--reply", choices=list(REPLIES), default="fixed",
                        help='fixed: "The answer is: 42" to every prompt; self-ask: self_ask_reply')
    parser.add_argument("--requests-per-minute", type=int, default=None, help="429 past it (default: no limit)")
    parser.add_argument("--tokens-per-minute", type=int, default=None, help="429 past it (default: no limit)")
    parser.add_argument("--rate-window-s", type=float, default=60.0,
                        help="seconds' worth of each limit that may come at once (1: enforced per second)")
    parser.add_argument("--batch-delay-s", type=float, default=0.0, help="seconds a batch stays in progress")
    args = parser.parse_args(argv)
    StubServer(reply=REPLIES[args.reply], latency_s=args.latency_s, model=args.model, host=args.host,
               port=args.port, requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
               rate_window_s=args.rate_window_s, batch_delay_s=args.batch_delay_s).serve_forever()


if __name__ == "__main__":
    main()
