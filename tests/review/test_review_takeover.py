"""Taking over a gone instance's decision on the real broker: the old owner's transactional
id is really fenced, so an owner that was only paused cannot commit the decision too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.contract.envelopes import ReviewDecision
from pipeline.review.kafka_io import PublishError
from pipeline.review.runtime import ReviewRuntime
from tests.review.test_review_service import publish_items, topic
from tests.review.test_review_support import FakeClock, registry

pytestmark = pytest.mark.kafka


def test_a_paused_owner_is_fenced_when_its_decision_is_taken_over(
    kafka_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    publish_items(kafka_settings, "r1")
    db = f"sqlite:///{tmp_path / 'review.db'}"
    runtimes = {
        name: ReviewRuntime(
            kafka_settings,
            db,
            registry=registry(),
            clock=clock,
            instance=name,
            maintenance_interval_s=600,  # the test drives delivery itself
        )
        for name in ("a", "b")
    }
    a, b = runtimes["a"], runtimes["b"]
    try:
        for runtime in runtimes.values():
            assert runtime.start(ready_timeout_s=30), "review queue did not catch up"
        a.service.claim("r1", "alice")

        def cut_short(messages: Any) -> None:  # "a" holds a live epoch, then stalls
            raise PublishError("paused before producing")

        monkeypatch.setattr(a.publisher, "publish", cut_short)
        assert not a.service.decide("r1", "alice", "approve").delivered
        monkeypatch.undo()

        clock.advance(seconds=61)  # "a" has been silent longer than the orphan delay
        b.store.heartbeat("b", clock())
        b.service.deliver_pending()
        assert b.service.stats.published == 1
        stored = b.store.decision("r1")
        assert stored is not None and stored.state == "published"
        assert (stored.owner, stored.taken_from) == ("b", "a")

        # "a" wakes up and commits what it had prepared: its producer epoch is fenced
        item = a.store.item("r1")
        assert item is not None
        with pytest.raises(PublishError, match="fenced"):
            a.publisher.publish(a.service._messages(item, stored.decision))
        a.service.deliver_pending()  # and its retry loop leaves the row to its new owner
        assert a.service.stats.published == 0
    finally:
        for runtime in runtimes.values():
            runtime.stop()

    decisions = topic(kafka_settings, "llm.review.decisions", ReviewDecision)
    assert [d.request_id for d in decisions] == ["r1"]
