"""The review web UI: server-rendered pages, plain forms, one small static script.

Security posture, in the order a request meets it:

* :mod:`pipeline.review.hardening` wraps everything: the client address and scheme
  (forwarding headers only from trusted proxies), the body capped and read with
  timeouts before anything parses it (uploads refused), and the security headers
  (a Content-Security-Policy without inline code, no framing, nosniff) on every
  response, errors included.
* Every template is rendered with autoescaping on, and every value passes through
  :func:`pipeline.review.display.finalize`, which also shows bidi controls, NUL and
  other invisible characters as visible markers.
* Sessions live on the server (:class:`pipeline.review.auth.SessionManager`); every
  POST other than the login needs a live session *and* its CSRF token, checked before
  the form is parsed for the session and right after for the token; cross-site
  requests are refused. Logins are throttled with growing delays, answered after the
  same time whatever the outcome.
* Reviewers decide; admins also manage sessions and users, release others' claims
  and read the audit log of everybody.

Pages are methods of :class:`ReviewWeb`, registered in :meth:`ReviewWeb.routes`: a new
page is a method plus a route, using :meth:`page` (logged-in GET) or :meth:`action`
(CSRF-checked POST) for the checks.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from pipeline.review.auth import (
    DEVICE_COOKIE,
    ROLES,
    SESSION_COOKIE,
    LoginThrottle,
    Role,
    Scope,
    Session,
    SessionManager,
    SessionPolicy,
    SessionSigner,
    ThrottlePolicy,
    UsersFile,
    address_key,
)
from pipeline.review.calibration import calibrate, samples_from_rows, shown_rows
from pipeline.review.display import (
    as_value,
    finalize,
    format_age,
    format_ts,
    plain,
    pretty,
)
from pipeline.review.hardening import Hardened, HttpLimits, client_host
from pipeline.review.inputs import (
    InputError,
    bounded_float,
    bounded_int,
    choice,
    parse_form,
)
from pipeline.review.model import QUEUE_SORTS, QueueFilter, QueueSort
from pipeline.review.service import ReviewError, ReviewService
from pipeline.review.store import StoreUnavailable

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

MAX_VERSION = 2**31 - 1
MAX_AGE_MINUTES = 10 * 365 * 24 * 60
MAX_TEXT_PARAM = 300
FILTER_FIELDS = ("prompt", "version", "reason", "min_age", "max_age", "min_conf", "max_conf")
ANONYMOUS_NOTICES = {
    "loggedout": "You are logged out.",
    "ended": "Your session has ended (logged out, idle too long, expired, or the password "
    "changed). Log in again.",
}
LOGIN_ERROR = "Unknown user or wrong password."
SORT_NAMES: dict[QueueSort, str] = {
    "age": "oldest first",
    "-age": "newest first",
    "confidence": "least confident first",
    "-confidence": "most confident first",
    "reason": "by reason, oldest first",
}


@dataclass(frozen=True)
class ReviewConfig:
    users: UsersFile
    signer: SessionSigner
    cookie_secure: bool = False
    """Force ``Secure`` cookies; they are Secure anyway whenever the request is HTTPS."""
    sessions: SessionPolicy = field(default_factory=SessionPolicy)
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    http: HttpLimits = field(default_factory=HttpLimits)
    login_answer_s: float = 0.5
    """Every login answer waits until this long after the request arrived, so the time
    it takes says nothing about the name, the password or the throttle."""


Form = dict[str, str]
Handler = Callable[[Request, Session, Form], Awaitable[Response]]
PageHandler = Callable[[Request, Session], Awaitable[Response]]


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # for every template, whatever its extension
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=finalize,
    )
    env.filters["age"] = format_age
    env.filters["ts"] = format_ts
    env.filters["pretty"] = pretty
    env.filters["plain"] = plain
    env.filters["as_value"] = as_value
    env.globals["item_url"] = item_url
    env.globals["params_query"] = params_query
    env.globals["sort_names"] = SORT_NAMES
    return env


def params_query(params: Mapping[str, str], **overrides: str) -> str:
    """The queue's query string with some parameters replaced (sort links)."""
    merged = {**params, **overrides}
    return urlencode({k: _encodable(v) for k, v in merged.items() if v})


