"""The review web UI: server-rendered pages, plain forms, one small static script.

Security posture, in the order a request meets it:

* Every response carries a Content-Security-Policy that allows scripts and styles only
  from this origin's ``/static/`` files (no inline code at all, so an injected
  ``<script>`` or ``onerror=`` would not run even if escaping failed), forbids framing
  and restricts form targets to this origin.
* Every template is rendered with autoescaping on, whatever its file name; request
  variables, model output and raw text are only ever shown as text.
* Every POST other than the login itself needs a signed session of a logged-in reviewer
  *and* the CSRF token bound to that session (the login POST needs the token of the
  anonymous session); anything else is a 403 before the handler runs. Cross-site
  requests (``Sec-Fetch-Site: cross-site`` or a foreign ``Origin``) are refused too.
* The session cookie is HttpOnly, SameSite=Strict, and Secure when served over HTTPS.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.review.auth import (
    SESSION_COOKIE,
    LoginThrottle,
    Session,
    SessionSigner,
    UsersFile,
)
from pipeline.review.model import QueueFilter, ms_to_datetime
from pipeline.review.service import ReviewError, ReviewService

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
NOTICES = {
    "decided": "Decision recorded and delivered.",
    "pending": "Decision recorded; delivery to Kafka is pending and will be retried.",
    "duplicate": "This item was already decided; nothing was changed.",
    "claimed": "You hold this item now.",
    "released": "Item released.",
    "nothing": "No free item matches these filters.",
    "loggedout": "You are logged out.",
}


@dataclass(frozen=True)
class ReviewConfig:
    users: UsersFile
    signer: SessionSigner
    cookie_secure: bool = False


class SecurityHeaders:
    """Pure ASGI middleware: headers on every response, including errors and static files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {name for name, _ in SECURITY_HEADERS}
                ]
                headers.extend(SECURITY_HEADERS)
                if not scope["path"].startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # for every template, whatever its extension
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = format_age
    env.filters["ts"] = format_ts
    env.filters["pretty"] = lambda value: json.dumps(value, indent=2, ensure_ascii=False)
    env.globals["item_url"] = item_url
    return env


def format_age(ms: int) -> str:
    minutes = ms // 60_000
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def format_ts(ms: int | None) -> str:
    if ms is None:
        return ""
    return ms_to_datetime(ms).strftime("%Y-%m-%d %H:%M:%S UTC")


def item_url(request_id: str, **extra: str) -> str:
    return "/item?" + urlencode({"id": request_id, **extra})


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        return None


def queue_filter(params: Mapping[str, Any]) -> QueueFilter:
    min_age = _int(params.get("min_age"))
    max_age = _int(params.get("max_age"))
    return QueueFilter(
        prompt=_text(params.get("prompt")),
        version=_int(params.get("version")),
        reason=_text(params.get("reason")),
        min_age_ms=min_age * 60_000 if min_age is not None else None,
        max_age_ms=max_age * 60_000 if max_age is not None else None,
    )


