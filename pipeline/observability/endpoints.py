"""The process's HTTP endpoints: ``/healthz``, ``/readyz`` and ``/metrics``.

Why the standard library's threaded HTTP server, off the event loop: a liveness probe must
get an answer *while the loop is wedged* (and the answer must say so), and neither a probe
nor a scrape may cost the stages anything. The handlers run on the server's own threads:
they read a few flags and a timestamp that the worker keeps (see
:mod:`pipeline.runtime.health`), and build the Prometheus text from the SDK's pull reader,
which aggregates nothing until it is scraped.

What each path answers is up to the process: :func:`set_checks` installs its liveness and
readiness checks (by default both are "the process answers"). ``/metrics`` serves the
current telemetry's Prometheus registry (:mod:`pipeline.observability.setup` tells where
to find it: :func:`set_registry_source`), which exists when ``OTEL_METRICS_EXPORTER``
includes ``prometheus``; otherwise it answers 404 with the variable to set, so an empty
scrape is never mistaken for an idle worker.

Bodies are small JSON documents (``{"ok": true, ...details}``) with 200 or 503: what
Kubernetes probes and Docker's ``HEALTHCHECK`` read is the status code, what an operator
reads is the detail.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pipeline.errors import LlmpipeError

log = logging.getLogger("llmpipe.endpoints")

HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
METRICS_OFF = (
    "metrics are not exported to Prometheus in this process: "
    "set OTEL_METRICS_EXPORTER=prometheus (it may be combined, e.g. otlp,prometheus)\n"
)


class EndpointError(LlmpipeError):
    """The endpoints cannot listen where they were told to (the CLI's one-line error)."""


@dataclass(frozen=True)
class Verdict:
    """A check's answer: ``ok`` decides the status code, ``detail`` explains it."""

    ok: bool
    detail: Mapping[str, Any] = field(default_factory=dict)


Check = Callable[[], Verdict]


def _answers() -> Verdict:
    return Verdict(True, {"process": "answering"})


def _no_registry() -> CollectorRegistry | None:
    return None


@dataclass
class _Checks:
    liveness: Check = _answers
    readiness: Check = _answers
    registry: Callable[[], CollectorRegistry | None] = _no_registry


_checks = _Checks()
_lock = threading.Lock()
_servers: dict[tuple[str, int], EndpointServer] = {}


def set_checks(liveness: Check | None = None, readiness: Check | None = None) -> None:
    """Install this process's checks; ``None`` puts back "the process answers"."""
    with _lock:
        _checks.liveness = liveness or _answers
        _checks.readiness = readiness or _answers


def set_registry_source(source: Callable[[], CollectorRegistry | None]) -> None:
    """Where ``/metrics`` finds the registry to serve, asked at every scrape."""
    with _lock:
        _checks.registry = source


def _run_check(check: Check) -> Verdict:
    """A check that raises is a failing check with its error, never a 500."""
    try:
        return check()
    except Exception as exc:
        return Verdict(False, {"error": f"{type(exc).__name__}: {exc}"})


class _Handler(BaseHTTPRequestHandler):
    server_version = "llmpipe"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == HEALTHZ:
            self._verdict(_run_check(_checks.liveness))
        elif path == READYZ:
            self._verdict(_run_check(_checks.readiness))
        elif path == METRICS:
            self._metrics()
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _verdict(self, verdict: Verdict) -> None:
        body = json.dumps({"ok": verdict.ok, **verdict.detail}, default=str).encode()
        status = HTTPStatus.OK if verdict.ok else HTTPStatus.SERVICE_UNAVAILABLE
        self._send(status, body + b"\n", "application/json")

    def _metrics(self) -> None:
        registry = _checks.registry()
        if registry is None:
            self._send(HTTPStatus.NOT_FOUND, METRICS_OFF.encode(), "text/plain; charset=utf-8")
            return
        self._send(HTTPStatus.OK, generate_latest(registry), CONTENT_TYPE_LATEST)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes arrive every few seconds: one access line each would drown the log."""


class EndpointServer:
    """One listening socket, served by daemon threads until :meth:`close`."""

    def __init__(self, host: str, port: int) -> None:
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"endpoints-{self.port}", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve(host: str, port: int) -> EndpointServer:
    """This process's server on ``host:port``, started on first call (``port=0``: any
    free port; read it from the returned server). An address in use is an
    :class:`EndpointError` that names the address."""
    with _lock:
        running = _servers.get((host, port))
        if running is not None:
            return running
        try:
            server = EndpointServer(host, port)
        except OSError as exc:
            raise EndpointError(
                f"cannot serve /healthz, /readyz, /metrics on {host}:{port}: {exc.strerror}"
            ) from None
        _servers[(host, port)] = _servers[(host, server.port)] = server
    log.info("endpoints on %s (%s, %s, %s)", server.url, HEALTHZ, READYZ, METRICS)
    return server


def serving() -> bool:
    """Whether this process already serves its endpoints somewhere."""
    with _lock:
        return bool(_servers)


def stop(server: EndpointServer) -> None:
    """Close ``server`` and forget it (the checks stay: another server may still run)."""
    with _lock:
        for key in [k for k, s in _servers.items() if s is server]:
            del _servers[key]
    server.close()
