"""The review UI's per-prompt calibration page shows what `llmpipe review calibration` shows."""

from __future__ import annotations

import html
from pathlib import Path

from pipeline.contract.envelopes import ReviewDecision
from pipeline.review.calibration import calibrate, samples_from_rows, shown_rows
from pipeline.review.model import decision_id_for
from tests.review.test_review_http import build, logged_in
from tests.review.test_review_support import escalation, incoming, registry, serving


def test_the_calibration_page_shows_the_cli_numbers(tmp_path: Path) -> None:
    app, server = build(tmp_path)
    items, decisions = [], []
    for i in range(60):
        esc = escalation(f"a{i}", confidence=0.8 + (i % 20) / 100, reason="audit")
        items.append(incoming(esc, 10 + i))
        action = "edit" if i % 10 == 0 else "approve"
        decisions.append(
            ReviewDecision(
                decision_id=decision_id_for(f"a{i}"),
                request_id=f"a{i}",
                action=action,
                reviewer="alice",
                output=esc.output,
                prompt=esc.validated.prompt,
                decided_at=esc.escalated_at,
            )
        )
    low = escalation("low", confidence=0.3, reason="low_confidence")  # not a sample
    server.store.apply([*items, incoming(low, 99)], decisions, [], 0)
    (expected,) = calibrate(
        "ticket_triage",
        samples_from_rows(server.store.calibration_rows("ticket_triage")),
        registry(),
        0.05,
    )
    assert expected.overall.n == 60 and expected.overall.errors == 6
    with serving(app) as base:
        server.base = base
        with server.client() as anonymous:
            assert anonymous.get("/calibration").status_code == 303  # to the login page
        with logged_in(server) as client:
            page = client.get("/calibration", params={"prompt": "ticket_triage", "target": "0.05"})
            assert page.status_code == 200, page.text
            text = html.unescape(page.text)
            assert "ticket_triage@2" in text and expected.message in text
            for row in shown_rows(expected):
                low_ci, high_ci = row.accepted.interval
                cells = (
                    f"<td>{row.threshold:.2f}</td>\n        <td>{row.accepted.n}</td>\n"
                    f"        <td>{row.accepted.errors}</td>"
                )
                assert cells in text, cells
                assert f"{low_ci * 100:.1f}%-{high_ci * 100:.1f}%" in text
            assert client.get("/calibration", params={"target": "2"}).status_code == 400
            assert client.get("/calibration", params={"target": "x"}).status_code == 400
            assert client.get("/calibration", params={"prompt": "nope"}).status_code == 404
            empty = client.get("/calibration", params={"prompt": "invoice_extract"})
            assert empty.status_code == 200 and "No audit or burn-in verdicts" in empty.text


def test_audit_and_high_risk_items_say_what_they_are(tmp_path: Path) -> None:
    app, server = build(tmp_path)
    audit = escalation("au1", confidence=0.9, reason="audit")
    risky = escalation("hr1", confidence=0.95, reason="high_risk").model_copy(
        update={"risk_rules": ["big_refund", "enterprise"]}
    )
    server.store.apply([incoming(audit, 50), incoming(risky, 51)], [], [], 0)
    with serving(app) as base:
        server.base = base
        with logged_in(server) as client:
            page = client.get("/item", params={"id": "au1"})
            assert page.status_code == 200 and "already delivered" in page.text
            page = client.get("/item", params={"id": "hr1"})
            assert "Risk rules that fired: big_refund, enterprise" in page.text
