"""The review web app over real HTTP (uvicorn on a local port): authentication, CSRF,
escaping, CSP, and every failure found by probing it as an attacker (issue #16)."""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.review.app import ReviewConfig, create_app
from pipeline.review.auth import (
    SESSION_COOKIE,
    SessionPolicy,
    SessionSigner,
    UsersFile,
    hash_password,
    verify_password,
)
from pipeline.review.hardening import HttpLimits, parse_networks
from pipeline.review.service import ReviewService
from pipeline.review.store import SqlReviewStore, open_store
from tests.review.test_review_support import (
    XSS_SUMMARY,
    FakeClock,
    MemoryKafka,
    escalation,
    incoming,
    registry,
    serving,
)

PASSWORD = "correct horse battery"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
IDLE_S = 600
LIFETIME_S = 3600


@dataclass
class Server:
    base: str
    store: SqlReviewStore
    kafka: MemoryKafka
    clock: FakeClock
    users: UsersFile
    service: ReviewService

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=30, **kwargs)


def csrf(client: httpx.Client, path: str = "/") -> str:
    page = client.get(path)
    match = TOKEN.search(page.text)
    assert match, page.text
    return match.group(1)


def login(client: httpx.Client, user: str = "alice", password: str = PASSWORD) -> httpx.Response:
    token = csrf(client, "/login")
    return client.post("/login", data={"username": user, "password": password, "csrf_token": token})


@contextmanager
def logged_in(server: Server, user: str = "alice") -> Iterator[httpx.Client]:
    with server.client() as client:
        assert login(client, user).status_code == 303
        yield client


def claim(client: httpx.Client, request_id: str = "r1") -> httpx.Response:
    return client.post("/claim", data={"request_id": request_id, "csrf_token": csrf(client)})


def build(
    tmp_path: Path, *, answer_s: float = 0.0, http: HttpLimits | None = None, **config: Any
) -> tuple[Any, Server]:
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
    users.add("root", PASSWORD, role="admin", log_n=10)
    app = create_app(
        service,
        ReviewConfig(
            users,
            SessionSigner(b"k" * 32),
            sessions=SessionPolicy(idle_timeout_s=IDLE_S, lifetime_s=LIFETIME_S),
            login_answer_s=answer_s,
            http=http or HttpLimits(chunk_timeout_s=1.0, body_deadline_s=3.0),
            **config,
        ),
    )
    return app, Server("", store, kafka, clock, users, service)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    app, parts = build(tmp_path)
    with serving(app) as base:
        parts.base = base
        yield parts


# -- what held before, kept ----------------------------------------------------------------


def test_passwords_are_salted_scrypt_hashes() -> None:
    first, second = hash_password("pw-12345678", log_n=10), hash_password("pw-12345678", log_n=10)
    assert first.startswith("$scrypt$ln=10,r=8,p=1$") and first != second
    assert verify_password("pw-12345678", first)
    assert not verify_password("pw-12345679", first)
    assert not verify_password("pw-12345678", "$scrypt$garbage")


def test_pages_need_a_login(server: Server) -> None:
    with server.client() as client:
        response = client.get("/item?id=r1")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


def test_anonymous_writes_are_refused(server: Server) -> None:
    with server.client() as client:
        token = csrf(client, "/login")  # a valid token of an anonymous session
        for path in ("/claim", "/decide", "/release", "/claim-next", "/logout"):
            response = client.post(
                path, data={"request_id": "r1", "action": "approve", "csrf_token": token}
            )
            assert response.status_code == 403, path
    assert server.kafka.published == []
    assert server.store.audit_trail("r1") == []


def test_posts_without_the_sessions_csrf_token_are_refused(server: Server) -> None:
    with logged_in(server) as client, logged_in(server, "bob") as other:
        good = csrf(client)
        missing = client.post("/claim", data={"request_id": "r1"})
        assert missing.status_code == 403 and "CSRF" in missing.text
        foreign = csrf(other)  # another session's token
        wrong = client.post("/claim", data={"request_id": "r1", "csrf_token": foreign})
        assert wrong.status_code == 403
        cross = client.post(
            "/claim",
            data={"request_id": "r1", "csrf_token": good},
            headers={"origin": "https://evil.example"},
        )
        assert cross.status_code == 403
        assert server.store.audit_trail("r1") == []
        assert (
            client.post("/claim", data={"request_id": "r1", "csrf_token": good}).status_code == 303
        )


