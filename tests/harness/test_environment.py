"""A worker subprocess gets the settings of the test or benchmark that started it: every
one, the Kafka security and Schema Registry settings included (a worker started against a
secured cluster without them would connect in plain text and be refused)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.harness.environment import worker_environment


def secured(tmp_path: Path) -> Settings:
    """Settings far from the defaults: SASL_SSL with client certificates, a Schema
    Registry with credentials and its own CA, and non-default values of every kind
    (secrets, paths, lists, booleans, numbers, optionals)."""
    files = {}
    for name in ("ca.pem", "client.pem", "client.key", "registry-ca.pem"):
        files[name] = tmp_path / name
        files[name].write_text("-----BEGIN CERTIFICATE-----\n")
    return Settings(
        bootstrap_servers="broker-1:9094,broker-2:9094",
        topic_prefix="secure.",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="llmpipe",
        sasl_password='s3cret, with = and "quotes"',
        sasl_oauthbearer_token_endpoint_url="https://idp.example/token",
        sasl_oauthbearer_client_id="llmpipe-worker",
        sasl_oauthbearer_client_secret="client-secret",
        sasl_oauthbearer_scope="kafka openid",
        sasl_oauthbearer_extensions="logicalCluster=lkc-1,identityPoolId=pool-2",
        ssl_cafile=files["ca.pem"],
        ssl_certfile=files["client.pem"],
        ssl_keyfile=files["client.key"],
        ssl_key_password="key password",
        output_format="confluent",
        schema_registry_url="https://registry.example:8081",
        schema_registry_basic_auth="registry-user:registry-password",
        schema_registry_cafile=files["registry-ca.pem"],
        model_api_key="sk-test",
        model_timeout_s=2.5,
        deny_patterns=["(?i)password", "a,b"],
        share_endpoint_breakers=False,
        max_request_cost_usd=0.25,
        health_port=9464,
        delivery="at_least_once",
        worker_processes=3,
    )


def read_back(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as a worker process builds them from exactly this environment."""
    for name in [n for n in os.environ if n.startswith("LLMPIPE_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_a_worker_process_reads_back_exactly_the_settings_it_was_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = secured(tmp_path)
    environment = worker_environment(settings)
    assert read_back(environment, monkeypatch) == settings
    assert environment["LLMPIPE_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert environment["LLMPIPE_SASL_PASSWORD"] == 's3cret, with = and "quotes"'
    assert environment["LLMPIPE_SCHEMA_REGISTRY_BASIC_AUTH"] == "registry-user:registry-password"
    assert environment["LLMPIPE_SSL_CAFILE"] == str(tmp_path / "ca.pem")


def test_every_setting_that_has_a_value_is_passed_and_unset_ones_are_left_out(
    tmp_path: Path,
) -> None:
    for settings in (secured(tmp_path), Settings(bootstrap_servers="127.0.0.1:1")):
        environment = worker_environment(settings)
        expected = {
            f"LLMPIPE_{name.upper()}"
            for name in Settings.model_fields
            if getattr(settings, name) is not None
        }
        assert set(environment) == expected


def test_a_worker_is_one_process_unless_the_settings_ask_for_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    one = Settings(worker_processes=0)  # 0: one per core for an operator's worker
    assert worker_environment(one)["LLMPIPE_WORKER_PROCESSES"] == "1"
    assert read_back(worker_environment(one), monkeypatch).worker_processes == 1
    assert worker_environment(Settings(worker_processes=2))["LLMPIPE_WORKER_PROCESSES"] == "2"
