"""Just enough HTTP/1.1 to serve OpenAI clients fast and to misbehave at the socket level.

A framework (uvicorn/starlette) would hide exactly what the fake needs to control: it cannot
reset a connection without a response or hold one open forever cheaply, and its per-request
overhead caps benchmark throughput. This parser supports what real clients send (keep-alive,
``Content-Length`` bodies, ``Expect: 100-continue``, pipelining) and rejects everything else
with a clean status instead of crashing, because fuzzed or broken clients are part of what a
fake model must survive.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

from pipeline.digits import ascii_int

__all__ = ["HttpError", "Request", "RequestParser", "build_response"]

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


@dataclass
class Request:
    """One parsed request; header names are lower-cased, repeated headers joined by ", "."""

    method: str
    target: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class HttpError(Exception):
    """A request we refuse; ``close`` is set when the byte stream can no longer be trusted."""

    def __init__(self, status: int, message: str, *, close: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


@dataclass
class _Head:
    request: Request
    body_start: int
    length: int
    expects_continue: bool


class RequestParser:
    """Incremental parser: ``feed`` bytes, then take complete requests with ``next_request``."""

    def __init__(
        self, *, max_header_bytes: int = MAX_HEADER_BYTES, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.buffer = bytearray()
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._head: _Head | None = None
        self.continue_sent = False

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def wants_continue(self) -> bool:
        """True once when a client waits for ``100 Continue`` before sending its body."""
        head = self._head
        if head is None or not head.expects_continue or self.continue_sent:
            return False
        self.continue_sent = True
        return True

    def next_request(self) -> Request | None:
        """A complete request, None if more bytes are needed; HttpError if it is malformed."""
        if self._head is None:
            self._head = self._parse_head()
            if self._head is None:
                return None
        head = self._head
        end = head.body_start + head.length
        if len(self.buffer) < end:
            return None
        head.request.body = bytes(self.buffer[head.body_start : end])
        del self.buffer[:end]
        self._head = None
        self.continue_sent = False
        return head.request

    def _parse_head(self) -> _Head | None:
        # RFC 9112 2.2: ignore empty lines before a request line (some clients send them).
        while self.buffer[:2] == b"\r\n":
            del self.buffer[:2]
        idx = self.buffer.find(b"\r\n\r\n", 0, self._max_header + 4)
        if idx < 0:
            if len(self.buffer) > self._max_header:
                raise HttpError(431, "request header section too large")
            return None
        try:
            head = bytes(self.buffer[:idx]).decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
            raise HttpError(400, "undecodable request head") from None
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise HttpError(400, "malformed request line")
        method, target, version = parts
        if not method or not set(method) <= _TOKEN_CHARS:
            raise HttpError(400, "malformed method")
        if not version.startswith("HTTP/"):
            raise HttpError(400, "malformed HTTP version")
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HttpError(505, f"{version} is not supported")
        if not target.startswith("/") and target != "*":
            if "://" in target:  # absolute-form; keep only the path
                target = "/" + target.split("://", 1)[1].partition("/")[2]
            else:
                raise HttpError(400, "malformed request target")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or not set(name) <= _TOKEN_CHARS:
                raise HttpError(400, f"malformed header line {line[:40]!r}")
            key = name.lower()
            value = value.strip(" \t")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if "transfer-encoding" in headers:
            raise HttpError(411, "chunked request bodies are not supported; send Content-Length")
        length = 0
        raw_length = headers.get("content-length")
        if raw_length is not None:
            values = {v.strip() for v in raw_length.split(",")}
            declared = ascii_int(next(iter(values))) if len(values) == 1 else None
            if declared is None:
                raise HttpError(400, "malformed Content-Length")
            length = declared
            if length > self._max_body:
                raise HttpError(413, f"request body over {self._max_body} bytes")
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
        path = target.split("?", 1)[0]
        request = Request(method, target, path, version, headers, b"", keep_alive)
        if raw_length is None and method in ("POST", "PUT", "PATCH"):
            # No body follows, so the connection stays usable after the refusal.
            del self.buffer[: idx + 4]
            raise HttpError(411, "Content-Length required", close=not keep_alive)
        expects = headers.get("expect", "").lower() == "100-continue" and length > 0
        return _Head(request, idx + 4, length, expects)


def build_response(
    status: int,
    body: bytes,
    *,
    keep_alive: bool,
    content_type: str = "application/json",
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """Serialise a complete response with ``Content-Length`` (never chunked: simpler clients)."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"content-type: {content_type}",
        f"content-length: {len(body)}",
        f"connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
