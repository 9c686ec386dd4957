"""Deterministic code for ticket_triage: the keyword fallback and output checks.

Both v1 and v2 reference this file, so it is part of both content hashes:
once either version is released, any edit here fails `llmpipe prompts check`.
That is intended, since this code is how released versions behave. A later
version that needs different rules gets its own file (e.g. ``rules_v3.py``)
instead of editing this one.
"""

from __future__ import annotations

import re
from typing import Any

# Order breaks ties: a ticket that mentions both a charge and an error is a
# billing problem first, because billing tickets have a contractual SLA.
_LABEL_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "billing",
        ("invoice", "charged", "refund", "payment", "billing", "receipt", "credit card", "plan"),
    ),
    (
        "account",
        ("password", "log in", "login", "locked out", "two-factor", "2fa", "sso", "username"),
    ),
    (
        "bug",
        ("error", "crash", "broken", "exception", "timeout", "does not work", "http 500"),
    ),
    (
        "feature_request",
        ("feature request", "would be great", "please add", "would be nice", "roadmap"),
    ),
)
_URGENT = ("outage", "production is down", "data loss", "lost data", "breach", "security incident")
_HIGH = ("cannot", "can't", "unable to", "blocked", "no workaround")
# An email address, or a phone number: nine or more digits with single separators
# (so ISO dates and short order numbers are not mistaken for phone numbers).
_CONTACT = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+|(?<!\w)\+?\d(?:[\s().-]?\d){8,}(?!\w)")
_SUMMARY_LIMIT = 200


def keyword_triage(variables: dict[str, Any]) -> dict[str, Any] | None:
    """Label by keyword counts; None when no keyword matches, since a guess is worse than review."""
    text = f"{variables['subject']}\n{variables['body']}".lower()
    scores = [(sum(text.count(k) for k in keywords), label) for label, keywords in _LABEL_KEYWORDS]
    best_score = max(score for score, _ in scores)
    if best_score == 0:
        return None
    label = next(label for score, label in scores if score == best_score)
    if any(k in text for k in _URGENT):
        priority = "urgent"
    elif any(k in text for k in _HIGH):
        priority = "high"
    elif label == "feature_request":
        priority = "low"
    else:
        priority = "normal"
    summary = " ".join(_CONTACT.sub("[redacted]", str(variables["subject"])).split())
    if len(summary) > _SUMMARY_LIMIT:
        summary = summary[: _SUMMARY_LIMIT - 3].rstrip() + "..."
    return {"label": label, "priority": priority, "summary": summary}


def summary_has_no_contact_details(output: dict[str, Any], variables: dict[str, Any]) -> list[str]:
    """Summaries land in a shared queue view; customer contact details must not."""
    if _CONTACT.search(str(output.get("summary", ""))):
        return ["summary must not contain email addresses or phone numbers; describe the customer"]
    return []


def urgent_needs_evidence(output: dict[str, Any], variables: dict[str, Any]) -> list[str]:
    """Priority "urgent" pages the on-call engineer, so it needs an outage-like signal."""
    if output.get("priority") != "urgent":
        return []
    text = f"{variables['subject']}\n{variables['body']}".lower()
    if variables.get("customer_tier") == "enterprise" or any(k in text for k in _URGENT):
        return []
    return [
        "priority 'urgent' is reserved for outages, data loss or security incidents, "
        "which this ticket does not describe; use 'high' if the customer is blocked"
    ]
