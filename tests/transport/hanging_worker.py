"""``llmpipe worker`` whose first transaction hangs just before it commits, for the abort test.

The real worker, real clients and real broker; only the first ``commit_transaction`` call
of the process prints ``IN-TXN`` and blocks forever, so the test can look at the open
transaction from outside and then SIGKILL the process at the worst possible moment: its
outputs are written to the log, its offsets are sent, nothing is committed.

    python -m tests.transport.hanging_worker validate
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from pipeline.config import Settings
from pipeline.observability.logs import configure_logging
from pipeline.runtime import worker
from pipeline.transport.clients import KafkaClients

_hung = threading.Lock()


class _HangingProducer:
    def __init__(self, producer: Any) -> None:
        self._producer = producer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def commit_transaction(self, timeout: float = -1) -> None:
        if _hung.acquire(blocking=False):
            self._producer.flush(10)  # the outputs are in the log, inside the open transaction
            print("IN-TXN", flush=True)
            threading.Event().wait()
        self._producer.commit_transaction(timeout)


class HangingClients(KafkaClients):
    def transactional_producer(self, transactional_id: str, **overrides: Any) -> Any:
        return _HangingProducer(super().transactional_producer(transactional_id, **overrides))


if __name__ == "__main__":
    configure_logging()
    worker.KafkaClients = HangingClients  # type: ignore[misc]
    worker.run_worker(Settings(), sys.argv[1:])
