"""The review UI in a real headless Chromium, against a real server, service and broker.

Logs in, triages from the queue (preview column, threshold, sorting), opens an item by
keyboard, claims it, corrects the model's output and submits; the corrected result must
arrive on ``llm.results`` (source ``human``) with a correction on ``llm.corrections``.
Then logs out and shows that the session cookie held before no longer opens anything.
The item's model output carries ``<script>`` and ``<img onerror>`` payloads, which must
render as inert text, and a subject carries U+202E, which must show as a marker.
Screenshots of the queue and item pages are taken too; with
``LLMPIPE_REVIEW_SCREENSHOTS=docs/review`` they are kept for the README.

Needs Debian's ``chromium`` and the ``playwright`` Python package (its bundled driver
only; no browser download). Skipped without them, except in CI where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.config import Settings
from pipeline.contract.envelopes import Correction, Result
from pipeline.review.app import ReviewConfig, create_app
from pipeline.review.auth import SESSION_COOKIE, SessionSigner, UsersFile
from pipeline.review.kafka_io import read_to_end
from pipeline.review.model import QueueFilter
from pipeline.review.runtime import ReviewRuntime
from tests.review.test_review_support import (
    XSS_SUMMARY,
    escalation,
    registry,
    review_message,
    serving,
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
            variables={
                "subject": "Refund for invoice_\u202efdp.exe",
                "body": "Please refund the unused seats.",
            },
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
    now = datetime.now(UTC)
    produce(kafka_settings, "llm.review", [review_message(kafka_settings, e) for e in _items(now)])
    runtime = ReviewRuntime(
        kafka_settings, f"sqlite:///{tmp_path / 'review.db'}", registry=registry()
    )
    users = UsersFile(tmp_path / "users.txt")
    users.add("alice", PASSWORD, log_n=10)
    app = create_app(runtime.service, ReviewConfig(users, SessionSigner(os.urandom(32))))
    try:
        assert runtime.start(ready_timeout_s=30)
        wait_for(lambda: len(runtime.service.queue(QueueFilter())) == 4, what="items indexed")
        with serving(app) as base:
            yield base, kafka_settings
    finally:
        runtime.stop()


def test_reviewer_triages_corrects_and_logs_out_in_a_real_browser(
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

            # triage from the queue alone: previews, threshold beside confidence, sorting
            rows = page.locator("table.queue tbody tr")
            assert rows.count() == 4
            previews = page.locator("td.preview").all_inner_texts()
            assert any("Dashboard takes 40s to load" in p for p in previews), previews
            assert any("Northwind Office Supply" in p for p in previews), previews
            assert "/ 0.75" in rows.first.inner_text()  # ticket_triage's accept threshold
            assert "SLA" in rows.first.inner_text()
            spoofed = page.locator("td.preview mark.ctl")  # the U+202E in a subject
            assert spoofed.first.inner_text() == "RLO"
            page.screenshot(path=str(shots / "queue.png"), full_page=True)
            page.get_by_role("link", name="Confidence").click()
            page.wait_for_url("**sort=confidence**")
            assert "tkt-1044" in page.locator("table.queue tbody tr").first.inner_text()

            # open the one whose preview says what we want to work on, by keyboard
            texts = page.locator("table.queue tbody tr").all_inner_texts()
            wanted = next(i for i, t in enumerate(texts) if "Dashboard takes 40s" in t)
            for _ in range(wanted + 1):
                page.keyboard.press("j")
            page.keyboard.press("o")
            page.wait_for_url("**/item?**")
            assert "tkt-1041" in page.locator("h1").inner_text()
            page.keyboard.press("c")  # claim
            page.wait_for_selector("#output")
            assert "You hold this item now." in page.locator(".notice").inner_text()
            # the page reads top-down, and the payloads are text that nothing ran
            tops = [page.locator(f"#{s}").bounding_box() for s in ("why", "input", "model")]
            tops.append(page.locator("#decision").bounding_box())
            assert [b["y"] for b in tops if b] == sorted(b["y"] for b in tops if b)
            assert "<script>window.__pwned = 1</script>" in page.locator("#raw-text").inner_text()
            subject = page.locator('pre[data-variable="subject"]').inner_text()
            assert subject.startswith("Dashboard takes 40s to load <img src=x onerror=")
            assert "since the release" not in subject  # readable text per variable
            messages = page.locator(".message pre").all_text_contents()
            assert any('onerror="window.__pwned=3"' in m for m in messages)
            assert page.evaluate("window.__pwned") is None
            assert page.locator("img").count() == 0
            assert "product of the components" in page.locator("#confidence-rule").inner_text()
            page.screenshot(path=str(shots / "item.png"), full_page=True)

            page.locator("#output").fill(json.dumps(CORRECTED, indent=2))
            page.get_by_role("button", name="Submit correction").click()
            page.wait_for_selector("text=Decided: edit")
            assert "Decision recorded and delivered." in page.locator(".notice").inner_text()
            assert page.evaluate("window.__pwned") is None
            assert dialogs == []
            page.screenshot(path=str(shots / "decided.png"), full_page=True)

            # log out; the cookie the browser held before is worthless afterwards
            (old,) = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
            page.get_by_role("button", name="Log out").click()
            page.wait_for_url("**/login?notice=loggedout")
            assert "You are logged out." in page.locator(".notice").inner_text()
            context.add_cookies([old])  # put the stolen copy back
            page.goto(base + "/")
            assert "/login" in page.url
            assert "Your session has ended" in page.locator(".notice").inner_text()
        finally:
            context.close()
    with httpx.Client(base_url=base, cookies={SESSION_COOKIE: old["value"]}) as thief:
        assert thief.get("/").status_code == 303
        assert thief.get("/item", params={"id": "tkt-1043"}).status_code == 303

    def arrived(topic: str, cls: Any) -> list[Any]:
        return [e for e, _ in read_to_end(settings, topic, cls, timeout_s=10)]

    (result,) = wait_for(lambda: arrived("llm.results", Result), what="the human result")
    assert result.request_id == "tkt-1041" and result.source == "human"
    assert result.reviewer == "alice" and result.output == CORRECTED
    (correction,) = wait_for(lambda: arrived("llm.corrections", Correction), what="a correction")
    assert correction.request_id == "tkt-1041" and correction.corrected_output == CORRECTED
    assert correction.original_output is not None
    assert correction.original_output["summary"] == XSS_SUMMARY