def test_login_needs_csrf_the_right_password_and_sets_a_strict_cookie(server: Server) -> None:
    with server.client() as client:
        no_token = client.post("/login", data={"username": "alice", "password": PASSWORD})
        assert no_token.status_code == 403
        wrong = login(client, password="wrong password")
        assert wrong.status_code == 401 and "wrong password" in wrong.text
        anonymous = client.cookies[SESSION_COOKIE]
        ok = login(client)
        assert ok.status_code == 303
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
        assert client.cookies[SESSION_COOKIE] != anonymous  # new session id on login
        assert client.get("/").status_code == 200


def test_a_tampered_session_cookie_is_anonymous(server: Server) -> None:
    with logged_in(server) as client:
        token = csrf(client)
        cookie = client.cookies[SESSION_COOKIE]
        payload = json.dumps({"sid": "x", "u": "mallory", "exp": 9999999999}).encode()
        forged = (
            base64.urlsafe_b64encode(payload).rstrip(b"=").decode() + "." + cookie.split(".")[1]
        )
        client.cookies.set(SESSION_COOKIE, forged)
        response = client.post("/claim", data={"request_id": "r1", "csrf_token": token})
    assert response.status_code == 403


def test_request_and_model_text_is_escaped_and_scripts_are_not_inline(server: Server) -> None:
    with logged_in(server) as client:
        queue = client.get("/")
        item = client.get("/item", params={"id": "xss<script>1</script>"})
        script = client.get("/static/review.js")
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
    assert script.status_code == 200 and "content-security-policy" in script.headers


def test_edit_errors_are_shown_and_a_double_submit_decides_once(server: Server) -> None:
    with logged_in(server) as client:
        token = csrf(client)
        claim(client)
        bad = '{"label": "<nope>", "priority": "normal", "summary": "ok ok ok ok"}'
        invalid = client.post(
            "/decide",
            data={"request_id": "r1", "action": "edit", "output": bad, "csrf_token": token},
        )
        assert invalid.status_code == 400
        assert "does not match the output schema" in invalid.text
        assert "&#39;&lt;nope&gt;&#39; is not one of" in invalid.text
        assert "&#34;&lt;nope&gt;&#34;" in invalid.text  # the draft is kept, escaped
        fixed = {"label": "bug", "priority": "high", "summary": "Dashboard takes 40 s to load."}
        form = {
            "request_id": "r1",
            "action": "edit",
            "output": json.dumps(fixed),
            "csrf_token": token,
        }
        first = client.post("/decide", data=form)
        first_page = client.get(first.headers["location"])
        second = client.post("/decide", data=form)
        second_page = client.get(second.headers["location"])
    assert first.status_code == second.status_code == 303
    assert "Decision recorded and delivered." in first_page.text
    assert "already decided; nothing was changed" in second_page.text
    assert [m.topic for m in server.kafka.published] == [
        "llm.review.decisions",
        "llm.results",
        "llm.corrections",
    ]
    assert "Decided: edit" in first_page.text and "decide:edit" in first_page.text


def test_a_second_reviewer_cannot_take_a_claimed_item(server: Server) -> None:
    with logged_in(server, "alice") as alice, logged_in(server, "bob") as bob:
        claim(alice)
        taken = claim(bob)
        assert taken.status_code == 409 and "Claimed by alice" in taken.text
        decide = bob.post(
            "/decide", data={"request_id": "r1", "action": "approve", "csrf_token": csrf(bob)}
        )
    assert decide.status_code == 409
    assert server.kafka.published == []


# -- failure 1: sessions that end ----------------------------------------------------------


def test_logout_ends_the_session_and_a_copied_cookie_no_longer_works(server: Server) -> None:
    with logged_in(server) as client, logged_in(server) as elsewhere:
        copied = client.cookies[SESSION_COOKIE]
        token = csrf(client)
        assert client.post("/logout", data={"csrf_token": token}).status_code == 303
        with server.client(cookies={SESSION_COOKIE: copied}) as thief:
            queue = thief.get("/")
            assert queue.status_code == 303 and "notice=ended" in queue.headers["location"]
            grab = thief.post("/claim", data={"request_id": "r1", "csrf_token": token})
            assert grab.status_code == 403
        # logout ends every session of that reviewer, not just this browser's
        assert elsewhere.get("/").status_code == 303
    assert server.store.audit_trail("r1") == []


