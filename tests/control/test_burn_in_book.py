"""The folded burn-in topic decides exactly, from topic order alone."""

from __future__ import annotations

from datetime import timedelta

from pipeline.contract.envelopes import BurnInClaim, PromptRef, utc_now
from pipeline.control.burn_in import BurnInBook
from pipeline.prompts.model import BurnInPolicy

V3 = PromptRef(name="p", version=3, hash="sha256:" + "0" * 64)
V4 = PromptRef(name="p", version=4, hash="sha256:" + "1" * 64)


def test_the_first_n_distinct_requests_in_topic_order_are_held() -> None:
    book, now, policy = BurnInBook(), utc_now(), BurnInPolicy(answers=2)
    assert book.verdict(V3, policy, "a", now) is None  # nothing known: claim first
    for request_id in ["a", "b", "a", "c"]:  # "a" twice: a redelivery after a crash
        book.apply(BurnInClaim(prompt=V3, request_id=request_id, claimed_at=now))
    assert [book.verdict(V3, policy, r, now) for r in "abc"] == [True, True, False]
    assert book.verdict(V3, policy, "new", now) is False  # two claimed: over, no claim
    assert book.verdict(V4, policy, "a", now) is None  # versions count separately
    assert book.count(V3) == 3


def test_days_hold_everything_until_they_have_passed_since_the_first_answer() -> None:
    book, start, policy = BurnInBook(), utc_now(), BurnInPolicy(days=1)
    book.apply(BurnInClaim(prompt=V3, request_id="a", claimed_at=start))
    assert book.verdict(V3, policy, "x", start + timedelta(hours=23)) is True
    assert book.verdict(V3, policy, "y", start + timedelta(hours=25)) is False
    # A request first claimed inside the window keeps its verdict when redelivered late.
    assert book.verdict(V3, policy, "a", start + timedelta(days=9)) is True


def test_with_both_limits_burn_in_lasts_until_both_have_passed() -> None:
    book, start, policy = BurnInBook(), utc_now(), BurnInPolicy(answers=1, days=1)
    book.apply(BurnInClaim(prompt=V3, request_id="a", claimed_at=start))
    later = start + timedelta(days=2)
    book.apply(BurnInClaim(prompt=V3, request_id="b", claimed_at=later))
    assert book.verdict(V3, policy, "a", later) is True  # rank 0
    assert book.verdict(V3, policy, "b", later) is False  # rank 1, after the days
    assert book.verdict(V3, policy, "c", start + timedelta(hours=1)) is True  # in the days
