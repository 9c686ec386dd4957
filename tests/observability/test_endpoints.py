"""The endpoint server and the worker's liveness check, without Kafka: real HTTP on a
loopback port, a real event loop that is really blocked."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.observability import endpoints, setup
from pipeline.observability.endpoints import EndpointError, EndpointServer, Verdict
from pipeline.observability.setup import PrometheusReader, build_telemetry, install
from pipeline.runtime.health import Heartbeat


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_status(url: str, status: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    seen: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        seen = get(url)
        if seen[0] == status:
            return seen[1]
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {status} within {timeout_s}s; last: {seen}")


def test_a_wedged_event_loop_turns_healthz_unhealthy_and_back(
    endpoint_server: EndpointServer,
) -> None:
    """The probe is answered off the loop, so it can say the loop is stuck (a route on
    the loop would just time out, and say nothing)."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    heartbeat = Heartbeat(stale_after_s=0.5)
    endpoints.set_checks(liveness=heartbeat.verdict)
    release = threading.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(heartbeat.run(stop, interval_s=0.05),)
    )
    thread.start()
    try:
        wait_for_status(endpoint_server.url + "/healthz", 200, 10)
        # Wedge the loop: a callback that blocks it until the test lets go.
        loop.call_soon_threadsafe(release.wait, 30)
        body = wait_for_status(endpoint_server.url + "/healthz", 503, 10)
        assert json.loads(body)["reason"] == "the event loop is not running"
        release.set()
        wait_for_status(endpoint_server.url + "/healthz", 200, 10)
    finally:
        release.set()
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_a_check_that_raises_is_not_ready_never_a_500(endpoint_server: EndpointServer) -> None:
    def broken() -> Verdict:
        raise RuntimeError("metadata cache gone")

    endpoints.set_checks(readiness=broken)
    status, body = get(endpoint_server.url + "/readyz")
    assert status == 503
    assert json.loads(body) == {"ok": False, "error": "RuntimeError: metadata cache gone"}
    endpoints.set_checks(readiness=lambda: Verdict(True, {"stages": 4}))
    assert get(endpoint_server.url + "/readyz") == (200, '{"ok": true, "stages": 4}\n')


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=60))
def test_any_request_line_gets_an_answer_below_500(
    endpoint_server: EndpointServer, path: str
) -> None:
    """Raw bytes on the socket: whatever the request line, a 2xx/4xx answer, no crash."""
    with socket.create_connection(("127.0.0.1", endpoint_server.port), timeout=10) as sock:
        sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert 200 <= status < 500, answer[:200]
    assert get(endpoint_server.url + "/healthz")[0] == 200  # and the server still serves


def test_metrics_without_prometheus_says_which_variable_to_set(
    endpoint_server: EndpointServer,
) -> None:
    previous = install(build_telemetry({}))
    try:
        status, body = get(endpoint_server.url + "/metrics")
    finally:
        if previous is not None:
            install(previous)
    assert status == 404
    assert "OTEL_METRICS_EXPORTER=prometheus" in body


def test_metrics_are_the_same_otel_instruments_with_the_instance_id(
    endpoint_server: EndpointServer,
) -> None:
    telemetry = build_telemetry({"OTEL_METRICS_EXPORTER": "prometheus"})
    assert telemetry.prometheus is not None
    previous = install(telemetry)
    try:
        telemetry.metrics.requests.add(3, {"llmpipe.route": "result"})
        status, body = get(endpoint_server.url + "/metrics")
    finally:
        if previous is not None:
            install(previous)
        telemetry.shutdown()
    assert status == 200
    assert 'llmpipe_requests_total{llmpipe_route="result"' in body
    assert body.count("llmpipe_requests_total{") == 1
    # The metrics carry the same instance id as the traces (Prometheus: on target_info).
    instance = telemetry.tracer_provider.resource.attributes["service.instance.id"]  # type: ignore[attr-defined]
    assert f'service_instance_id="{instance}"' in body


def test_every_process_telemetry_has_its_own_instance_id_unless_configured() -> None:
    def instance(environ: dict[str, str]) -> str:
        resource = build_telemetry(environ).tracer_provider.resource  # type: ignore[attr-defined]
        return str(resource.attributes["service.instance.id"])

    assert instance({}) != instance({})
    configured = {
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.instance.id=pod-7"
    }
    assert instance(configured) == "pod-7"


def test_prometheus_readers_do_not_share_a_registry() -> None:
    """Two telemetries side by side (tests, the overhead benchmark) scrape separately."""
    a, b = PrometheusReader(), PrometheusReader()
    assert a.registry is not b.registry


def test_a_second_server_on_a_used_port_is_one_clear_error(
    endpoint_server: EndpointServer,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EndpointError, match=f"127.0.0.1:{port}"):
            endpoints.serve("127.0.0.1", port)
    assert (
        endpoints.serve("127.0.0.1", endpoint_server.port) is endpoint_server
    )  # same address: same server


def test_the_standalone_scrape_endpoint_is_not_started_twice(
    endpoint_server: EndpointServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker serves /metrics on its own port: configuring Prometheus then must not
    start a second listener on OTEL_EXPORTER_PROMETHEUS_PORT; a process without one gets
    it there."""
    started: list[tuple[str, int]] = []
    monkeypatch.setattr(endpoints, "serve", lambda host, port: started.append((host, port)))
    telemetry = build_telemetry({"OTEL_METRICS_EXPORTER": "prometheus"})
    environ = {"OTEL_EXPORTER_PROMETHEUS_HOST": "0.0.0.0", "OTEL_EXPORTER_PROMETHEUS_PORT": "9999"}
    setup.serve_prometheus(telemetry, environ)
    assert started == []
    monkeypatch.setattr(endpoints, "serving", lambda: False)
    setup.serve_prometheus(telemetry, environ)
    assert started == [("0.0.0.0", 9999)]
    setup.serve_prometheus(build_telemetry({}), environ)  # no Prometheus reader: nothing
    assert started == [("0.0.0.0", 9999)]
