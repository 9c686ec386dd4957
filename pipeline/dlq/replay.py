"""``dlq replay``: send selected dead letters back to the stage that refused them.

A replayed message is the dead letter's key, value and headers, untouched except for two
headers: ``x-dlq-replay-count`` goes up by one (so a message that keeps failing is stopped
at ``--max-replays`` instead of looping forever), and ``x-dlq-replay-source`` names the
dead letter it came from (the engine's recovery marker). The other ``x-dlq-*`` provenance
stays: if the message fails again, :func:`pipeline.transport.headers.dead_letter_headers`
keeps its first-failure time and replay count, so its history survives any number of trips.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.dlq.engine import Action, Outgoing, PlanItem, marker_value
from pipeline.dlq.model import DeadLetterView, Filter
from pipeline.transport import headers as h
from pipeline.transport.reader import RawHeaders, SourceRecord

REPLAY_SOURCE = h.DLQ_REPLAY_SOURCE
DEFAULT_MAX_REPLAYS = 3
KIND = "replay"


def replayed_headers(headers: RawHeaders, replay_count: int, marker: bytes) -> RawHeaders:
    """The original headers in their original order, with the count bumped and the marker set."""
    out: list[tuple[str, bytes | None]] = []
    counted = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == REPLAY_SOURCE:
            continue
        if lowered == h.DLQ_REPLAY_COUNT:
            if counted:
                continue
            out.append((name, str(replay_count + 1).encode()))
            counted = True
            continue
        out.append((name, value))
    if not counted:
        out.append((h.DLQ_REPLAY_COUNT, str(replay_count + 1).encode()))
    out.append((REPLAY_SOURCE, marker))
    return tuple(out)


class ReplaySelector:
    """Which dead letters to replay, where to, and which to refuse as poison."""

    kind = KIND
    marker_header = REPLAY_SOURCE

    def __init__(
        self,
        settings: Settings,
        selection: Filter,
        *,
        group: str,
        to: str | None = None,
        max_replays: int = DEFAULT_MAX_REPLAYS,
        force: bool = False,
    ) -> None:
        self._settings = settings
        self._filter = selection
        self._group = group
        self._to = settings.topic(to) if to else None
        self._max_replays = max_replays
        self._force = force

    def fingerprint_parts(self) -> dict[str, Any]:
        return {
            "filter": list(self._filter.spelled),
            "to": self._to,
            "max_replays": self._max_replays,
            "force": self._force,
        }

    def destination(self, view: DeadLetterView) -> str | None:
        """``--to``, else the topic the message was consumed from, else the stage's input."""
        if self._to:
            return self._to
        if view.original_topic:
            return view.original_topic
        stage = topology.STAGES.get(view.stage)
        return self._settings.topic(stage.input_topic) if stage else None

    def consider(self, record: SourceRecord) -> PlanItem | None:
        view = DeadLetterView(record)
        if not self._filter.matches(view.facts()):
            return None
        destination = self.destination(view)
        count = view.replay_count
        action: Action = "refuse"
        if destination is None:
            note = "no original topic and an unknown stage: use --to"
        elif count >= self._max_replays and not self._force:
            note = f"already replayed {count} times (--max-replays {self._max_replays})"
        else:
            action, note = "send", f"replay #{count + 1}"
        return PlanItem(
            ref=record.ref,
            timestamp_ms=record.timestamp_ms,
            action=action,
            note=note,
            destination=destination,
            summary=summarize(view),
        )

    def finalize(self, items: list[PlanItem]) -> None:
        return None

    def outgoing(self, record: SourceRecord, item: PlanItem) -> list[Outgoing]:
        view = DeadLetterView(record)
        assert item.destination is not None
        same_topic = item.destination == view.original_topic
        return [
            Outgoing(
                topic=item.destination,
                partition=view.original_partition if same_topic else None,
                key=record.key,
                value=record.value,
                headers=replayed_headers(
                    record.headers, view.replay_count, marker_value(self._group, record)
                ),
            )
        ]


def summarize(view: DeadLetterView) -> dict[str, Any]:
    """The few facts a dry-run listing shows; decoding is avoided unless the header is absent."""
    record = view.record
    return {
        "request_id": record.request_id or "-",
        "reason": view.reason,
        "stage": view.stage,
        "prompt": view.prompt_label,
        "replay_count": view.replay_count,
        "error": view.error_message,
        "at": record.timestamp_ms,
    }
