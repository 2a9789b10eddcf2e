"""What the stand-in server (stub_server.py) adds for cost controls: per-minute limits answering 429 with
Retry-After, and the files and batches API.

Limits (`requests_per_minute`, `tokens_per_minute`): token buckets refilled continuously, each holding
`rate_window_s` seconds' worth (60: a whole minute's allowance may come at once; 1: the limit enforced per
second, as OpenAI may quantize it). A request counts 1 request and `rate_tokens` tokens (its prompt at 4
characters a token plus max_tokens: OpenAI's way). Past a limit: 429 `rate_limit_exceeded` with
`retry-after-ms` / `retry-after` (the time until the bucket has room) and `x-ratelimit-*` headers. Every
arrival is recorded (`arrivals`: time, accepted) so that tests can count requests per window.

Batches: POST /v1/files (multipart, purpose batch), GET /v1/files/{id}(/content), POST /v1/batches,
GET /v1/batches(/{id}), POST /v1/batches/{id}/cancel. A batch is `in_progress` for `batch_delay_s`
(its `request_counts.completed` grows with the time), then `completed`: every line answered by the
server's `reply`, except those `fail_line(custom_id, messages)` fails with a status (error file). A batch
of more than `batch_max_requests` lines, a duplicate custom_id or a line that is not a chat completion
request fails validation (`failed`, with `errors`), as OpenAI's does.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dnc_ray.llm.rate_limit import Bucket, rate_tokens


class RateGate:
    """The server side of the limits: admits or refuses each arriving request."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, window_s: float):
        self.limits = (requests_per_minute, tokens_per_minute)
        self.bucket = Bucket(requests_per_minute, tokens_per_minute, burst_s=window_s)
        self.arrivals: list[tuple[float, bool, int]] = []  # (time.monotonic(), accepted, tokens)

    def check(self, messages: list[dict], max_tokens: int) -> JSONResponse | None:
        """None: admitted; else the 429 to answer."""
        now = time.monotonic()
        tokens = rate_tokens(messages, max_tokens)
        wait = self.bucket.wait_s(tokens, now) if self.bucket.limited else 0.0
        self.arrivals.append((now, wait <= 0, tokens))
        if wait <= 0:
            self.bucket.take(tokens, now)
            return None
        rpm, tpm = self.limits
        which = "requests per min (RPM)" if rpm and self.bucket.level[0] < 1 else "tokens per min (TPM)"
        error = {"message": f"Rate limit reached for {which}: limits {rpm} RPM, {tpm} TPM. Please try again in "
                            f"{wait:.3f}s.", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
        headers = {"retry-after-ms": f"{math.ceil(wait * 1000)}", "retry-after": f"{math.ceil(wait)}"}
        if rpm:
            headers |= {"x-ratelimit-limit-requests": str(rpm),
                        "x-ratelimit-remaining-requests": str(max(0, int(self.bucket.level[0])))}
        if tpm:
            headers |= {"x-ratelimit-limit-tokens": str(tpm),
                        "x-ratelimit-remaining-tokens": str(max(0, int(self.bucket.level[1])))}
        return JSONResponse({"error": error}, status_code=429, headers=headers)

    @property
    def refused(self) -> int:
        return sum(not accepted for _, accepted, _ in self.arrivals)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}},
                        status_code=status)


