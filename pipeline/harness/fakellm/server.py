"""The fake model server: OpenAI chat completions over real HTTP, misbehaving on purpose.

Real HTTP (not an httpx mock transport) because the failures that matter most in production
-- resets, hangs, slow answers, 429 storms, thousands of connections in flight -- live in the
socket, the connection pool and the timeouts, which a mock transport skips. The server is a
bare :class:`asyncio.Protocol` so one process can answer thousands of requests a second
for benchmarks and still abort a socket or hold it open at will.

Behaviour precedence for a chat request (first that applies wins):

1. ``force_behavior`` set through ``POST /control`` (simulates an outage, ignores everything);
2. the ``x-fake-behavior`` request header;
3. a ``[[fake:...]]`` directive in the messages;
4. ``default_behavior`` set through ``POST /control`` or the constructor;
5. the seeded profile draw (:func:`pipeline.harness.fakellm.behaviors.choose_behavior`).

A header or directive with ``times=N`` is skipped once it has served N requests of the same
conversation (same first user message), so a test can script "fail twice, then succeed".

Structured output: ``response_format`` is checked like OpenAI checks it (a strict schema
outside the strict subset is a 400) and honoured (see
:func:`pipeline.harness.fakellm.responses.render_content`); ``ignore_schema`` misbehaves
under it on purpose. ``refuse_formats`` makes the fake refuse some forms the way
llama.cpp refuses OpenAI's ``json_schema``: an HTTP 500 carrying a validation error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import random
import re
import resource
import secrets
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import orjson

from pipeline.harness.fakellm.behaviors import (
    BehaviorSpec,
    Profile,
    ProfileLike,
    draw_fraction,
    draw_text,
    find_directive,
    identity_text,
    parse_behavior,
    parse_profile,
)
from pipeline.harness.fakellm.http11 import HttpError, Request, RequestParser, build_response
from pipeline.harness.fakellm.responses import (
    completion_body,
    constraint_of,
    error_body,
    render_content,
    rendered_behavior,
    valid_answer,
)
from pipeline.harness.fakellm.schema_instance import SchemaInstanceError
from pipeline.llm.structured import STRUCTURED_OUTPUT_MODES, strict_decision

__all__ = [
    "CLIENT_REQUEST_ID_HEADER",
    "DEFAULT_PORT",
    "CallTally",
    "FakeLLMServer",
    "ServerConfig",
    "main",
    "running_fake_llm",
    "serve",
]

log = logging.getLogger("pipeline.harness.fakellm")

DEFAULT_PORT = 8089
BEHAVIOR_HEADER = "x-fake-behavior"
# The header an OpenAI client uses to send its own id for a call; llmpipe sends the
# pipeline's request id in it, so calls can be counted per request (see ``request_calls``).
CLIENT_REQUEST_ID_HEADER = "x-client-request-id"
NO_REQUEST_ID = "-"
_CONTENT_BEHAVIORS = frozenset({"valid", "slow", "fenced", "hedge", "ignore_schema"})
_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MAX_BUFFERED = 4 * 1024 * 1024
_MAX_TIMES_KEYS = 100_000
_RECENT = 256
_JSON = "application/json"


@dataclass(frozen=True)
class ServerConfig:
    """Runtime-mutable settings; replaced wholesale so readers on other threads never tear."""

    profile: Profile
    seed: int
    default_behavior: BehaviorSpec | None = None
    force_behavior: BehaviorSpec | None = None
    latency: float = 0.0
    jitter: float = 0.0
    refuse_formats: frozenset[str] = frozenset()

    def as_json(self) -> dict[str, Any]:
        return {
            "profile": str(self.profile),
            "seed": self.seed,
            "default_behavior": _spec_text(self.default_behavior),
            "force_behavior": _spec_text(self.force_behavior),
            "latency": self.latency,
            "jitter": self.jitter,
            "refuse_formats": sorted(self.refuse_formats),
        }


def _spec_text(spec: BehaviorSpec | None) -> str | None:
    return None if spec is None else str(spec)


def _refusals(formats: Sequence[str] | frozenset[str] | None) -> frozenset[str]:
    """Structured-output modes to refuse, named as llmpipe names them."""
    chosen = frozenset(formats or ())
    unknown = sorted(chosen - set(STRUCTURED_OUTPUT_MODES) - {"none"})
    if unknown or "none" in chosen:
        raise ValueError("refuse_formats takes json_schema, json_object_schema, json_object")
    return chosen


def _format_mode(body: Mapping[str, Any]) -> str:
    fmt = body.get("response_format")
    if not isinstance(fmt, Mapping) or fmt.get("type") in (None, "text"):
        return "none"
    if fmt.get("type") == "json_object":
        return "json_object_schema" if "schema" in fmt else "json_object"
    return str(fmt.get("type"))


def _check_latency(latency: float, jitter: float) -> None:
    if not 0 <= latency <= 3600:
        raise ValueError("latency must be within 0..3600 seconds")
    if not 0 <= jitter <= 1:
        raise ValueError("jitter must be a fraction within 0..1")


CallKind = Callable[[Sequence[Any]], str]


def _any_call(messages: Sequence[Any]) -> str:
    return "chat"


@dataclass
class CallTally:
    """Calls for one request id (and kind): how many started and how many have ended."""

    started: int = 0
    ended: int = 0
    last_ended_at: float = 0.0  # wall clock (time.time()) of the latest end, 0 if none

    @property
    def in_flight(self) -> int:
        return self.started - self.ended


@dataclass
class _Call:
    """One chat call being served: whose it is, and the connection it must answer on."""

    key: tuple[str, str]
    conn: _Connection


@dataclass
class _Reply:
    data: bytes
    keep_alive: bool


class _ClientError(Exception):
    """A request the OpenAI API would answer with 400; carries the offending ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Unset:
    """Marks "argument not given" where ``None`` is a meaningful value (clear an override)."""


