"""The trace viewer's door and data, over HTTP on a real server: who gets in with and without
keys, the login session (cookie, hash-only storage, logout, revocation), the viewer's JSON and
its ETags. The pages drawn in a browser are tested in test_ui_browser.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
from helpers import create_key, in_store
from multidict import CIMultiDict
from server_fixtures import RunningServer, setup_demo

from openfusion.server.app import create_app
from openfusion.server.ui import SESSION_COOKIE
from openfusion.store import Store
from openfusion.store.keys import hash_key

Serve = Callable[..., RunningServer]
QUESTION = [{"role": "user", "content": "Who wrote Pride and Prejudice?"}]


async def get(
    server: RunningServer, path: str, *, headers: dict[str, str] | None = None, **params: str
) -> tuple[int, str, CIMultiDict[str]]:
    """A GET (redirects not followed): status, body, headers (any case)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            server.url + path, headers=headers or {}, params=params, allow_redirects=False
        ) as response,
    ):
        return response.status, await response.text(), CIMultiDict(response.headers)


async def post_form(
    server: RunningServer, path: str, fields: dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, str, aiohttp.ClientResponse]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.url + path, data=fields, headers=headers or {}, allow_redirects=False
        ) as response,
    ):
        return response.status, await response.text(), response


async def ask(server: RunningServer, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.base_url + "/chat/completions",
            json={"model": "openfusion/demo", "messages": QUESTION},
            headers=headers,
        ) as response,
    ):
        assert response.status == 200, await response.text()
        return response.headers["X-Generation-Id"]


async def log_in(server: RunningServer, key: str) -> tuple[str, str]:
    """Log in with ``key``: the session cookie's value and the raw ``Set-Cookie`` header."""
    status, _, response = await post_form(server, "/ui/login", {"key": key, "next": "/ui"})
    assert status == 303 and response.headers["Location"] == "/ui"
    raw = response.headers["Set-Cookie"]
    cookie = SimpleCookie(raw)[SESSION_COOKIE].value
    return cookie, raw


def with_cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={token}"}


async def test_without_keys_the_viewer_opens_on_this_machine(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    run_id = await ask(server)
    status, html, headers = await get(server, "/ui")
    assert status == 200 and '<div id="app"' in html and "/ui/static/app.js" in html
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, body, _ = await get(server, "/ui/api/runs")
    assert status == 200 and [r["id"] for r in json.loads(body)["data"]] == [run_id]
    status, body, _ = await get(server, "/ui/api/me")
    assert json.loads(body) == {"via": "local", "key": None, "admin": True}
    status, _, headers = await get(server, "/ui/login")
    assert status == 303 and headers["Location"] == "/ui"  # nothing to log in with
    status, script, headers = await get(server, "/ui/static/app.js")
    assert status == 200 and 'from "./run.js"' in script
    assert "javascript" in headers["Content-Type"] and "Content-Security-Policy" in headers
    status, script, _ = await get(server, "/ui/static/run.js")
    assert status == 200 and "export function runView" in script
    status, body, headers = await get(server, "/ui/nowhere")
    assert status == 404 and "not a page of the trace viewer" in body
    assert "Content-Security-Policy" in headers
    status, body, headers = await get(server, "/uinowhere")  # not the viewer's: the API's 404
    assert status == 404 and "Content-Security-Policy" not in headers


async def test_without_keys_a_page_named_by_another_host_is_refused(serve: Serve) -> None:
    """A DNS-rebinding page (its own host name resolving to 127.0.0.1) reaches the server
    through the user's browser with its own ``Host``: it gets nothing."""
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    await ask(server)
    for path in ("/ui", "/ui/api/runs", "/ui/login"):
        status, body, _ = await get(server, path, headers={"Host": "attacker.example:8000"})
        assert status == 403 and "only on this machine" in body, (path, body)


async def call_asgi(app: Any, path: str, server: tuple[str, int], client: tuple[str, int]) -> int:
    """One GET straight into the ASGI app, as if it arrived at ``server`` from ``client``."""
    status: list[int] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    host = f"{server[0]}:{server[1]}".encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", host)],
        "server": server,
        "client": client,
    }
    await app(scope, receive, send)
    return status[0]


