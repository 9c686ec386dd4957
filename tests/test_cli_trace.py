"""`llmpipe trace` shows every model call and replay; `dlq stats` counts replays (issue #19).

One request makes the whole trip on the real broker, with a real worker and the fake model
over HTTP: a first worker with a tiny request limit dead-letters it (``too_large``); a
second, normal worker takes the ``dlq replay``; the prompt's primary model points at an
address where nothing listens, so its three attempts fail and the fallback model answers;
that first answer is not JSON (a ``[[fake:invalid_json:times=1]]`` directive), so the
settle stage re-asks, and the re-ask walks the chain again. The CLI runs as a subprocess,
the way an operator runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.harness.environment import create_topics
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.transport import headers as h
from tests.support import make_settings, produce, running_worker

pytestmark = pytest.mark.kafka

PRIMARY, FALLBACK = "gpt-4o-mini", "gpt-4o"  # invoice_extract@3's chain
ANSWER = {"invoice_number": "CF-20240318", "total": 934.1, "currency": "USD", "due_date": None}
INVOICE = (
    "Coastal Freight Inc.\nInvoice No. CF-20240318\nContainer haulage      860.00\n"
    "Fuel surcharge 74.10\nTotal due: USD 934.10\n"
    f"[[fake:invalid_json:times=1]] [[answer:{json.dumps(ANSWER)}]]"
)
BOUND_S = 60.0  # generous: the scan's own bound is far lower; the machine is shared


def llmpipe(settings: Settings, *args: str, **env: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={
            **os.environ,
            "LLMPIPE_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "LLMPIPE_TOPIC_PREFIX": settings.topic_prefix,
            "LLMPIPE_MODEL_ENDPOINTS": settings.model_endpoints,
            **env,
        },
    )
    return result.returncode, result.stdout, result.stderr, time.monotonic() - started


def _request(request_id: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    body = {
        "request_id": request_id,
        "prompt": "invoice_extract",
        "prompt_version": 3,
        "variables": {"text": INVOICE},
    }
    return request_id.encode(), json.dumps(body).encode(), [(h.CONTENT_TYPE, b"application/json")]


def _calls(stop: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    return [(c["purpose"], c["model"], c["attempt"], c["outcome"]) for c in stop["calls"]]


def test_trace_shows_fallback_models_reasks_and_replays(kafka_bootstrap: str) -> None:
    with running_fake_llm() as fake:
        settings = make_settings(
            kafka_bootstrap,
            model_base_url=fake.url,
            model_endpoints=json.dumps({PRIMARY: "http://127.0.0.1:1/v1"}),
            model_max_attempts=3,
            breaker_min_calls=100_000,
            quality_breaker_min_calls=100_000,
        )
        create_topics(settings)
        rid = "trace-journey-1"
        strict = settings.model_copy(update={"max_request_bytes": 100})
        with running_worker(strict, ("validate",)):
            produce(settings, topology.REQUESTS, [_request(rid)])
            ledger = read_terminal(settings, [rid], timeout_s=60)
        assert ledger.first(rid).route == "dead_letter"

        with running_worker(settings):
            code, out, err, took = llmpipe(
                settings, "dlq", "replay", "--reason", "too_large", "--group", "incident-7"
            )
            assert code == 0, err
            assert took < BOUND_S
            # The replayed request ends once more in a terminal place: wait for a second sighting.
            deadline = time.monotonic() + 90
            while len(read_terminal(settings, [rid], timeout_s=30).seen.get(rid, [])) < 2:
                assert time.monotonic() < deadline, "the replayed request never ended anywhere"

        code, out, err, took = llmpipe(settings, "trace", rid, "--json")
        assert code == 0, err
        assert took < BOUND_S
        stops = [json.loads(line) for line in out.splitlines()]
        topics = [s["topic"] for s in stops]
        assert topics[:3] == [topology.REQUESTS, topology.DLQ, topology.REQUESTS], topics
        dead, replayed = stops[1], stops[2]
        assert dead["reason"] == "too_large" and dead["replay_count"] is None
        assert replayed["replay_count"] == 1
        marker = f"{settings.topic(topology.DLQ)}[{dead['partition']}]@{dead['offset']}"
        assert replayed["replayed_from"] == f"replay of {marker} (group incident-7)"

        completion = next(s for s in stops if s["topic"] == topology.COMPLETIONS)
        primary_failed = [("answer", PRIMARY, n, "connection") for n in (1, 2, 3)]
        assert _calls(completion) == [*primary_failed, ("answer", FALLBACK, 1, "ok")]
        settled = stops[stops.index(completion) + 1]
        assert settled["topic"] in (topology.RESULTS, topology.REVIEW, topology.FALLBACK)
        # The re-ask walks the chain again: the primary still fails, the fallback answers.
        assert _calls(settled) == [
            *[("reask", m, n, o) for _, m, n, o in primary_failed],
            ("reask", FALLBACK, 1, "ok"),
        ]
        assert all(c["latency_ms"] >= 0 for s in stops for c in s["calls"])
        # Calls are shown where they first appear, never twice along the journey.
        later = stops[stops.index(settled) + 1 :]
        assert all(not s["calls"] for s in later), later

        # On a narrow terminal each message is a block of lines: the replay is marked and
        # each call is a line; nothing is cut.
        code, out, err, _ = llmpipe(settings, "trace", rid, COLUMNS="70")
        assert code == 0, err
        assert "…" not in out, out
        lines = out.splitlines()
        assert any(f"{topology.REQUESTS}  request received (replay #1)" in x for x in lines), out
        assert f"    └ answer call {PRIMARY} attempt 3: connection (" in out, out
        assert f"    └ reask call {FALLBACK} attempt 1: ok (" in out, out
        assert f"replay of {marker} (group incident-7)" in out, out
        # Wide enough, the same journey is one table.
        code, out, err, _ = llmpipe(settings, "trace", rid, COLUMNS="240")
        assert code == 0, err
        assert "journey of trace-journey-1" in out and "└ reask call" in out, out
        assert "…" not in out and rid in out, out

        code, out, err, took = llmpipe(settings, "dlq", "stats", "--json")
        assert code == 0, err
        assert took < BOUND_S
        stats = json.loads(out)
        (group,) = stats["groups"]
        assert (group["reason"], group["count"], group["replayed"], group["replays"]) == (
            "too_large",
            1,
            1,
            1,
        )
        assert stats["replays"] == 1
        # A narrow table folds its cells instead of cutting them.
        code, out, err, _ = llmpipe(settings, "dlq", "stats", COLUMNS="50")
        assert code == 0, err
        assert "…" not in out, out
        columns = folded_columns(out)
        assert "too_large" in columns["reason"], columns
        assert "invoice_extract@3" in columns["prompt"], columns
        assert "1(1times)" in columns["replayed"], columns


PREVIEWS = {"expected", "got", "error/request"}


def test_every_table_folds_identifiers_on_a_narrow_terminal(kafka_settings: Settings) -> None:
    """Each command that prints a table, at 50 columns: no column cut (no ellipsis) but
    those previewing long free text, and identifiers whole once a column's folded pieces
    are joined."""
    settings = kafka_settings
    scope = "invoice_extract"
    code, _, err, _ = llmpipe(
        settings, "flags", "set", "force_review", "on", "--scope", scope, "--reason", "audit-42"
    )
    assert code == 0, err
    code, _, err, _ = llmpipe(
        settings, "prompts", "pin", "invoice_extract", "2", "--reason", "rollback-drill"
    )
    assert code == 0, err
    dead = _request("narrow-table-dead-letter")
    headers = [
        *dead[2],
        (h.DLQ_REASON, b"unknown_prompt_version"),
        (h.DLQ_STAGE, b"validate"),
        (h.DLQ_TOPIC, settings.topic(topology.REQUESTS).encode()),
        (h.REQUEST_ID, b"narrow-table-dead-letter"),
    ]
    produce(settings, topology.DLQ, [(dead[0], dead[1], headers)])
    commands = {
        ("flags", "list"): ("flag", "force_review:invoice_extract"),
        ("flags", "list", "--history"): ("flag", "force_review:invoice_extract"),
        ("prompts", "pins"): ("prompt", "invoice_extract"),
        ("prompts", "pins", "--history"): ("reason", "rollback-drill"),
        ("dlq", "stats"): ("reason", "unknown_prompt_version"),
        ("dlq", "inspect"): ("request id / prompt", "narrow-table-dead-letter"),
        ("dlq", "replay", "--group", "narrow", "--dry-run"): ("request id", "narrow-table-dead"),
        ("prompts", "test", "ticket_triage"): ("case", "enterprise slow dashboard"),
    }
    for args, (column, identifier) in commands.items():
        code, out, err, took = llmpipe(settings, *args, COLUMNS="50")
        assert code == 0, (args, err)
        assert took < BOUND_S, args
        columns = folded_columns(out)
        assert identifier.replace(" ", "") in columns[column.replace(" ", "")], (args, out)
        # Only previews of long free text (a model's answer, an error message) are shortened.
        cut = [name for name, text in columns.items() if "…" in text and name not in PREVIEWS]
        assert not cut, (args, cut, out)


def folded_columns(table: str) -> dict[str, str]:
    """The first box table in ``table``, column by column (keyed by header), each column's
    folded pieces joined and spaces dropped: an identifier folded over lines is whole again."""
    headers: list[str] = []
    columns: dict[str, str] = {}
    for line in table.splitlines():
        if line.startswith("┃") and not columns:
            cells = [c.replace(" ", "") for c in line.strip().strip("┃").split("┃")]
            headers = [a + b for a, b in zip(headers or [""] * len(cells), cells, strict=True)]
        elif line.startswith("│") and headers:
            cells = [c.replace(" ", "") for c in line.strip().strip("│").split("│")]
            for name, cell in zip(headers, cells, strict=True):
                columns[name] = columns.get(name, "") + cell
        elif line.startswith("└") and columns:
            break
    return columns


def test_the_readme_smoke_test_shows_a_model_result(kafka_bootstrap: str) -> None:
    """The README's smoke test, run as written (its two commands, read from the README),
    against a worker and the fake model: the journey ends in a ``source=model`` result."""
    from tests.test_docs import documented_commands

    smoke = [args for name, _, args in documented_commands() if "smoke-0304" in args]
    assert [args[0] for args in smoke] == ["send", "trace"], smoke
    with running_fake_llm() as fake:
        settings = make_settings(kafka_bootstrap, model_base_url=fake.url)
        create_topics(settings)
        with running_worker(settings):
            code, out, err, took = llmpipe(settings, *smoke[0])
            assert (code, out.strip()) == (0, "smoke-0304"), err
            assert took < BOUND_S
            ledger = read_terminal(settings, ["smoke-0304"], timeout_s=60)
        assert ledger.first("smoke-0304").outcome == "result:model", ledger.first("smoke-0304")
        code, out, err, _ = llmpipe(settings, *smoke[1], COLUMNS="200")
        assert code == 0, err
        columns = folded_columns(out)
        assert columns["topic"].endswith(topology.RESULTS), out
        assert columns["detail"].endswith("source=modelstatus=ok"), out
