"""The review web app over HTTP (httpx ASGI transport): authentication, CSRF, escaping, CSP."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pipeline.review.app import ReviewConfig, create_app
from pipeline.review.auth import (
    SESSION_COOKIE,
    SessionSigner,
    UsersFile,
    hash_password,
    verify_password,
)
from pipeline.review.service import ReviewService
from pipeline.review.store import SqlReviewStore, open_store
from tests.review.test_review_support import (
    XSS_SUMMARY,
    FakeClock,
    MemoryKafka,
    escalation,
    incoming,
    registry,
)

PASSWORD = "correct horse battery"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Harness:
    client: httpx.AsyncClient
    store: SqlReviewStore
    kafka: MemoryKafka
    signer: SessionSigner

    async def csrf(self, path: str = "/") -> str:
        page = await self.client.get(path)
        match = TOKEN.search(page.text)
        assert match, page.text
        return match.group(1)

    async def login(self, user: str = "alice", password: str = PASSWORD) -> httpx.Response:
        token = await self.csrf("/login")
        return await self.client.post(
            "/login", data={"username": user, "password": password, "csrf_token": token}
        )


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    store = open_store("sqlite://")
    payload = escalation(
        "xss<script>1</script>",
        output={"label": "bug", "priority": "normal", "summary": XSS_SUMMARY},
        raw_text=f"Here you go: {XSS_SUMMARY}",
        variables={"subject": '<b>bold</b> " onmouseover=alert(1)', "body": XSS_SUMMARY},
        reason="low_confidence",
    )
    store.apply([incoming(escalation("r1"), 0), incoming(payload, 1)], [], [], 0)
    kafka = MemoryKafka(store)
    clock = FakeClock()
    service = ReviewService(store, registry(), kafka, kafka, lambda t: t, clock)
    assert service.become_ready(1.0)
    users = UsersFile(tmp_path / "users.txt")
    users.add("alice", PASSWORD, log_n=10)
    users.add("bob", PASSWORD, log_n=10)
    signer = SessionSigner(b"k" * 32)
    app = create_app(service, ReviewConfig(users, signer))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://review.test") as client:
        yield Harness(client, store, kafka, signer)


def test_passwords_are_salted_scrypt_hashes() -> None:
    first, second = hash_password("pw-12345678", log_n=10), hash_password("pw-12345678", log_n=10)
    assert first.startswith("$scrypt$ln=10,r=8,p=1$") and first != second
    assert verify_password("pw-12345678", first)
    assert not verify_password("pw-12345679", first)
    assert not verify_password("pw-12345678", "$scrypt$garbage")


def test_session_cookies_cannot_be_forged_or_outlive_their_expiry() -> None:
    now = [1000.0]
    signer = SessionSigner(b"s" * 32, max_age_s=60, clock=lambda: now[0])
    session = signer.new("alice")
    cookie = signer.dumps(session)
    assert signer.loads(cookie) == session
    payload, signature = cookie.split(".")
    assert signer.loads(f"{payload}.{signature[:-2]}xx") is None
    other = SessionSigner(b"t" * 32, clock=lambda: now[0])
    assert other.loads(cookie) is None
    assert not signer.check_csrf(session, other.csrf_token(session))
    assert signer.check_csrf(session, signer.csrf_token(session))
    now[0] += 61
    assert signer.loads(cookie) is None


async def test_pages_need_a_login(harness: Harness) -> None:
    response = await harness.client.get("/item?id=r1")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


async def test_anonymous_writes_are_refused(harness: Harness) -> None:
    token = await harness.csrf("/login")  # a valid token of an anonymous session
    for path in ("/claim", "/decide", "/release", "/claim-next", "/logout"):
        response = await harness.client.post(
            path, data={"request_id": "r1", "action": "approve", "csrf_token": token}
        )
        assert response.status_code == 403, path
    assert harness.kafka.published == []
    assert harness.store.audit_trail("r1") == []


async def test_posts_without_the_sessions_csrf_token_are_refused(harness: Harness) -> None:
    assert (await harness.login()).status_code == 303
    good = await harness.csrf()
    missing = await harness.client.post("/claim", data={"request_id": "r1"})
    assert missing.status_code == 403 and "CSRF" in missing.text
    foreign = harness.signer.csrf_token(harness.signer.new("alice"))  # another session's
    wrong = await harness.client.post("/claim", data={"request_id": "r1", "csrf_token": foreign})
    assert wrong.status_code == 403
    cross = await harness.client.post(
        "/claim",
        data={"request_id": "r1", "csrf_token": good},
        headers={"origin": "https://evil.example"},
    )
    assert cross.status_code == 403
    assert harness.store.audit_trail("r1") == []
    ok = await harness.client.post("/claim", data={"request_id": "r1", "csrf_token": good})
    assert ok.status_code == 303


async def test_login_needs_csrf_the_right_password_and_sets_a_strict_cookie(
    harness: Harness,
) -> None:
    no_token = await harness.client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert no_token.status_code == 403
    wrong = await harness.login(password="wrong password")
    assert wrong.status_code == 401 and "wrong password" in wrong.text
    anonymous = harness.client.cookies[SESSION_COOKIE]
    ok = await harness.login()
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert harness.client.cookies[SESSION_COOKIE] != anonymous  # new session id on login
    assert (await harness.client.get("/")).status_code == 200


async def test_a_tampered_session_cookie_is_anonymous(harness: Harness) -> None:
    await harness.login()
    token = await harness.csrf()
    cookie = harness.client.cookies[SESSION_COOKIE]
    payload = json.dumps({"sid": "x", "u": "mallory", "exp": 9999999999}).encode()
    forged = base64.urlsafe_b64encode(payload).rstrip(b"=").decode() + "." + cookie.split(".")[1]
    harness.client.cookies.set(SESSION_COOKIE, forged, domain="review.test")
    response = await harness.client.post("/claim", data={"request_id": "r1", "csrf_token": token})
    assert response.status_code == 403


async def test_request_and_model_text_is_escaped_and_scripts_are_not_inline(
    harness: Harness,
) -> None:
    await harness.login()
    queue = await harness.client.get("/")
    item = await harness.client.get("/item", params={"id": "xss<script>1</script>"})
    assert item.status_code == 200
    for page in (queue, item):
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        scripts = re.findall(r"<script[^>]*>", page.text)
        assert scripts == ['<script src="/static/review.js" defer>'], scripts
        assert "<img" not in page.text
        assert "xss&lt;script&gt;1&lt;/script&gt;" in page.text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in item.text
    assert "onerror=&#34;window.__pwned = 2&#34;" in item.text
    assert "&lt;b&gt;bold&lt;/b&gt;" in item.text
    script = await harness.client.get("/static/review.js")
    assert script.status_code == 200 and "content-security-policy" in script.headers


async def test_edit_errors_are_shown_and_a_double_submit_decides_once(harness: Harness) -> None:
    await harness.login()
    token = await harness.csrf()
    await harness.client.post("/claim", data={"request_id": "r1", "csrf_token": token})
    invalid = await harness.client.post(
        "/decide",
        data={
            "request_id": "r1",
            "action": "edit",
            "output": '{"label": "<nope>", "priority": "normal", "summary": "ok ok ok ok"}',
            "csrf_token": token,
        },
    )
    assert invalid.status_code == 400
    assert "does not match the output schema" in invalid.text
    assert "&#39;&lt;nope&gt;&#39; is not one of" in invalid.text
    assert "&#34;&lt;nope&gt;&#34;" in invalid.text  # the draft is kept, escaped
    fixed = {"label": "bug", "priority": "high", "summary": "Dashboard takes 40 s to load."}
    form = {"request_id": "r1", "action": "edit", "output": json.dumps(fixed), "csrf_token": token}
    first = await harness.client.post("/decide", data=form)
    second = await harness.client.post("/decide", data=form)
    assert first.status_code == second.status_code == 303
    assert "notice=decided" in first.headers["location"]
    assert "notice=duplicate" in second.headers["location"]
    assert [m.topic for m in harness.kafka.published] == [
        "llm.review.decisions",
        "llm.results",
        "llm.corrections",
    ]
    page = await harness.client.get(first.headers["location"])
    assert "Decided: edit" in page.text and "decide:edit" in page.text


async def test_a_second_reviewer_cannot_take_a_claimed_item(harness: Harness) -> None:
    await harness.login("alice")
    token = await harness.csrf()
    await harness.client.post("/claim", data={"request_id": "r1", "csrf_token": token})
    await harness.login("bob")
    token = await harness.csrf()
    taken = await harness.client.post("/claim", data={"request_id": "r1", "csrf_token": token})
    assert taken.status_code == 409 and "Claimed by alice" in taken.text
    decide = await harness.client.post(
        "/decide", data={"request_id": "r1", "action": "approve", "csrf_token": token}
    )
    assert decide.status_code == 409
    assert harness.kafka.published == []