def test_a_password_change_or_removal_ends_the_users_sessions(server: Server) -> None:
    with logged_in(server, "alice") as alice, logged_in(server, "bob") as bob:
        assert alice.get("/").status_code == 200 and bob.get("/").status_code == 200
        server.users.add("alice", "a brand new password", log_n=10)
        assert alice.get("/").status_code == 303
        assert login(alice, password="a brand new password").status_code == 303
        assert alice.get("/").status_code == 200
        assert server.users.remove("bob")
        assert bob.get("/").status_code == 303
        assert login(bob).status_code == 401


def test_idle_sessions_end_and_no_session_outlives_its_lifetime(server: Server) -> None:
    with logged_in(server) as idle, logged_in(server) as busy:
        server.clock.advance(seconds=IDLE_S - 60)
        assert busy.get("/").status_code == 200  # seen: its idle clock restarts
        server.clock.advance(seconds=120)
        assert idle.get("/").status_code == 303  # idle for IDLE_S + 60 s
        assert busy.get("/").status_code == 200
        while server.clock.now_ms < FakeClock().now_ms + (LIFETIME_S - 300) * 1000:
            server.clock.advance(seconds=IDLE_S / 2)
            assert busy.get("/").status_code == 200
        server.clock.advance(seconds=IDLE_S / 2)
        assert busy.get("/").status_code == 303  # past its absolute lifetime, though busy


def test_cookies_are_secure_behind_https_and_a_trusted_proxy_only(tmp_path: Path) -> None:
    def login_cookie(base_app: Any, headers: dict[str, str]) -> str:
        with serving(base_app) as base, httpx.Client(base_url=base, headers=headers) as client:
            page = client.get("/login")  # the proxy would speak TLS to the browser; we cannot,
            anonymous = page.cookies[SESSION_COOKIE]  # so a Secure cookie is sent by hand
            match = TOKEN.search(page.text)
            assert match
            form = {"username": "alice", "password": PASSWORD, "csrf_token": match.group(1)}
            client.cookies.clear()
            response = client.post(
                "/login", data=form, headers={"cookie": f"{SESSION_COOKIE}={anonymous}"}
            )
            assert response.status_code == 303
            return response.headers["set-cookie"].lower()

    proxy = HttpLimits(trusted_proxies=parse_networks(["127.0.0.1/32"]))
    trusting, _ = build(tmp_path, http=proxy)
    plain, _ = build(tmp_path)
    forwarded = {"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.9"}
    assert "; secure" in login_cookie(trusting, forwarded)
    assert "; secure" not in login_cookie(plain, forwarded)  # anyone can send that header
    assert "; secure" not in login_cookie(trusting, {})
    forced, _ = build(tmp_path, cookie_secure=True)
    assert "; secure" in login_cookie(forced, {})


# -- failure 2: throttling that protects without locking out --------------------------------


def test_guessing_across_many_names_from_one_address_is_throttled(server: Server) -> None:
    with server.client() as attacker:
        answers = [login(attacker, f"user{n}", "guess").status_code for n in range(40)]
        assert answers == [401] * 11 + [429] * 29  # 10 free failures per address, then waits
        correct = login(attacker, "alice", PASSWORD)
        assert correct.status_code == 429
        assert re.search(r"Too many attempts; try again in \d+ s", correct.text)
        assert "wrong password" not in correct.text
        assert int(correct.headers["retry-after"]) >= 1
    with server.client() as reviewer:  # the same address waits even for the right user
        assert login(reviewer).status_code == 429


def test_a_stranger_cannot_lock_a_reviewer_out(tmp_path: Path) -> None:
    proxy = HttpLimits(trusted_proxies=parse_networks(["127.0.0.1/32"]))
    app, parts = build(tmp_path, http=proxy)
    with serving(app) as base:
        alice = httpx.Client(base_url=base, headers={"x-forwarded-for": "198.51.100.7"})
        assert login(alice).status_code == 303  # alice's browser now has a device cookie
        alice.post("/logout", data={"csrf_token": csrf(alice)})
        for n in range(8):  # an attacker guesses alice's password from 8 addresses
            with httpx.Client(base_url=base, headers={"x-forwarded-for": f"192.0.2.{n}"}) as evil:
                login(evil, "alice", "guess")
        with httpx.Client(base_url=base, headers={"x-forwarded-for": "192.0.2.99"}) as evil:
            blocked = login(evil, "alice", PASSWORD)
            assert blocked.status_code == 429  # the name is throttled for strangers...
            wait = int(blocked.headers["retry-after"])
            assert 1 <= wait <= 60  # ...with a growing delay, never a lock
            for _ in range(20):  # attempts while throttled do not extend the wait
                assert int(login(evil, "alice", "guess").headers["retry-after"]) <= wait
            parts.clock.advance(seconds=wait)
            assert login(evil, "alice", PASSWORD).status_code == 303
        assert login(alice).status_code == 303  # ...but alice's own browser was never held
        alice.close()


