"""Readiness probe for the local Kafka broker started by infra/kafka/kafka.sh.

Sends a real Metadata request to HOST:PORT and exits 0 only if the broker
answers with a metadata response that lists at least one broker.

It uses confluent-kafka's AdminClient.list_topics() when confluent_kafka can be
imported (the project's venv), and otherwise a tiny standard-library client
that speaks the Kafka wire protocol (Metadata v4, valid for Kafka 0.11 .. 4.x),
so that the script also works with a bare `python3`.

With --warm-up (confluent-kafka only) it then looks up the coordinator of a
dummy consumer group until that succeeds, which makes a fresh broker create and
load __consumer_offsets now rather than in the first test that uses a group.

Usage: probe.py HOST:PORT [--timeout SECONDS] [--stdlib] [--warm-up]
Exit codes: 0 ready, 1 not ready (reason on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import socket
import struct
import sys
from typing import Any

_METADATA_API_KEY = 3
_METADATA_VERSION = 4
_CORRELATION_ID = 0x4C4C4D50  # "LLMP"


class NotReady(Exception):
    """The broker did not (yet) answer a metadata request."""


def _probe_confluent(bootstrap: str, timeout: float) -> str:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("llmpipe.kafka.probe")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "socket.timeout.ms": int(timeout * 1000),
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 500,
        "logger": quiet,
    }
    admin = AdminClient(config)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise NotReady(f"list_topics failed: {exc}") from exc
    if not md.brokers:
        raise NotReady("metadata lists no broker")
    return f"confluent-kafka: cluster {md.cluster_id}, {len(md.brokers)} broker(s)"


def _warm_up(bootstrap: str, timeout: float) -> str:
    import time

    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while True:
        fut = admin.describe_consumer_groups(["llmpipe-kafka-warm-up"])["llmpipe-kafka-warm-up"]
        try:
            fut.result(timeout=max(deadline - time.monotonic(), 0.1))
        except Exception as exc:  # coordinator not available / loading: retry
            if time.monotonic() >= deadline:
                raise NotReady(f"group coordinator not ready: {exc}") from exc
            time.sleep(0.1)
        else:
            return "group coordinator ready"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NotReady("connection closed by broker")
        buf += chunk
    return bytes(buf)


def _probe_stdlib(bootstrap: str, timeout: float) -> str:
    host, _, port = bootstrap.rpartition(":")
    client_id = b"llmpipe-probe"
    header = struct.pack(
        ">hhih", _METADATA_API_KEY, _METADATA_VERSION, _CORRELATION_ID, len(client_id)
    )
    # Metadata v4 body: topics = null array (all topics), allow_auto_topic_creation = false.
    body = struct.pack(">ib", -1, 0)
    request = header + client_id + body
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            payload = _recv_exact(sock, size)
    except OSError as exc:
        raise NotReady(f"socket error: {exc}") from exc
    (correlation_id, _throttle, n_brokers) = struct.unpack_from(">iii", payload, 0)
    if correlation_id != _CORRELATION_ID:
        raise NotReady(f"unexpected correlation id {correlation_id}")
    if n_brokers < 1:
        raise NotReady("metadata lists no broker")
    return f"stdlib Metadata v{_METADATA_VERSION}: {n_brokers} broker(s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap", help="HOST:PORT of the broker")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument(
        "--stdlib", action="store_true", help="do not use confluent_kafka even if importable"
    )
    parser.add_argument(
        "--warm-up", action="store_true", help="also wait for the group coordinator"
    )
    args = parser.parse_args(argv)

    probe = _probe_stdlib
    if not args.stdlib:
        try:
            import confluent_kafka  # noqa: F401
        except ImportError:
            pass
        else:
            probe = _probe_confluent
    try:
        print(probe(args.bootstrap, args.timeout))
        if args.warm_up and probe is _probe_confluent:
            print(_warm_up(args.bootstrap, args.timeout))
    except NotReady as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
