"""``TraceViewer``: the pages, login and JSON of the trace viewer at ``/ui``.

The viewer is static HTML, CSS and plain JavaScript shipped in this package (``static/``,
``templates/``; no build step, nothing fetched from elsewhere). Its script reads runs from
``/ui/api/runs`` and ``/ui/api/runs/{id}``: the runs API itself (``RunsAPI``, same filters,
same rule of who sees which run), under the viewer's path so that its login cookie, scoped to
``/ui``, never authorises the rest of the API (a cookie that could post to
``/v1/chat/completions`` would let another site's page spend the user's credits).

Who gets in, by the server's ``KeyGate`` (the API's rule):

- keys configured: a request with ``Authorization: Bearer <key>``, or a browser logged in at
  ``/ui/login`` with an active key (a cookie holding a random session token: ``HttpOnly``,
  ``SameSite=Strict``, ``Path=/ui``; only its hash is stored, ``store/sessions.py``). A page
  without either is sent to the login; the JSON answers 401. An admin key sees every run,
  another key its own.
- no keys: only this machine (the connection's both ends on loopback, and a ``Host`` header
  that names loopback, so a DNS-rebinding page cannot read it through the user's browser);
  from anywhere else 403, even when the server was started with ``--insecure-no-auth``.

Every response carries a strict Content-Security-Policy (scripts and styles from this server
only): run records hold model output, which the script only ever inserts as text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openfusion.errors import ConfigError, StoreError
from openfusion.server.auth import KeyGate, bearer_token, is_loopback, refusal
from openfusion.server.errors import APIError
from openfusion.server.runs_api import RunsAPI, conditional_json
from openfusion.store import KeyRecord
from openfusion.store.keys import CREATE_HINT
from openfusion.store.sessions import SessionStore

__all__ = ["SESSION_COOKIE", "UI_PREFIX", "TraceViewer"]

log = logging.getLogger(__name__)

UI_PREFIX = "/ui"
SESSION_COOKIE = "openfusion_session"
HERE = Path(__file__).parent
MAX_LOGIN_BYTES = 4096
SAFE_NEXT = re.compile(r"/ui(?:/[A-Za-z0-9._~%/?=&+-]*)?")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
LOCAL_ONLY = (
    "the trace viewer of a server without API keys is shown only on this machine (open it at "
    f"http://127.0.0.1:PORT/ui); to open it from elsewhere, create a key with {CREATE_HINT} "
    "and log in with it"
)

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Visitor:
    """Who is looking: a key (``None``: a keyless server, seen from this machine) and how."""

    key: KeyRecord | None
    via: Literal["session", "bearer", "local"]


class TraceViewer:
    """The ``/ui`` routes over the runs API, the key gate and the login sessions."""

    def __init__(self, gate: KeyGate, sessions: SessionStore, runs: RunsAPI) -> None:
        self.gate = gate
        self.sessions = sessions
        self.runs = runs
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
        )

    def mount(self, app: ASGIApp) -> ASGIApp:
        """``app`` for every path but ``/ui`` and the paths under it, which the viewer answers
        (it checks keys itself, so that a browser may use its login cookie)."""
        return _UnderPrefix(UI_PREFIX, Router(self.routes(), default=_not_found), app)

    def routes(self) -> list[BaseRoute]:
        static = _Headers(StaticFiles(directory=HERE / "static"), {"Cache-Control": "no-cache"})
        return [
            Route(UI_PREFIX, _guarded(self.page), methods=["GET"]),
            Route(UI_PREFIX + "/", _guarded(self.page), methods=["GET"]),
            Route(UI_PREFIX + "/runs/{run_id}", _guarded(self.page), methods=["GET"]),
            Route(UI_PREFIX + "/login", _guarded(self.login_form), methods=["GET"]),
            Route(UI_PREFIX + "/login", _guarded(self.login), methods=["POST"]),
            Route(UI_PREFIX + "/logout", _guarded(self.logout), methods=["POST"]),
            Route(UI_PREFIX + "/api/me", _guarded(self.me), methods=["GET"]),
            Route(UI_PREFIX + "/api/runs", _guarded(self.run_list), methods=["GET"]),
            Route(UI_PREFIX + "/api/runs/{run_id}", _guarded(self.run), methods=["GET"]),
            Mount(UI_PREFIX + "/static", app=static),
        ]

    # --- pages ------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        """The run list (``/ui``) and a run's page (``/ui/runs/{id}``): one page whose
        script reads the path; a visitor without a key is sent to the login."""
        try:
            await self.visitor(request)
        except APIError as exc:
            if exc.status == 401 and bearer_token(request.scope) is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                response = _redirect(f"{UI_PREFIX}/login?next={quote(target, safe='/')}")
                if SESSION_COOKIE in request.cookies:  # expired, ended, or its key revoked
                    self._forget(request, response)
                return response
            return self._message(exc.status, "Not allowed", exc.message)
        return self._render("app.html", 200)

    async def login_form(self, request: Request) -> Response:
        if not await self.gate.enforcing():
            if not _from_this_machine(request):
                return self._message(403, "Not allowed", LOCAL_ONLY)
            return _redirect(UI_PREFIX)  # nothing to log in with: the viewer is open here
        return self._render("login.html", 200, next=_safe_next(request.query_params.get("next")))

    async def login(self, request: Request) -> Response:
        """Check the key from the form; on success start a session and set its cookie."""
        if not _same_origin(request):
            return self._message(403, "Not allowed", "a login must come from this server's page")
        fields = await _form(request)
        target = _safe_next(fields.get("next"))
        if not await self.gate.enforcing():
            return _redirect(target)
        key = await self.gate.verify(fields.get("key", "").strip())
        if key is None:
            message = "That key is not an active API key of this server."
            return self._render("login.html", 401, next=target, error=message)
        token = await self.sessions.start(key)
        response = _redirect(target)
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(self.sessions.lifetime.total_seconds()),
            path=UI_PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        log.info("trace viewer: key %s logged in", key.id)
        return response

    async def logout(self, request: Request) -> Response:
        if not _same_origin(request):
            return self._message(403, "Not allowed", "a logout must come from this server's page")
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            await self.sessions.end(token)
        response = _redirect(f"{UI_PREFIX}/login")
        self._forget(request, response)
        return response

    # --- JSON for the page's script ----------------------------------------------------------

    async def me(self, request: Request) -> Response:
        visitor = await self.visitor(request)
        key = visitor.key
        return conditional_json(
            request,
            {
                "via": visitor.via,
                "key": None if key is None else {"id": key.id, "name": key.name},
                "admin": key is None or key.admin,
            },
        )

    async def run_list(self, request: Request) -> Response:
        request.state.api_key = (await self.visitor(request)).key
        return conditional_json(request, await self.runs.list(request))

    async def run(self, request: Request) -> Response:
        request.state.api_key = (await self.visitor(request)).key
        return conditional_json(request, await self.runs.get(request))

    # --- who is looking ----------------------------------------------------------------------

    async def visitor(self, request: Request) -> Visitor:
        """The visitor, or an ``APIError``: 401 (no key, or not a valid one), 403 (a keyless
        server seen from elsewhere), 503 (the keys cannot be read)."""
        try:
            if not await self.gate.enforcing():
                if not _from_this_machine(request):
                    raise APIError(403, LOCAL_ONLY)
                return Visitor(None, "local")
            token = bearer_token(request.scope)
            if token is not None:
                key = await self.gate.verify(token)
                if key is None:
                    error = APIError(401, refusal(token))
                    error.headers["WWW-Authenticate"] = "Bearer"
                    raise error
                return Visitor(key, "bearer")
            session = request.cookies.get(SESSION_COOKIE)
            key = await self.sessions.verify(session) if session else None
        except (ConfigError, StoreError) as exc:
            log.error("trace viewer: refusing request: %s", exc)
            raise APIError(
                503, "the server cannot read its API keys now; its log says why"
            ) from exc
        if key is None:
            raise APIError(401, "log in at /ui/login with an API key of this server")
        return Visitor(key, "session")

    # --- helpers -----------------------------------------------------------------------------

    def _render(self, template: str, status: int, **context: object) -> Response:
        html = self.templates.get_template(template).render(**context)
        return HTMLResponse(html, status, headers={"Cache-Control": "no-store"})

    def _message(self, status: int, title: str, message: str) -> Response:
        return self._render("message.html", status, title=title, message=message)

    def _forget(self, request: Request, response: Response) -> None:
        response.delete_cookie(
            SESSION_COOKIE,
            path=UI_PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


def _guarded(endpoint: Endpoint) -> Endpoint:
    """The endpoint with the security headers on its answer, and an ``APIError`` (or a
    database that cannot be read: 503) as JSON."""

    async def wrapped(request: Request) -> Response:
        try:
            response = await endpoint(request)
        except APIError as exc:
            response = Response(
                exc.encode(), exc.status, exc.headers, media_type="application/json"
            )
        except (ConfigError, StoreError) as exc:  # the database is down: say so, not "500"
            log.error("trace viewer: %s %s: %s", request.method, request.url.path, exc)
            error = APIError(503, "the server cannot read its database now; its log says why")
            response = Response(error.encode(), 503, media_type="application/json")
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            error = APIError(500, "internal error; see the server log")
            response = Response(error.encode(), 500, media_type="application/json")
        response.headers.update(SECURITY_HEADERS)
        return response

    return wrapped


class _UnderPrefix:
    """ASGI: HTTP requests for ``prefix`` and the paths under it go to ``inner``, the rest
    (and the lifespan) to ``outer``."""

    def __init__(self, prefix: str, inner: ASGIApp, outer: ASGIApp) -> None:
        self.prefix, self.inner, self.outer = prefix, inner, outer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.inner(scope, receive, send)
        else:
            await self.outer(scope, receive, send)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    error = APIError(404, f"{scope['method']} {scope['path']}: not a page of the trace viewer")
    response = Response(error.encode(), 404, SECURITY_HEADERS, media_type="application/json")
    await response(scope, receive, send)


class _Headers:
    """ASGI middleware: the security headers (and ``extra``) on every response of ``app``."""

    def __init__(self, app: ASGIApp, extra: dict[str, str]) -> None:
        self.app = app
        self.headers = [
            (name.lower().encode(), value.encode())
            for name, value in {**SECURITY_HEADERS, **extra}.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _redirect(target: str) -> Response:
    return RedirectResponse(target, 303, headers={"Cache-Control": "no-store"})


def _safe_next(target: str | None) -> str:
    """Where to go after the login: a path of the viewer, never another site."""
    if target and SAFE_NEXT.fullmatch(target):
        return target
    return UI_PREFIX


def _from_this_machine(request: Request) -> bool:
    """Both ends of the connection on loopback, and a ``Host`` that names loopback."""
    server, client = request.scope.get("server"), request.scope.get("client")
    host = request.url.hostname or ""
    return bool(
        server and client and is_loopback(server[0]) and is_loopback(client[0])
    ) and is_loopback(host)


def _same_origin(request: Request) -> bool:
    """False when a browser says the form was posted from another site's page."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser, or one that sends none: SameSite guards the cookie
        return True
    return urlsplit(origin).netloc == request.headers.get("host")


async def _form(request: Request) -> dict[str, str]:
    """The login form's fields (url-encoded, small); a 400 when it is something else."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        raise APIError(400, "send the login form as application/x-www-form-urlencoded")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_LOGIN_BYTES:
            raise APIError(400, f"login form larger than {MAX_LOGIN_BYTES} bytes")
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    return {name: values[0] for name, values in fields.items()}
