"""A worker's link to ``llm.fleet``: fold the topic into its :class:`FleetState`, publish its
own part (quality outcomes, endpoint news and spend every flush; its lease every lease
interval), and resize its rate-limit shares when the membership or the demand changes.

The state and every decision about it are in :mod:`pipeline.resilience.fleet`; the Kafka
clients are the shared compacted-topic follower and publisher of
:mod:`pipeline.transport.compacted`. This module only moves records between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pipeline.config import Settings
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import FleetEvent
from pipeline.contract.topology import FLEET
from pipeline.resilience.fleet import FLUSH_S, LEASE_EVERY_S, FleetState, Outbox
from pipeline.resilience.stack import ResilientClient
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients
from pipeline.transport.compacted import CompactedFollower, Record, StatePublisher

log = logging.getLogger("llmpipe.fleet")
SPEND_DELAY_S = 0.005
"""Reports of spend within this are published together: at most 1 / SPEND_DELAY_S records
a second per worker, whatever the call rate."""


class FleetLink:
    """Run beside the stages: ``await ready`` before they start, so a restarted worker
    has read back the day's spend, the open breakers and the other workers' leases."""

    def __init__(
        self,
        settings: Settings,
        clients: KafkaClients,
        codec: Codec,
        state: FleetState,
        client: ResilientClient,
        *,
        flush_s: float = FLUSH_S,
        lease_every_s: float = LEASE_EVERY_S,
    ) -> None:
        topic = settings.topic(FLEET)
        self.state = state
        self._client = client
        self._codec = codec
        self._flush_s = flush_s
        self._lease_every_s = lease_every_s
        self._follower = CompactedFollower(topic, self._apply, clients, poll_timeout_s=0.05)
        self._publisher = StatePublisher(topic, clients, codec)
        self._soon: asyncio.TimerHandle | None = None
        self.ready = self._follower.ready
        state.spend.on_report = self._publish_spend_soon

    async def run(self, stop: asyncio.Event) -> None:
        follow = asyncio.create_task(self._follower.run(stop))
        next_lease = 0.0
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._flush_s)
                if follow.done():
                    follow.result()
                    raise RuntimeError("the fleet follower stopped")
                if not self.ready.is_set():
                    continue
                if next_lease == 0.0:
                    log.info(
                        "fleet state loaded: %d records, members %s",
                        self.state.folded,
                        ",".join(self.state.shares.members()),
                    )
                self._publish(self.state.flush())
                if time.monotonic() >= next_lease:
                    next_lease = time.monotonic() + self._lease_every_s
                    self._publish(self.state.heartbeat())
                self._rescale()
                self._publisher.poll()
        finally:
            if self._soon is not None:
                self._soon.cancel()
            # Unhooked: spend reported from now on has nobody to publish it. This also
            # drops the state's reference to this link, through which an object frozen
            # by gc.freeze() kept the link, and its producer, alive to the interpreter's
            # shutdown.
            self.state.spend.on_report = None
            if self.ready.is_set():
                self._publish(self.state.flush())
                self._publish(self.state.leave())
            try:
                await self._publisher.close()
            finally:
                stop.set()
                await asyncio.gather(follow, return_exceptions=True)

    def _publish_spend_soon(self) -> None:
        """Spend (a reservation above all) goes out within ``SPEND_DELAY_S``: a worker
        SIGKILLed with calls in flight must have told the fleet what they may cost."""
        if self._soon is None and self.ready.is_set():
            self._soon = asyncio.get_running_loop().call_later(SPEND_DELAY_S, self._spend_now)

    def _spend_now(self) -> None:
        self._soon = None
        self._publish(self.state.flush())
        self._publisher.poll()

    def _publish(self, records: Outbox) -> None:
        for key, event in records:
            self._publisher.publish(key, event)

    def _rescale(self) -> None:
        """Apply the current shares (cheap when nothing changed; every tick, because a
        larger slot share takes effect only after it has stood a while)."""
        self._client.rate_limits.rescale()

    def _apply(self, record: Record) -> None:
        if record.key is None:
            return
        key = record.key.decode("utf-8", "replace")
        event: FleetEvent | None = None
        if record.value is not None:
            try:
                event = self._codec.decode(
                    record.value, FleetEvent, h.text(record.headers, h.CONTENT_TYPE)
                )
            except DecodeError as exc:
                log.error("ignoring an unreadable fleet record %s: %s", key, exc)
                return
        self.state.apply(event, key)
        if key.startswith("lease:"):
            self._rescale()
