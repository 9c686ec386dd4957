"""The model client's own HTTP/1.1 pool (``pipeline.llm.http``) over real sockets.

A scripted server answers each request with bytes a test chooses, including what a real
server or a middlebox gets wrong (framing, encodings, early closes, stray bytes), so every
answer the client cannot use must end in a classified ``ModelError``, never a crash or a
hang. TLS and a ``CONNECT`` proxy run in front of the real fake model.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from pipeline.harness.fakellm import FakeLLMServer
from pipeline.llm.http import BodyError, Pool
from pipeline.llm.openai import OpenAIChatClient
from pipeline.llm.protocol import ChatRequest, EndpointOptions, ModelError
from tests.transport.pki import Pki, make_pki

pytestmark = pytest.mark.usefixtures("no_proxy_env")

REQUEST = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], timeout_s=5.0)
ANSWER = json.dumps(
    {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {}}
).encode()


def response(
    body: bytes = ANSWER, *, status: str = "200 OK", headers: tuple[str, ...] = ()
) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


UNTIL_CLOSE_GZIP = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n"


def chunked(body: bytes, size: int = 7, *headers: str) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    head = "\r\n".join(["HTTP/1.1 200 OK", "Transfer-Encoding: chunked", *headers])
    return head.encode() + b"\r\n\r\n" + b"".join(parts) + b"0\r\n\r\n"


Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Scripted:
    """A server that answers the n-th request with ``replies[n]`` (the last one repeats)."""

    replies: list[bytes | Reply]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0
    closed_by_client: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_client += 1
                    return
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
                if isinstance(reply, bytes):
                    writer.write(reply)
                    await writer.drain()
                else:
                    await reply(reader, writer)
                if writer.is_closing():
                    return
        finally:
            self.open_now -= 1
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[Scripted]]]:
    servers: list[asyncio.Server] = []

    async def start(*replies: bytes | Reply) -> Scripted:
        script = Scripted(list(replies))
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        script.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return script

    yield start
    for server in servers:
        server.close()


async def close_after(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
    writer.close()


async def call(url: str, request: ChatRequest = REQUEST, max_connections: int = 256) -> str:
    client = OpenAIChatClient(url, max_connections=max_connections)
    try:
        return (await client.complete(request)).text
    finally:
        await client.aclose()


async def failure(url: str, request: ChatRequest = REQUEST) -> ModelError:
    with pytest.raises(ModelError) as caught:
        await call(url, request)
    return caught.value


async def test_one_connection_carries_many_calls_and_connection_close_is_honoured(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await scripted(response(), response(), response(headers=("Connection: close",)))
    client = OpenAIChatClient(server.url)
    try:
        texts = [(await client.complete(REQUEST)).text for _ in range(5)]
    finally:
        await client.aclose()
    assert texts == ["ok"] * 5
    # calls 1-2 on the first connection, 3 closes it; 4 and 5 each get one closing answer
    assert (server.connections, len(server.requests)) == (3, 5)


async def test_chunked_gzip_and_both_deflate_forms_are_decoded(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw.compress(ANSWER) + raw.flush()
    replies: list[bytes | Reply] = [
        chunked(ANSWER),
        response(gzip.compress(ANSWER), headers=("Content-Encoding: gzip",)),
        response(zlib.compress(ANSWER), headers=("Content-Encoding: deflate",)),
        response(raw_deflate, headers=("Content-Encoding: deflate",)),
        chunked(zlib.compress(ANSWER), 1, "Content-Encoding: deflate"),  # a byte at a time
        # no length, no chunks: the body ends with the connection
        lambda r, w: close_after(w, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + ANSWER),
        b"HTTP/1.1 100 Continue\r\n\r\n" + response(),
        lambda r, w: close_after(w, UNTIL_CLOSE_GZIP + gzip.compress(ANSWER)),
    ]
    for reply in replies:
        server = await scripted(reply)
        assert await call(server.url) == "ok", reply
    sent = server.requests[0].lower()
    assert b"accept-encoding: gzip, deflate\r\n" in sent


async def test_what_is_not_http_ends_in_a_classified_error(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    truncated = response()[:-5]
    cut_gzip = gzip.compress(ANSWER)[:-8]  # no trailer
    cases: list[tuple[bytes | Reply, str, str]] = [
        (b"SMTP ready\r\n\r\n", "connection", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", "connection", "malformed"),
        (lambda r, w: close_after(w, truncated), "connection", "in the middle of the response"),
        (lambda r, w: close_after(w, b""), "connection", "before answering"),
        (response(b"not gzip", headers=("Content-Encoding: gzip",)), "bad_response", "gzip"),
        (response(cut_gzip, headers=("Content-Encoding: gzip",)), "bad_response", "ends early"),
        (lambda r, w: close_after(w, UNTIL_CLOSE_GZIP + cut_gzip), "bad_response", "ends early"),
        (response(ANSWER, headers=("Content-Encoding: br",)), "bad_response", "'br'"),
        (response(b"{}"), "bad_response", "unexpected response shape"),
    ]  # fmt: skip
    for reply, kind, words in cases:
        server = await scripted(reply)
        error = await failure(server.url)
        assert (error.kind, words in str(error)) == (kind, True), (reply, str(error))


async def test_bodies_past_the_cap_are_refused_and_error_bodies_cut(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    big = b"x" * 5000

    async def post(server: Scripted, body: bytes = b"{}") -> int:
        pool = Pool(server.url, {}, limit=4, keepalive_s=4.0, max_body=1000, max_error_body=100)
        try:
            answer = await pool.post(body)
        finally:
            pool.close()
        assert answer.body == big[:100] and not answer.keep_alive
        return answer.status

    for reply in (
        response(big),  # declared too large: refused before the body is read
        chunked(big, size=512),  # found too large while reading
        response(gzip.compress(big), headers=("Content-Encoding: gzip",)),  # decoded too large
    ):
        server = await scripted(reply)
        pool = Pool(server.url, {}, limit=4, keepalive_s=4.0, max_body=1000, max_error_body=100)
        with pytest.raises(BodyError, match="response of"):
            await pool.post(b"{}")
        pool.close()
    server = await scripted(response(big, status="503 Service Unavailable"))
    assert await post(server) == 503
    error = await failure(server.url)
    assert (error.kind, error.status) == ("server_error", 503)


async def test_the_pool_holds_at_most_its_limit_and_every_call_is_answered(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.02)
        writer.write(response())
        await writer.drain()

    server = await scripted(slow)
    client = OpenAIChatClient(server.url, max_connections=2)
    try:
        answers = await asyncio.gather(*(client.complete(REQUEST) for _ in range(12)))
    finally:
        await client.aclose()
    assert [a.text for a in answers] == ["ok"] * 12
    assert (server.connections, server.most_open, len(server.requests)) == (2, 2, 12)


async def test_a_connection_the_server_closed_while_idle_is_not_used_again(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    # keep-alive advertised, then the server closes anyway (an idle timeout shorter than ours)
    server = await scripted(lambda r, w: close_after(w, response()))
    pool = Pool(server.url, {}, limit=4, keepalive_s=4.0, max_body=1000, max_error_body=100)
    try:
        for _ in range(3):
            assert (await pool.post(b"{}")).body == ANSWER
            deadline = asyncio.get_running_loop().time() + 5
            while pool.idle:  # until the client has heard the close
                assert asyncio.get_running_loop().time() < deadline, "the close went unheard"
                await asyncio.sleep(0.01)
    finally:
        pool.close()
    assert (server.connections, len(server.requests)) == (3, 3)  # nothing was resent


async def test_a_timeout_abandons_its_connection_and_the_next_call_works(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    abandoned = asyncio.Event()

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.read() == b"":  # returns when the client closes the connection
            abandoned.set()
        writer.close()

    server = await scripted(never, response())
    client = OpenAIChatClient(server.url, max_connections=1)
    quick = ChatRequest(model="m", messages=REQUEST.messages, timeout_s=0.2)
    try:
        with pytest.raises(ModelError) as caught:
            await client.complete(quick)
        assert caught.value.kind == "timeout"
        assert (await client.complete(REQUEST)).text == "ok"
    finally:
        await client.aclose()
    assert server.connections == 2
    try:
        await asyncio.wait_for(abandoned.wait(), 5)
    except TimeoutError:
        pytest.fail("the timed-out call's connection was never closed")


async def test_stray_bytes_after_an_answer_drop_the_connection(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await scripted(response() + b"HTTP/1.1 200 OK\r\n", response())
    client = OpenAIChatClient(server.url)
    try:
        assert [(await client.complete(REQUEST)).text for _ in range(2)] == ["ok", "ok"]
    finally:
        await client.aclose()
    assert server.connections == 2


async def test_headers_that_would_split_the_request_are_refused(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await scripted(response())
    for headers in ({"X-Team": "a\r\nX-Injected: 1"}, {"Content-Length": "0"}, {"B@d": "x"}):
        request = ChatRequest(
            model="m", messages=REQUEST.messages, endpoint=EndpointOptions(headers=headers)
        )
        error = await failure(server.url, request)
        assert error.kind == "client_error" and "cannot send the request" in str(error)
    request = ChatRequest(
        model="m",
        messages=REQUEST.messages,
        endpoint=EndpointOptions(headers={"authorization": "Bearer endpoint", "X-Team": "a"}),
    )
    assert await call(server.url, request, max_connections=1) == "ok"
    sent = server.requests[-1].decode()
    assert sent.lower().count("authorization:") == 1 and "authorization: Bearer endpoint" in sent
    assert "X-Team: a\r\n" in sent
    assert server.requests[-1].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


async def test_nothing_listening_is_a_connection_error(unused_tcp_port: int) -> None:
    error = await failure(f"http://127.0.0.1:{unused_tcp_port}/v1")
    assert error.kind == "connection" and "cannot connect to 127.0.0.1" in str(error)


# TLS, in front of the real fake model


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def tls_front(pki: Pki) -> AsyncIterator[tuple[int, FakeLLMServer]]:
    """The fake model behind TLS, with the "broker" certificate (127.0.0.1, localhost)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.directory / "broker.pem", pki.directory / "broker.key")
    async with FakeLLMServer() as fake:

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(fake.host, fake.port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        server = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=context)
        try:
            yield server.sockets[0].getsockname()[1], fake
        finally:
            server.close()


