"""ASGI middleware guarding request bodies before anything parses them: 413 over a byte limit, 422 for
JSON bodies that are not UTF-8 (FastAPI would answer those 400, unlike every other malformed JSON)."""
from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BodyTooLargeError, error_body, http_status


class BodyGuard:
    """Refuse bodies over `max_bytes` (by Content-Length at once, else while reading chunked uploads) and
    JSON bodies that do not decode as UTF-8."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _answer_error(send, self._too_large())
            return
        chunks, size, more = [], 0, True
        while more:  # at most max_bytes are buffered
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await _answer_error(send, self._too_large())
                return
        body = b"".join(chunks)
        if _is_json(headers.get(b"content-type", b"")):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                await _answer(send, 422, {"detail": [{"type": "json_invalid", "loc": ["body", exc.start],
                                                      "msg": "JSON decode error: the body is not valid UTF-8"}]})
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    def _too_large(self) -> BodyTooLargeError:
        return BodyTooLargeError(f"request body is over the server's limit of {self.max_bytes} bytes "
                                 f"(--max-body-bytes); send fewer or shorter inputs")


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";")[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


async def _answer_error(send: Send, exc: BodyTooLargeError) -> None:
    await _answer(send, http_status(exc), error_body(exc))


async def _answer(send: Send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A receive() that gives `messages` first, then defers to `then` (e.g. to see the disconnect)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive
