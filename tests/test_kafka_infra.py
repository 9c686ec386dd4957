"""The local broker started by infra/kafka/kafka.sh is up and usable.

Needs a running broker: `infra/kafka/kafka.sh up` (or the suite's broker fixture).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from bench.chaos import free_broker_port
from pipeline.config import REPO_ROOT

pytestmark = pytest.mark.kafka

KAFKA_SH = REPO_ROOT / "infra" / "kafka" / "kafka.sh"
BOOTSTRAP = f"127.0.0.1:{os.environ.get('LLMPIPE_KAFKA_PORT', '9092')}"


def _status() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(KAFKA_SH), "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_status_reports_running_broker() -> None:
    res = _status()
    assert res.returncode == 0, (
        f"broker not running (exit {res.returncode}): {res.stdout}{res.stderr}"
        f"start it with: {KAFKA_SH.relative_to(REPO_ROOT)} up"
    )
    assert res.stdout.startswith("running pid="), res.stdout
    assert f"bootstrap={BOOTSTRAP}" in res.stdout, res.stdout


def test_round_trip_through_broker() -> None:
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    broker = ConfigResource(ConfigResource.Type.BROKER, "1")
    configs = admin.describe_configs([broker])[broker].result(timeout=30)
    assert configs["auto.create.topics.enable"].value == "false"

    topic = f"test-infra-{uuid.uuid4().hex[:12]}"
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(
        timeout=30
    )
    try:
        producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
        sent = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(5)]
        for key, value in sent:
            producer.produce(topic, key=key, value=value, headers=[("trace", b"t-1")])
        assert producer.flush(30) == 0

        consumer = Consumer(
            {
                "bootstrap.servers": BOOTSTRAP,
                "group.id": f"{topic}-g",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.subscribe([topic])
            received: list[tuple[bytes | None, bytes | None]] = []
            deadline = time.monotonic() + 30
            while len(received) < len(sent) and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                err = msg.error()
                assert err is None or err.code() == KafkaError._PARTITION_EOF, err
                if err is None:
                    assert msg.headers() == [("trace", b"t-1")]
                    received.append((msg.key(), msg.value()))
            assert received == sent
            committed = consumer.commit(asynchronous=False)
            assert committed is not None
            assert [tp.offset for tp in committed] == [len(sent)]
        finally:
            consumer.close()
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


WITH_BROKER = REPO_ROOT / "infra" / "kafka" / "with-broker.sh"


def test_make_test_wrapper_leaves_a_running_broker_alone() -> None:
    """`make test` runs through with-broker.sh: the shared broker must still run after."""
    inside = subprocess.run(
        ["bash", str(WITH_BROKER), "sh", "-c", "exit 3"], capture_output=True, timeout=60
    )
    assert inside.returncode == 3, inside  # the command's own exit code
    assert _status().returncode == 0, "with-broker.sh stopped a broker it did not start"


def test_make_test_wrapper_stops_the_broker_it_started(tmp_path: os.PathLike[str]) -> None:
    """Its own port and data dir: the shared broker is never touched."""
    port = free_broker_port()
    env = {
        **os.environ,
        "LLMPIPE_KAFKA_PORT": str(port),
        "LLMPIPE_KAFKA_DATA": str(tmp_path),
        "LLMPIPE_KAFKA_HEAP": "-Xms256m -Xmx512m",
    }
    status = f"bash {KAFKA_SH} status"
    run = subprocess.run(
        ["bash", str(WITH_BROKER), "sh", "-c", status],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert run.returncode == 0, f"no broker inside the wrapper: {run.stdout}{run.stderr}"
    after = subprocess.run(["bash", str(KAFKA_SH), "status"], capture_output=True, env=env)
    assert after.returncode != 0, "the broker with-broker.sh started is still running"
    assert _status().returncode == 0, "the shared broker was stopped"
