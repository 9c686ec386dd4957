"""Reading and writing the compacted ``llm.control`` topic from tools (CLI, tests).

Workers fold the topic with :class:`~pipeline.control.listener.ControlListener`;
operators change it with these functions, which record who, when and why in every event.
"""

from __future__ import annotations

import getpass
from typing import Any

from pipeline.config import Settings
from pipeline.contract.codec import CONTENT_TYPE_HEADER, Codec, DecodeError
from pipeline.contract.envelopes import ControlEvent, utc_now
from pipeline.contract.topology import CONTROL
from pipeline.control.state import ControlState
from pipeline.transport.batch import Written, produce_batch
from pipeline.transport.reader import scan


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def publish(
    settings: Settings, key: str, value: Any, actor: str | None = None, reason: str = ""
) -> tuple[ControlEvent, Written]:
    """Write one control event; the event and where its delivery report says it landed.

    Raises :class:`~pipeline.transport.batch.DeliveryError` when the broker did not
    acknowledge it (a kill switch that did not switch must never look switched)."""
    event = ControlEvent(
        key=key, value=value, actor=actor or default_actor(), reason=reason, at=utc_now()
    )
    data, content_type = Codec().encode(event)
    headers = [(CONTENT_TYPE_HEADER, content_type.encode())]
    (written,) = produce_batch(settings, CONTROL, [(key.encode(), data, headers)])
    return event, written


def read_history(settings: Settings, timeout_s: float = 10.0) -> list[ControlEvent]:
    """Every control event still on the topic, oldest first per key's partition (compaction
    keeps the latest per key and whatever has not been compacted yet, which is the recent
    history). Read to the end offsets seen at the start, within ``timeout_s``."""
    codec = Codec()
    events: list[ControlEvent] = []
    for record in scan(settings, [settings.topic(CONTROL)], deadline_s=timeout_s):
        if record.value is None:
            continue
        try:
            events.append(codec.decode(record.value, ControlEvent))
        except DecodeError:
            continue
    return events


def current_state(settings: Settings) -> ControlState:
    state = ControlState()
    for event in read_history(settings):
        state.apply(event)
    return state
