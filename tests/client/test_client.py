"""The typed client against the real broker, a running worker and the fake model over HTTP.

What an upstream service relies on: ``submit`` returns only what the broker acknowledged
(and fails in one line otherwise), ``wait`` returns the typed result or says at once that
the request was dead-lettered, ``results`` reads committed results, drops the second copy
an at-least-once hop can publish, and resumes a consumer group where it stopped. The
examples in docs/client.md run here as written.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.client import Client, RequestDeadLettered, Result, ResultTimeout
from pipeline.config import REPO_ROOT, Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec
from pipeline.harness.environment import create_topics
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.transport import headers as h
from pipeline.transport.batch import DeliveryError
from tests.support import make_settings, produce, running_worker

pytestmark = pytest.mark.kafka

ANSWER = {"label": "billing", "priority": "normal", "summary": "Credit card charged twice."}
BODY = f"My credit card was charged twice.\n[[answer:{json.dumps(ANSWER)}]]"
BOUND_S = 30.0  # generous; the client's own bound is LLMPIPE_CLI_TIMEOUT_S (3 s here)


@pytest.fixture(scope="module")
def pipeline_settings(kafka_bootstrap: str) -> Iterator[Settings]:
    with running_fake_llm() as fake:
        settings = make_settings(
            kafka_bootstrap,
            model_base_url=fake.url,
            cli_timeout_s=3,
            breaker_min_calls=100_000,
            quality_breaker_min_calls=100_000,
        )
        create_topics(settings)
        with running_worker(settings):
            yield settings


def ticket(client: Client, body: str = BODY, **kwargs: object) -> str:
    return client.submit(
        "ticket_triage", {"subject": "Charged twice this month", "body": body}, **kwargs
    )


def test_submit_then_wait_returns_the_typed_model_result(pipeline_settings: Settings) -> None:
    with Client(pipeline_settings) as client:
        deadline = datetime.now(UTC).replace(year=datetime.now(UTC).year + 1)
        rid = ticket(client, key="customer-1", deadline=deadline, metadata={"ticket": "T-1"})
        result = client.wait(rid, timeout=60)
    assert isinstance(result, Result)
    assert (result.request_id, result.source, result.status) == (rid, "model", "ok")
    assert result.output == ANSWER and result.metadata == {"ticket": "T-1"}
    assert [(c.purpose, c.outcome) for c in result.calls] == [("answer", "ok")]


def test_wait_reports_a_dead_letter_at_once(pipeline_settings: Settings) -> None:
    with Client(pipeline_settings) as client:
        rid = client.submit("no_such_prompt", {"x": 1})
        started = time.monotonic()
        with pytest.raises(RequestDeadLettered) as failed:
            client.wait(rid, timeout=120)
    assert failed.value.reason == "unknown_prompt"
    assert time.monotonic() - started < 60, "the dead letter was not reported before the timeout"


def test_wait_times_out_saying_the_request_is_in_review(pipeline_settings: Settings) -> None:
    with Client(pipeline_settings) as client:
        rid = ticket(client, body=f"{BODY} [[fake:hedge]]", version=2)
        ledger = read_terminal(pipeline_settings, [rid], timeout_s=60)
        assert ledger.first(rid).route == "review"
        with pytest.raises(ResultTimeout, match="waiting in human review"):
            client.wait(rid, timeout=3)


def test_submit_fails_in_one_line_when_nothing_was_written(pipeline_settings: Settings) -> None:
    wrong = pipeline_settings.model_copy(
        update={"topic_prefix": pipeline_settings.topic_prefix + "typo."}
    )
    started = time.monotonic()
    with Client(wrong) as client, pytest.raises(DeliveryError) as failed:
        ticket(client)
    assert "does not exist" in str(failed.value) and "LLMPIPE_TOPIC_PREFIX" in str(failed.value)
    assert "\n" not in str(failed.value) and time.monotonic() - started < BOUND_S

    gone = pipeline_settings.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
    started = time.monotonic()
    with Client(gone) as client, pytest.raises(DeliveryError) as failed:
        ticket(client)
    assert "LLMPIPE_BOOTSTRAP_SERVERS" in str(failed.value) and "\n" not in str(failed.value)
    assert time.monotonic() - started < BOUND_S


def _collect(client: Client, wanted: set[str], until: str, **kwargs: Any) -> list[Result]:
    """Results for ``wanted`` from ``client.results`` up to the one for ``until``, or the
    first ``until`` of them when it is a number; within 60 s."""

    async def run() -> list[Result]:
        got: list[Result] = []
        results = client.results(request_ids=wanted, **kwargs)
        async with asyncio.timeout(60), aclosing(results):
            async for result in results:
                got.append(result)
                if result.request_id == until or str(len(got)) == until:
                    break
        return got

    return asyncio.run(run())


def _copies(settings: Settings, result: Result, times: int, key: str | None = None) -> None:
    """Publish ``result`` again, as a hop redone after a crash would in at_least_once."""
    value, content_type = Codec().encode(result)
    headers = [(h.CONTENT_TYPE, content_type.encode()), (h.REQUEST_ID, result.request_id.encode())]
    message = ((key or result.request_id).encode(), value, headers)
    produce(settings, topology.RESULTS, [message] * times)


def test_results_drop_an_at_least_once_duplicate_but_not_a_human_correction(
    pipeline_settings: Settings,
) -> None:
    with Client(pipeline_settings) as client:
        first = client.wait(ticket(client), timeout=60)
    rid = first.request_id
    _copies(pipeline_settings, first, 2)
    _copies(pipeline_settings, first.model_copy(update={"source": "human", "reviewer": "a"}), 1)
    # Same key, so same partition, after the copies: once it is read, so are they.
    sentinel = first.model_copy(update={"request_id": f"{rid}-sentinel"})
    _copies(pipeline_settings, sentinel, 1, key=rid)
    wanted = {rid, sentinel.request_id}

    def sources(results: list[Result]) -> list[tuple[str, str]]:
        return [(r.request_id, r.source) for r in results]

    # Exactly-once (the default): nothing is removed (there is nothing to remove there).
    with Client(pipeline_settings) as client:
        every = _collect(client, wanted, sentinel.request_id, from_beginning=True)
    assert sources(every) == [(rid, "model")] * 3 + [(rid, "human"), (sentinel.request_id, "model")]
    at_least_once = pipeline_settings.model_copy(update={"delivery": "at_least_once"})
    with Client(at_least_once) as client:
        deduped = _collect(client, wanted, sentinel.request_id, from_beginning=True)
    assert sources(deduped) == [(rid, "model"), (rid, "human"), (sentinel.request_id, "model")]


def test_a_results_group_resumes_where_it_stopped(pipeline_settings: Settings) -> None:
    with Client(pipeline_settings) as client:
        ids = [ticket(client, key="same-key") for _ in range(3)]  # one results partition
        for rid in ids:
            client.wait(rid, timeout=60)
        group = f"{pipeline_settings.topic_prefix}billing-service"
        first = [r.request_id for r in _collect(client, set(ids), "2", group=group)]
        second = [r.request_id for r in _collect(client, set(ids), "2", group=group)]
    # The last one handled before stopping is seen again (its position is committed when
    # the next one is asked for); nothing before it is, and nothing is skipped.
    assert second[0] == first[-1], (first, second)
    assert sorted({*first, *second}) == sorted(ids) and len(set(first)) == 2


def test_the_docs_examples_run_as_written(
    pipeline_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (REPO_ROOT / "docs" / "client.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    for name, value in {
        "LLMPIPE_BOOTSTRAP_SERVERS": pipeline_settings.bootstrap_servers,
        "LLMPIPE_TOPIC_PREFIX": pipeline_settings.topic_prefix,
    }.items():
        monkeypatch.setenv(name, value)
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, "docs/client.md", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    rid = namespace["request_id"]
    assert lines[0] == "model billing T-1001", lines
    assert lines[1].startswith(f"{rid} model "), lines
