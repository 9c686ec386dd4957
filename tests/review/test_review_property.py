"""No input gives a 500: hypothesis over methods, paths, queries, headers, cookies and form
bodies, sent to the real ASGI app (hardening layer, routing, sessions, store, service).

Requests are built at the ASGI level, below any HTTP client, so they can carry what no
client library would send: any bytes in header values and cookies, lone surrogates in
percent-encoded form fields, query strings that are not UTF-8. Some requests carry a
live reviewer session and its CSRF token, so they get past authentication into the
handlers (claims, decisions with hostile JSON edits, filters); the rest are anonymous.
Every response must be below 500 and carry the security headers.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.review.app import ReviewConfig, create_app
from pipeline.review.auth import SESSION_COOKIE, SessionSigner, UsersFile
from pipeline.review.hardening import HttpLimits, parse_networks
from pipeline.review.service import ReviewService
from pipeline.review.store import open_store
from tests.review.test_review_support import FakeClock, MemoryKafka, escalation, incoming, registry

PASSWORD = "correct horse battery"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
IDS = ["r1", "r2", "tkt-\u202e1", "x\x00y", "missing", ""]
CLAIMED = [f"held-{n}" for n in range(12)]
"""Items alice holds from the start, so edits reach the JSON and schema checks."""
ROUTES = [
    ("GET", "/"),
    ("GET", "/login"),
    ("POST", "/login"),
    ("POST", "/logout"),
    ("GET", "/item"),
    ("POST", "/claim"),
    ("POST", "/claim-next"),
    ("POST", "/release"),
    ("POST", "/decide"),
    ("POST", "/decide"),
    ("GET", "/admin/users"),
    ("POST", "/admin/role"),
    ("POST", "/admin/end-sessions"),
    ("GET", "/audit"),
    ("GET", "/calibration"),
    ("GET", "/healthz"),
    ("GET", "/static/review.css"),
    ("GET", "/static/../auth.py"),
]
FIELDS = [
    "csrf_token",
    "request_id",
    "action",
    "output",
    "reason",
    "question",
    "username",
    "password",
    "next",
    "holder",
    "user",
    "role",
    "prompt",
    "target",
    "version",
    "min_age",
    "max_age",
    "min_conf",
    "max_conf",
    "sort",
    "id",
    "notice",
    "actor",
]
ROUTE_FIELDS = {
    "/login": ["username", "password", "next"],
    "/claim": ["request_id"],
    "/release": ["request_id", "holder"],
    "/decide": ["request_id", "action", "output", "reason", "question"],
    "/claim-next": ["sort", "min_conf", "version"],
    "/admin/role": ["user", "role"],
    "/admin/end-sessions": ["user"],
}
ENDING = ("/logout", "/admin/end-sessions")
"""Requests that may end the live sessions: both are renewed after one."""
HEADER_NAMES = [
    b"origin",
    b"host",
    b"content-type",
    b"sec-fetch-site",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"content-length",
    b"referer",
    b"transfer-encoding",
    b"accept",
]

TRICKY_VALUES = [
    b"http://[",
    b"http://[::1",
    b"https://evil.example",
    b"null",
    b"same-origin",
    b"cross-site",
    b"https",
    b"1.2.3.4, 10.0.0.1",
    b"garbage, ::1",
    b"-1",
    b"99999999999999999999",
    b"chunked",
    b"multipart/form-data; boundary=x",
    b"text/plain",
    b"\xff\xfe",
]
header_values = st.binary(max_size=200) | st.sampled_from(TRICKY_VALUES)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
HOSTILE = [
    '{"label": "bug", "priority": "low", "summary": "a lone \\ud800 surrogate"}',
    '{"label": "bug", "priority": "low", "summary": "fine", "n": ' + "9" * 5000 + "}",
    '{"label": "bug", "priority": "low", "summary": "\\u202e\\u0000 hidden"}',
    "NaN",
    "{",
]
outputs = st.one_of(
    st.sampled_from(HOSTILE),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.text(),
)


@dataclass
class Live:
    """A reviewer session the generated requests may use; renewed after a logout."""

    cookie: bytes
    token: str
    anonymous_cookie: bytes
    anonymous_token: str
    admin_cookie: bytes
    admin_token: str


async def _session(app: Any, user: str | None) -> tuple[bytes, str]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://review.test") as client:
        page = await client.get("/login")
        match = TOKEN.search(page.text)
        assert match
        if user is not None:
            form = {"username": user, "password": PASSWORD, "csrf_token": match.group(1)}
            assert (await client.post("/login", data=form)).status_code == 303
            match = TOKEN.search((await client.get("/")).text)
            assert match
        return f"{SESSION_COOKIE}={client.cookies[SESSION_COOKIE]}".encode(), match.group(1)


def _form_value(draw: Any, name: str, live: Live, token: str) -> str:
    if name == "csrf_token":
        if draw(st.integers(0, 9)) < 7:
            return token
        return draw(st.sampled_from([live.anonymous_token, "", "x" * 43]) | st.text())
    if name in ("request_id", "id"):
        return draw(st.sampled_from(IDS + CLAIMED * 3) | st.text())
    if name == "action":
        return draw(st.sampled_from(["edit", "edit", "edit", "approve", "reject", "clarify", ""]))
    if name == "output":
        return str(draw(outputs))
    return str(draw(st.text()))


@st.composite
def requests(draw: Any, live: Live) -> dict[str, Any]:
    if draw(st.integers(0, 9)) == 0:  # now and then anything at all
        method = draw(st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE"]))
        path = draw(st.text(max_size=30).map(lambda t: "/" + t))
    else:
        method, path = draw(st.sampled_from(ROUTES))
    if draw(st.booleans()):
        params = draw(st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=40), max_size=5))
        query = "&".join(
            f"{quote(k)}={quote(v, errors='surrogatepass')}" for k, v in params.items()
        ).encode()
    else:
        query = draw(st.binary(max_size=80))
    who = draw(st.integers(0, 9))  # 0-4 the reviewer, 5-6 the admin, else anyone
    cookie, token = (live.cookie, live.token) if who < 5 else (live.admin_cookie, live.admin_token)
    fields = draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True))
    if draw(st.integers(0, 4)) > 0:  # mostly the fields the route reads, and the token
        fields = list(dict.fromkeys(["csrf_token", *ROUTE_FIELDS.get(path, []), *fields]))
    if draw(st.integers(0, 4)) == 0:
        body = draw(st.binary(max_size=300))
        content_type = draw(st.binary(max_size=60))
    else:
        form = {name: _form_value(draw, name, live, token) for name in fields}
        body = "&".join(
            f"{quote(k)}={quote(v, errors='surrogatepass')}" for k, v in form.items()
        ).encode()
        content_type = b"application/x-www-form-urlencoded"
    cookie = (
        cookie
        if who < 7
        else draw(
            st.sampled_from([live.anonymous_cookie, b""])
            | st.binary(max_size=120)
            | st.binary(max_size=80).map(lambda b: SESSION_COOKIE.encode() + b"=" + b)
            | st.tuples(st.text(max_size=30), st.text(max_size=30)).map(
                lambda parts: f"{SESSION_COOKIE}={parts[0]}.{parts[1]}".encode("utf-8", "replace")
            )
        )
    )
    headers = [(b"content-type", content_type), (b"cookie", cookie)]
    headers += draw(
        st.lists(
            st.tuples(st.sampled_from(HEADER_NAMES), header_values),
            max_size=4,
        )
    )
    client = draw(st.sampled_from(["127.0.0.1", "10.0.0.1", "::1"]) | st.ip_addresses().map(str))
    return {
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body": body,
        "client": client,
    }


async def _call(app: Any, request: dict[str, Any]) -> list[dict[str, Any]]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["path"].encode("utf-8", "surrogatepass"),
        "query_string": request["query"],
        "root_path": "",
        "headers": request["headers"],
        "client": (request["client"], 50000),
        "server": ("review.test", 80),
    }
    pending = [{"type": "http.request", "body": request["body"], "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@dataclass
class Harness:
    app: Any
    service: ReviewService
    store: Any
    loop: asyncio.AbstractEventLoop
    live: Live
    statuses: dict[int, int]
    fresh: int = 0

    def send(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """One request; fails on a 500, a missing security header or a broken answer."""
        sent = self.loop.run_until_complete(_call(self.app, request))
        starts = [m for m in sent if m["type"] == "http.response.start"]
        assert len(starts) == 1, (request, sent)
        status = starts[0]["status"]
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status < 500, (request, sent)
        names = {k for k, _ in starts[0]["headers"]}
        assert b"content-security-policy" in names and b"x-content-type-options" in names
        if request["method"] == "POST" and request["path"] in ENDING:
            self.live.cookie, self.live.token = self.loop.run_until_complete(
                _session(self.app, "alice")
            )
            self.live.admin_cookie, self.live.admin_token = self.loop.run_until_complete(
                _session(self.app, "root")
            )
        return sent

    def claimed_item(self) -> str:
        """A new item alice holds, so an edit reaches the JSON and schema checks."""
        self.fresh += 1
        request_id = f"fresh-{self.fresh}"
        self.store.apply([incoming(escalation(request_id), 1000 + self.fresh)], [], [], 0)
        assert self.service.claim(request_id, "alice").ok
        return request_id

    def form_post(self, path: str, form: dict[str, str], **extra: Any) -> list[dict[str, Any]]:
        body = "&".join(f"{quote(k)}={quote(v, errors='surrogatepass')}" for k, v in form.items())
        headers = [
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"cookie", self.live.cookie),
        ]
        request = {"method": "POST", "path": path, "query": b"", "headers": headers}
        return self.send({**request, "body": body.encode(), "client": "127.0.0.1", **extra})


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    store = open_store("sqlite://")
    items = [
        escalation("r1"),
        escalation("r2", output=None, confidence=None),
        escalation("tkt-\u202e1", variables={"subject": "a\u202eb", "body": "\x00"}),
        escalation("x\x00y", prompt="invoice_extract", output={"invoice_number": "1"}),
    ]
    items += [escalation(request_id) for request_id in CLAIMED]
    store.apply([incoming(e, i) for i, e in enumerate(items)], [], [], 0)
    kafka = MemoryKafka(store)
    service = ReviewService(store, registry(), kafka, kafka, lambda t: t, FakeClock())
    assert service.become_ready(1.0)
    assert all(service.claim(request_id, "alice").ok for request_id in CLAIMED)
    users = UsersFile(tmp_path / "users.txt")
    users.add("alice", PASSWORD, log_n=10)
    users.add("root", PASSWORD, role="admin", log_n=10)
    config = ReviewConfig(
        users,
        SessionSigner(b"p" * 32),
        login_answer_s=0.0,
        http=HttpLimits(trusted_proxies=parse_networks(["10.0.0.0/8"])),
    )
    app = create_app(service, config)
    loop = asyncio.new_event_loop()
    try:
        anonymous = loop.run_until_complete(_session(app, None))
        live = Live(
            *loop.run_until_complete(_session(app, "alice")),
            *anonymous,
            *loop.run_until_complete(_session(app, "root")),
        )
        yield Harness(app, service, store, loop, live, {})
    finally:
        loop.close()


PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@PROPERTY
@given(data=st.data())
def test_no_request_makes_the_app_answer_500(harness: Harness, data: st.DataObject) -> None:
    harness.send(data.draw(requests(harness.live)))


@PROPERTY
@given(output=outputs, action=st.sampled_from(["edit", "edit", "approve", "reject", "clarify"]))
def test_no_correction_makes_the_app_answer_500(harness: Harness, output: str, action: str) -> None:
    """Forms: every edit reaches the JSON, encodability and schema checks of a live claim."""
    request_id = harness.claimed_item()
    form = {"csrf_token": harness.live.token, "request_id": request_id, "action": action}
    sent = harness.form_post("/decide", {**form, "output": output, "reason": output[:50]})
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    assert status in (303, 400), (output, sent)


@PROPERTY
@given(
    query=st.binary(max_size=200)
    | st.dictionaries(st.sampled_from(FIELDS), st.text()).map(
        lambda params: "&".join(
            f"{quote(k)}={quote(v, errors='surrogatepass')}" for k, v in params.items()
        ).encode()
    )
)
def test_no_query_makes_the_queue_answer_500(harness: Harness, query: bytes) -> None:
    """Queries: filters, sorts and ids as anything, on the pages a reviewer reads."""
    headers = [(b"cookie", harness.live.cookie)]
    for path in ("/", "/item", "/login"):
        request = {"method": "GET", "path": path, "query": query, "headers": headers}
        harness.send({**request, "body": b"", "client": "127.0.0.1"})


@PROPERTY
@given(
    cookie=st.binary(max_size=300),
    headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values), max_size=6),
)
def test_no_cookie_or_header_makes_the_app_answer_500(
    harness: Harness, cookie: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Cookies of any bytes are no session; headers of any bytes are no error."""
    for raw in (cookie, SESSION_COOKIE.encode() + b"=" + cookie):
        all_headers = [(b"cookie", raw), *headers]
        for method, path in (("GET", "/"), ("GET", "/login"), ("POST", "/claim")):
            request = {"method": method, "path": path, "query": b"", "headers": all_headers}
            harness.send({**request, "body": b"request_id=r1", "client": "10.0.0.1"})


@pytest.mark.parametrize("length", [b"\xb9", b"\xb2\xb3", b"-1", b" 12", b"1" * 19, b"", b"0x10"])
def test_a_content_length_that_is_not_ascii_digits_is_a_400(
    harness: Harness, length: bytes
) -> None:
    """Found by the property test above (2026-12-03): ``\\xb9`` is latin-1 for ``¹``, which
    ``str.isdigit`` accepts and ``int`` refuses, and the app answered 500."""
    request = {
        "method": "POST",
        "path": "/login",
        "query": b"",
        "headers": [(b"content-length", length), (b"content-type", b"text/plain")],
        "body": b"",
        "client": "127.0.0.1",
    }
    sent = harness.send(request)
    assert sent[0]["status"] == 400, sent
    assert b"invalid Content-Length" in b"".join(m.get("body", b"") for m in sent)
