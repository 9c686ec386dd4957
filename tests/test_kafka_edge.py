"""One Kafka edge: outside ``pipeline/transport/`` nothing builds a Kafka client itself.

Every consumer, producer and admin client of the product and of the benchmarks comes from
:class:`~pipeline.transport.clients.KafkaClients` (security settings, ``read_committed``,
idempotence, librdkafka's log through the project's logger and the one outage line). A
client built by hand from ``Settings.kafka_client_config()`` works, but silently skips all
of that; this test finds any. Calls are read with ``ast``: ``Consumer(...)``,
``confluent_kafka.Producer(...)``, ``admin.AdminClient(...)``, whatever the import style.
Type annotations (``consumer: Consumer``) are fine: only construction counts.

``tests/`` is not scanned: some tests build clients on purpose, from outside the edge, to
check the broker and the edge themselves (the way an operator's kcat would).
"""

from __future__ import annotations

import ast

from pipeline.config import REPO_ROOT

CLIENT_CLASSES = frozenset(
    {
        "Consumer",
        "Producer",
        "AdminClient",
        "DeserializingConsumer",
        "SerializingProducer",
        "AIOConsumer",
        "AIOProducer",
    }
)
EDGE = REPO_ROOT / "pipeline" / "transport"
SCANNED = [REPO_ROOT / "pipeline", REPO_ROOT / "bench"]


def constructions(source: str) -> list[tuple[int, str]]:
    """(line, class) of every call that constructs a Kafka client in ``source``."""
    tree = ast.parse(source)
    names = {name: name for name in CLIENT_CLASSES}
    for node in ast.walk(tree):  # ``from confluent_kafka import Consumer as C``
        if isinstance(node, ast.ImportFrom):
            names.update({a.asname: a.name for a in node.names if a.asname and a.name in names})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name in names:
            found.append((node.lineno, names[name]))
    return sorted(found)


def outside_the_edge() -> dict[str, list[tuple[int, str]]]:
    offenders = {}
    for root in SCANNED:
        for path in sorted(root.rglob("*.py")):
            if path.is_relative_to(EDGE):
                continue
            found = constructions(path.read_text(encoding="utf-8"))
            if found:
                offenders[str(path.relative_to(REPO_ROOT))] = found
    return offenders


def test_no_kafka_client_is_built_outside_the_transport_edge() -> None:
    assert outside_the_edge() == {}, "build clients with pipeline.transport.clients.KafkaClients"


def test_the_edge_does_build_its_clients_where_this_test_looks() -> None:
    """The scan finds the factory's own constructions, so it is not blind to them."""
    found = {name for _, name in constructions((EDGE / "clients.py").read_text())}
    assert {"Consumer", "Producer", "AdminClient"} <= found


def test_a_planted_client_is_caught_in_every_import_style() -> None:
    planted = """
import confluent_kafka
from confluent_kafka import Consumer as C, Producer
from confluent_kafka import admin

def annotated(consumer: "C") -> None: ...

def build(config):
    Producer(config)
    confluent_kafka.Consumer(config)
    admin.AdminClient(config)
    C(config)
"""
    assert [name for _, name in constructions(planted)] == [
        "Producer",
        "Consumer",
        "AdminClient",
        "Consumer",
    ]
