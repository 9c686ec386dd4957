"""The outermost ASGI layer: what every request meets before any handler, parser or login.

In order:

1. **Client address and scheme.** Behind a reverse proxy, ``X-Forwarded-For`` and
   ``X-Forwarded-Proto`` are believed only when the connection comes from a proxy that
   was configured as trusted; otherwise anybody could pick their own address (and so
   escape the per-address login throttle) or claim HTTPS.
2. **The body, bounded.** ``Content-Length`` over the limit is refused (413) without
   reading a byte; ``multipart`` (file uploads) is refused (415) before reading too;
   a body is read with a timeout per chunk and a deadline for the whole (408), so a
   client that announces more than it sends cannot hold a connection. The handlers get
   the complete body, already capped, and parse it only after authentication.
3. **Security headers on every response**, including 404s, 413s and the 500 of a bug,
   which is why this wraps the whole application rather than sitting inside it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.digits import ascii_int

log = logging.getLogger("llmpipe.review")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)
HSTS = (b"strict-transport-security", b"max-age=31536000")
_OURS = {name for name, _ in (*SECURITY_HEADERS, HSTS)} | {b"cache-control"}

_LIST_HEADERS = {b"x-forwarded-for", b"x-forwarded-proto"}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ErrorPage = Callable[[int, str], bytes]


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 1_048_576
    """Large enough for a corrected output of 200 000 characters, URL-encoded."""
    max_login_body_bytes: int = 16_384
    """A login form is a name, a password and a token; nothing bigger is a login."""
    chunk_timeout_s: float = 10.0
    body_deadline_s: float = 30.0
    trusted_proxies: tuple[Network, ...] = field(default_factory=tuple)

    def body_limit(self, path: str) -> int:
        return self.max_login_body_bytes if path == "/login" else self.max_body_bytes


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """``10.0.0.1``, ``10.0.0.0/8``, ``::1``: the proxies whose forwarding headers count."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _header(scope: Scope, name: bytes) -> str | None:
    """One header's value; repeated list headers (``X-Forwarded-For``) are joined as
    HTTP says they may be, repeated single-value headers that disagree are refused."""
    values = [bytes(v).decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == name]
    if not values:
        return None
    if name in _LIST_HEADERS:
        return ", ".join(values)
    if len(set(values)) > 1:
        raise _Refused(400, f"conflicting {name.decode()} headers")
    return values[0]


def _trusted(host: str | None, proxies: tuple[Network, ...]) -> bool:
    if not host or not proxies:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in proxies)


def forwarded(scope: Scope, proxies: tuple[Network, ...]) -> Scope:
    """The scope with the real client and scheme, if (and only if) a trusted proxy says so.

    ``X-Forwarded-For`` is read from the right: the nearest hop is the trusted proxy,
    and the first address that is not a trusted proxy is the client. Everything to its
    left was written by the client and proves nothing.
    """
    client = scope.get("client")
    if not _trusted(client[0] if client else None, proxies):
        return scope
    updated = dict(scope)
    chain = _header(scope, b"x-forwarded-for")
    if chain:
        hops = [hop.strip() for hop in chain.split(",") if hop.strip()]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break  # garbage in the chain: believe nothing further left
            updated["client"] = (hop, 0)
            if not _trusted(hop, proxies):
                break
    proto = (_header(scope, b"x-forwarded-proto") or "").split(",")[0].strip().lower()
    if proto in ("http", "https"):
        updated["scheme"] = proto
    return updated


class Hardened:
    """Pure ASGI middleware around the whole app; see the module docstring."""

    def __init__(self, app: ASGIApp, limits: HttpLimits, error_page: ErrorPage) -> None:
        self.app = app
        self.limits = limits
        self.error_page = error_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        https = False

        async def secured(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _OURS]
                headers.extend(SECURITY_HEADERS)
                if https:
                    headers.append(HSTS)
                path = str(scope.get("path", ""))
                cache = b"public, max-age=300" if path.startswith("/static/") else b"no-store"
                headers.append((b"cache-control", cache))
                message = {**message, "headers": headers}
            await send(message)

        try:
            scope = forwarded(scope, self.limits.trusted_proxies)
            https = scope.get("scheme") == "https"
            body = await self._body(scope, receive)
        except _Refused as refused:
            await self._refuse(secured, refused.status, str(refused))
            return
        if body is None:  # the client went away
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, secured)
        except Exception:
            log.exception("review: unhandled error for %s %s", scope.get("method"), scope["path"])
            if not started:
                await self._refuse(secured, 500, "Internal error; it has been logged.")

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.limits.body_limit(str(scope.get("path", "")))
        length = _header(scope, b"content-length")
        if length is not None:
            declared = ascii_int(length)
            if declared is None:
                raise _Refused(400, "invalid Content-Length")
            if declared > limit:
                raise _Refused(413, f"request body over {limit} bytes")
        media = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if media.startswith("multipart/"):
            raise _Refused(415, "file uploads are not accepted")
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_deadline_s
        while True:
            remaining = min(self.limits.chunk_timeout_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, remaining))
            except TimeoutError:
                raise _Refused(408, "the request body did not arrive in time") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > limit:
                raise _Refused(413, f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(
        self, send: Callable[[Message], Awaitable[None]], status: int, text: str
    ) -> None:
        body = self.error_page(status, text)
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def client_host(scope: Scope) -> str | None:
    client: Any = scope.get("client")
    return str(client[0]) if client else None
