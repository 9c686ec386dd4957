"""Structured JSON log lines with trace ids, redacted before they leave the process.

Every line carries the trace and span id of the code that logged it, plus the request id,
stage and prompt version of the message being processed (from
:mod:`pipeline.observability.context`), so a log search and a trace view lead to each
other; and ``service.instance.id``, the resource attribute the process's spans and
metrics carry, so a line leads to the one replica (of several) that wrote it.
Everything free-form (the message, extra fields, tracebacks) goes through the redactor;
identifiers we assign ourselves do not, because a request id that happens to
look like a phone number must still be searchable.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from pipeline.observability.context import current_scope
from pipeline.observability.redact import DEFAULT_REDACTOR, Redactor
from pipeline.observability.setup import INSTANCE_ID, instance_id

RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# Identifiers, not content: kept verbatim so they can be searched for.
IDENTIFIERS = frozenset({"request_id", "trace_id", "span_id", "decision_id"})


class JsonFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor = DEFAULT_REDACTOR) -> None:
        super().__init__()
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        redact = self._redactor
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact.text(record.getMessage()),
            INSTANCE_ID: instance_id(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            line["trace_id"] = format(ctx.trace_id, "032x")
            line["span_id"] = format(ctx.span_id, "016x")
        scope = current_scope()
        if scope is not None:
            line["stage"] = scope.stage
            if scope.request_id is not None:
                line["request_id"] = scope.request_id
            if scope.prompt_name is not None:
                line["prompt"] = (
                    f"{scope.prompt_name}@{scope.prompt_version}"
                    if scope.prompt_version is not None
                    else scope.prompt_name
                )
        for key, value in vars(record).items():
            if key in RESERVED or key.startswith("_"):
                continue
            if key in IDENTIFIERS and (value is None or isinstance(value, str)):
                if value is not None:
                    line[key] = value
                continue
            line[key] = redact.value(value, key)
        if record.exc_info:
            line["exc"] = redact.text(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
