"""Kafka security against a real broker: TLS, mTLS, SASL and OAUTHBEARER listeners.

One broker of its own for the whole module (``infra/kafka/kafka.sh`` with an SSL listener
that requires client certificates, and a SASL_SSL listener with PLAIN and SCRAM users
created by Kafka's StorageTool and OAUTHBEARER validated against a JWKS file), certificates
made by the test (:mod:`tests.transport.pki`), tokens from a loopback OIDC token endpoint
(:mod:`tests.transport.oidc`). Workers, a CLI command and the review service connect
through each listener; refused credentials and untrusted certificates give one line and
exit 2 from the CLI, and a rate-limited error from a worker that keeps running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.chaos import free_broker_port
from bench.common import free_port
from pipeline.config import REPO_ROOT, Settings
from pipeline.contract.envelopes import Result
from pipeline.harness.environment import create_topics, worker_environment
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.harness.scenarios import mixed_requests
from pipeline.review.kafka_io import read_to_end
from pipeline.review.model import QueueFilter
from pipeline.review.runtime import ReviewRuntime
from tests.review.test_review_support import FakeClock, escalation, registry, review_message
from tests.support import make_settings, produce, running_worker
from tests.transport.oidc import CLIENT_ID, CLIENT_SECRET, Provider, running_provider
from tests.transport.pki import CLIENT_KEY_PASSWORD, Pki, make_pki

pytestmark = pytest.mark.kafka

KAFKA_SCRIPT = REPO_ROOT / "infra" / "kafka" / "kafka.sh"
USER, PASSWORD = "llmpipe-app", "scram-secret-1"


@dataclass(frozen=True)
class SecureBroker:
    pki: Pki
    ssl: str
    sasl_ssl: str
    oidc: Provider

    def sasl(self, mechanism: str = "SCRAM-SHA-512", **overrides: Any) -> dict[str, Any]:
        """Settings for the SASL_SSL listener, trusting the test CA."""
        return {
            "bootstrap_servers": self.sasl_ssl,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": mechanism,
            "sasl_username": USER,
            "sasl_password": PASSWORD,
            "ssl_cafile": self.pki.ca,
            **overrides,
        }

    def oauth(self, **overrides: Any) -> dict[str, Any]:
        """Settings for OAUTHBEARER on the SASL_SSL listener, tokens from the test's IdP."""
        return {
            "bootstrap_servers": self.sasl_ssl,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "OAUTHBEARER",
            "sasl_oauthbearer_token_endpoint_url": self.oidc.token_endpoint,
            "sasl_oauthbearer_client_id": CLIENT_ID,
            "sasl_oauthbearer_client_secret": CLIENT_SECRET,
            "sasl_oauthbearer_scope": "kafka",
            "ssl_cafile": self.pki.ca,
            **overrides,
        }

    def mtls(self, **overrides: Any) -> dict[str, Any]:
        """Settings for the SSL listener with the client certificate (encrypted key)."""
        return {
            "bootstrap_servers": self.ssl,
            "security_protocol": "SSL",
            "ssl_cafile": self.pki.ca,
            "ssl_certfile": self.pki.client_cert,
            "ssl_keyfile": self.pki.client_key,
            "ssl_key_password": CLIENT_KEY_PASSWORD,
            **overrides,
        }


@pytest.fixture(scope="module")
def broker() -> Iterator[SecureBroker]:
    port = free_broker_port()
    assert port != 9092
    ssl_port, sasl_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix=f"llmpipe-secure-kafka-{port}-"))
    pki = make_pki(work / "pki")
    oidc = ExitStack()
    provider = oidc.enter_context(running_provider(work))
    env = {
        "LLMPIPE_KAFKA_HEAP": "-Xms256m -Xmx768m",
        **os.environ,
        "LLMPIPE_KAFKA_PORT": str(port),
        "LLMPIPE_KAFKA_DATA": str(work / "data"),
        "LLMPIPE_KAFKA_TLS_DIR": str(pki.directory),
        "LLMPIPE_KAFKA_SSL_PORT": str(ssl_port),
        "LLMPIPE_KAFKA_SASL_SSL_PORT": str(sasl_port),
        "LLMPIPE_KAFKA_SASL_USERS": f"{USER}:{PASSWORD}",
        "LLMPIPE_KAFKA_OAUTH_JWKS": str(provider.jwks),
    }

    def kafka(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(KAFKA_SCRIPT), command], env=env, capture_output=True, text=True
        )

    with oidc:
        started = kafka("up")
        assert started.returncode == 0, f"secure broker did not start: {started.stderr[-3000:]}"
        try:
            _warm_up(f"127.0.0.1:{port}")
            yield SecureBroker(pki, f"127.0.0.1:{ssl_port}", f"127.0.0.1:{sasl_port}", provider)
        finally:
            kafka("down")
            shutil.rmtree(work, ignore_errors=True)


