"""``llmpipe review`` commands: users, export, calibration, and serve as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from bench.common import free_port
from pipeline.config import Settings
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Correction, ReviewAction, ReviewDecision
from pipeline.harness.environment import stop_process, worker_environment
from pipeline.review.auth import UsersFile
from pipeline.review.cli import review_app
from pipeline.review.model import decision_id_for
from pipeline.transport import headers as h
from tests.review.test_review_support import escalation, review_message, wait_for
from tests.support import produce

runner = CliRunner()


def test_users_add_writes_a_private_scrypt_hash(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    result = runner.invoke(
        review_app,
        ["users", "add", "alice", "--file", str(users), "--password-stdin"],
        input="a long enough password\n",
    )
    assert result.exit_code == 0, result.output
    assert users.stat().st_mode & 0o777 == 0o600
    assert "a long enough password" not in users.read_text()
    assert UsersFile(users).verify("alice", "a long enough password")
    short = runner.invoke(
        review_app, ["users", "add", "bob", "--file", str(users), "--password-stdin"], input="x\n"
    )
    assert short.exit_code == 2


def test_users_have_roles_and_can_be_removed(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    args = ["--file", str(users), "--password-stdin"]
    admin = runner.invoke(
        review_app, ["users", "add", "root", "--role", "admin", *args], input="long password 1\n"
    )
    assert admin.exit_code == 0, admin.output
    plain = runner.invoke(review_app, ["users", "add", "alice", *args], input="long password 2\n")
    assert plain.exit_code == 0, plain.output
    again = runner.invoke(review_app, ["users", "add", "root", *args], input="long password 3\n")
    assert again.exit_code == 0  # a new password keeps the role
    bad = runner.invoke(
        review_app, ["users", "add", "eve", "--role", "god", *args], input="long password 4\n"
    )
    assert bad.exit_code == 2 and "--role must be one of reviewer, admin" in bad.output
    listed = runner.invoke(review_app, ["users", "list", "--file", str(users)])
    assert listed.output.splitlines() == ["alice\treviewer", "root\tadmin"]
    assert UsersFile(users).verify("root", "long password 3") is not None
    removed = runner.invoke(review_app, ["users", "remove", "alice", "--file", str(users)])
    assert removed.exit_code == 0
    assert UsersFile(users).get("alice") is None
    missing = runner.invoke(review_app, ["users", "remove", "alice", "--file", str(users)])
    assert missing.exit_code == 2


@pytest.mark.kafka
def test_export_and_calibration_read_the_topics(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, setting in worker_environment(kafka_settings).items():
        monkeypatch.setenv(name, setting)
    codec = Codec()
    old = datetime(2029, 1, 1, tzinfo=UTC)
    new = datetime(2030, 1, 1, tzinfo=UTC)
    Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]
    corrections: list[Message] = []
    items: list[Message] = []
    decisions: list[Message] = []
    verdicts: list[tuple[datetime, float, ReviewAction]] = [
        (old, 0.4, "edit"),
        (new, 0.5, "edit"),
        (new, 0.7, "approve"),
    ]
    for i, (when, confidence, action) in enumerate(verdicts):
        esc = escalation(f"r{i}", confidence=confidence, escalated_at=when, reason="audit")
        items.append(review_message(kafka_settings, esc))
        fixed = {"label": "bug", "priority": "high", "summary": f"fixed {i}"}
        decision = ReviewDecision(
            decision_id=decision_id_for(f"r{i}"),
            request_id=f"r{i}",
            action=action,
            reviewer="alice",
            output=fixed,
            prompt=esc.validated.prompt,
            decided_at=when,
        )
        decisions.append((f"r{i}".encode(), codec.encode(decision)[0], []))
        if action == "edit":
            correction = Correction(
                request_id=f"r{i}",
                prompt=esc.validated.prompt,
                variables=esc.validated.request.variables,
                original_output=esc.output,
                corrected_output=fixed,
                reviewer="alice",
                decided_at=when,
            )
            value, content_type = codec.encode(correction)
            corrections.append((f"r{i}".encode(), value, [(h.CONTENT_TYPE, content_type.encode())]))
    produce(kafka_settings, "llm.review", items)
    produce(kafka_settings, "llm.review.decisions", decisions)
    produce(kafka_settings, "llm.corrections", corrections)

    out = tmp_path / "train.jsonl"
    result = runner.invoke(
        review_app, ["export", "--since", "2029-06-01", "--format", "jsonl", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["metadata"]["request_id"] == "r1"
    assert (
        record["messages"][-1]["content"] == '{"label":"bug","priority":"high","summary":"fixed 1"}'
    )
    assert [m["role"] for m in record["messages"]][:1] == ["system"]
    assert runner.invoke(review_app, ["export", "--format", "csv"]).exit_code == 2

    plots = tmp_path / "plots"
    result = runner.invoke(review_app, ["calibration", "ticket_triage", "--json"])
    assert result.exit_code == 0, result.output
    (version,) = json.loads(result.output)
    assert (version["version"], version["samples"], version["errors"]) == (2, 3, 2)
    assert version["verdict"] == "too_few_samples" and version["recommended"] is None
    text = runner.invoke(review_app, ["calibration", "ticket_triage", "--plots", str(plots)])
    assert text.exit_code == 0, text.output
    assert "too few samples to tell" in text.output and "ticket_triage@2" in text.output
    assert sorted(p.name for p in plots.iterdir()) == [
        "ticket_triage-v2-reliability.png",
        "ticket_triage-v2-threshold.png",
    ]


@pytest.mark.kafka
def test_serve_runs_and_refuses_to_start_without_reviewers(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    users = tmp_path / "users.txt"
    env = {
        **os.environ,
        **worker_environment(kafka_settings),
        "LLMPIPE_REVIEW_DB": f"sqlite:///{tmp_path / 'review.db'}",
        "LLMPIPE_REVIEW_SESSION_SECRET": "s" * 32,
    }
    command = [sys.executable, "-m", "pipeline.review.cli", "serve", "--users", str(users)]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "no reviewers" in refused.stderr

    UsersFile(users).add("alice", "a long enough password", log_n=10)
    port = free_port()
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                return False

        wait_for(healthy, timeout_s=30, what="the review server")
        login = httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)
        assert login.status_code == 200 and "csrf_token" in login.text
    finally:
        stop_process(process)
