"""Shared fixtures: one real broker per test run, an isolated topic prefix per test."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from pipeline.config import REPO_ROOT, Settings
from pipeline.harness.environment import create_topics
from pipeline.observability import endpoints
from pipeline.observability.endpoints import EndpointServer
from tests.real_model import local_model  # noqa: F401 - the shared real-model fixture
from tests.support import SESSION, make_settings

KAFKA_SCRIPT = REPO_ROOT / "infra" / "kafka" / "kafka.sh"

if "PYTEST_XDIST_WORKER" in os.environ:
    # GNU readline (imported with pdb by pytest) writes COLUMNS=80 and LINES=24 into the
    # C environment of the main pytest process, where os.environ does not see them; the
    # xdist workers it starts inherit them as real variables. The CLI's tables would then
    # fold at 80 columns in a worker and not in a plain run (pipeline/cli/console.py).
    for _name in ("COLUMNS", "LINES"):
        os.environ.pop(_name, None)


BROKER_CHAOS_FILES = frozenset({"tests/e2e/test_pipeline_crash.py", "tests/e2e/test_chaos.py"})
"""The scenarios that kill workers and stop brokers: timing sensitive and the heaviest
files. tests/run-suite.sh (``make test``) runs them alone, before everything else; under a
plain ``pytest -n N`` they are one unit of work, run one after the other by one worker
process (while the others run lighter tests), and first: the longest unit, started last,
would leave one process running alone at the end."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the local model server is marked ``real_model``: `make test`
    runs those in a process of their own, beside the rest (see tests/run-suite.sh). In an
    xdist worker the broker-chaos files go first (see ``BROKER_CHAOS_FILES``)."""
    for item in items:
        if "local_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)
    if "PYTEST_XDIST_WORKER" in os.environ:
        items.sort(key=lambda item: item.nodeid.split("::")[0] not in BROKER_CHAOS_FILES)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's ``--dist loadfile`` (a test file is the unit handed to a worker, so
    module-scoped fixtures are set up once), with the broker-chaos files as one unit.
    (Its ``loadgroup`` would do with markers, but does not group on pytest 9.2:
    pytest-xdist#1386.)"""
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "broker-chaos" if path in BROKER_CHAOS_FILES else path

    return FileScheduling(config, log)


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


TEST_TOPIC = re.compile(rf"^(t|topics-){SESSION}-[0-9a-f]+\.")
"""This run's topics, and only this run's (see ``tests.support.SESSION``)."""


@pytest.fixture(autouse=True)
def _delete_test_topics(request: pytest.FixtureRequest) -> Iterator[None]:
    """Delete the topics a broker test created: thousands of leftover partitions exhaust
    the broker's heap over a full run."""
    if "kafka_bootstrap" not in request.fixturenames:
        yield
        return
    admin = AdminClient(Settings().kafka_client_config())
    before = set(admin.list_topics(timeout=30).topics)
    yield
    created = [t for t in set(admin.list_topics(timeout=30).topics) - before if TEST_TOPIC.match(t)]
    if created:
        for future in admin.delete_topics(created, operation_timeout=30).values():
            future.result(timeout=60)


@pytest.fixture
def endpoint_server() -> Iterator[EndpointServer]:
    """The process's /healthz, /readyz, /metrics server on a free loopback port; the
    checks it answers with are put back to their defaults afterwards."""
    served = endpoints.serve("127.0.0.1", 0)
    try:
        yield served
    finally:
        endpoints.set_checks()
        endpoints.stop(served)