def _warm_up(plaintext: str) -> None:
    """The broker's first transaction and consumer group, over PLAINTEXT, with time to
    spare: they create ``__transaction_state`` and ``__consumer_offsets`` (10 partitions
    each), which on a loaded CI machine took longer than a worker's 20 s to start its
    transactional producer (2026-12-03). What the tests below measure is the listeners."""
    admin = AdminClient({"bootstrap.servers": plaintext})
    admin.create_topics([NewTopic("warm-up", 1, 1)], operation_timeout=120)["warm-up"].result(120)
    producer = Producer({"bootstrap.servers": plaintext, "transactional.id": "warm-up"})
    producer.init_transactions(120)
    producer.begin_transaction()
    producer.produce("warm-up", b"x")
    producer.commit_transaction(120)
    consumer = Consumer(
        {"bootstrap.servers": plaintext, "group.id": "warm-up", "auto.offset.reset": "earliest"}
    )
    try:
        consumer.subscribe(["warm-up"])
        deadline = time.monotonic() + 120
        while consumer.poll(1.0) is None:
            assert time.monotonic() < deadline, "the warm-up group never got its record"
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()


def _settings(listener: dict[str, Any]) -> Settings:
    """Test settings (own topic prefix) for a listener's settings."""
    rest = {k: v for k, v in listener.items() if k != "bootstrap_servers"}
    return make_settings(listener["bootstrap_servers"], **rest)


def _env(settings: dict[str, Any]) -> dict[str, str]:
    return {f"LLMPIPE_{name.upper()}": str(value) for name, value in settings.items()}


PLAN = ("topics", "plan")


def _plans(
    envs: dict[str, dict[str, str]], commands: dict[str, tuple[str, ...]] | None = None
) -> dict[str, subprocess.CompletedProcess[str]]:
    """``llmpipe topics plan`` (or ``commands[case]``) once per case, all at once: a CLI
    start is mostly imports."""
    commands = commands or {}
    started = {
        case: subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *commands.get(case, PLAN)],
            env={**os.environ, "LLMPIPE_CLI_TIMEOUT_S": "5", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, env in envs.items()
    }
    done = {}
    for case, process in started.items():
        stdout, stderr = process.communicate(timeout=120)
        done[case] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


def _pipeline_end_to_end(settings: Settings) -> None:
    """Requests in over this listener, through every stage, results out: a full ledger."""
    planned = mixed_requests(
        12, seed=5, weights={"valid": 3, "invalid_json": 1, "garbage_bytes": 1}
    )
    with running_fake_llm() as fake:
        settings = settings.model_copy(update={"model_base_url": fake.url})
        create_topics(settings)
        with running_worker(settings):
            produce(settings, "llm.requests", [(p.key, p.value, p.headers) for p in planned])
            ledger = read_terminal(settings, [p.request_id for p in planned], timeout_s=120)
    assert not ledger.missing, f"missing: {sorted(ledger.missing)}"
    assert not ledger.duplicates, f"duplicates: {ledger.duplicates}"
    assert not ledger.two_places, f"in two terminal places: {ledger.two_places}"
    wrong = [p.request_id for p in planned if ledger.first(p.request_id).outcome != p.expected]
    assert not wrong, f"unexpected routes: {wrong}"


def test_a_worker_runs_the_pipeline_over_sasl_ssl_with_scram(broker: SecureBroker) -> None:
    _pipeline_end_to_end(_settings(broker.sasl()))


