"""Client compatibility check against the running local broker (infra/kafka/kafka.sh up).

Exercises what llmpipe needs from its Kafka client, confluent-kafka (librdkafka):
AdminClient create_topics / describe_configs / list_topics / delete_topics, idempotent and
transactional Producer, Consumer in a cooperative-sticky group with manual commit (with
commit metadata read back), pause/resume, watermarks.

Run:  .venv/bin/python infra/kafka/compat_check.py [BOOTSTRAP]   (default 127.0.0.1:9092)
Exit code 0 and "ALL OK" when everything works; a traceback otherwise.
"""

from __future__ import annotations

import sys
import time
import uuid

BOOTSTRAP = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"


def step(msg: str) -> None:
    print(f"  ok  {msg}", flush=True)


def check_confluent() -> None:
    import confluent_kafka
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

    ver = confluent_kafka.__version__
    print(f"confluent-kafka {ver}, librdkafka {confluent_kafka.libversion()[0]}")
    topic = f"compat-ck-{uuid.uuid4().hex[:8]}"
    group = f"compat-ck-g-{uuid.uuid4().hex[:8]}"

    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    for fut in admin.create_topics(
        [
            NewTopic(
                topic, num_partitions=2, replication_factor=1, config={"retention.ms": "3600000"}
            )
        ]
    ).values():
        fut.result(timeout=30)
    step("AdminClient.create_topics")
    md = admin.list_topics(timeout=10)
    assert topic in md.topics and len(md.topics[topic].partitions) == 2
    step("AdminClient.list_topics")
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    configs = admin.describe_configs([res])[res].result(timeout=30)
    assert configs["retention.ms"].value == "3600000", configs["retention.ms"]
    step("AdminClient.describe_configs (topic)")
    bres = ConfigResource(ConfigResource.Type.BROKER, "1")
    bconf = admin.describe_configs([bres])[bres].result(timeout=30)
    assert bconf["auto.create.topics.enable"].value == "false"
    step("AdminClient.describe_configs (broker): auto.create.topics.enable=false")

    producer = Producer(
        {"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True, "linger.ms": 5}
    )
    errors: list[object] = []
    for i in range(10):
        producer.produce(
            topic,
            value=f"v{i}".encode(),
            key=f"k{i}".encode(),
            partition=i % 2,
            headers=[("h", b"x")],
            on_delivery=lambda err, _msg: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0 and not errors, errors
    step("idempotent Producer x10 + flush")

    txp = Producer(
        {"bootstrap.servers": BOOTSTRAP, "transactional.id": f"ck-tx-{uuid.uuid4().hex[:8]}"}
    )
    txp.init_transactions(30)
    txp.begin_transaction()
    txp.produce(topic, value=b"tx", partition=0)
    txp.commit_transaction(30)
    step("transactional Producer commit")

    consumer = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
        }
    )
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < 11 and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=100, timeout=0.5):
            assert msg.error() is None, msg.error()
            got.append(msg.value() or b"")
    assert len(got) == 11, got
    step(f"group Consumer consume ({len(got)} records)")
    consumer.commit(asynchronous=False)
    committed = consumer.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
    assert sum(tp.offset for tp in committed) >= 11, committed
    step("manual commit + committed()")
    consumer.commit(offsets=[TopicPartition(topic, 0, 1, metadata="lp1bAQ")], asynchronous=False)
    [back] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    assert (back.offset, back.metadata) == (1, "lp1bAQ"), back
    step("commit with metadata + committed() returns it")
    assignment = consumer.assignment()
    consumer.pause(assignment)
    consumer.resume(assignment)
    step("pause / resume")
    lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    assert hi > lo
    step("get_watermark_offsets")
    consumer.close()

    for fut in admin.delete_topics([topic]).values():
        fut.result(timeout=30)
    step("AdminClient.delete_topics")


def main() -> int:
    print(f"broker {BOOTSTRAP}")
    t0 = time.monotonic()
    check_confluent()
    print(f"ALL OK in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
