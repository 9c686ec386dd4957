"""Feeds ``llm.control`` into the worker's :class:`ControlState`.

The topic is followed from the beginning by the shared
:class:`~pipeline.transport.compacted.CompactedFollower` (no consumer group: every worker
needs every event); ``ready`` is set once it has caught up with the end offsets seen at
start, so that a starting worker never serves a request under stale flags or pins.
Events are applied on the event loop, where the stages read the state.
"""

from __future__ import annotations

import asyncio
import logging

from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import ControlEvent
from pipeline.control.state import ControlState
from pipeline.observability.hooks import record_control_change
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients
from pipeline.transport.compacted import CompactedFollower, Record

log = logging.getLogger("llmpipe.control")


class ControlListener:
    def __init__(
        self, topic: str, state: ControlState, codec: Codec, clients: KafkaClients
    ) -> None:
        self._state = state
        self._codec = codec
        self._follower = CompactedFollower(
            topic, self._apply, clients, poll_timeout_s=0.2, on_loaded=self._loaded
        )
        self.ready = self._follower.ready

    async def run(self, stop: asyncio.Event) -> None:
        await self._follower.run(stop)

    def _loaded(self) -> None:
        log.info("control state loaded: %d events", self._state.applied)

    def _apply(self, record: Record) -> None:
        if record.value is None:
            return
        content_type = h.text(record.headers, h.CONTENT_TYPE)
        try:
            event = self._codec.decode(record.value, ControlEvent, content_type)
            self._state.apply(event)
            record_control_change(event.key)
            if self.ready.is_set():  # the initial load is summed up in one line instead
                log.info(
                    "control event applied: %s = %s (by %s at %s: %s)",
                    event.key,
                    "default" if event.value is None else event.value,
                    event.actor,
                    event.at.isoformat(),
                    event.reason,
                    extra={"control_key": event.key},
                )
        except (DecodeError, ValueError) as exc:
            log.error("ignoring a bad control event: %s", exc)
