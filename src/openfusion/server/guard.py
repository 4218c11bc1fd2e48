"""``BrowserGuard``: a server without API keys answers programs, not web pages.

A keyless server on loopback trusts whoever can reach it, and a web page in the user's browser
can reach it too: a "simple" cross-site POST (``Content-Type: text/plain``, no preflight) runs a
fusion on the user's upstream keys, and DNS rebinding (a page's own name resolved to 127.0.0.1)
even lets it read the answer. A request that carries no verified key (``BearerAuth`` puts one in
``scope["state"]["api_key"]``; this guard sits inside it) must therefore:

- name an allowed ``Host``: a loopback name or address by default, plus ``[server]
  allowed_hosts`` (``"*"`` allows any) — else 421, which defeats rebinding;
- come from no browser origin other than the server's own (``Origin`` equal to
  ``http(s)://<Host>``) or one listed in ``[server] cors_origins`` — else 403;
- send its body as ``application/json`` — else 415: a browser cannot send that cross-site
  without a CORS preflight, which is refused unless ``cors_origins`` allows the origin.

A request with a key passes untouched: a browser cannot attach a bearer token cross-site; so
does ``/health`` (a load balancer's probe names no loopback host, and it says nothing). The
checks read the headers once, in plain ASGI (no per-request objects), so the hot path stays
cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from openfusion.server.auth import is_loopback

__all__ = ["BrowserGuard"]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BrowserGuard:
    """ASGI middleware: Host allow-list, foreign ``Origin`` refusal, JSON-only bodies for
    requests without a verified key (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
        open_paths: Iterable[str] = ("/health",),
    ) -> None:
        self.app = app
        self.open_paths = frozenset(open_paths)
        hosts = {h.strip().lower().rstrip(".") for h in allowed_hosts}
        self.any_host = "*" in hosts
        self.hosts = frozenset(hosts - {"*"})
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or "api_key" in scope.get("state", {})
            or scope["path"] in self.open_paths
        ):
            await self.app(scope, receive, send)
            return
        host = origin = content_type = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1").strip().lower()
            elif name == b"origin":
                origin = value.decode("latin-1").strip().rstrip("/").lower()
            elif name == b"content-type":
                content_type = value.decode("latin-1")
        refusal = self._refusal(scope["method"], host, origin, content_type)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message = refusal
        body = json.dumps({"error": {"code": status, "message": message, "metadata": {}}})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})

    def _refusal(
        self, method: str, host: str | None, origin: str | None, content_type: str | None
    ) -> tuple[int, str] | None:
        if host is None or not self._host_allowed(host):
            return 421, (
                f"Host {host!r} is not one this server answers to: a server without API keys "
                "answers loopback names only; add the name to [server] allowed_hosts in "
                "config.toml, or create an API key"
            )
        own = (f"http://{host}", f"https://{host}")
        if origin is not None and origin not in self.origins and origin not in own:
            return 403, (
                f"cross-origin request from {origin!r} refused: a server without API keys "
                "does not serve other web pages; list the origin in [server] cors_origins "
                "to allow it"
            )
        if method in BODY_METHODS:
            media_type = (content_type or "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                return 415, (
                    f"Content-Type {content_type!r} is not accepted: send the body as JSON "
                    "with the header `Content-Type: application/json`"
                )
        return None

    def _host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        name = _hostname(host)
        return name in self.hosts or host in self.hosts or is_loopback(name)


def _hostname(host: str) -> str:
    """``host`` without its port: ``[::1]:8000`` → ``::1``, ``localhost:80`` → ``localhost``."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    if name and port.isascii() and port.isdigit() and ":" not in name:
        return name.rstrip(".")
    return host.rstrip(".")