def _multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body as {field: (filename, bytes)} (the stand-in needs no python-multipart)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class BatchAPI:
    """Files and batches held in memory; `server` is the StubServer (reply, fail_line, batch_delay_s, model)."""

    def __init__(self, server):
        self.server = server
        self.files: dict[str, dict] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.lines: list[tuple[str, str]] = []  # (batch id, custom_id) of every line answered

    def install(self, app: FastAPI) -> None:
        app.post("/v1/files")(self.upload)
        app.get("/v1/files/{file_id}")(self.file)
        app.get("/v1/files/{file_id}/content")(self.content)
        app.post("/v1/batches")(self.create)
        app.get("/v1/batches")(self.list)
        app.get("/v1/batches/{batch_id}")(self.retrieve)
        app.post("/v1/batches/{batch_id}/cancel")(self.cancel)
        app.get("/stub/arrivals")(self.arrivals)

    async def arrivals(self):
        """What the limits saw (for a stand-in in another process): [time.monotonic(), accepted, tokens] each."""
        return {"arrivals": self.server.rate.arrivals}

    # -- files ---------------------------------------------------------------------------------
    def _store(self, data: bytes, filename: str, purpose: str) -> dict:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "status": "processed"}
        self.contents[file_id] = data
        return self.files[file_id]

    async def upload(self, request: Request):
        fields = _multipart(await request.body(), request.headers.get("content-type", ""))
        if "file" not in fields or fields.get("purpose", (None, b""))[1].decode() != "batch":
            return _error(400, "expected a multipart body with `file` and `purpose: batch`")
        filename, data = fields["file"]
        return self._store(data, filename or "upload.jsonl", "batch")

    async def file(self, file_id: str):
        return self.files.get(file_id) or _error(404, "no such file")

    async def content(self, file_id: str):
        if file_id not in self.contents:
            return _error(404, "no such file")
        return Response(self.contents[file_id], media_type="application/octet-stream")

    # -- batches -------------------------------------------------------------------------------
    async def create(self, request: Request):
        body = await request.json()
        input_file = body.get("input_file_id")
        if input_file not in self.contents:
            return _error(400, "input_file_id: no such file")
        if body.get("endpoint") != "/v1/chat/completions":
            return _error(400, "endpoint: only /v1/chat/completions")
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                 "input_file_id": input_file, "completion_window": body.get("completion_window", "24h"),
                 "status": "in_progress", "output_file_id": None, "error_file_id": None, "created_at": now,
                 "in_progress_at": now, "expires_at": now + 86400, "completed_at": None, "failed_at": None,
                 "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": body.get("metadata")}
        lines, problem = self._parse(self.contents[input_file])
        if problem:
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [
                {"code": "invalid_request", "message": problem, "param": None, "line": None}]})
        else:
            batch["request_counts"]["total"] = len(lines)
        self.batches[batch_id] = batch | {"_lines": lines, "_started": time.monotonic()}
        return self._public(batch_id)

    def _parse(self, data: bytes) -> tuple[list[dict], str | None]:
        lines, seen = [], set()
        for number, text in enumerate(data.decode("utf-8").splitlines(), 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                return [], f"line {number}: not JSON"
            if line.get("method") != "POST" or line.get("url") != "/v1/chat/completions" or "body" not in line:
                return [], f"line {number}: not a POST /v1/chat/completions request"
            if line.get("custom_id") in seen or not isinstance(line.get("custom_id"), str):
                return [], f"line {number}: custom_id missing or not unique"
            seen.add(line["custom_id"])
            lines.append(line)
        limit = self.server.batch_max_requests
        if limit is not None and len(lines) > limit:
            return [], f"{len(lines)} requests: more than the {limit} a batch may hold"
        if not lines:
            return [], "the input file holds no request"
        return lines, None

    def _advance(self, batch_id: str) -> None:
        """Move a batch on by the clock: its progress while in progress, its results when the delay is over."""
        batch = self.batches[batch_id]
        if batch["status"] != "in_progress":
            return
        total = batch["request_counts"]["total"]
        elapsed = time.monotonic() - batch["_started"]
        delay = self.server.batch_delay_s
        if elapsed < delay:
            batch["request_counts"]["completed"] = int(total * elapsed / delay)
            return
        self._finish(batch, "completed")

    def _finish(self, batch: dict, status: str, answered: int | None = None) -> None:
        out, errors = [], []
        for line in batch["_lines"][:answered]:
            messages = line["body"].get("messages", [])
            self.lines.append((batch["id"], line["custom_id"]))
            failed = self.server.fail_line(line["custom_id"], messages) if self.server.fail_line else None
            if failed:
                body = {"error": {"message": f"stub failure {failed} for {line['custom_id']}", "type": "stub_error",
                                  "param": None, "code": str(failed)}}
                errors.append({"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": line["custom_id"],
                               "response": {"status_code": int(failed), "request_id": uuid.uuid4().hex, "body": body},
                               "error": None})
                continue
            answer = self.server.completion(messages, line["body"].get("model", self.server.model))
            out.append({"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": line["custom_id"],
                        "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": answer},
                        "error": None})
        now = int(time.time())
        if out:
            batch["output_file_id"] = self._store(_jsonl(out), f"{batch['id']}_output.jsonl", "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._store(_jsonl(errors), f"{batch['id']}_error.jsonl", "batch_output")["id"]
        batch["request_counts"].update(completed=len(out), failed=len(errors))
        batch["status"] = status
        batch[{"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]] = now

    def _public(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    async def retrieve(self, batch_id: str):
        if batch_id not in self.batches:
            return _error(404, "no such batch")
        self._advance(batch_id)
        return self._public(batch_id)

    async def list(self, limit: int = 20, after: str | None = None):
        ids = sorted(self.batches, key=lambda b: self.batches[b]["_started"], reverse=True)  # newest first
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        page = ids[:limit]
        for batch_id in page:
            self._advance(batch_id)
        return {"object": "list", "data": [self._public(b) for b in page], "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None, "has_more": len(ids) > len(page)}

    async def cancel(self, batch_id: str):
        if batch_id not in self.batches:
            return _error(404, "no such batch")
        batch = self.batches[batch_id]
        if batch["status"] == "in_progress":
            self._finish(batch, "cancelled", batch["request_counts"]["completed"])
        return self._public(batch_id)


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()