async def test_https_verifies_the_server_against_the_configured_ca(
    tls_front: tuple[int, FakeLLMServer],
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, fake = tls_front
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.other_ca))
    error = await failure(f"https://localhost:{port}/v1")
    assert error.kind == "connection" and "CERTIFICATE_VERIFY_FAILED" in str(error)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    assert await call(f"https://localhost:{port}/v1")
    assert await call(f"https://127.0.0.1:{port}/v1")  # the address is in the certificate too
    assert len(fake.recent_requests()) == 2


async def test_https_through_a_proxy_goes_over_connect(
    tls_front: tuple[int, FakeLLMServer],
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, fake = tls_front
    asked: list[bytes] = []

    async def connect_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        asked.append(head)
        authority = head.split(b" ")[1].decode()
        if not head.startswith(b"CONNECT "):
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", authority.split(":")[1])
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    proxy = await asyncio.start_server(connect_proxy, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:p%40ss@127.0.0.1:{proxy_port}")
        assert await call(f"https://localhost:{port}/v1")
    finally:
        proxy.close()
    assert asked[0].startswith(f"CONNECT localhost:{port} HTTP/1.1\r\n".encode())
    assert b"Proxy-Authorization: Basic dXNlcjpwQHNz\r\n" in asked[0]  # user:p@ss
    assert fake.recent_requests()[0]["headers"]["host"] == f"localhost:{port}"
