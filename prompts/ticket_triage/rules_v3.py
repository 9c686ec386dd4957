"""Deterministic code for ticket_triage v3: a broader keyword rule, used twice.

v3 asks this rule for a second opinion on every model answer (the agreement
component) and uses it as the fallback, so its vocabulary is wider than the
v1/v2 rule's (which stays as released in ``rules.py``): words, not substrings
(so "accounts payable" is not an account problem), phrases for the five
labels including ``other`` (job applications, press, partnerships), and the
same priority and redaction logic. It returns None when no keyword matches:
no opinion is better than a guess, both for agreement and for the fallback.
"""

from __future__ import annotations

import re
from typing import Any

# Order breaks ties: a ticket that mentions both a charge and an error is a
# billing problem first, because billing tickets have a contractual SLA.
_LABEL_PHRASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "billing",
        (
            "invoice", "invoices", "invoicing", "charged", "charge", "charges", "refund",
            "payment", "pay", "paid", "billing", "bill", "billed", "receipt", "credit card",
            "price", "pricing", "subscription", "discount", "vat", "purchase order",
            "bank transfer", "wire transfer", "checkout", "upgrade", "downgrade", "cheaper",
        ),
    ),
    (
        "account",
        (
            "password", "log in", "login", "sign in", "signin", "locked out", "locked",
            "two-factor", "2fa", "authenticator", "sso", "single sign-on", "saml", "username",
            "invite", "invited", "inviting", "permissions", "access", "owner", "ownership",
            "account", "user", "users", "organisation members",
        ),
    ),
    (
        "bug",
        (
            "error", "errors", "crash", "crashes", "broken", "exception", "timeout",
            "does not work", "doesn't work", "http 500", "404", "fails", "failing", "failed",
            "wrong", "missing", "empty", "unreachable", "outage", "lag", "disappears",
            "blank screen", "bug", "data loss", "not working", "stopped working",
        ),
    ),
    (
        "feature_request",
        (
            "feature request", "would be great", "please add", "would be nice", "roadmap",
            "could you add", "would love", "we would like", "i would like",
            "suggestion", "do you plan", "plan to support", "will it be available",
            "are you going to", "an option to", "please provide", "planned", "support for",
        ),
    ),
    (
        "other",
        (
            "office", "job", "cv", "career", "careers", "hiring", "partnership", "reseller",
            "conference", "call for papers", "journalist", "press", "article", "thesis",
            "stickers", "t-shirts", "swag", "thank you", "meetups", "questionnaire",
            "meetup", "visit", "apply",
        ),
    ),
)
_PATTERNS = tuple(
    (label, re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, phrases)) + r")(?!\w)"))
    for label, phrases in _LABEL_PHRASES
)
_URGENT = ("outage", "production is down", "data loss", "lost data", "breach", "security incident")
_HIGH = ("cannot", "can't", "unable to", "blocked", "no workaround", "no longer")
# An email address, or a phone number: nine or more digits with single separators
# (so ISO dates and short order numbers are not mistaken for phone numbers).
_CONTACT = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+|(?<!\w)\+?\d(?:[\s().-]?\d){8,}(?!\w)")
_SUMMARY_LIMIT = 200


def keyword_triage(variables: dict[str, Any]) -> dict[str, Any] | None:
    """Label by keyword counts (subject words count twice); None when nothing matches."""
    subject = str(variables["subject"]).lower()
    body = str(variables["body"]).lower()
    scores = [
        (2 * len(pattern.findall(subject)) + len(pattern.findall(body)), label)
        for label, pattern in _PATTERNS
    ]
    best_score = max(score for score, _ in scores)
    if best_score == 0:
        return None
    label = next(label for score, label in scores if score == best_score)
    text = f"{subject}\n{body}"
    if any(k in text for k in _URGENT):
        priority = "urgent"
    elif any(k in text for k in _HIGH):
        priority = "high"
    elif label in ("feature_request", "other"):
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