@pytest.mark.parametrize(
    ("server", "client"),
    [
        (("192.0.2.10", 8000), ("192.0.2.20", 50000)),  # --insecure-no-auth on a public address
        (("127.0.0.1", 8000), ("192.0.2.20", 50000)),  # a proxy or a forwarded port
    ],
)
async def test_without_keys_the_viewer_is_refused_off_this_machine(
    server: tuple[str, int], client: tuple[str, int]
) -> None:
    demo = setup_demo()
    async with Store.for_settings(demo.settings) as store:
        app = create_app(demo.settings, registry=demo.registry, store=store)
        for path in ("/ui", "/ui/runs/gen-1", "/ui/api/runs", "/ui/api/runs/gen-1"):
            assert await call_asgi(app, path, server, client) == 403, path
        assert await call_asgi(app, "/ui", ("127.0.0.1", 8000), ("127.0.0.1", 50000)) == 200


async def test_with_keys_a_page_without_a_key_goes_to_the_login(serve: Serve) -> None:
    demo = setup_demo()
    create_key(demo.settings, "alice")
    server = serve(demo.settings, demo.registry)
    status, _, headers = await get(server, "/ui/runs/gen-1")
    assert status == 303 and headers["Location"] == "/ui/login?next=/ui/runs/gen-1"
    for path in ("/ui/api/runs", "/ui/api/runs/gen-1", "/ui/api/me"):
        status, body, _ = await get(server, path)
        assert status == 401 and "log in" in json.loads(body)["error"]["message"]
    status, html, _ = await get(server, "/ui/login", next="/ui/runs/gen-1")
    assert status == 200 and 'name="key"' in html and 'value="/ui/runs/gen-1"' in html
    status, _, _ = await get(server, "/ui", headers={"Authorization": "Bearer ofk-wrong"})
    assert status == 401
    status, _, _ = await get(server, "/ui", headers=with_cookie("forged-session-token"))
    assert status == 303


async def test_login_sets_a_strict_cookie_and_stores_only_its_hash(serve: Serve) -> None:
    demo = setup_demo()
    alice_id, alice = create_key(demo.settings, "alice")
    _, bob = create_key(demo.settings, "bob")
    _, admin = create_key(demo.settings, "ops", admin=True)
    server = serve(demo.settings, demo.registry)
    mine = await ask(server, alice)
    theirs = await ask(server, bob)

    status, html, _ = await post_form(server, "/ui/login", {"key": "ofk-not-a-key"})
    assert status == 401 and "not an active API key" in html
    token, raw = await log_in(server, alice)
    attributes = raw.lower()
    assert "httponly" in attributes and "samesite=strict" in attributes
    assert "path=/ui" in attributes and "max-age=43200" in attributes
    assert alice not in raw  # the cookie holds a session token, not the key

    status, body, _ = await get(server, "/ui/api/runs", headers=with_cookie(token))
    assert status == 200 and [r["id"] for r in json.loads(body)["data"]] == [mine]
    status, _, _ = await get(server, f"/ui/api/runs/{theirs}", headers=with_cookie(token))
    assert status == 404  # another key's run, as in the API
    status, body, _ = await get(server, "/ui/api/me", headers=with_cookie(token))
    assert json.loads(body) == {
        "via": "session",
        "key": {"id": alice_id, "name": "alice"},
        "admin": False,
    }
    # the cookie is the viewer's only: the rest of the API still wants the key itself
    status, _, _ = await get(server, "/v1/fusion/runs", headers=with_cookie(token))
    assert status == 401

    database = demo.settings.database.removeprefix("sqlite+aiosqlite:///")
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT hash, key_id FROM ui_sessions").fetchall()
        dump = "\n".join(db.iterdump())
    assert rows == [(hash_key(token), alice_id)] and token not in dump

    admin_token, _ = await log_in(server, admin)
    status, body, _ = await get(server, "/ui/api/runs", headers=with_cookie(admin_token))
    assert sorted(r["id"] for r in json.loads(body)["data"]) == sorted([mine, theirs])
    status, body, _ = await get(server, "/ui/api/runs", headers={"Authorization": f"Bearer {bob}"})
    assert [r["id"] for r in json.loads(body)["data"]] == [theirs]


