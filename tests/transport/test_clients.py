"""The client factory's quiet failure logs: one line per outage, rate-limited librdkafka."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError

from pipeline.config import Settings
from pipeline.transport.clients import (
    MAX_MESSAGE_BYTES,
    OUTAGE_AFTER_S,
    BrokerHealth,
    KafkaClients,
    LibrdkafkaLog,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def refused() -> KafkaError:
    return KafkaError(KafkaError._TRANSPORT, "Connect to ipv4#127.0.0.1:9092 failed")


def kafka_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "llmpipe.kafka"]


def test_an_outage_is_one_line_and_its_end_another(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    health = BrokerHealth(clock)
    for _ in range(2_000):  # ten seconds of a dozen clients reconnecting
        health.error(refused())
        health.error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        clock.t += 0.005
    assert health.down
    for _ in range(50):
        health.ok()
    lines = kafka_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("broker unreachable since") and lines[0].endswith("retrying")
    assert lines[1].startswith("broker recovered after 10 s (4000 connection errors)")
    assert not health.down
    assert health.outages == 1, "counted once, for the producers to replace"


def test_a_few_connection_errors_that_end_quickly_are_not_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    health = BrokerHealth(clock)
    health.error(refused())  # a client closing, or reconnecting right after a recovery
    clock.t += OUTAGE_AFTER_S / 2
    health.error(refused())
    health.ok()
    assert kafka_lines(caplog) == []
    assert health.outages == 0


def test_other_client_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    health = BrokerHealth(clock, interval_s=30)
    for _ in range(100):
        health.error(KafkaError(KafkaError.NOT_COORDINATOR, "not coordinator"))
        clock.t += 0.1
    clock.t += 30
    health.error(KafkaError(KafkaError.NOT_COORDINATOR, "not coordinator"))
    assert len(kafka_lines(caplog)) == 2


def test_librdkafka_lines_are_rate_limited_per_facility_and_count_what_was_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    logger = LibrdkafkaLog(interval_s=30, clock=clock)
    for _ in range(500):
        logger.log(logging.WARNING, "%s [%s] %s", "SESSTMOUT", "rdkafka#consumer-1", "timed out")
        logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "refused")
    clock.t += 31
    logger.log(logging.WARNING, "%s [%s] %s", "SESSTMOUT", "rdkafka#consumer-1", "timed out")
    records = [r for r in caplog.records if r.name == "llmpipe.kafka"]
    assert [r.getMessage().split()[1] for r in records] == ["SESSTMOUT", "SESSTMOUT"]
    assert records[1].suppressed == 499
    assert all("FAIL" not in r.getMessage() for r in records), "BrokerHealth reports those"


def test_every_client_shares_security_settings_and_reads_committed() -> None:
    settings = Settings(
        bootstrap_servers="b:1",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="p",  # type: ignore[arg-type]
    )
    clients = KafkaClients(settings)
    config = clients.base_config()
    assert config["security.protocol"] == "SASL_SSL"
    assert (config["sasl.username"], config["sasl.password"]) == ("u", "p")
    assert config["error_cb"] == clients.health.error
    assert config["socket.nagle.disable"] is True  # small requests go out at once
    consumer = clients.consumer_config("g")
    assert consumer["isolation.level"] == "read_committed"
    assert consumer["enable.auto.commit"] is False
    assert consumer["security.protocol"] == "SASL_SSL"


def test_stage_consumers_read_ahead_a_bounded_amount_that_follows_max_in_flight() -> None:
    """librdkafka's defaults (100,000 messages per partition, 64 MiB per consumer) would
    make a backlog of large requests a second backlog in memory; the factory bounds it."""
    config = KafkaClients(Settings(max_in_flight=32)).prefetch_config()
    assert config["queued.min.messages"] == 128
    assert config["queued.max.messages.kbytes"] == 4_096
    assert config["fetch.max.bytes"] == 4_096 * 1024
    assert config["max.partition.fetch.bytes"] == 1_048_576
    # A partition whose queue was full is fetched again within this, not librdkafka's 1 s.
    assert config["fetch.queue.backoff.ms"] <= 200
    tuned = KafkaClients(
        Settings(kafka_prefetch_kbytes=1_024, kafka_prefetch_messages=500)
    ).prefetch_config()
    assert (tuned["queued.min.messages"], tuned["queued.max.messages.kbytes"]) == (500, 1_024)
    # librdkafka accepts the smallest allowed bound (fetch.max.bytes >= message.max.bytes).
    smallest = Settings(bootstrap_servers="127.0.0.1:1", kafka_prefetch_kbytes=1_024)
    KafkaClients(smallest).stage_consumer("g").close()
    with pytest.raises(ValueError):
        Settings(kafka_prefetch_kbytes=512)


def test_a_producer_buffer_is_bounded_but_holds_the_largest_message() -> None:
    """The buffer replaces librdkafka's 1 GiB default; its floor keeps one message of the
    largest size llm.requests accepts producible (a smaller buffer would refuse it with
    BufferError for ever, and the callers' wait-and-retry would never end)."""
    settings = Settings(bootstrap_servers="127.0.0.1:1", kafka_producer_buffer_kbytes=11_264)
    producer = KafkaClients(settings).producer()
    largest = b"x" * (MAX_MESSAGE_BYTES - 4_096)  # what message.max.bytes leaves a value
    producer.produce("t", largest)  # queued locally: no broker needed
    with pytest.raises(BufferError):
        producer.produce("t", largest)  # the bound holds
    producer.purge()
    producer.flush(0)
    with pytest.raises(ValueError):
        Settings(kafka_producer_buffer_kbytes=10_240)


@pytest.mark.parametrize("linger_ms", [0, 1, 20])
def test_the_stage_producer_lingers_as_configured(
    monkeypatch: pytest.MonkeyPatch, linger_ms: int
) -> None:
    """LLMPIPE_KAFKA_STAGE_LINGER_MS reaches the shared stage producer's librdkafka
    configuration (and only its: the other producers keep their own linger)."""
    configs: list[dict[str, object]] = []
    monkeypatch.setattr(
        "pipeline.transport.clients.Producer", lambda config: configs.append(config) or config
    )
    clients = KafkaClients(
        Settings(bootstrap_servers="127.0.0.1:1", kafka_stage_linger_ms=linger_ms)
    )
    assert clients.stage_producer() is clients.stage_producer()  # one, shared
    clients.producer()
    assert [c["linger.ms"] for c in configs] == [linger_ms, 5]
    with pytest.raises(ValueError):
        Settings(kafka_stage_linger_ms=-1)