def test_login_answers_take_the_same_time_whatever_the_outcome(tmp_path: Path) -> None:
    answer_s = 0.4
    app, _ = build(tmp_path, answer_s=answer_s)
    with serving(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        timings: dict[int, list[float]] = {}
        for _ in range(14):
            token = csrf(client, "/login")
            started = time.monotonic()
            response = client.post(
                "/login", data={"username": "alice", "password": "nope", "csrf_token": token}
            )
            timings.setdefault(response.status_code, []).append(time.monotonic() - started)
    assert set(timings) == {401, 429}  # wrong passwords, then throttled
    for status, seconds in timings.items():  # a lower bound only: no wall-clock ceilings
        assert min(seconds) >= answer_s, (status, seconds)


def test_the_client_address_comes_from_forwarding_headers_only_behind_a_trusted_proxy(
    tmp_path: Path,
) -> None:
    def statuses(http: HttpLimits) -> list[int]:
        app, _ = build(tmp_path, http=http)
        answers = []
        with serving(app) as base:
            for n in range(12):  # each "from" its own address
                headers = {"x-forwarded-for": f"1.2.3.4, 192.0.2.{n}"}
                with httpx.Client(base_url=base, headers=headers) as client:
                    answers.append(login(client, f"user{n}", "guess").status_code)
        return answers

    trusted = statuses(HttpLimits(trusted_proxies=parse_networks(["127.0.0.1"])))
    assert trusted == [401] * 12
    spoofed = statuses(HttpLimits())  # nobody trusted: all from 127.0.0.1
    assert spoofed == [401] * 11 + [429]


# -- failure 3: hostile input gives no 500 --------------------------------------------------


def test_hostile_edits_are_refused_with_a_reason_not_a_500(server: Server) -> None:
    with logged_in(server) as client:
        claim(client)
        token = csrf(client)
        hostile = {
            "nested": "[" * 100_000 + "]" * 100_000,
            "surrogate": '{"label": "bug", "priority": "low", "summary": "a \\ud800 b"}',
            "nan": '{"label": "bug", "priority": "low", "summary": NaN}',
            "huge": '{"label": "bug", "priority": "low", "summary": "x", "n": ' + "9" * 5000 + "}",
            "deep": '{"a":' * 40 + "1" + "}" * 40,
        }
        for name, output in hostile.items():
            response = client.post(
                "/decide",
                data={"request_id": "r1", "action": "edit", "output": output, "csrf_token": token},
            )
            assert response.status_code == 400, (name, response.status_code)
            assert "corrected output" in response.text, name
    assert server.kafka.published == []


def test_out_of_range_filters_and_odd_cookies_are_no_errors(server: Server) -> None:
    with logged_in(server) as client:
        for query in ("version=99999999999999999999", "min_age=-5", "max_conf=NaN", "sort=x;--"):
            response = client.get(f"/?{query}")
            assert response.status_code == 400, query
            assert "Some filters were ignored" in response.text
        assert client.get("/?version=2&min_conf=0.5").status_code == 200
    raw_cookie = f"{SESSION_COOKIE}=caf\xe9.\xff\xfe\xa0; other=\xc3(".encode("latin-1")
    with server.client(headers={"cookie": raw_cookie}) as odd:
        assert odd.get("/").status_code == 303
        assert odd.get("/login").status_code == 200


def test_errors_carry_the_security_headers_too(tmp_path: Path) -> None:
    app, parts = build(tmp_path)

    def broken(query: Any) -> Any:
        raise RuntimeError("a bug")

    parts.service.queue_rows = broken  # type: ignore[method-assign]
    with serving(app) as base, httpx.Client(base_url=base) as client:
        login(client)
        responses = [client.get("/"), client.get("/nope"), client.put("/login")]
    assert [r.status_code for r in responses] == [500, 404, 405]
    for response in responses:
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
        assert "a bug" not in response.text


# -- failure 4: bodies are bounded before parsing and authentication ------------------------


def _raw(base: str, request: bytes, body_chunk: bytes = b"", chunks: int = 0) -> bytes:
    """Send a request over a plain socket (what no HTTP library lets a test do)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        try:
            for _ in range(chunks):
                sock.sendall(body_chunk)
        except OSError:
            pass  # the server answered and closed while we were still sending: the point
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer


def test_a_huge_anonymous_body_is_refused_unread(server: Server) -> None:
    head = (
        b"POST /claim HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    answer = _raw(server.base, head, b"a=" + b"b" * 65534, chunks=4)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"content-security-policy" in answer.lower()


def test_uploads_are_refused_before_reading(server: Server) -> None:
    head = (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: 209715200\r\n\r\n"
    )
    assert _raw(server.base, head, b"x" * 65536, chunks=4).startswith(b"HTTP/1.1 413")
    small = (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: 10\r\n\r\n"
    )
    assert _raw(server.base, small + b"--x--\r\n\r\n ").startswith(b"HTTP/1.1 415")


def test_a_body_shorter_than_its_content_length_times_out(server: Server) -> None:
    head = (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000\r\n\r\nusername=alice"
    )
    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)  # and then nothing more, connection left open
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


# -- failure 5: text that cannot spoof ------------------------------------------------------

SPOOF_ID = "tkt-\u202e1337\u202c-\u200bx\x00"
HIDDEN_CHARS = ("\u202e", "\u202c", "\u200b", "\x00", "\u2066")


def test_bidi_nul_and_invisible_characters_are_visible_markers_everywhere(server: Server) -> None:
    spoof = escalation(
        SPOOF_ID,
        output={"label": "bug", "priority": "low", "summary": "see \u202efdp.exe\u202c now"},
        raw_text="raw \u2066text\u2069 \x00",
        variables={"subject": "invoice\u202etxt.exe", "body": "a\u200bb\x00c"},
    )
    server.store.apply([incoming(spoof, 5)], [], [], 0)
    with logged_in(server) as client:
        queue = client.get("/")
        item = client.get("/item", params={"id": SPOOF_ID})
        claim(client, SPOOF_ID)
        claimed = client.get("/item", params={"id": SPOOF_ID})
    for page in (queue, item, claimed):
        assert page.status_code == 200
        assert '<mark class="ctl" title="U+202E RIGHT-TO-LEFT OVERRIDE">RLO</mark>' in page.text
        assert ">NUL</mark>" in page.text and ">ZWSP</mark>" in page.text
        # raw, only inside form values (which must round-trip) and nowhere a reader sees
        outside_values = re.sub(r'value="[^"]*"', "", page.text)
        for char in HIDDEN_CHARS:
            assert char not in outside_values, (repr(char), page.url)
    assert "\u27e8RLO\u27e9" in item.text.split("</title>")[0]  # the tab title: text markers
    assert "\\u202e" in claimed.text  # the correction editor shows them as JSON escapes
    assert server.store.item(SPOOF_ID) is not None
    assert server.store.item(SPOOF_ID).holder(server.clock()) == "alice"  # type: ignore[union-attr]


# -- failure 6: a queue a reviewer can triage, an item page that reads top-down -------------


def test_the_queue_previews_sorts_filters_and_shows_the_threshold(server: Server) -> None:
    more = [
        escalation("low", confidence=0.2, variables={"subject": "Refund twice", "body": "x"}),
        escalation("high", confidence=0.7, variables={"subject": "Dark mode", "body": "y"}),
    ]
    server.store.apply([incoming(e, 10 + i) for i, e in enumerate(more)], [], [], 0)
    with logged_in(server) as client:
        page = client.get("/")
        assert "Refund twice" in page.text and "Dark mode" in page.text  # the preview column
        assert '0.20</span> <span class="muted">/ 0.75' in page.text  # threshold beside it
        by_confidence = client.get("/?sort=confidence").text
        assert by_confidence.index("Refund twice") < by_confidence.index("Dark mode")
        reverse = client.get("/?sort=-confidence").text
        assert reverse.index("Dark mode") < reverse.index("Refund twice")
        filtered = client.get("/?min_conf=0.65").text
        assert "Dark mode" in filtered and "Refund twice" not in filtered
        token = csrf(client)
        nxt = client.post(
            "/claim-next", data={"csrf_token": token, "sort": "confidence", "max_conf": "0.5"}
        )
        assert nxt.headers["location"] == "/item?id=low"
        assert 'data-key="n"' in page.text  # the shortcut for "review next"


def test_the_item_page_reads_top_down_with_readable_collapsible_input(server: Server) -> None:
    long_body = "Line one of a long ticket.\n" * 80 + 'He said "stop".'
    server.store.apply(
        [incoming(escalation("long", variables={"subject": "Long", "body": long_body}), 20)],
        [],
        [],
        0,
    )
    with logged_in(server) as client:
        claim(client, "long")
        page = client.get("/item", params={"id": "long"}).text
    order = [page.index(f'id="{part}"') for part in ("why", "input", "model", "decision")]
    assert order == sorted(order)
    assert "Line one of a long ticket.\nLine one" in page  # text, not a JSON string
    assert "\\n" not in page.split('id="input"')[1].split('id="model"')[0]
    assert "He said &#34;stop&#34;." in page
    body = page.split('data-variable="body"')[0].rsplit("<details", 1)[1]
    assert " open" not in body.split(">")[0]  # the long field starts folded
    assert "folded" in page
    assert "product of the components" in page
    assert '<th>logprob</th><td class="num">0.632</td><td class="num">1.0</td>' in page
    assert '<th>format</th><td class="num">0.950</td>' in page
    assert "pulls the result under the threshold = 0.600" in page
    assert "does not follow from these components" not in page


def test_the_item_page_shows_each_components_declared_weight(server: Server) -> None:
    weighted = escalation(
        "weighted",
        version=3,  # declares confidence.components with a weight of 0.5 for support
        confidence=0.72,
        components={"field_logprob": 0.9, "support": 0.64, "agreement": 1.0, "format": 1.0},
    )
    server.store.apply([incoming(weighted, 31)], [], [], 0)
    with logged_in(server) as client:
        page = client.get("/item", params={"id": "weighted"}).text
    assert '<th>support</th><td class="num">0.640</td><td class="num">0.5</td>' in page
    assert "raised to its weight" in page and "= 0.720" in page
    assert "does not follow from these components" not in page
    assert "accept threshold <strong>0.50</strong>" in page


def test_the_item_page_says_when_the_confidence_rule_is_not_the_one_it_knows(
    server: Server,
) -> None:
    odd = escalation("odd", confidence=0.9, components={"logprob": 0.5, "agreement": 0.4})
    server.store.apply([incoming(odd, 30)], [], [], 0)
    with logged_in(server) as client:
        page = client.get("/item", params={"id": "odd"}).text
    assert "= 0.200" in page and "does not follow from these components" in page


def test_failed_edits_are_audited_and_notices_tell_the_truth(server: Server) -> None:
    with logged_in(server) as client:
        token = csrf(client)
        nothing = client.post("/release", data={"request_id": "r1", "csrf_token": token})
        assert "Nothing was released" in client.get(nothing.headers["location"]).text
        claim(client)
        client.post(
            "/decide",
            data={"request_id": "r1", "action": "edit", "output": "{oops", "csrf_token": token},
        )
        page = client.get("/item?id=r1").text
        assert "refused:edit" in page and "not JSON" in page
        released = client.post("/release", data={"request_id": "r1", "csrf_token": token})
        assert "Your claim is released" in client.get(released.headers["location"]).text
        forged = client.get("/?notice=decided").text
        assert "Decision recorded" not in forged  # notices are not taken from the URL


# -- roles -----------------------------------------------------------------------------------


def test_admins_manage_sessions_release_claims_and_read_every_audit(server: Server) -> None:
    with logged_in(server, "alice") as alice, logged_in(server, "root") as root:
        claim(alice)
        assert alice.get("/audit").status_code == 403
        assert alice.get("/admin/users").status_code == 403
        steal = alice.post(
            "/release", data={"request_id": "r1", "holder": "bob", "csrf_token": csrf(alice)}
        )
        assert steal.status_code == 403
        users = root.get("/admin/users")
        assert users.status_code == 200 and "alice" in users.text
        released = root.post(
            "/release", data={"request_id": "r1", "holder": "alice", "csrf_token": csrf(root)}
        )
        assert released.status_code == 303
        assert "released alice&#39;s claim (admin)" in root.get("/audit").text
        ended = root.post("/admin/end-sessions", data={"user": "alice", "csrf_token": csrf(root)})
        assert ended.status_code == 303
        assert alice.get("/").status_code == 303