async def test_logout_and_revoking_the_key_end_the_session(serve: Serve) -> None:
    demo = setup_demo()
    _, alice = create_key(demo.settings, "alice")
    server = serve(demo.settings, demo.registry)
    first, _ = await log_in(server, alice)
    second, _ = await log_in(server, alice)
    status, _, response = await post_form(server, "/ui/logout", {}, with_cookie(first))
    assert status == 303 and response.headers["Location"] == "/ui/login"
    assert 'openfusion_session=""' in response.headers["Set-Cookie"]
    assert (await get(server, "/ui/api/runs", headers=with_cookie(first)))[0] == 401
    assert (await get(server, "/ui/api/runs", headers=with_cookie(second)))[0] == 200
    in_store(demo.settings, lambda store: store.keys.revoke("alice"))
    assert (await get(server, "/ui/api/runs", headers=with_cookie(second)))[0] == 401
    status, _, headers = await get(server, "/ui", headers=with_cookie(second))
    assert status == 303 and headers["Location"].startswith("/ui/login")
    assert 'openfusion_session=""' in headers["Set-Cookie"]  # the dead cookie is cleared


async def test_login_refuses_other_sites_and_never_redirects_away(serve: Serve) -> None:
    demo = setup_demo()
    _, alice = create_key(demo.settings, "alice")
    server = serve(demo.settings, demo.registry)
    status, body, _ = await post_form(
        server, "/ui/login", {"key": alice}, {"Origin": "https://attacker.example"}
    )
    assert status == 403 and "must come from this server" in body
    for target in ("https://attacker.example/", "//attacker.example", "/v1/models", "/ui\r\nX: y"):
        status, _, response = await post_form(server, "/ui/login", {"key": alice, "next": target})
        assert status == 303 and response.headers["Location"] == "/ui", target
    status, _, response = await post_form(
        server, "/ui/login", {"key": alice, "next": "/ui/runs/gen-1"}, {"Origin": server.url}
    )
    assert status == 303 and response.headers["Location"] == "/ui/runs/gen-1"
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/ui/login", json={"key": alice}) as response,
    ):
        assert response.status == 400
        assert "x-www-form-urlencoded" in (await response.json())["error"]["message"]


async def test_a_run_answers_304_until_it_changes(serve: Serve) -> None:
    """The viewer polls a run in progress with ``If-None-Match``: unchanged, no body."""
    from openfusion.providers.scripted import Step

    demo = setup_demo(c=Step("Austen.", delay=2.5, cost=0.003))
    server = serve(demo.settings, demo.registry)
    task = asyncio.create_task(ask(server))
    run_id = ""
    for _ in range(100):
        _, body, _ = await get(server, "/ui/api/runs", status="running")
        if json.loads(body)["data"]:
            run_id = json.loads(body)["data"][0]["id"]
            break
        await asyncio.sleep(0.05)
    assert run_id, "the run never showed as running"
    path = f"/ui/api/runs/{run_id}"
    status, body, headers = await get(server, path)
    last, etag = json.loads(body), headers["ETag"]
    for _ in range(20):
        status, body, again = await get(server, path, headers={"If-None-Match": etag})
        if status == 304:
            break
        # the run moved on between two reads: its new state comes with a new tag
        assert status == 200 and again["ETag"] != etag
        last, etag = json.loads(body), again["ETag"]
    assert (status, body, again["ETag"]) == (304, "", etag)
    assert last["status"] == "running"
    await task
    status, body, done = await get(server, path, headers={"If-None-Match": etag})
    assert status == 200 and json.loads(body)["status"] == "ok" and done["ETag"] != etag
    status, _, _ = await get(
        server, f"/v1/fusion/runs/{run_id}", headers={"If-None-Match": done["ETag"]}
    )
    assert status == 304  # the API's own route answers the same way
