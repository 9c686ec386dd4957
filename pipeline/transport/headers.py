"""Header names and builders: the part of the contract that travels beside the value."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from pipeline.contract.envelopes import PromptRef
from pipeline.contract.topology import ROUTE_DEAD_LETTER

REQUEST_ID = "x-request-id"
PROMPT = "x-prompt"
PROMPT_HASH = "x-prompt-hash"
ROUTE = "x-route"
REASON = "x-reason"
TRACEPARENT = "traceparent"
CONTENT_TYPE = "content-type"
ORDERED = "x-ordered"

DLQ_PREFIX = "x-dlq-"
DLQ_TOPIC = "x-dlq-original-topic"
DLQ_PARTITION = "x-dlq-original-partition"
DLQ_OFFSET = "x-dlq-original-offset"
DLQ_TIMESTAMP = "x-dlq-original-timestamp"
DLQ_GROUP = "x-dlq-consumer-group"
DLQ_STAGE = "x-dlq-stage"
DLQ_REASON = "x-dlq-reason"
DLQ_ERROR_CLASS = "x-dlq-error-class"
DLQ_ERROR_MESSAGE = "x-dlq-error-message"
DLQ_ATTEMPTS = "x-dlq-attempts"
DLQ_FIRST_FAILURE = "x-dlq-first-failure-at"
DLQ_REPLAY_COUNT = "x-dlq-replay-count"
# On a replayed message (not a dead letter): the dead letter it came from, as
# ``<group>|<topic>|<partition>|<offset>``; a re-parsed result names its source the same way.
DLQ_REPLAY_SOURCE = "x-dlq-replay-source"
REPARSE_SOURCE = "x-reparse-source"
DLQ_HEADERS = (
    DLQ_TOPIC,
    DLQ_PARTITION,
    DLQ_OFFSET,
    DLQ_TIMESTAMP,
    DLQ_GROUP,
    DLQ_STAGE,
    DLQ_REASON,
    DLQ_ERROR_CLASS,
    DLQ_ERROR_MESSAGE,
    DLQ_ATTEMPTS,
    DLQ_FIRST_FAILURE,
    DLQ_REPLAY_COUNT,
)
MAX_ERROR_MESSAGE = 512


def _utf8(text: str) -> bytes:
    """Header values come partly from untrusted input (request ids, prompt names): a lone
    surrogate must not make a header unencodable, or the message could never be sent."""
    return text.encode("utf-8", "replace")


Headers = list[tuple[str, bytes]]


def as_map(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, bytes]:
    """Last value wins, keys lower-cased: Kafka allows duplicates, our contract does not."""
    return {k.lower(): v for k, v in (headers or ()) if v is not None}


def text(headers: Mapping[str, bytes], name: str) -> str | None:
    value = headers.get(name)
    return value.decode("utf-8", "replace") if value is not None else None


def output_headers(
    request_id: str,
    prompt: PromptRef | None,
    route: str,
    content_type: str,
    trace: Mapping[str, str],
    reason: str | None = None,
    passthrough: Mapping[str, bytes] | None = None,
) -> Headers:
    headers: dict[str, bytes] = {}
    if passthrough and ORDERED in passthrough:
        headers[ORDERED] = passthrough[ORDERED]
    headers[REQUEST_ID] = _utf8(request_id)
    headers[ROUTE] = _utf8(route)
    headers[CONTENT_TYPE] = _utf8(content_type)
    if prompt is not None:
        headers[PROMPT] = _utf8(prompt.ref)
        headers[PROMPT_HASH] = _utf8(prompt.hash)
    if reason:
        headers[REASON] = _utf8(reason)
    for key, value in trace.items():
        headers[key] = _utf8(value)
    return list(headers.items())


def dead_letter_headers(
    original: Mapping[str, bytes],
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    group: str,
    stage: str,
    reason: str,
    error_class: str,
    error_message: str,
    attempts: int,
    request_id: str | None,
    prompt: PromptRef | None,
    now: datetime | None = None,
) -> Headers:
    """Original headers unchanged, then provenance; a replayed message keeps its history.

    ``first-failure-at`` and ``replay-count`` survive a replay (they are read from the
    original headers), so a poison message can be recognised however often it comes back.
    """
    now = now or datetime.now(UTC)
    merged = {k: v for k, v in original.items() if not k.startswith(DLQ_PREFIX) and k != ROUTE}
    first = original.get(DLQ_FIRST_FAILURE) or _utf8(now.isoformat(timespec="milliseconds"))
    replays = original.get(DLQ_REPLAY_COUNT) or b"0"
    merged.update(
        {
            DLQ_TOPIC: _utf8(topic),
            DLQ_PARTITION: _utf8(str(partition)),
            DLQ_OFFSET: _utf8(str(offset)),
            DLQ_TIMESTAMP: _utf8(str(timestamp_ms if timestamp_ms is not None else -1)),
            DLQ_GROUP: _utf8(group),
            DLQ_STAGE: _utf8(stage),
            DLQ_REASON: _utf8(reason),
            DLQ_ERROR_CLASS: _utf8(error_class),
            DLQ_ERROR_MESSAGE: _utf8(error_message[:MAX_ERROR_MESSAGE]),
            DLQ_ATTEMPTS: _utf8(str(attempts)),
            DLQ_FIRST_FAILURE: first,
            DLQ_REPLAY_COUNT: replays,
            ROUTE: ROUTE_DEAD_LETTER.encode(),
        }
    )
    if request_id and REQUEST_ID not in original:
        merged[REQUEST_ID] = _utf8(request_id)
    if prompt is not None:
        merged[PROMPT] = _utf8(prompt.ref)
        merged[PROMPT_HASH] = _utf8(prompt.hash)
    return list(merged.items())