def _safe_next(target: str | None) -> str:
    """Only same-site paths: a login must never redirect to another host."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def create_app(
    service: ReviewService,
    config: ReviewConfig,
    *,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> Starlette:
    """The ASGI app. Starting the service (Kafka follower etc.) is the caller's business,
    passed in as hooks, so tests can drive the app with an in-memory service."""
    env = _environment()
    signer = config.signer
    throttle = LoginThrottle()

    def session_of(request: Request) -> Session | None:
        return signer.loads(request.cookies.get(SESSION_COOKIE))

    def set_cookie(response: Response, session: Session) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            signer.dumps(session),
            max_age=signer.max_age_s,
            path="/",
            httponly=True,
            samesite="strict",
            secure=config.cookie_secure,
        )

    def render(
        request: Request,
        template: str,
        context: dict[str, Any],
        *,
        session: Session | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        fresh = session is None
        session = session or session_of(request) or signer.new()
        body = env.get_template(template).render(
            **{"notice": None, **context},
            user=session.user,
            csrf_token=signer.csrf_token(session),
            service_ready=service.ready,
        )
        response = HTMLResponse(body, status_code=status)
        if fresh and session_of(request) is None:
            set_cookie(response, session)
        return response

    def error_page(request: Request, status: int, message: str) -> HTMLResponse:
        return render(request, "error.html", {"status": status, "message": message}, status=status)

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
            return urlsplit(origin).netloc != request.headers.get("host", "")
        return False

    Handler = Callable[[Request, Session, FormData], Awaitable[Response]]

    def guarded(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """No anonymous writes, no writes without the session's CSRF token."""

        async def endpoint(request: Request) -> Response:
            session = session_of(request)
            form = await request.form()
            if cross_site(request):
                return error_page(request, 403, "Cross-site request refused.")
            if session is None or session.user is None:
                return error_page(request, 403, "Log in first: anonymous changes are refused.")
            token = form.get("csrf_token")
            if not signer.check_csrf(session, token if isinstance(token, str) else None):
                return error_page(request, 403, "Missing or invalid CSRF token.")
            return await handler(request, session, form)

        return endpoint

    def logged_in(request: Request) -> Session | None:
        session = session_of(request)
        return session if session is not None and session.user is not None else None

    def to_login(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)

    # -- pages --------------------------------------------------------------------------

    async def login_page(request: Request) -> Response:
        return render(
            request,
            "login.html",
            {
                "next": _safe_next(request.query_params.get("next")),
                "error": None,
                "notice": NOTICES.get(request.query_params.get("notice", "")),
            },
        )

    async def login(request: Request) -> Response:
        session = session_of(request)
        form = await request.form()
        token = form.get("csrf_token")
        if cross_site(request) or not signer.check_csrf(
            session, token if isinstance(token, str) else None
        ):
            return error_page(request, 403, "Missing or invalid CSRF token; reload the page.")
        name = str(form.get("username", "")).strip()
        password = str(form.get("password", ""))
        next_url = _safe_next(str(form.get("next", "/")))
        if throttle.blocked(name):
            ok = False
        else:
            ok = await run_in_threadpool(config.users.verify, name, password)
        if not ok:
            throttle.failed(name)
            context = {"next": next_url, "error": "Unknown user or wrong password.", "notice": None}
            return render(request, "login.html", context, status=401)
        throttle.succeeded(name)
        response = RedirectResponse(next_url, status_code=303)
        set_cookie(response, signer.new(name))  # a new session id: no fixation
        return response

    async def logout(request: Request, session: Session, form: FormData) -> Response:
        response = RedirectResponse("/login?notice=loggedout", status_code=303)
        set_cookie(response, signer.new())
        return response

    async def queue(request: Request) -> Response:
        session = logged_in(request)
        if session is None:
            return to_login(request)
        query = queue_filter(request.query_params)
        items = await run_in_threadpool(service.queue, query)
        facets = await run_in_threadpool(service.facets)
        now = service.clock()
        rows = [
            {
                "item": item,
                "age_ms": item.age_ms(now),
                "overdue": item.age_ms(now) >= service.sla_ms,
                "holder": item.holder(now),
            }
            for item in items
        ]
        context = {
            "rows": rows,
            "facets": facets,
            "params": {
                k: request.query_params.get(k, "")
                for k in ("prompt", "version", "reason", "min_age", "max_age")
            },
            "sla_ms": service.sla_ms,
            "notice": NOTICES.get(request.query_params.get("notice", "")),
            "now_ms": now,
        }
        return render(request, "queue.html", context, session=session)

    async def item_page(request: Request) -> Response:
        session = logged_in(request)
        if session is None:
            return to_login(request)
        return await _item_response(request, session, request.query_params.get("id", ""))

    async def _item_response(
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
            view = await run_in_threadpool(service.view, request_id)
        except ReviewError as exc:
            return error_page(request, exc.status, str(exc))
        context = {
            "view": view,
            "me": session.user,
            "errors": errors or [],
            "error_message": message,
            "draft": draft if draft is not None else (view.output_json or "{}"),
            "notice": NOTICES.get(request.query_params.get("notice", "")),
            "sla_ms": service.sla_ms,
            "lease_ms": service.lease_ms,
        }
        return render(request, "item.html", context, session=session, status=status)

    # -- actions ------------------------------------------------------------------------

    async def claim(request: Request, session: Session, form: FormData) -> Response:
        request_id = str(form.get("request_id", ""))
        assert session.user is not None
        outcome = await run_in_threadpool(service.claim, request_id, session.user)
        if outcome.status == "missing":
            return error_page(request, 404, "No such review item.")
        if not outcome.ok:
            reason = (
                "This item is already decided."
                if outcome.status == "decided"
                else f"Claimed by {outcome.holder} until {format_ts(outcome.lease_until_ms)}."
            )
            return await _item_response(request, session, request_id, message=reason, status=409)
        return RedirectResponse(item_url(request_id, notice="claimed"), status_code=303)

    async def claim_next(request: Request, session: Session, form: FormData) -> Response:
        assert session.user is not None
        query = queue_filter(form)
        request_id = await run_in_threadpool(service.claim_next, session.user, query)
        if request_id is None:
            return RedirectResponse("/?notice=nothing", status_code=303)
        return RedirectResponse(item_url(request_id, notice="claimed"), status_code=303)

    async def release(request: Request, session: Session, form: FormData) -> Response:
        assert session.user is not None
        request_id = str(form.get("request_id", ""))
        await run_in_threadpool(service.release, request_id, session.user)
        return RedirectResponse("/?notice=released", status_code=303)

    async def decide(request: Request, session: Session, form: FormData) -> Response:
        assert session.user is not None
        request_id = str(form.get("request_id", ""))
        action = str(form.get("action", ""))

        def field(name: str) -> str | None:
            value = form.get(name)
            return value if isinstance(value, str) else None

        try:
            outcome = await run_in_threadpool(
                lambda: service.decide(
                    request_id,
                    str(session.user),
                    action,
                    output_text=field("output"),
                    reason=field("reason"),
                    question=field("question"),
                )
            )
        except ReviewError as exc:
            return await _item_response(
                request,
                session,
                request_id,
                errors=exc.errors,
                message=str(exc),
                draft=field("output") if action == "edit" else None,
                status=exc.status,
            )
        notice = "duplicate" if outcome.duplicate else "decided" if outcome.delivered else "pending"
        return RedirectResponse(item_url(request_id, notice=notice), status_code=303)

    async def health(request: Request) -> Response:
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    routes = [
        Route("/", queue, methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", guarded(logout), methods=["POST"]),
        Route("/item", item_page, methods=["GET"]),
        Route("/claim", guarded(claim), methods=["POST"]),
        Route("/claim-next", guarded(claim_next), methods=["POST"]),
        Route("/release", guarded(release), methods=["POST"]),
        Route("/decide", guarded(decide), methods=["POST"]),
        Route("/healthz", health, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(SecurityHeaders)
    return app


def new_secret() -> bytes:
    return secrets.token_bytes(32)