def test_a_worker_runs_the_pipeline_over_mtls(broker: SecureBroker) -> None:
    _pipeline_end_to_end(_settings(broker.mtls()))


def test_a_worker_runs_the_pipeline_over_oauthbearer(broker: SecureBroker) -> None:
    _pipeline_end_to_end(_settings(broker.oauth()))
    assert broker.oidc.issued, "the clients fetched their tokens from the token endpoint"


def test_cli_commands_connect_through_each_listener(broker: SecureBroker) -> None:
    listeners = {
        "scram-sha-512": broker.sasl("SCRAM-SHA-512"),
        "scram-sha-256": broker.sasl("SCRAM-SHA-256"),
        "plain": broker.sasl("PLAIN"),
        "mtls": broker.mtls(),
        "oauthbearer": broker.oauth(),
    }
    plans = _plans(
        {
            listener: {**_env(settings), "LLMPIPE_TOPIC_PREFIX": f"cli-{listener}."}
            for listener, settings in listeners.items()
        }
    )
    for listener, planned in plans.items():  # each read the cluster's topics and configs
        assert planned.returncode == 0, f"{listener}: {planned.stderr}"
        assert f"create          cli-{listener}.llm.requests" in planned.stdout, planned.stdout
    assert any(t["scope"] == "kafka" for t in broker.oidc.issued), "the scope was passed on"


