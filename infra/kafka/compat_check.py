"""Client compatibility check against the running local broker (infra/kafka/kafka.sh up).

Exercises what llmpipe needs from both Python clients:

* aiokafka: admin create/delete topics, producer (plain, idempotent, transactional,
  gzip, headers), consumer in a group with manual commit, committed(), pause/resume,
  seek, end_offsets / beginning_offsets / offsets_for_times, restart from the
  committed offset.
* confluent-kafka: AdminClient create_topics / describe_configs / list_topics /
  delete_topics, Producer, Consumer in a group with manual commit, pause/resume.

Run:  .venv/bin/python infra/kafka/compat_check.py [BOOTSTRAP]   (default 127.0.0.1:9092)
Exit code 0 and "ALL OK" when everything works; a traceback otherwise.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

BOOTSTRAP = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"


def step(msg: str) -> None:
    print(f"  ok  {msg}", flush=True)


async def check_aiokafka() -> None:
    import aiokafka
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    print(f"aiokafka {aiokafka.__version__}")
    topic = f"compat-aio-{uuid.uuid4().hex[:8]}"
    group = f"compat-aio-g-{uuid.uuid4().hex[:8]}"

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
        step("admin.create_topics")
        topics = await admin.list_topics()
        assert topic in topics, topics
        step("admin.list_topics")
        desc = await admin.describe_topics([topic])
        assert len(desc[0]["partitions"]) == 2, desc
        step("admin.describe_topics")

        producer = AIOKafkaProducer(
            bootstrap_servers=BOOTSTRAP, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            t0_ms = int(time.time() * 1000)
            for i in range(10):
                md = await producer.send_and_wait(
                    topic,
                    value=f"v{i}".encode(),
                    key=f"k{i}".encode(),
                    partition=i % 2,
                    headers=[("h", b"x")],
                )
                assert md.offset >= 0
            step("idempotent producer send_and_wait x10 (acks=all, headers)")
            batch = producer.create_batch()
            batch.append(key=None, value=b"batched", timestamp=None)
            fut = await producer.send_batch(batch, topic, partition=0)
            await fut
            step("producer.send_batch")
        finally:
            await producer.stop()

        gz = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, compression_type="gzip")
        await gz.start()
        try:
            await gz.send_and_wait(topic, b"gzipped", partition=1)
            step("gzip producer")
        finally:
            await gz.stop()

        txp = AIOKafkaProducer(
            bootstrap_servers=BOOTSTRAP, transactional_id=f"compat-tx-{uuid.uuid4().hex[:8]}"
        )
        await txp.start()
        try:
            async with txp.transaction():
                await txp.send_and_wait(topic, b"tx-committed", partition=0)
            step("transactional producer commit")
            await txp.begin_transaction()
            await txp.send_and_wait(topic, b"tx-aborted", partition=0)
            await txp.abort_transaction()
            step("transactional producer abort")
        finally:
            await txp.stop()

        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=BOOTSTRAP,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            values: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(values) < 13 and time.monotonic() < deadline:
                res = await consumer.getmany(timeout_ms=500)
                for msgs in res.values():
                    values.extend(m.value for m in msgs)
            assert b"tx-aborted" not in values, values
            assert len(values) == 13, values
            step(f"group consumer getmany read_committed ({len(values)} records)")
            assert consumer.assignment() == {tp0, tp1}, consumer.assignment()
            await consumer.commit()
            committed = await consumer.committed(tp0)
            assert committed is not None and committed > 0, committed
            step(f"manual commit + committed() = {committed}")

            consumer.pause(tp0)
            assert consumer.paused() == {tp0}
            consumer.seek(tp1, 0)
            res = await consumer.getmany(timeout_ms=1000)
            assert set(res) <= {tp1}, res
            consumer.resume(tp0)
            assert not consumer.paused()
            step("pause / seek / resume")

            end = await consumer.end_offsets([tp0, tp1])
            beg = await consumer.beginning_offsets([tp0, tp1])
            assert all(end[tp] > beg[tp] for tp in (tp0, tp1)), (beg, end)
            ts = await consumer.offsets_for_times({tp0: t0_ms - 60_000})
            assert ts[tp0] is not None and ts[tp0].offset == 0, ts
            step("end_offsets / beginning_offsets / offsets_for_times")
            await consumer.commit({tp0: 2, tp1: 2})
        finally:
            await consumer.stop()

        consumer2 = AIOKafkaConsumer(
            topic,
            bootstrap_servers=BOOTSTRAP,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer2.start()
        try:
            first: dict[int, int] = {}
            deadline = time.monotonic() + 30
            while len(first) < 2 and time.monotonic() < deadline:
                res = await consumer2.getmany(timeout_ms=500)
                for tp, msgs in res.items():
                    first.setdefault(tp.partition, msgs[0].offset)
            assert first == {0: 2, 1: 2}, first
            step("rejoined group resumes from committed offsets")
        finally:
            await consumer2.stop()

        await admin.delete_topics([topic])
        step("admin.delete_topics")
        groups = await admin.list_consumer_groups()
        assert any(g[0] == group for g in groups), groups
        step("admin.list_consumer_groups")
    finally:
        await admin.close()


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
    asyncio.run(check_aiokafka())
    check_confluent()
    print(f"ALL OK in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
