"""The review UI in a real headless Chromium, against a real server, service and broker.

Logs in, claims the oldest item, corrects the model's output and submits; the corrected
result must arrive on ``llm.results`` (source ``human``) with a correction on
``llm.corrections``. The oldest item's model output carries ``<script>`` and
``<img onerror>`` payloads, which must render as inert text. Screenshots of the queue
and item pages are taken too; with ``LLMPIPE_REVIEW_SCREENSHOTS=docs/review`` they are
kept for the README.

Needs Debian's ``chromium`` and the ``playwright`` Python package (its bundled driver
only; no browser download). Skipped without them, except in CI where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.contract.envelopes import Correction, Result
from pipeline.review.app import ReviewConfig, create_app
from pipeline.review.auth import SessionSigner, UsersFile
from pipeline.review.kafka_io import read_to_end
from pipeline.review.model import QueueFilter
from pipeline.review.runtime import ReviewRuntime
from tests.review.test_review_support import (
    XSS_SUMMARY,
    escalation,
    registry,
    review_message,
    wait_for,
)
from tests.support import produce

pytestmark = pytest.mark.kafka

CHROMIUM = os.environ.get("LLMPIPE_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS_ENV = "LLMPIPE_REVIEW_SCREENSHOTS"
"""Set to a directory (docs/review for the README) to keep the screenshots; else a tmp dir."""
PASSWORD = "correct horse battery"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
CORRECTED = {
    "label": "bug",
    "priority": "high",
    "summary": "Dashboard takes 40 s to load for the whole team since the release.",
}


def _playwright() -> Any:
    reason = None
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return sync_playwright


def _items(now: datetime) -> list[Any]:
    """A queue worth a screenshot: mixed prompts, reasons and ages (one past the SLA)."""
    return [
        escalation(
            "tkt-1041",
            output={"label": "bug", "priority": "normal", "summary": XSS_SUMMARY},
            raw_text=f'{{"label": "bug", "priority": "normal", "summary": "{XSS_SUMMARY}"}}',
            variables={
                "subject": 'Dashboard takes 40s to load <img src=x onerror="window.__pwned=3">',
                "body": "Since yesterday's release the metrics dashboard takes about 40 seconds"
                " to load for our whole team. We can still query from the CLI.",
                "customer_tier": "enterprise",
            },
            confidence=0.58,
            escalated_at=now - timedelta(minutes=95),
        ),
        escalation(
            "inv-2024-0042",
            prompt="invoice_extract",
            version=2,
            output={
                "invoice_number": "INV-2024-0042",
                "total": 1249.5,
                "currency": "USD",
                "due_date": "2024-04-15",
            },
            variables={
                "text": "Northwind Office Supply\nInvoice Number: INV-2024-0042\nTotal: $1,249.50"
            },
            reason="force_review",
            confidence=0.91,
            escalated_at=now - timedelta(minutes=41),
        ),
        escalation(
            "tkt-1043",
            output={"label": "billing", "priority": "low", "summary": "Asks about a refund."},
            variables={"subject": "Refund", "body": "Please refund the unused seats."},
            confidence=0.66,
            escalated_at=now - timedelta(minutes=12),
        ),
        escalation(
            "tkt-1044",
            version=1,
            output={"label": "account", "priority": "normal", "summary": "Cannot reset 2FA."},
            variables={"subject": "2FA", "body": "Lost my phone, cannot log in."},
            confidence=0.42,
            escalated_at=now - timedelta(minutes=3),
        ),
    ]


@pytest.fixture
def server(kafka_settings: Settings, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    import uvicorn

    now = datetime.now(UTC)
    produce(kafka_settings, "llm.review", [review_message(kafka_settings, e) for e in _items(now)])
    runtime = ReviewRuntime(
        kafka_settings, f"sqlite:///{tmp_path / 'review.db'}", registry=registry()
    )
    users = UsersFile(tmp_path / "users.txt")
    users.add("alice", PASSWORD, log_n=10)
    app = create_app(runtime.service, ReviewConfig(users, SessionSigner(os.urandom(32))))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    try:
        assert runtime.start(ready_timeout_s=30)
        wait_for(lambda: len(runtime.service.queue(QueueFilter())) == 4, what="items indexed")
        thread.start()
        wait_for(lambda: uv.started, what="uvicorn started")
        yield f"http://127.0.0.1:{port}", kafka_settings
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
        runtime.stop()


def test_reviewer_corrects_the_oldest_item_in_a_real_browser(
    server: tuple[str, Settings], tmp_path: Path
) -> None:
    sync_playwright = _playwright()
    base, settings = server
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            dialogs: list[str] = []

            def on_dialog(dialog: Any) -> None:  # alert()/confirm() would mean a script ran
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)

            page.goto(base + "/")
            assert "/login" in page.url
            page.get_by_label("User").fill("alice")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(base + "/")
            rows = page.locator("table.queue tbody tr")
            assert rows.count() == 4
            assert "tkt-1041" in rows.first.inner_text()
            assert "SLA" in rows.first.inner_text()
            page.screenshot(path=str(shots / "queue.png"), full_page=True)

            page.get_by_role("button", name="Review next (oldest free)").click()
            page.wait_for_url("**/item?**")
            assert "tkt-1041" in page.locator("h1").inner_text()
            assert "You hold this item now." in page.locator(".notice").inner_text()
            # the payloads are on the page as text, and nothing of them ran or rendered
            assert "<script>window.__pwned = 1</script>" in page.locator("#raw-text").inner_text()
            assert "<img src=x onerror=" in page.locator("#variables").inner_text()
            messages = page.locator(".message pre").all_inner_texts()
            assert any('onerror="window.__pwned=3"' in m for m in messages)
            assert page.evaluate("window.__pwned") is None
            assert page.locator("img").count() == 0
            page.screenshot(path=str(shots / "item.png"), full_page=True)

            page.locator("#output").fill(json.dumps(CORRECTED, indent=2))
            page.get_by_role("button", name="Submit correction").click()
            page.wait_for_url("**notice=decided**")
            assert "Decided: edit" in page.locator("#decision").inner_text()
            assert page.evaluate("window.__pwned") is None
            assert dialogs == []
            page.screenshot(path=str(shots / "decided.png"), full_page=True)
        finally:
            context.close()

    def arrived(topic: str, cls: Any) -> list[Any]:
        return [e for e, _ in read_to_end(settings, topic, cls, timeout_s=10)]

    (result,) = wait_for(lambda: arrived("llm.results", Result), what="the human result")
    assert result.request_id == "tkt-1041" and result.source == "human"
    assert result.reviewer == "alice" and result.output == CORRECTED
    (correction,) = wait_for(lambda: arrived("llm.corrections", Correction), what="a correction")
    assert correction.request_id == "tkt-1041" and correction.corrected_output == CORRECTED
    assert correction.original_output is not None
    assert correction.original_output["summary"] == XSS_SUMMARY
