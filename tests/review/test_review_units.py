"""The review service's small parts, directly: throttle arithmetic, session rules, visible
markers for every invisible character, input parsers, queue previews from prompt files."""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

from pipeline.prompts.errors import PromptError
from pipeline.prompts.registry import PromptRegistry
from pipeline.review.auth import (
    Limit,
    LoginThrottle,
    SessionManager,
    SessionPolicy,
    SessionSigner,
    ThrottlePolicy,
    UsersFile,
    address_key,
)
from pipeline.review.display import HIDDEN, json_for_editing, marked, plain
from pipeline.review.inputs import InputError, bounded_int, json_object, parse_form
from pipeline.review.store import open_store
from pipeline.review.triage import preview
from tests.review.test_review_support import FakeClock, escalation, registry

REPO_PROMPTS = Path(__file__).resolve().parents[2] / "prompts"


def test_throttle_delays_grow_cap_and_are_not_extended_by_blocked_attempts() -> None:
    now = [0.0]
    policy = ThrottlePolicy(name=Limit(free=2, max_s=8.0))
    throttle = LoginThrottle(policy, clock=lambda: now[0])
    key = [("name", "alice")]
    waits = []
    for _ in range(7):
        assert throttle.wait_s(key) == 0
        throttle.failed(key)
        waits.append(throttle.wait_s(key))
        now[0] += waits[-1]  # try again exactly when allowed
    assert waits == [0, 0, 1, 2, 4, 8, 8]  # doubling, capped: never a lock
    throttle.failed(key)
    blocked_until = now[0] + throttle.wait_s(key)
    for _ in range(50):  # the app does not call failed() while waiting; waiting decays
        now[0] += 0.1
        assert now[0] + throttle.wait_s(key) == pytest.approx(blocked_until)
    now[0] += policy.forget_after_s + 10
    throttle.failed(key)
    assert throttle.wait_s(key) == 0  # a quiet period starts from zero


def test_a_success_clears_the_name_but_not_the_address() -> None:
    throttle = LoginThrottle(ThrottlePolicy(address=Limit(1, 60), name=Limit(1, 60)))
    keys = [("address", "192.0.2.1"), ("name", "alice")]
    throttle.failed(keys)
    throttle.failed(keys)
    throttle.succeeded(keys)
    assert throttle.wait_s([("name", "alice")]) == 0
    assert throttle.wait_s([("address", "192.0.2.1")]) > 0


def test_addresses_are_keyed_per_host_and_ipv6_per_64() -> None:
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") == "2001:db8::/64"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key(None) == "unknown" and address_key("not an ip") == "not an ip"


def test_sessions_end_by_rule(tmp_path: Path) -> None:
    store = open_store("sqlite://")
    users = UsersFile(tmp_path / "users.txt")
    users.add("alice", "a long password", log_n=10)
    clock = FakeClock()
    manager = SessionManager(
        store,
        users,
        SessionSigner(b"s" * 32),
        clock,
        SessionPolicy(idle_timeout_s=60, lifetime_s=300, touch_every_s=1),
    )
    user = users.get("alice")
    assert user is not None
    session, cookie = manager.open(user)
    assert manager.check(cookie) == session and session.role == "reviewer"
    users.set_role("alice", "admin")
    assert manager.check(cookie) is not None and manager.check(cookie).is_admin  # type: ignore[union-attr]
    for bad in ("", "x", "a.b", "\u00e9.\u00e9", "." * 5000, cookie + "x", cookie.upper()):
        assert manager.check(bad) is None, bad
    clock.advance(seconds=61)
    assert manager.check(cookie) is None  # idle
    assert store.session_row(manager._key(session.sid)) is None  # and deleted


def test_every_invisible_or_direction_changing_character_gets_a_marker() -> None:
    missed = [
        f"U+{code:04X}"
        for code in range(sys.maxunicode + 1)
        if unicodedata.category(chr(code)) in ("Cc", "Cf", "Cs", "Zl", "Zp")
        and chr(code) not in "\t\n\r"
        and not HIDDEN.fullmatch(chr(code))
    ]
    assert missed == []
    assert str(marked("a\u202eb<")) == (
        'a<mark class="ctl" title="U+202E RIGHT-TO-LEFT OVERRIDE">RLO</mark>b&lt;'
    )
    assert plain("x\x00y") == "x\u27e8NUL\u27e9y"
    assert json_for_editing({"s": "a\u202e\U000e0041"}) == '{\n  "s": "a\\u202e\\udb40\\udc41"\n}'


def test_parsers_are_total() -> None:
    assert parse_form(b"a=1&b=%C3%A9", "application/x-www-form-urlencoded") == {"a": "1", "b": "é"}
    for body, ctype, status in [
        (b"a=%ff", "application/x-www-form-urlencoded", 400),
        (b"a=1&a=2", "application/x-www-form-urlencoded", 400),
        (b"x", "multipart/form-data; boundary=x", 415),
        (
            "&".join(f"f{i}=1" for i in range(100)).encode(),
            "application/x-www-form-urlencoded",
            413,
        ),
        (b"\xff", "application/x-www-form-urlencoded", 400),
    ]:
        with pytest.raises(InputError) as refused:
            parse_form(body, ctype)
        assert refused.value.status == status
    assert bounded_int("42", 1, 100, "v") == 42 and bounded_int("", 1, 2, "v") is None
    for bad in ("99999999999999999999", "-1", " 1", "\u0661", "1e3"):
        with pytest.raises(InputError):
            bounded_int(bad, 0, 1000, "v")
    assert json_object('{"a": [1, {"b": "c"}]}', 1000) == {"a": [1, {"b": "c"}]}


def test_queue_previews_come_from_the_prompt_or_a_sensible_default(tmp_path: Path) -> None:
    item = escalation("r1", variables={"subject": "Refund  twice\n", "body": "long " * 100})
    assert preview(registry().get("ticket_triage", 2), item) == "Refund twice"
    assert preview(None, item) == "Refund twice"  # prompt version not loaded: first text
    spec = yaml.safe_load((REPO_PROMPTS / "ticket_triage" / "v2.yaml").read_text())
    target = tmp_path / "ticket_triage"
    target.mkdir()
    (target / "rules.py").write_text((REPO_PROMPTS / "ticket_triage" / "rules.py").read_text())
    spec["review"] = {"preview": ["output.label", "subject"]}
    (target / "v2.yaml").write_text(yaml.safe_dump(spec))
    declared = PromptRegistry.load(tmp_path).get("ticket_triage", 2)
    assert preview(declared, item) == "bug \u00b7 Refund twice"
    assert declared.content_hash != registry().get("ticket_triage", 2).content_hash
    spec["review"] = {"preview": "no_such_variable"}
    (target / "v2.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(PromptError, match=r"review\.preview refers to no_such_variable"):
        PromptRegistry.load(tmp_path)