def test_tls_trusts_the_system_ca_bundle_when_no_ca_file_is_set(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """Without LLMPIPE_SSL_CAFILE the clients verify against the system bundle. The test CA
    is added to that bundle in a mount namespace of the child process only (root in CI),
    so the machine's real bundle is never touched."""
    system_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    assert system_bundle.is_file(), "the ca-certificates package is not installed"
    assert shutil.which("unshare"), "util-linux's unshare is needed for this test"
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(system_bundle.read_text() + broker.pki.ca.read_text())
    settings = broker.sasl()
    del settings["ssl_cafile"]
    env = {**os.environ, "LLMPIPE_CLI_TIMEOUT_S": "5", **_env(settings)}
    env["LLMPIPE_TOPIC_PREFIX"] = "system-ca."

    def plan(extra_ca: bool) -> subprocess.CompletedProcess[str]:
        mount = f"mount --bind {bundle} {system_bundle} && " if extra_ca else ""
        return subprocess.run(
            ["unshare", "--mount", "sh", "-c", f'{mount}exec "$0" -m pipeline.cli topics plan',
             sys.executable],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    trusted = plan(extra_ca=True)
    assert trusted.returncode == 0, trusted.stderr
    assert "create" in trusted.stdout
    untrusted = plan(extra_ca=False)  # the real bundle: the test CA is not in it
    assert untrusted.returncode == 2, untrusted.stderr
    assert "not signed by a trusted CA" in untrusted.stderr


def _without_key_password(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != "ssl_key_password"}


REFUSALS = {
    "wrong password": (
        lambda b: b.sasl(sasl_password="not-the-password"),
        "the broker rejected the credentials",
    ),
    "untrusted broker certificate": (
        lambda b: b.sasl(ssl_cafile=b.pki.other_ca),
        "the broker's TLS certificate is not signed by a trusted CA",
    ),
    "wrong client secret": (
        lambda b: b.oauth(sasl_oauthbearer_client_secret="not-the-password"),
        "fetching the OAUTHBEARER token failed",
    ),
    "untrusted client certificate": (
        lambda b: _without_key_password(
            b.mtls(ssl_certfile=b.pki.untrusted_client_cert, ssl_keyfile=b.pki.untrusted_client_key)
        ),
        "the broker rejected the client certificate",
    ),
}


def test_a_refused_cli_command_says_why_in_one_line_and_exits_2(broker: SecureBroker) -> None:
    envs = {case: _env(settings(broker)) for case, (settings, _) in REFUSALS.items()}
    envs["wrong key password"] = _env(broker.mtls(ssl_key_password="wrong"))
    envs["send, wrong password"] = envs["wrong password"]
    send = ("send", "ticket_triage", "--vars", "{}")
    for case, result in _plans(envs, {"send, wrong password": send}).items():
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, f"{case}: {result.stderr}"
        assert len(lines) == 1, f"{case}: {lines}"
        assert PASSWORD not in result.stderr and "not-the-password" not in result.stderr
        if case == "wrong key password":  # librdkafka refuses to create the client
            assert "ssl.key.location" in lines[0], lines
            continue
        cause = REFUSALS[case.removeprefix("send, ")][1]
        assert lines[0].startswith("error: Kafka refused the connection: "), lines
        assert cause in lines[0], f"{case}: {lines[0]}"


class WorkerProcess:
    """``llmpipe worker`` as a process, its stderr (JSON log lines) collected."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        stderr = self.process.stderr
        assert stderr is not None
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(stderr.readline, "")))
        self._reader.start()

    def alive(self) -> None:
        code = self.process.poll()
        assert code is None, f"worker exited {code}: {self.lines[-5:]}"

    def stop(self) -> int | None:
        """SIGTERM; the exit code (None if it had to be killed)."""
        code: int | None = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)
        return code


def test_a_refused_worker_keeps_running_and_says_why_at_a_bounded_rate(
    broker: SecureBroker,
) -> None:
    """A wrong password and an untrusted broker certificate, one worker each, side by side.
    librdkafka retries the connection every second or so; the worker neither crashes nor
    floods its log: the refusal is logged once per interval, and SIGTERM still stops it."""
    cases = ["wrong password", "untrusted broker certificate"]
    base = _settings(broker.sasl())
    # The security settings reach the worker processes through worker_environment alone.
    workers = {
        case: WorkerProcess(
            {**os.environ, **worker_environment(base.model_copy(update=REFUSALS[case][0](broker)))}
        )
        for case in cases
    }
    codes: dict[str, int | None] = {}
    try:
        deadline = time.monotonic() + 60
        for case, worker in workers.items():
            cause = REFUSALS[case][1]
            while not any(cause in line for line in worker.lines):
                worker.alive()
                assert time.monotonic() < deadline, (
                    f"{case}: no refusal logged: {worker.lines[-5:]}"
                )
                time.sleep(0.1)
        watched_until = time.monotonic() + 8  # librdkafka retries many times in this window
        while time.monotonic() < watched_until:
            for worker in workers.values():
                worker.alive()
            time.sleep(0.2)
    finally:
        for case, worker in workers.items():
            codes[case] = worker.stop()
    for case, worker in workers.items():
        lines = worker.lines
        assert codes[case] == 0, f"{case}: SIGTERM gave {codes[case]}: {lines[-5:]}"
        refusals = [json.loads(line) for line in lines if "Kafka refused the connection" in line]
        assert len(refusals) == 1, f"{case}: {len(refusals)} refusal lines in ~10 s: {refusals}"
        assert refusals[0]["level"] == "error" and REFUSALS[case][1] in refusals[0]["msg"]
        assert not any(PASSWORD in line or "not-the-password" in line for line in lines)
        assert not any("Traceback" in line for line in lines), lines


@pytest.mark.parametrize("listener", ["sasl_ssl", "mtls"])
def test_the_review_service_reads_and_publishes_over_each_listener(
    broker: SecureBroker, tmp_path: Path, listener: str
) -> None:
    settings = _settings(broker.sasl() if listener == "sasl_ssl" else broker.mtls())
    create_topics(settings)
    produce(settings, "llm.review", [review_message(settings, escalation("sec-1"))])
    clock = FakeClock()
    runtime = ReviewRuntime(
        settings, f"sqlite:///{tmp_path / 'review.db'}", registry=registry(), clock=clock
    )
    try:
        assert runtime.start(ready_timeout_s=60), "the review queue did not catch up with Kafka"
        assert [i.request_id for i in runtime.service.queue(QueueFilter())] == ["sec-1"]
        runtime.service.claim("sec-1", "alice")
        assert runtime.service.decide("sec-1", "alice", "approve").delivered
    finally:
        runtime.stop()
    results = [r for r, _ in read_to_end(settings, "llm.results", Result, timeout_s=30)]
    assert [(r.request_id, r.source, r.reviewer) for r in results] == [("sec-1", "human", "alice")]