_UNSET = _Unset()


class FakeLLMServer:
    """A fake OpenAI-compatible endpoint; see the module docstring for behaviour precedence.

    Use ``async with FakeLLMServer() as srv`` (or ``start``/``stop``) inside an event loop,
    or :func:`running_fake_llm` from synchronous code. ``url`` ends in ``/v1`` so it can be
    handed to any OpenAI client as its base URL.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        profile: ProfileLike = None,
        seed: int = 0,
        latency: float = 0.0,
        jitter: float = 0.0,
        default_behavior: str | None = None,
        backlog: int = 4096,
        refuse_formats: Sequence[str] = (),
        call_kind: CallKind | None = None,
    ) -> None:
        """``call_kind`` names what a call is for (from its messages), so per-request counts
        can be split, e.g. a pipeline's first call from its re-asks; the default is one kind.
        """
        _check_latency(latency, jitter)
        self.host = host
        self._requested_port = port
        self._backlog = backlog
        self._config = ServerConfig(
            profile=parse_profile(profile),
            seed=seed,
            default_behavior=parse_behavior(default_behavior) if default_behavior else None,
            latency=latency,
            jitter=jitter,
            refuse_formats=_refusals(refuse_formats),
        )
        self._lock = threading.Lock()
        self._total_calls = 0
        self._bad_requests = 0
        self._by_behavior: dict[str, int] = {}
        self._by_model: dict[str, int] = {}
        self._in_flight = 0
        self._max_in_flight = 0
        self._times_used: dict[tuple[str, str, str], int] = {}
        self._in_flight_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._call_kind = call_kind or _any_call
        self._by_request: dict[tuple[str, str], CallTally] = {}
        self._live: dict[int, _Call] = {}
        self._call_ids = itertools.count(1)
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port: int | None = None
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._latency_rng = random.Random(seed)
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=_RECENT)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting; ``port=0`` picks a free port (see ``port``/``url``)."""
        if self._server is not None:
            raise RuntimeError("server already started")
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Connection(self),
            self.host,
            self._requested_port,
            backlog=self._backlog,
            reuse_address=True,
        )
        sockets = self._server.sockets
        self._port = int(sockets[0].getsockname()[1]) if sockets else self._requested_port

    async def stop(self) -> None:
        """Stop listening and drop every connection, including hung ones, then wait."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = [c.task for c in self._connections if c.task is not None]
        for conn in list(self._connections):
            conn.abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> FakeLLMServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def base_url(self) -> str:
        """Scheme, host and port, without ``/v1`` (for ``/counters``, ``/control``...)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL, ending in ``/v1``."""
        return f"{self.base_url}/v1"

    # -- counters and control -------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """A snapshot, safe to call from any thread."""
        with self._lock:
            return {
                "total_calls": self._total_calls,
                "by_behavior": dict(self._by_behavior),
                "by_model": dict(self._by_model),
                "in_flight": self._in_flight,
                "orphaned": self._orphaned(),
                "max_in_flight": self._max_in_flight,
                "bad_requests": self._bad_requests,
            }

    def recent_requests(self) -> list[dict[str, Any]]:
        """The last chat requests received (``headers`` and parsed ``body``), oldest first,
        so tests can check what a client really put on the wire."""
        with self._lock:
            return list(self._recent)

    def _orphaned(self) -> int:
        """Calls still being served whose client has gone (caller holds ``_lock``)."""
        return sum(1 for call in self._live.values() if call.conn.gone)

    def request_calls(self) -> dict[str, dict[str, CallTally]]:
        """Calls per request id (the ``x-client-request-id`` header) and kind; a snapshot.

        Tests compare these between runs to count exactly which calls a crash made the
        pipeline pay twice. Calls without the header are counted under ``"-"``. Not reset
        by :meth:`reset_counters`: a fault run reads them before and after each fault.
        """
        with self._lock:
            out: dict[str, dict[str, CallTally]] = {}
            for (rid, kind), tally in self._by_request.items():
                out.setdefault(rid, {})[kind] = replace(tally)
            return out

    def in_flight_requests(self) -> dict[str, int]:
        """Request id -> calls in flight for it right now (a snapshot)."""
        with self._lock:
            out: dict[str, int] = {}
            for call in self._live.values():
                out[call.key[0]] = out.get(call.key[0], 0) + 1
            return out

    def live_in_flight(self) -> int:
        """Calls in flight whose client is still connected (orphans of a killed client
        are excluded: the server keeps serving them until their latency ends)."""
        with self._lock:
            return len(self._live) - self._orphaned()

    def reset_counters(self) -> None:
        """Zero the counters and ``times=N`` budgets; requests still in flight stay counted."""
        with self._lock:
            self._total_calls = 0
            self._bad_requests = 0
            self._by_behavior.clear()
            self._by_model.clear()
            self._max_in_flight = self._in_flight
            self._times_used.clear()
            self._recent.clear()

    @property
    def config(self) -> ServerConfig:
        return self._config

    def configure(
        self,
        *,
        profile: ProfileLike | _Unset = _UNSET,
        seed: int | _Unset = _UNSET,
        default_behavior: str | _Unset | None = _UNSET,
        force_behavior: str | _Unset | None = _UNSET,
        latency: float | _Unset = _UNSET,
        jitter: float | _Unset = _UNSET,
        refuse_formats: Sequence[str] | _Unset = _UNSET,
    ) -> ServerConfig:
        """Change settings at runtime (thread-safe); ``None`` clears an override.

        Setting a profile clears ``default_behavior`` unless one is given too, because a
        caller who installs a profile wants the profile to take effect.
        """
        cfg = self._config
        changes: dict[str, Any] = {}
        if not isinstance(profile, _Unset):
            changes["profile"] = parse_profile(profile)
            changes["default_behavior"] = None
        if not isinstance(seed, _Unset):
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError("seed must be an integer")
            changes["seed"] = seed
        if not isinstance(default_behavior, _Unset):
            changes["default_behavior"] = (
                parse_behavior(default_behavior) if default_behavior else None
            )
        if not isinstance(force_behavior, _Unset):
            changes["force_behavior"] = parse_behavior(force_behavior) if force_behavior else None
        if not isinstance(latency, _Unset):
            changes["latency"] = float(latency)
        if not isinstance(jitter, _Unset):
            changes["jitter"] = float(jitter)
        if not isinstance(refuse_formats, _Unset):
            changes["refuse_formats"] = _refusals(refuse_formats)
        new = replace(cfg, **changes)
        _check_latency(new.latency, new.jitter)
        self._config = new
        return new

    async def wait_in_flight(self, count: int) -> None:
        """Wait until exactly ``count`` chat requests are in flight (tests sync on this).

        Wrap it in ``asyncio.timeout``; it may be awaited from any event loop.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not None and loop is not self._loop:
            fut = asyncio.run_coroutine_threadsafe(self.wait_in_flight(count), self._loop)
            await asyncio.wrap_future(fut)
            return
        if self._in_flight == count:
            return
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (count, waiter)
        self._in_flight_waiters.append(entry)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._in_flight_waiters.remove(entry)

    def wait_in_flight_blocking(self, count: int, timeout: float = 10.0) -> None:
        """:meth:`wait_in_flight` for threads other than the server's (``running_fake_llm``)."""
        if self._loop is None:
            raise RuntimeError("server not started")
        fut = asyncio.run_coroutine_threadsafe(self.wait_in_flight(count), self._loop)
        try:
            fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def wait_orphans_drained(self, timeout: float = 60.0) -> None:
        """Block until no call of a departed client is still being served.

        After a client is killed its calls stay in flight here until their latency ends;
        a test that waits for "N in flight" before the next kill must wait for these to
        finish first, or it counts the dead client's calls as the new one's.
        """
        self._poll(lambda: self.counters()["orphaned"] == 0, timeout, "orphaned calls to end")

    def wait_live_in_flight(self, count: int, timeout: float = 60.0) -> None:
        """Block until at least ``count`` calls of connected clients are in flight."""
        self._poll(lambda: self.live_in_flight() >= count, timeout, f"{count} live calls in flight")

    @staticmethod
    def _poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"fakellm: timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.01)

    def _flight(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            current = self._in_flight
        for count, waiter in self._in_flight_waiters:
            if count == current and not waiter.done():
                waiter.set_result(None)

    def _count_call(self, behavior: str, model: str) -> None:
        with self._lock:
            self._total_calls += 1
            self._by_behavior[behavior] = self._by_behavior.get(behavior, 0) + 1
            self._by_model[model] = self._by_model.get(model, 0) + 1

    def _count_bad(self) -> None:
        with self._lock:
            self._bad_requests += 1

    # -- behaviour resolution -----------------------------------------------------------

    def resolve_behavior(self, messages: Sequence[Any], header: str | None = None) -> BehaviorSpec:
        """Apply the precedence in the module docstring; consumes ``times=N`` budgets."""
        cfg = self._config
        if cfg.force_behavior is not None:
            return cfg.force_behavior
        identity: str | None = None
        candidates: list[tuple[str, BehaviorSpec]] = []
        if header:
            candidates.append(("header", parse_behavior(header)))
        directive = find_directive(messages)
        if directive is not None:
            candidates.append(("directive", directive))
        for source, spec in candidates:
            if spec.times is None:
                return spec
            if identity is None:
                identity = hashlib.sha256(
                    identity_text(messages).encode("utf-8", "surrogatepass")
                ).hexdigest()
            key = (source, f"{spec}:{spec.times}", identity)
            with self._lock:
                used = self._times_used.get(key, 0)
                if used < spec.times:
                    if len(self._times_used) >= _MAX_TIMES_KEYS:
                        self._times_used.clear()
                    self._times_used[key] = used + 1
                    return spec
        if cfg.default_behavior is not None:
            return cfg.default_behavior
        return cfg.profile.draw(draw_fraction(cfg.seed, draw_text(messages)))

    # -- request handling -----------------------------------------------------------------

    async def dispatch(self, request: Request, conn: _Connection) -> _Reply | None:
        """Route one request; None means the connection was reset or closed instead."""
        path = request.path.rstrip("/") or "/"
        method = request.method
        if path in ("/v1/chat/completions", "/chat/completions"):
            if method != "POST":
                return self._method_not_allowed(request, "POST")
            return await self._chat(request, conn)
        if path in ("/healthz", "/health"):
            if method not in ("GET", "HEAD"):
                return self._method_not_allowed(request, "GET")
            return self._json(request, 200, {"status": "ok"})
        if path == "/counters":
            if method != "GET":
                return self._method_not_allowed(request, "GET")
            return self._json(request, 200, self.counters())
        if path == "/counters/requests":
            if method != "GET":
                return self._method_not_allowed(request, "GET")
            calls = {
                rid: {k: [t.started, t.ended] for k, t in kinds.items()}
                for rid, kinds in self.request_calls().items()
            }
            return self._json(request, 200, calls)
        if path == "/counters/reset":
            if method != "POST":
                return self._method_not_allowed(request, "POST")
            self.reset_counters()
            return self._json(request, 200, self.counters())
        if path == "/control":
            if method == "GET":
                return self._json(request, 200, self._config.as_json())
            if method != "POST":
                return self._method_not_allowed(request, "GET, POST")
            return self._control(request)
        if path in ("/v1/models", "/models"):
            models = {
                "object": "list",
                "data": [
                    {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fakellm"}
                ],
            }
            return self._json(request, 200, models)
        return self._error(request, 404, f"no route for {path}", type_="invalid_request_error")

    def _control(self, request: Request) -> _Reply:
        try:
            body = json.loads(request.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError("control body must be a JSON object")
            allowed = {
                "profile",
                "seed",
                "default_behavior",
                "force_behavior",
                "latency",
                "jitter",
                "refuse_formats",
            }
            unknown = set(body) - allowed
            if unknown:
                raise ValueError(f"unknown control fields: {sorted(unknown)}")
            for key in ("latency", "jitter"):
                if key in body and (
                    isinstance(body[key], bool) or not isinstance(body[key], int | float)
                ):
                    raise ValueError(f"{key} must be a number")
            for key in ("default_behavior", "force_behavior"):
                if key in body and body[key] is not None and not isinstance(body[key], str):
                    raise ValueError(f"{key} must be a string or null")
            if "profile" in body and not isinstance(body["profile"], str | dict | None):
                raise ValueError("profile must be a string or an object of weights")
            refusals = body.get("refuse_formats", [])
            if not isinstance(refusals, list) or not all(isinstance(f, str) for f in refusals):
                raise ValueError("refuse_formats must be a list of strings")
            cfg = self.configure(**body)
        except (ValueError, TypeError, RecursionError) as exc:
            self._count_bad()
            return self._error(request, 400, str(exc), type_="invalid_request_error")
        return self._json(request, 200, cfg.as_json())

    async def _chat(self, request: Request, conn: _Connection) -> _Reply | None:
        try:
            body, messages, model = _parse_chat(request.body)
            spec = self.resolve_behavior(messages, request.headers.get(BEHAVIOR_HEADER))
            rendered = rendered_behavior(spec.name, constraint_of(body))
            answer = valid_answer(body, messages) if rendered in _CONTENT_BEHAVIORS else None
        except _ClientError as exc:
            self._count_bad()
            return self._error(
                request, 400, str(exc), type_="invalid_request_error", param=exc.param
            )
        except (ValueError, SchemaInstanceError) as exc:
            self._count_bad()
            return self._error(request, 400, f"fakellm: {exc}", type_="invalid_request_error")
        with self._lock:
            self._recent.append({"headers": dict(request.headers), "body": body})
        if _format_mode(body) in self._config.refuse_formats:
            self._count_bad()
            return self._refuse_format(request, body)
        self._count_call(spec.name, model)
        call_id = self._begin(request, conn, messages)
        self._flight(+1)
        try:
            return await self._perform(request, conn, spec, body, messages, model, answer)
        finally:
            self._end(call_id)
            self._flight(-1)

    def _begin(self, request: Request, conn: _Connection, messages: Sequence[Any]) -> int:
        rid = request.headers.get(CLIENT_REQUEST_ID_HEADER) or NO_REQUEST_ID
        key = (rid, self._call_kind(messages))
        call_id = next(self._call_ids)
        with self._lock:
            self._by_request.setdefault(key, CallTally()).started += 1
            self._live[call_id] = _Call(key, conn)
        return call_id

    def _end(self, call_id: int) -> None:
        with self._lock:
            call = self._live.pop(call_id, None)
            if call is not None:
                tally = self._by_request[call.key]
                tally.ended += 1
                tally.last_ended_at = time.time()

    async def _perform(
        self,
        request: Request,
        conn: _Connection,
        spec: BehaviorSpec,
        body: Mapping[str, Any],
        messages: Sequence[Any],
        model: str,
        answer: Any,
    ) -> _Reply | None:
        if spec.name == "hang":
            await conn.wait_gone()
            conn.close()
            return None
        cfg = self._config
        delay = spec.param if spec.name == "slow" else 0.0
        if cfg.latency > 0:
            delay += cfg.latency * (1 + self._latency_rng.uniform(-cfg.jitter, cfg.jitter))
        if delay > 0:
            await asyncio.sleep(delay)
        headers = [(BEHAVIOR_HEADER, str(spec))]
        if spec.name == "reset":
            conn.reset()
            return None
        if spec.name == "rate_limit":
            retry_after = spec.param
            retry_text = str(int(retry_after)) if retry_after.is_integer() else repr(retry_after)
            headers += [
                ("retry-after", retry_text),
                ("retry-after-ms", str(int(retry_after * 1000))),
            ]
            message = f"Rate limit reached for {model}. Please try again in {retry_after:g}s."
            return self._error(
                request, 429, message, type_="requests", code="rate_limit_exceeded", headers=headers
            )
        if spec.name == "server_error":
            message = "The server had an error while processing your request. Sorry about that!"
            return self._error(request, 500, message, type_="server_error", headers=headers)
        content = render_content(spec, answer, constraint_of(body))
        seed_bytes = hashlib.sha256(f"{spec.name}\x00{content}".encode("utf-8", "surrogatepass"))
        completion = completion_body(
            completion_id=f"chatcmpl-fake{self._id_prefix}{next(self._ids):010d}",
            created=int(time.time()),
            model=model,
            messages=messages,
            behavior=spec.name,
            content=content,
            choices=_int_field(body, "n", 1, 1, 128),
            logprobs=bool(body.get("logprobs")),
            top_logprobs=_int_field(body, "top_logprobs", 0, 0, 20),
            max_tokens=_max_tokens(body),
            rng=random.Random(seed_bytes.digest()),
        )
        return self._json(request, 200, completion, headers=headers)

    def _refuse_format(self, request: Request, body: Mapping[str, Any]) -> _Reply:
        """What llama.cpp's server answers to a form it does not know: a 500 that is really
        a request validation error."""
        fmt = body.get("response_format")
        given = fmt.get("type") if isinstance(fmt, Mapping) else None
        message = (
            "1 validation error:\n  {'type': 'literal_error', "
            "'loc': ('body', 'response_format', 'type'), "
            f"'msg': \"Input should be 'text' or 'json_object'\", 'input': {given!r}}}"
        )
        return self._error(request, 500, message, type_="internal_server_error")

    def _json(
        self,
        request: Request,
        status: int,
        payload: Any,
        headers: Sequence[tuple[str, str]] = (),
    ) -> _Reply:
        data = _dumps(payload)
        if request.method == "HEAD":
            data = b""
        return _Reply(
            build_response(status, data, keep_alive=request.keep_alive, headers=headers),
            request.keep_alive,
        )

    def _error(
        self,
        request: Request,
        status: int,
        message: str,
        *,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> _Reply:
        payload = error_body(message, type_=type_, code=code, param=param)
        return self._json(request, status, payload, headers)

    def _method_not_allowed(self, request: Request, allow: str) -> _Reply:
        payload = error_body(f"method {request.method} not allowed", type_="invalid_request_error")
        return self._json(request, 405, payload, [("allow", allow)])


def _dumps(payload: Any) -> bytes:
    """Compact JSON; orjson first (a fraction of json's CPU, which at thousands of requests
    a second is the fake's largest cost), json for what orjson refuses to write: a lone
    surrogate in model text (``\\udXXX`` escapes), an integer beyond 64 bits."""
    try:
        return orjson.dumps(payload)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode()


def _loads(raw: bytes) -> Any:
    """orjson's parse, or json's for what orjson refuses (a lone surrogate escape, NaN),
    so the fake accepts what it accepted before and rejects the rest with json's message
    (one difference: orjson reads an integer beyond 64 bits as a float)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _parse_chat(raw: bytes) -> tuple[dict[str, Any], list[Any], str]:
    """Validate what OpenAI itself would reject, so pipeline bugs surface against the fake."""
    if not raw:
        raise _ClientError("request body is empty; expected a JSON object")
    try:
        body = _loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _ClientError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _ClientError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _ClientError("'model' is required and must be a non-empty string", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ClientError("'messages' must be a non-empty array", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _ClientError(f"messages[{index}] must be an object with a 'role'", "messages")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _ClientError(f"messages[{index}].content must be a string or array", "messages")
    if body.get("stream"):
        raise _ClientError("fakellm does not support stream=true", "stream")
    _int_field(body, "n", 1, 1, 128)
    _int_field(body, "top_logprobs", 0, 0, 20)
    _max_tokens(body)
    _check_sampling(body)
    _check_response_format(body.get("response_format"))
    return body, messages, model


_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


def _check_sampling(body: Mapping[str, Any]) -> None:
    """The ranges and types OpenAI enforces, so a bad parameter fails here as it would there."""
    for name, (low, high) in _RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise _ClientError(f"'{name}' must be a number within {low:g}..{high:g}", name)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _ClientError("'seed' must be an integer", "seed")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) for x in stops):
        raise _ClientError("'stop' must be a string or an array of up to 4 strings", "stop")


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    where = "response_format"
    if not isinstance(fmt, Mapping) or fmt.get("type") not in (
        "text",
        "json_object",
        "json_schema",
    ):
        raise _ClientError("'response_format.type' must be text, json_object or json_schema", where)
    if fmt["type"] == "json_object" and not isinstance(fmt.get("schema", {}), Mapping):
        raise _ClientError("'response_format.schema' must be an object", where)
    if fmt["type"] != "json_schema":
        return
    spec = fmt.get("json_schema")
    if not isinstance(spec, Mapping):
        raise _ClientError("'response_format.json_schema' is required", where)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise _ClientError(
            "'response_format.json_schema.name' must match ^[a-zA-Z0-9_-]{1,64}$", where
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, Mapping):
        raise _ClientError("'response_format.json_schema.schema' must be an object", where)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _ClientError("'response_format.json_schema.strict' must be a boolean", where)
    if strict:
        decision = strict_decision(schema)
        if not decision.strict:
            raise _ClientError(
                f"Invalid schema for response_format '{name}': {decision.reasons[0]}", where
            )


def _int_field(body: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _ClientError(f"'{name}' must be an integer within {low}..{high}", name)
    return int(value)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _ClientError(f"'{name}' must be a positive integer", name)
        return int(value)
    return None


class _Connection(asyncio.Protocol):
    """One client connection; requests on it are served one at a time, in order."""

    def __init__(self, server: FakeLLMServer) -> None:
        self._server = server
        self._parser = RequestParser()
        self._transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self._closing = False
        self._peer_eof = False
        self._paused = False
        self._gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._parser.feed(data)
        if len(self._parser.buffer) > _MAX_BUFFERED and not self._paused and self._transport:
            # A client pipelining faster than we answer; stop reading rather than buffer.
            self._transport.pause_reading()
            self._paused = True
        if self.task is None:
            self._advance()

    def eof_received(self) -> bool:
        # EOF while a hang is pending means the client gave up; otherwise finish the reply.
        self._peer_eof = True
        self._mark_gone()
        if self.task is None:
            self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server._connections.discard(self)
        self._mark_gone()
        if self.task is not None:
            self.task.cancel()

    # helpers used by the server

    @property
    def gone(self) -> bool:
        """The client went away (EOF or reset) or the server aborted the connection."""
        return self._gone.done()

    async def wait_gone(self) -> None:
        """Block until the client goes away (EOF or reset) or the server aborts us."""
        await asyncio.shield(self._gone)

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def reset(self) -> None:
        """Send a TCP RST (SO_LINGER 0) instead of a FIN, like a crashed upstream."""
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    # internals

    def _mark_gone(self) -> None:
        if not self._gone.done():
            self._gone.set_result(None)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._closing:
            self._transport.write(data)

    def _advance(self) -> None:
        """Start on the next buffered request, if complete; answer protocol errors inline."""
        while self.task is None and not self._closing:
            try:
                request = self._parser.next_request()
            except HttpError as err:
                self._server._count_bad()
                payload = json.dumps(error_body(err.message, type_="invalid_request_error"))
                self._write(build_response(err.status, payload.encode(), keep_alive=not err.close))
                if err.close:
                    self.close()
                    return
                continue
            if request is None:
                if self._parser.wants_continue():
                    self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if self._paused and self._transport is not None:
                    self._transport.resume_reading()
                    self._paused = False
                if self._peer_eof:
                    self.close()
                return
            self.task = asyncio.get_running_loop().create_task(self._serve(request))
            self.task.add_done_callback(self._served)

    async def _serve(self, request: Request) -> None:
        try:
            reply = await self._server.dispatch(request, self)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("fakellm: unhandled error serving %s %s", request.method, request.path)
            payload = json.dumps(error_body("fakellm internal error", type_="fakellm_bug"))
            reply = _Reply(build_response(500, payload.encode(), keep_alive=False), False)
        if reply is None:
            return
        self._write(reply.data)
        if not reply.keep_alive:
            self.close()

    def _served(self, task: asyncio.Task[None]) -> None:
        self.task = None
        if not task.cancelled() and not self._closing:
            self._advance()


@contextlib.contextmanager
def running_fake_llm(
    host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> Iterator[FakeLLMServer]:
    """Run a :class:`FakeLLMServer` on a background thread for synchronous code.

    The server gets its own event loop so a blocking test (or a test that runs its own loop)
    cannot starve it. Keyword arguments are those of :class:`FakeLLMServer`.
    """
    server = FakeLLMServer(host, port, **kwargs)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name="fakellm", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("fake LLM server did not start within 30s")
    if failure:
        raise failure[0]
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def _raise_fd_limit() -> None:
    # Thousands of hung connections need thousands of descriptors; the soft limit is often 1024.
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    profile: ProfileLike = None,
    seed: int = 0,
    latency: float = 0.0,
    jitter: float = 0.0,
    default_behavior: str | None = None,
    announce: Callable[[str], None] | None = print,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; ``announce`` receives the base URL line."""
    _raise_fd_limit()
    server = FakeLLMServer(
        host,
        port,
        profile=profile,
        seed=seed,
        latency=latency,
        jitter=jitter,
        default_behavior=default_behavior,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await server.start()
        if announce is not None:
            cfg = server.config
            announce(f"fake LLM listening on {server.url} (profile {cfg.profile}, seed {cfg.seed})")
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.harness.fakellm`` entry point (same options as ``llmpipe fake-llm``)."""
    parser = argparse.ArgumentParser(prog="fakellm", description="Scripted fake OpenAI server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--profile", default="valid=1", help='e.g. "valid=0.7,invalid_json=0.3"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="mean seconds per answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="fraction, e.g. 0.2 = ±20%%")
    parser.add_argument("--default-behavior", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        parse_profile(args.profile)
        _check_latency(args.latency, args.jitter)
        if args.default_behavior:
            parse_behavior(args.default_behavior)
    except ValueError as exc:
        parser.error(str(exc))
    serve(
        args.host,
        args.port,
        profile=args.profile,
        seed=args.seed,
        latency=args.latency,
        jitter=args.jitter,
        default_behavior=args.default_behavior,
    )
    return 0
