"""Human review: a durable queue of escalated requests, a web UI, corrections as training data.

Kafka is the source of truth (``llm.review`` holds the items, ``llm.review.decisions`` what
reviewers decided); the database is a rebuildable index of both plus the things Kafka does
not need to know (claims and the audit trail). See ``service.py`` for the exactly-once
design of decisions.
"""
