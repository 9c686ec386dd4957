"""A lean HTTP/1.1 keep-alive client: what the model client needs and nothing else.

Why not aiohttp: the model call is the largest single cost of a request inside the worker,
and most of it was the HTTP library's own request machinery (0.14-0.18 ms of CPU per call
through aiohttp against 0.05 ms for a raw asyncio loop, ``python -m bench.httpclient``).
One origin, one method (``POST``) and one body kind need little of that: this module is
an :class:`asyncio.Protocol` per connection, with responses parsed by ``httptools``
(llhttp, Node.js's parser: Content-Length, chunked, keep-alive rules, malformed input
refused), and a pool around them.

What it keeps of a general client:

- **A bounded pool**: at most ``limit`` connections; a call past it waits for one.
  Connections are reused while the server keeps them alive, and dropped after
  ``keepalive_s`` idle (under the usual 5 s server-side keep-alive, so the client drops a
  connection before the server closes it under a request).
- **Stale connections**: an idle connection the server closed is noticed when it closes
  (the protocol hears it) and never used again. A request is never resent once written:
  whether the server acted on it cannot be known, and the retry policy above decides.
- **TLS** for ``https``: the default context, certificates verified against the system
  CAs or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``, host names checked.
- **Bodies** up to a cap, read no further past it; ``gzip`` and ``deflate`` decoded (the
  encodings it asks for), decoded size capped too.
- **The environment**, read once per pool: ``HTTP(S)_PROXY`` / ``NO_PROXY`` (an ``http://``
  proxy; ``https`` origins through it over ``CONNECT``), proxy credentials in the proxy URL
  or ``~/.netrc``, and the origin's ``~/.netrc`` (``NETRC``) credentials unless an
  ``Authorization`` header is given.

Failures are two exceptions, for the caller to classify: :class:`TransportError` (no
connection, a broken one, a response that is not HTTP) and :class:`BodyError` (a body too
large or undecodable). Timeouts are the caller's (``asyncio.timeout`` around a call): a
call cancelled mid-exchange closes its connection, since the answer may still come.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import netrc
import os
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit
from urllib.request import getproxies, proxy_bypass

import httptools

from pipeline.digits import ascii_int

log = logging.getLogger("pipeline.llm.http")

# RFC 8305's recommended delay before racing the next address family (as aiohttp used).
HAPPY_EYEBALLS_DELAY_S = 0.25


class HTTPError(Exception):
    """An exchange that produced no usable HTTP response."""


class TransportError(HTTPError):
    """No connection, a connection that broke, or bytes that are not an HTTP response."""


class BodyError(HTTPError):
    """A response body past the cap, or one its ``Content-Encoding`` does not decode."""


class HeaderError(HTTPError):
    """A request header that cannot be sent as given (a line break, a bad name)."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """``host[:port]`` as the ``Host`` header and ``CONNECT`` name it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True)
class Target:
    """Where one pool's requests go: the origin, the request target and the credentials
    in the URL (``http://user:pass@host``), if any."""

    origin: Origin
    path: str
    """Path and query, percent-encoded."""
    userinfo: tuple[str, str] | None = None

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        origin = Origin(scheme, _ascii_host(parts.hostname), parts.port or _default_port(scheme))
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
        userinfo = None
        if parts.username is not None:
            userinfo = (unquote(parts.username), unquote(parts.password or ""))
        return cls(origin, path, userinfo)

    @property
    def url(self) -> str:
        return f"{self.origin.scheme}://{self.origin.authority}{self.path}"


