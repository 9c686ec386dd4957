"""The baseline: move messages through the pipeline's topic hops with no processing at all.

``requests -> validated -> completions -> results``: three consume-produce hops, the same
number the pipeline makes for a request that ends in ``llm.results``. Whatever the
pipeline achieves is compared with this, measured in the same run on the same broker, so
the ratio says what validation, model calls, parsing, Avro and bookkeeping cost on top of
"Kafka in Python".

confluent-kafka (librdkafka in C, the pipeline's own client): one consumer thread per
hop, one shared idempotent producer; librdkafka does the protocol work outside the GIL.

Offsets are auto-committed: this is a throughput floor, not a delivery guarantee.
Run as ``python -m bench.relay --bootstrap HOST:PORT --prefix PREFIX``; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.transport.clients import KafkaClients

HOPS = (
    (topology.REQUESTS, topology.VALIDATED),
    (topology.VALIDATED, topology.COMPLETIONS),
    (topology.COMPLETIONS, topology.RESULTS),
)
BATCH = 500


def relay_groups(prefix: str) -> list[str]:
    return [f"{prefix}relay.{i}" for i in range(len(HOPS))]


def run_confluent(bootstrap: str, prefix: str, stop: threading.Event) -> None:
    # The factory's clients (idempotent, acks=all, linger 5 ms: what the workers use), but
    # with librdkafka's auto commit: the relay is the baseline with no delivery work.
    clients = KafkaClients(Settings(bootstrap_servers=bootstrap))
    producer = clients.producer()

    def hop(index: int, source: str, target: str) -> None:
        consumer = clients.consumer(
            relay_groups(prefix)[index],
            **{"enable.auto.commit": True, "enable.auto.offset.store": True},
        )
        consumer.subscribe([prefix + source])
        try:
            while not stop.is_set():
                for message in consumer.consume(num_messages=BATCH, timeout=0.1):
                    if message.error():
                        continue
                    while True:
                        try:
                            producer.produce(
                                prefix + target,
                                value=message.value(),
                                key=message.key(),
                                headers=message.headers(),
                            )
                            break
                        except BufferError:
                            producer.poll(0.05)
                producer.poll(0)
        finally:
            consumer.close()

    threads = [
        threading.Thread(target=hop, args=(i, s, t), daemon=True) for i, (s, t) in enumerate(HOPS)
    ]
    for t in threads:
        t.start()
    while not stop.is_set():
        producer.poll(0.1)
    for t in threads:
        t.join(10)
    producer.flush(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--client", choices=("confluent",), default="confluent")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_confluent(args.bootstrap, args.prefix, stop)


if __name__ == "__main__":
    main()