def item_url(request_id: str, **extra: str) -> str:
    return "/item?" + urlencode({"id": _encodable(request_id), **extra})


def _encodable(text: str) -> str:
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _text_param(value: str | None) -> str | None:
    return value[:MAX_TEXT_PARAM] if value else None


def queue_filter(params: Mapping[str, str]) -> tuple[QueueFilter, list[str]]:
    """Filters from a query string or form; an invalid one is ignored and reported."""
    errors: list[str] = []

    def take(parse: Callable[..., Any], *args: Any) -> Any:
        try:
            return parse(*args)
        except InputError as exc:
            errors.append(str(exc))
            return None

    min_age = take(bounded_int, params.get("min_age"), 0, MAX_AGE_MINUTES, "min_age")
    max_age = take(bounded_int, params.get("max_age"), 0, MAX_AGE_MINUTES, "max_age")
    sort = take(choice, params.get("sort"), QUEUE_SORTS, "sort")
    chosen: QueueSort = "age"
    for option in get_args(QueueSort):
        if option == sort:
            chosen = option
    query = QueueFilter(
        prompt=_text_param(params.get("prompt")),
        version=take(bounded_int, params.get("version"), 1, MAX_VERSION, "version"),
        reason=_text_param(params.get("reason")),
        min_age_ms=min_age * 60_000 if min_age is not None else None,
        max_age_ms=max_age * 60_000 if max_age is not None else None,
        min_confidence=take(bounded_float, params.get("min_conf"), 0.0, 1.0, "min_conf"),
        max_confidence=take(bounded_float, params.get("max_conf"), 0.0, 1.0, "max_conf"),
        sort=chosen,
    )
    return query, errors