@dataclass(frozen=True)
class Proxy:
    origin: Origin
    authorization: str | None = None
    """The ``Proxy-Authorization`` value (Basic), from the proxy URL or ``~/.netrc``."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    """Lower-case names; repeated headers joined with ``", "``."""
    body: bytes
    keep_alive: bool


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _ascii_host(host: str) -> str:
    """The host as it goes on the wire: IDNA for a non-ASCII name (as yarl did)."""
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        return host.encode("idna").decode("ascii")
    return host


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def load_netrc() -> netrc.netrc | None:
    """``NETRC``, else ``~/.netrc``; None (with a warning when the file was wanted) if it
    cannot be read or parsed."""
    named = os.environ.get("NETRC")
    try:
        path = Path(named) if named is not None else Path.home() / ".netrc"
    except RuntimeError:  # no home directory to resolve
        return None
    try:
        return netrc.netrc(str(path))
    except netrc.NetrcParseError as exc:
        log.warning("could not parse the .netrc file: %s", exc)
    except OSError as exc:
        if named is not None or path.is_file():
            log.warning("could not read the .netrc file: %s", exc)
    return None


def netrc_basic(entries: netrc.netrc | None, host: str) -> str | None:
    """The Basic credentials ``~/.netrc`` holds for ``host`` (login, else account)."""
    found = entries.authenticators(host) if entries is not None else None
    if found is None:
        return None
    login, account, password = found
    return basic(login or account or "", password or "")


def proxy_from_env(origin: Origin, entries: netrc.netrc | None) -> Proxy | None:
    """The proxy ``HTTP_PROXY`` / ``HTTPS_PROXY`` name for ``origin``, unless ``NO_PROXY``
    bypasses it. Only ``http://`` proxies are supported (as in aiohttp): another is ignored
    with a warning."""
    if proxy_bypass(origin.host):
        return None
    named = getproxies().get(origin.scheme)
    if not named:
        return None
    parts = urlsplit(named if "://" in named else f"http://{named}")
    if parts.scheme.lower() != "http" or not parts.hostname:
        log.warning("%s proxies (%s) are not supported, ignoring", parts.scheme.upper(), named)
        return None
    host = _ascii_host(parts.hostname)
    if parts.username is not None:
        authorization: str | None = basic(unquote(parts.username), unquote(parts.password or ""))
    else:
        authorization = netrc_basic(entries, host)
    return Proxy(Origin("http", host, parts.port or 80), authorization)


_TLS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def tls_context() -> ssl.SSLContext:
    """The default verifying context, made once per CA configuration (loading the CA bundle
    costs milliseconds): the system CAs, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``."""
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    context = _TLS.get(key)
    if context is None:
        context = _TLS[key] = ssl.create_default_context()
    return context


# Headers that frame the request: set here only, or one request could be read as two.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def header_line(name: str, value: str) -> bytes:
    """``name: value\\r\\n``, refusing what would split or corrupt the request."""
    if not name or not _TOKEN.issuperset(name):
        raise HeaderError(f"invalid header name {name!r}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise HeaderError(f"header {name} holds a line break or NUL")
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


class Pool:
    """Keep-alive connections to one URL, ``POST`` only, bound to the running event loop.

    ``headers`` are sent with every request; the ones given per call replace them by name
    (case-insensitively). ``max_body`` caps a 200 answer's body (past it: :class:`BodyError`,
    the rest unread), ``max_error_body`` another status's (past it: cut, the rest unread).
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        limit: int,
        keepalive_s: float,
        max_body: int,
        max_error_body: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.target = Target.parse(url)
        origin = self.target.origin
        entries = load_netrc()
        self.proxy = proxy_from_env(origin, entries)
        base: dict[str, tuple[str, str]] = {
            "host": ("Host", origin.authority),
            "user-agent": ("User-Agent", "llmpipe"),
            "accept": ("Accept", "application/json"),
            "accept-encoding": ("Accept-Encoding", "gzip, deflate"),
            "content-type": ("Content-Type", "application/json"),
        }
        if self.target.userinfo is not None:
            base["authorization"] = ("Authorization", basic(*self.target.userinfo))
        for name, value in headers.items():
            base[name.lower()] = (name, value)
        if "authorization" not in base:
            credentials = netrc_basic(entries, origin.host)
            if credentials is not None:
                base["authorization"] = ("Authorization", credentials)
        tunnel = self.proxy is not None and origin.tls
        if self.proxy is not None and not tunnel and self.proxy.authorization is not None:
            base["proxy-authorization"] = ("Proxy-Authorization", self.proxy.authorization)
        # Through a plain-HTTP proxy the request line names the whole URL (absolute form).
        target = self.target.url if self.proxy is not None and not tunnel else self.target.path
        self._request_line = f"POST {target} HTTP/1.1\r\n".encode("ascii")
        self._base = base
        self._head = self._request_line + b"".join(header_line(n, v) for n, v in base.values())
        self._limit = max(1, limit)
        self._keepalive_s = keepalive_s
        self._max_body = max_body
        self._max_error_body = max_error_body
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._swept = time.monotonic()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle(self) -> int:
        """Connections open and waiting for a call."""
        return len(self._idle)

    async def post(self, body: bytes, headers: Mapping[str, str] | None = None) -> Response:
        """Send ``body``; the answer once complete. Raises :class:`HTTPError` subclasses."""
        data = self._request(body, headers)
        while True:
            conn = await self._acquire()
            if conn.closing:  # closed while it waited in the pool: nothing was sent yet
                self._drop(conn)
                continue
            try:
                response = await conn.exchange(data)
            except BaseException:
                self._drop(conn)
                raise
            if response.keep_alive and not self._closed:
                self._idle_put(conn)
            else:
                self._drop(conn)
            return response

    def _request(self, body: bytes, headers: Mapping[str, str] | None) -> bytes:
        head = self._head
        if headers:
            for name in headers:
                if name.lower() in _FRAMING:
                    raise HeaderError(f"{name} is the client's to set, not a configured header")
            if any(name.lower() in self._base for name in headers):
                merged = dict(self._base)
                merged.update({name.lower(): (name, value) for name, value in headers.items()})
                head = self._request_line + b"".join(header_line(n, v) for n, v in merged.values())
            else:
                head += b"".join(header_line(n, v) for n, v in headers.items())
        return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)

    async def _acquire(self) -> _Connection:
        while True:
            if self._closed:
                raise TransportError("the connection pool is closed")
            idle = self._idle
            if idle:
                now = time.monotonic()
                while idle:
                    conn = idle.pop()
                    conn.idle = False
                    if now - conn.idle_since <= self._keepalive_s and not conn.closing:
                        return conn
                    self._drop(conn)
            if self._open < self._limit:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # it was this one's turn: pass it on
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                raise

    async def _connect(self) -> _Connection:
        origin = self.target.origin
        via = self.proxy.origin if self.proxy is not None else origin
        direct_tls = origin.tls and self.proxy is None
        conn = _Connection(self, self._max_body, self._max_error_body)
        try:
            await self._loop.create_connection(
                lambda: conn,
                via.host,
                via.port,
                ssl=tls_context() if direct_tls else None,
                server_hostname=origin.host if direct_tls else None,
                happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S,
            )
            if origin.tls and self.proxy is not None:
                await conn.tunnel(origin, self.proxy)
        except HTTPError:
            conn.close()
            raise
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS verification
            conn.close()
            where = origin.authority
            if self.proxy is not None:
                where += f" through the proxy {self.proxy.origin.authority}"
            raise TransportError(f"cannot connect to {where}: {_describe(exc)}") from exc
        except BaseException:
            conn.close()
            raise
        conn.pooled = True
        return conn

    def _idle_put(self, conn: _Connection) -> None:
        conn.idle = True
        conn.idle_since = now = time.monotonic()
        self._idle.append(conn)
        if now - self._swept > self._keepalive_s:
            self._sweep(now)
        self._wake()

    def _sweep(self, now: float) -> None:
        """Close the connections idle past the keep-alive (the oldest are at the bottom)."""
        self._swept = now
        while self._idle and now - self._idle[0].idle_since > self._keepalive_s:
            conn = self._idle.pop(0)
            conn.idle = False
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        """Close ``conn`` and free its place (once, whoever notices first)."""
        conn.close()
        self.forget(conn)

    def forget(self, conn: _Connection) -> None:
        if conn.idle:
            conn.idle = False
            self._idle.remove(conn)
        if conn.pooled:
            conn.pooled = False
            self._open -= 1
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections now and the busy ones when their calls end."""
        self._closed = True
        while self._idle:
            self._drop(self._idle[-1])
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(TransportError("the connection pool is closed"))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Decoder:
    """``gzip`` / ``deflate`` (zlib-wrapped or raw, as servers disagree) with a size cap."""

    def __init__(self, encoding: str) -> None:
        gzip = encoding in ("gzip", "x-gzip")
        self._zlib: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self._first = b""

    def decode(self, data: bytes, room: int) -> bytes:
        """At most ``room`` decoded bytes of ``data``; raises ``zlib.error`` on bad data."""
        if self._zlib is None:
            data = self._first + data
            if len(data) < 2:  # the form is told by the first two bytes
                self._first = data
                return b""
            # RFC 9110's deflate is zlib-wrapped; some servers send it raw.
            zlib_header = (data[0] & 0x0F) == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        out: bytes = self._zlib.decompress(data, room)
        if self._zlib.unconsumed_tail:
            out += b"\0"  # more than room decoded bytes: reported as one past the cap
        return out

    def finish(self) -> None:
        if self._zlib is None or not self._zlib.eof:
            raise zlib.error("the compressed body ends early")


class _Connection(asyncio.Protocol):
    """One connection: writes a request, parses its response, hands it to one waiter."""

    def __init__(self, pool: Pool, max_body: int, max_error_body: int) -> None:
        self._pool = pool
        self._max_body = max_body
        self._max_error_body = max_error_body
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._tunnelling = False
        self.pooled = False
        self.idle = False
        self.idle_since = 0.0
        self._lost = False
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._cap = self._max_body
        self._decoder: _Decoder | None = None
        self._head_done = False
        self._framed = True
        self._interim = False
        self._keep_alive = False
        self._received = False

    @property
    def closing(self) -> bool:
        return self._lost or self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the stream cannot be trusted
            self.close()
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(TransportError("the server switched protocols unasked"))
        except httptools.HttpParserError as exc:
            self._fail(TransportError(f"malformed HTTP response: {exc}"))
        if self._tunnelling and self._waiter is None:
            self._tunnelling = False
            self._parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._ended(exc)
        self._pool.forget(self)

    def _ended(self, exc: Exception | None) -> None:
        if self._waiter is None:
            return
        if self._head_done and not self._framed and not self._interim:
            self.on_message_complete()  # a body delimited by the connection's end
            return
        if not self._received:
            what = "closed the connection before answering"
        else:
            what = "closed the connection in the middle of the response"
        cause = f" ({_describe(exc)})" if exc is not None else ""
        self._fail(TransportError(f"the server {what}{cause}"))

    # one exchange

    def exchange(self, data: bytes) -> asyncio.Future[Response]:
        assert self._transport is not None
        waiter = self._pool.loop.create_future()
        if self.closing:
            waiter.set_exception(TransportError("the connection closed before the request went"))
            return waiter
        self._waiter = waiter
        self._reset()
        self._transport.write(data)
        return waiter

    async def tunnel(self, origin: Origin, proxy: Proxy) -> None:
        """``CONNECT`` through ``proxy`` to ``origin``, then TLS to it over the tunnel."""
        assert self._transport is not None
        head = f"CONNECT {origin.authority} HTTP/1.1\r\nHost: {origin.authority}\r\n"
        if proxy.authorization is not None:
            head += f"Proxy-Authorization: {proxy.authorization}\r\n"
        self._tunnelling = True
        answer = await self.exchange((head + "\r\n").encode("utf-8", "surrogateescape"))
        if answer.status != 200:
            raise TransportError(
                f"the proxy {proxy.origin.authority} refused the tunnel: {answer.status}"
            )
        transport = await self._pool.loop.start_tls(
            self._transport, self, tls_context(), server_hostname=origin.host
        )
        if transport is None:
            raise TransportError("the TLS handshake through the proxy did not complete")
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def _complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        body = b"".join(self._chunks)
        if len(body) > self._cap:
            body = body[: self._cap]
        waiter.set_result(Response(self._status, self._headers, body, self._keep_alive))

    def _fail(self, error: HTTPError) -> None:
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    # httptools callbacks (never raise: a failure goes to the waiter)

    def on_message_begin(self) -> None:
        if self._waiter is None:  # a second response to one request: drop the connection
            self._keep_alive = False
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        seen = self._headers.get(key)
        self._headers[key] = text if seen is None else f"{seen}, {text}"

    def on_headers_complete(self) -> None:
        if self._waiter is None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and not self._tunnelling:
            self._interim = True  # 100 Continue and the like: the answer follows
            return
        self._status = status
        self._head_done = True
        self._keep_alive = self._parser.should_keep_alive()
        if self._tunnelling:
            self._complete()
            return
        headers = self._headers
        self._cap = self._max_body if status == 200 else self._max_error_body
        length = headers.get("content-length")
        self._framed = (
            length is not None or "chunked" in headers.get("transfer-encoding", "").lower()
        )
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding and encoding != "identity":
            if encoding not in ("gzip", "x-gzip", "deflate"):
                self._fail(BodyError(f"response in an encoding not asked for: {encoding!r}"))
                return
            self._decoder = _Decoder(encoding)
        declared = ascii_int(length) if status == 200 else None
        if declared is not None and declared > self._cap:
            self._fail(BodyError(f"response of {declared} bytes"))

    def on_body(self, data: bytes) -> None:
        if self._waiter is None or self._interim:
            return
        room = self._cap + 1 - self._size
        if self._decoder is not None:
            try:
                data = self._decoder.decode(data, room)
            except zlib.error as exc:
                self._fail(
                    BodyError(f"undecodable {self._headers['content-encoding']} body: {exc}")
                )
                return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._cap:
            if self._status == 200:
                self._fail(BodyError(f"response of more than {self._cap} bytes"))
            else:
                self._keep_alive = False  # the rest stays unread: the connection goes
                self._complete()
                self.close()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._headers = {}
            return
        if self._waiter is None:
            return
        if self._decoder is not None:
            try:
                self._decoder.finish()
            except zlib.error as exc:
                self._fail(
                    BodyError(f"undecodable {self._headers['content-encoding']} body: {exc}")
                )
                return
        self._complete()
