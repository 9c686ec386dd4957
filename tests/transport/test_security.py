"""Kafka security settings without a broker: how LLMPIPE_* maps to librdkafka, what a half
configuration says, and how refusals are picked out of librdkafka's log and rate-limited.
The broker tests are in test_security_kafka.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.cli.usage import settings_error
from pipeline.config import Settings
from pipeline.transport.clients import KafkaClients, LibrdkafkaLog, SecurityFailures

WRONG_PASSWORD = (
    "sasl_ssl://10.0.0.1:9093/bootstrap: SASL authentication error: Authentication failed "
    "during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 "
    "(after 309ms in state AUTH_REQ)"
)
UNTRUSTED = (
    "ssl://b:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate "
    "verify failed: broker certificate could not be verified (after 2ms in state SSL_HANDSHAKE)"
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def pem(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def test_tls_without_a_ca_file_uses_the_system_bundle() -> None:
    config = Settings(security_protocol="SSL").kafka_client_config()
    assert config["security.protocol"] == "SSL"
    assert config["ssl.ca.location"] == "probe"
    assert "ssl.certificate.location" not in config and "sasl.mechanism" not in config


def test_mtls_maps_ca_certificate_key_and_key_password(tmp_path: Path) -> None:
    ca, cert, key = pem(tmp_path, "ca.pem"), pem(tmp_path, "c.pem"), pem(tmp_path, "c.key")
    settings = Settings(
        security_protocol="SSL",
        ssl_cafile=ca,
        ssl_certfile=cert,
        ssl_keyfile=key,
        ssl_key_password="k-secret",  # type: ignore[arg-type]
    )
    config = KafkaClients(settings).base_config()
    assert config["ssl.ca.location"] == str(ca)
    assert config["ssl.certificate.location"] == str(cert)
    assert config["ssl.key.location"] == str(key)
    assert config["ssl.key.password"] == "k-secret"
    assert "k-secret" not in repr(settings)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_user_and_password_over_tls(mechanism: str) -> None:
    settings = Settings(
        security_protocol="SASL_SSL",
        sasl_mechanism=mechanism,  # type: ignore[arg-type]
        sasl_username="app",
        sasl_password="pw-secret",  # type: ignore[arg-type]
    )
    config = settings.kafka_client_config()
    assert config["sasl.mechanism"] == mechanism
    assert (config["sasl.username"], config["sasl.password"]) == ("app", "pw-secret")
    assert config["ssl.ca.location"] == "probe"
    assert "pw-secret" not in repr(settings)


def test_sasl_plaintext_has_no_tls_settings() -> None:
    config = Settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_username="app",
        sasl_password="pw",  # type: ignore[arg-type]
    ).kafka_client_config()
    assert config["sasl.mechanism"] == "PLAIN"
    assert not any(key.startswith("ssl.") for key in config)


def test_oauthbearer_passes_the_oidc_token_endpoint_through() -> None:
    settings = Settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauthbearer_token_endpoint_url="https://idp.example/oauth2/token",
        sasl_oauthbearer_client_id="llmpipe",
        sasl_oauthbearer_client_secret="oidc-secret",  # type: ignore[arg-type]
        sasl_oauthbearer_scope="kafka.write kafka.read",
        sasl_oauthbearer_extensions="logicalCluster=lkc-1,identityPoolId=pool-2",
    )
    config = settings.kafka_client_config()
    assert {k: v for k, v in config.items() if k.startswith("sasl.")} == {
        "sasl.mechanism": "OAUTHBEARER",
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.token.endpoint.url": "https://idp.example/oauth2/token",
        "sasl.oauthbearer.client.id": "llmpipe",
        "sasl.oauthbearer.client.secret": "oidc-secret",
        "sasl.oauthbearer.scope": "kafka.write kafka.read",
        "sasl.oauthbearer.extensions": "logicalCluster=lkc-1,identityPoolId=pool-2",
    }
    assert "oidc-secret" not in repr(settings)


def test_librdkafka_accepts_every_mapped_key(tmp_path: Path) -> None:
    """librdkafka rejects unknown or misspelt keys when a client is created: build one per
    security shape (no connection is made until it is used)."""
    from confluent_kafka.admin import AdminClient

    shapes: list[dict[str, Any]] = [
        {"security_protocol": "SSL"},
        {"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": "p"},
        {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "OAUTHBEARER",
            "sasl_oauthbearer_token_endpoint_url": "https://idp.example/token",
            "sasl_oauthbearer_client_id": "c",
            "sasl_oauthbearer_client_secret": "s",
            "sasl_oauthbearer_scope": "kafka",
            "sasl_oauthbearer_extensions": "a=b",
        },
    ]
    for shape in shapes:
        AdminClient(KafkaClients(Settings(bootstrap_servers="127.0.0.1:1", **shape)).base_config())


@pytest.mark.parametrize(
    ("shape", "names"),
    [
        ({"security_protocol": "SASL_SSL"}, "LLMPIPE_SASL_USERNAME, LLMPIPE_SASL_PASSWORD"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
            "LLMPIPE_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL, LLMPIPE_SASL_OAUTHBEARER_CLIENT_ID",
        ),
        ({"security_protocol": "SSL", "ssl_certfile": "/etc/hostname"}, "LLMPIPE_SSL_KEYFILE"),
        ({"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"}, "no such file"),
    ],
)
def test_a_half_configured_security_setting_is_one_line_naming_the_variable(
    shape: dict[str, Any], names: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**shape)
    line = settings_error(caught.value)
    assert names in line and "\n" not in line


def test_refusals_are_told_apart_and_name_the_settings_to_check() -> None:
    classify = SecurityFailures.classify
    wrong = classify(WRONG_PASSWORD)
    assert wrong is not None and "LLMPIPE_SASL_PASSWORD" in wrong
    assert "(after" not in wrong, "librdkafka's state suffix is noise to an operator"
    untrusted = classify(UNTRUSTED)
    assert untrusted is not None and "LLMPIPE_SSL_CAFILE" in untrusted
    rejected = classify(
        "ssl://b:9093/bootstrap: Receive failed: error:0A000412:SSL routines::ssl/tls alert "
        "bad certificate: SSL alert number 42"
    )
    assert rejected is not None and "LLMPIPE_SSL_CERTFILE" in rejected
    assert classify("Connect to ipv4#127.0.0.1:9092 failed: Connection refused") is None


def test_a_refusal_is_logged_once_per_interval_and_counts_what_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    failures = SecurityFailures(interval_s=30, clock=clock)
    logger = LibrdkafkaLog(interval_s=30, clock=clock, refusals=failures)
    caplog.set_level(logging.DEBUG, logger="llmpipe.kafka")
    for _ in range(40):  # librdkafka's retries, each a FAIL line
        logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", WRONG_PASSWORD)
        clock.t += 0.5
    clock.t += 30
    logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", WRONG_PASSWORD)
    records = [r for r in caplog.records if r.name == "llmpipe.kafka"]
    assert [r.levelno for r in records] == [logging.ERROR, logging.ERROR]
    assert all("the broker rejected the credentials" in r.getMessage() for r in records)
    assert getattr(records[1], "suppressed", None) == 39


def test_a_tool_learns_of_refusals_since_it_started_waiting_only() -> None:
    clock = Clock()
    failures = SecurityFailures(clock=clock)
    assert failures.report(UNTRUSTED)
    clock.t += 5
    assert failures.since(clock.t - 10) is not None
    assert failures.since(clock.t) is None


def test_a_logged_client_configuration_never_shows_a_secret(tmp_path: Path) -> None:
    """Every secret setting, as librdkafka keys (what a debugging line would dump) and as
    settings names, through the JSON log formatter: masked whole."""
    import json

    from pipeline.observability.logs import JsonFormatter

    key = pem(tmp_path, "c.key")
    settings = Settings(
        security_protocol="SASL_SSL",
        sasl_username="app",
        sasl_password="pw-secret-1",  # type: ignore[arg-type]
        ssl_certfile=pem(tmp_path, "c.pem"),
        ssl_keyfile=key,
        ssl_key_password="key-secret-2",  # type: ignore[arg-type]
        schema_registry_basic_auth="registry:reg-secret-3",  # type: ignore[arg-type]
    )
    oauth = Settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauthbearer_token_endpoint_url="https://idp.example/token",
        sasl_oauthbearer_client_id="c",
        sasl_oauthbearer_client_secret="oidc-secret-4",  # type: ignore[arg-type]
    )
    record = logging.LogRecord("llmpipe.kafka", logging.WARNING, __file__, 1, "config", (), None)
    record.kafka = {**settings.kafka_client_config(), **oauth.kafka_client_config()}
    record.registry = {"basic.auth.user.info": "registry:reg-secret-3"}
    for name, source in (("settings", settings), ("oauth_settings", oauth)):
        setattr(
            record,
            name,
            {
                field: (value.get_secret_value() if hasattr(value, "get_secret_value") else value)
                for field, value in dict(source).items()
            },
        )
    line = JsonFormatter().format(record)
    for secret in ("pw-secret-1", "key-secret-2", "reg-secret-3", "oidc-secret-4"):
        assert secret not in line, secret
    logged = json.loads(line)
    assert logged["kafka"]["sasl.username"] == "app", "only secrets are masked"
    assert logged["kafka"]["sasl.password"] == "[REDACTED]"