def _safe_next(target: str | None) -> str:
    """Only same-site paths: a login must never redirect to another host."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or not target.isprintable()
        or len(target) > 2000
    ):
        return "/"
    return target


class ReviewWeb:
    """The pages and actions; one instance per app."""

    def __init__(self, service: ReviewService, config: ReviewConfig) -> None:
        self.service = service
        self.config = config
        self.env = _environment()
        self.sessions = SessionManager(
            service.store, config.users, config.signer, service.clock, config.sessions
        )
        self.throttle = LoginThrottle(config.throttle, clock=lambda: service.clock() / 1000)

    # -- plumbing -----------------------------------------------------------------------

    async def session_of(self, request: Request) -> Session | None:
        return await run_in_threadpool(self.sessions.check, request.cookies.get(SESSION_COOKIE))

    def secure(self, request: Request) -> bool:
        return self.config.cookie_secure or request.scope.get("scheme") == "https"

    def set_cookie(
        self, request: Request, response: Response, name: str, value: str, max_age: int
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            httponly=True,
            samesite="strict",
            secure=self.secure(request),
        )

    async def render(
        self,
        request: Request,
        template: str,
        context: dict[str, Any],
        *,
        session: Session | None = None,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> HTMLResponse:
        """A page; visitors without a session get an anonymous one (for the CSRF token)."""
        cookie = None
        if session is None:
            session = await self.session_of(request)
        if session is None:
            session, cookie = self.sessions.anonymous()
        notice = context.pop("notice", None)
        if session.user is not None:
            notice = await run_in_threadpool(self.sessions.take_flash, session) or notice
        body = self.env.get_template(template).render(
            **context,
            notice=notice,
            user=session.user,
            is_admin=session.is_admin,
            csrf_token=self.config.signer.csrf_token(session),
            service_ready=self.service.ready,
        )
        response = HTMLResponse(body, status_code=status, headers=headers)
        if cookie is not None:
            lifetime = self.config.sessions.anonymous_lifetime_s
            self.set_cookie(request, response, SESSION_COOKIE, cookie, lifetime)
        return response

    async def error(self, request: Request, status: int, message: str) -> HTMLResponse:
        return await self.render(
            request, "error.html", {"status": status, "message": message}, status=status
        )

    def error_bytes(self, status: int, message: str) -> bytes:
        """The error page without a request (for the hardening layer's refusals)."""
        return (
            self.env.get_template("error.html")
            .render(
                status=status,
                message=message,
                notice=None,
                user=None,
                is_admin=False,
                csrf_token="",
                service_ready=self.service.ready,
            )
            .encode("utf-8")
        )

    @staticmethod
    def cross_site(request: Request) -> bool:
        """Defence in depth behind the CSRF token, from what browsers tell us.

        ``Sec-Fetch-Site`` is authoritative where sent (every current browser);
        otherwise a real ``Origin`` must be ours. ``Origin: null`` alone proves nothing
        (browsers send it under some referrer policies), so the token decides then.
        """
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None:
            return fetch_site not in ("same-origin", "none")
        origin = request.headers.get("origin")
        if origin and origin != "null":
            try:
                netloc = urlsplit(origin).netloc
            except ValueError:
                return True
            return netloc != request.headers.get("host", "")
        return False

    async def form(self, request: Request) -> Form:
        """The body (already capped and fully read by the hardening layer), parsed."""
        return parse_form(await request.body(), request.headers.get("content-type"))

    async def to_login(self, request: Request) -> Response:
        query = bytes(request.scope.get("query_string", b"")).decode("latin-1")
        target = str(request.scope.get("path", "/")) + (f"?{query}" if query else "")
        params = {"next": _encodable(target)}
        data = self.config.signer.loads(request.cookies.get(SESSION_COOKIE))
        if data is not None and data.get("u") is not None:
            params["notice"] = "ended"
        return RedirectResponse("/login?" + urlencode(params), status_code=303)

    def page(
        self, handler: PageHandler, *, admin: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """A GET page for logged-in users (admins only with ``admin``)."""

        async def endpoint(request: Request) -> Response:
            session = await self.session_of(request)
            if session is None or session.user is None:
                return await self.to_login(request)
            if admin and not session.is_admin:
                return await self.error(request, 403, "Only admins can see this page.")
            return await handler(request, session)

        return endpoint

    def action(
        self, handler: Handler, *, admin: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """A POST: same site, a live session, then the form, then that session's token."""

        async def endpoint(request: Request) -> Response:
            if self.cross_site(request):
                return await self.error(request, 403, "Cross-site request refused.")
            session = await self.session_of(request)
            if session is None or session.user is None:
                return await self.error(
                    request, 403, "Log in first: anonymous changes are refused."
                )
            if admin and not session.is_admin:
                return await self.error(request, 403, "Only admins can do this.")
            try:
                form = await self.form(request)
            except InputError as exc:
                return await self.error(request, exc.status, str(exc))
            if not self.config.signer.check_csrf(session, form.get("csrf_token")):
                return await self.error(request, 403, "Missing or invalid CSRF token.")
            return await handler(request, session, form)

        return endpoint

    async def flash_to(self, session: Session, text: str, url: str) -> Response:
        await run_in_threadpool(self.sessions.flash, session, text)
        return RedirectResponse(url, status_code=303)

    # -- login and logout ---------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        notice = ANONYMOUS_NOTICES.get(request.query_params.get("notice", ""))
        context = {"next": _safe_next(request.query_params.get("next")), "error": None}
        return await self.render(request, "login.html", {**context, "notice": notice})

    async def login(self, request: Request) -> Response:
        """Padded to ``login_answer_s``: throttled, unknown, wrong and right alike."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await self._login(request)
        await asyncio.sleep(max(0.0, self.config.login_answer_s - (loop.time() - started)))
        return response

    async def _login(self, request: Request) -> Response:
        if self.cross_site(request):
            return await self.error(request, 403, "Cross-site request refused.")
        session = await self.session_of(request)
        try:
            form = await self.form(request)
        except InputError as exc:
            return await self.error(request, exc.status, str(exc))
        if not self.config.signer.check_csrf(session, form.get("csrf_token")):
            return await self.error(request, 403, "Missing or invalid CSRF token; reload the page.")
        name = form.get("username", "").strip()[:64]
        password = form.get("password", "")
        next_url = _safe_next(form.get("next", "/"))
        device = self.sessions.device(request.cookies.get(DEVICE_COOKIE), name)
        keys: list[tuple[Scope, str]] = [("address", address_key(client_host(request.scope)))]
        if device is not None:  # this browser logged in as this user before
            keys.append(("device", device))
        else:
            keys += [("name", name.lower()), ("global", "")]
        wait = self.throttle.wait_s(keys)
        context: dict[str, Any] = {"next": next_url}
        if wait > 0:
            seconds = math.ceil(wait)
            message = f"Too many attempts; try again in {seconds} s."
            return await self.render(
                request,
                "login.html",
                {**context, "error": message},
                status=429,
                headers={"retry-after": str(seconds)},
            )
        user = await run_in_threadpool(self.config.users.verify, name, password)
        if user is None:
            self.throttle.failed(keys)
            return await self.render(
                request, "login.html", {**context, "error": LOGIN_ERROR}, status=401
            )
        self.throttle.succeeded(keys)
        _, cookie = await run_in_threadpool(self.sessions.open, user)
        response = RedirectResponse(next_url, status_code=303)
        policy = self.config.sessions
        self.set_cookie(request, response, SESSION_COOKIE, cookie, policy.lifetime_s)
        if device is None:
            device_cookie = self.sessions.device_cookie(user.name)
            self.set_cookie(
                request, response, DEVICE_COOKIE, device_cookie, policy.device_lifetime_s
            )
        return response

    async def logout(self, request: Request, session: Session, form: Form) -> Response:
        """Ends every session of this reviewer, on every browser, not just this cookie."""
        assert session.user is not None
        await run_in_threadpool(self.sessions.end_all, session.user)
        response = RedirectResponse("/login?notice=loggedout", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=self.secure(request), httponly=True, samesite="strict"
        )
        return response

    # -- queue and items ----------------------------------------------------------------

    async def queue(self, request: Request, session: Session) -> Response:
        params = dict(request.query_params)
        query, errors = queue_filter(params)
        rows = await run_in_threadpool(self.service.queue_rows, query)
        facets = await run_in_threadpool(self.service.facets)
        context = {
            "rows": rows,
            "facets": facets,
            "params": {k: params.get(k, "") for k in (*FILTER_FIELDS, "sort")},
            "sort": query.sort,
            "sorts": QUEUE_SORTS,
            "filter_errors": errors,
            "sla_ms": self.service.sla_ms,
        }
        status = 400 if errors else 200
        return await self.render(request, "queue.html", context, session=session, status=status)

    async def item_page(self, request: Request, session: Session) -> Response:
        return await self.item_response(request, session, request.query_params.get("id", ""))

    async def item_response(
        self,
        request: Request,
        session: Session,
        request_id: str,
        *,
        errors: list[str] | None = None,
        message: str | None = None,
        draft: str | None = None,
        status: int = 200,
    ) -> Response:
        try:
            view = await run_in_threadpool(self.service.view, request_id)
        except ReviewError as exc:
            return await self.error(request, exc.status, str(exc))
        context = {
            "view": view,
            "me": session.user,
            "errors": errors or [],
            "error_message": message,
            "draft": draft,
            "sla_ms": self.service.sla_ms,
            "lease_ms": self.service.lease_ms,
        }
        return await self.render(request, "item.html", context, session=session, status=status)

    async def claim(self, request: Request, session: Session, form: Form) -> Response:
        assert session.user is not None
        request_id = form.get("request_id", "")
        outcome = await run_in_threadpool(self.service.claim, request_id, session.user)
        if outcome.status == "missing":
            return await self.error(request, 404, "No such review item.")
        if not outcome.ok:
            reason = (
                "This item is already decided."
                if outcome.status == "decided"
                else f"Claimed by {outcome.holder} until {format_ts(outcome.lease_until_ms)}."
            )
            return await self.item_response(
                request, session, request_id, message=reason, status=409
            )
        notice = "You hold this item now."
        if outcome.status == "renewed":
            notice = "Your claim is renewed."
        elif outcome.status == "taken_over":
            notice = f"You hold this item now ({outcome.previous_holder}'s lease had expired)."
        return await self.flash_to(session, notice, item_url(request_id))

    async def claim_next(self, request: Request, session: Session, form: Form) -> Response:
        assert session.user is not None
        query, _ = queue_filter(form)
        request_id = await run_in_threadpool(self.service.claim_next, session.user, query)
        if request_id is None:
            return await self.flash_to(session, "No free item matches these filters.", "/")
        return await self.flash_to(session, "You hold this item now.", item_url(request_id))

    async def release(self, request: Request, session: Session, form: Form) -> Response:
        assert session.user is not None
        request_id = form.get("request_id", "")
        holder = form.get("holder") or None
        if holder is not None and holder != session.user and not session.is_admin:
            return await self.error(
                request, 403, "Only admins can release another reviewer's claim."
            )
        released = await run_in_threadpool(
            lambda: self.service.release(request_id, session.user or "", holder=holder)
        )
        if not released:
            text = "Nothing was released: that claim was not live (expired, decided or not held)."
            return await self.flash_to(session, text, item_url(request_id))
        who = f"{holder}'s claim" if holder and holder != session.user else "Your claim"
        return await self.flash_to(session, f"{who} is released; the item is free.", "/")

    async def decide(self, request: Request, session: Session, form: Form) -> Response:
        assert session.user is not None
        request_id = form.get("request_id", "")
        action = form.get("action", "")
        reviewer = session.user
        try:
            outcome = await run_in_threadpool(
                lambda: self.service.decide(
                    request_id,
                    reviewer,
                    action,
                    output_text=form.get("output"),
                    reason=form.get("reason"),
                    question=form.get("question"),
                )
            )
        except ReviewError as exc:
            return await self.item_response(
                request,
                session,
                request_id,
                errors=exc.errors,
                message=str(exc),
                draft=form.get("output") if action == "edit" else None,
                status=exc.status,
            )
        if outcome.duplicate:
            notice = "This item was already decided; nothing was changed."
        elif outcome.delivered:
            notice = "Decision recorded and delivered."
        else:
            notice = "Decision recorded; delivery to Kafka is pending and will be retried."
        return await self.flash_to(session, notice, item_url(request_id))

    # -- admin --------------------------------------------------------------------------

    async def users_page(self, request: Request, session: Session) -> Response:
        users = await run_in_threadpool(self.config.users.load)
        counts = await run_in_threadpool(self.service.store.session_counts)
        rows = [(u, counts.get(u.name, 0)) for u in sorted(users.values(), key=lambda u: u.name)]
        return await self.render(
            request, "users.html", {"rows": rows, "roles": ROLES}, session=session
        )

    async def end_sessions(self, request: Request, session: Session, form: Form) -> Response:
        name = form.get("user", "")
        ended = await run_in_threadpool(self.sessions.end_all, name)
        return await self.flash_to(session, f"Ended {ended} session(s) of {name}.", "/admin/users")

    async def set_role(self, request: Request, session: Session, form: Form) -> Response:
        name, role = form.get("user", ""), form.get("role", "")
        if role not in ROLES or self.config.users.get(name) is None:
            return await self.error(request, 400, "Unknown user or role.")
        chosen: Role = "admin" if role == "admin" else "reviewer"
        await run_in_threadpool(self.config.users.set_role, name, chosen)
        return await self.flash_to(session, f"{name} is now {chosen}.", "/admin/users")

    async def remove_user(self, request: Request, session: Session, form: Form) -> Response:
        name = form.get("user", "")
        if name == session.user:
            return await self.error(request, 400, "You cannot remove yourself.")
        removed = await run_in_threadpool(self.config.users.remove, name)
        ended = await run_in_threadpool(self.sessions.end_all, name)
        text = f"Removed {name}; ended {ended} session(s)." if removed else f"No user {name}."
        return await self.flash_to(session, text, "/admin/users")

    async def audit_page(self, request: Request, session: Session) -> Response:
        actor = _text_param(request.query_params.get("actor"))
        entries = await run_in_threadpool(self.service.audit_log, actor)
        return await self.render(
            request, "audit.html", {"entries": entries, "actor": actor or ""}, session=session
        )

    async def calibration_page(self, request: Request, session: Session) -> Response:
        """Per-prompt calibration from the verdicts in this service's database."""
        names = self.service.registry.names()
        prompt = _text_param(request.query_params.get("prompt")) or (names[0] if names else None)
        raw_target = _text_param(request.query_params.get("target")) or "0.02"
        try:
            target = float(raw_target)
        except ValueError:
            target = -1.0
        if not 0 < target <= 0.5:
            return await self.error(request, 400, "The target must be a number in (0, 0.5].")
        if prompt is not None and prompt not in names:
            return await self.error(request, 404, "No such prompt.")
        report = []
        if prompt is not None:
            rows = await run_in_threadpool(self.service.store.calibration_rows, prompt)
            report = calibrate(prompt, samples_from_rows(rows), self.service.registry, target)
        context = {
            "prompts": names,
            "prompt": prompt,
            "target": target,
            "report": report,
            "rows": {part.version: shown_rows(part) for part in report},
        }
        return await self.render(request, "calibration.html", context, session=session)

    # -- the app ------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        ready = self.service.ready and self.service.store.available
        body = {"ready": ready, "database": self.service.store.available}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def unavailable(self, request: Request, exc: Exception) -> Response:
        """The database is down or restarting: a 503 page, drawn without touching it (no
        session lookup), with a hint to retry; the store reconnects by itself."""
        message = "The review database is unavailable right now; try again in a few seconds."
        return HTMLResponse(
            self.error_bytes(503, message), status_code=503, headers={"Retry-After": "5"}
        )

    async def http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        messages = {404: "Not found.", 405: "Method not allowed here."}
        return await self.error(request, status, messages.get(status, "Request refused."))

    def routes(self) -> list[Route | Mount]:
        page, action = self.page, self.action
        return [
            Route("/", page(self.queue), methods=["GET"]),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", action(self.logout), methods=["POST"]),
            Route("/item", page(self.item_page), methods=["GET"]),
            Route("/claim", action(self.claim), methods=["POST"]),
            Route("/claim-next", action(self.claim_next), methods=["POST"]),
            Route("/release", action(self.release), methods=["POST"]),
            Route("/decide", action(self.decide), methods=["POST"]),
            Route("/admin/users", page(self.users_page, admin=True), methods=["GET"]),
            Route("/admin/end-sessions", action(self.end_sessions, admin=True), methods=["POST"]),
            Route("/admin/role", action(self.set_role, admin=True), methods=["POST"]),
            Route("/admin/remove", action(self.remove_user, admin=True), methods=["POST"]),
            Route("/audit", page(self.audit_page, admin=True), methods=["GET"]),
            Route("/calibration", page(self.calibration_page), methods=["GET"]),
            Route("/healthz", self.health, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
        ]


def create_app(
    service: ReviewService,
    config: ReviewConfig,
    *,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> ASGIApp:
    """The ASGI app. Starting the service (Kafka follower etc.) is the caller's business,
    passed in as hooks, so tests can drive the app with an in-memory service."""
    web = ReviewWeb(service, config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = Starlette(
        routes=web.routes(),
        lifespan=lifespan,
        exception_handlers={
            404: web.http_error,
            405: web.http_error,
            StoreUnavailable: web.unavailable,
        },
    )
    return Hardened(app, config.http, web.error_bytes)


def new_secret() -> bytes:
    return secrets.token_bytes(32)
