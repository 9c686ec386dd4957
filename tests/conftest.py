"""Shared fixtures: one real broker per test run, an isolated topic prefix per test."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from pipeline.config import REPO_ROOT, Settings
from tests.support import create_topics, make_settings

KAFKA_SCRIPT = REPO_ROOT / "infra" / "kafka" / "kafka.sh"


def _broker_running() -> bool:
    return (
        subprocess.run(["bash", str(KAFKA_SCRIPT), "status"], capture_output=True).returncode == 0
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Reuse the broker `.ci/run` or a developer started; else start one and stop it after."""
    started = False
    if not _broker_running():
        subprocess.run(["bash", str(KAFKA_SCRIPT), "up"], check=True)
        started = True
    yield Settings().bootstrap_servers
    if started:
        subprocess.run(["bash", str(KAFKA_SCRIPT), "down"], check=False)


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> Settings:
    """Settings with a unique topic prefix and all declared topics created under it."""
    settings = make_settings(kafka_bootstrap)
    create_topics(settings)
    return settings
