"""Server API keys: the key store in the database, the bearer middleware, the bind check, the
``keys`` CLI, and the move of the first releases' key file into the database."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import eventually, in_store
from server_fixtures import RunningServer

from openfusion.cli import main
from openfusion.errors import ConfigError
from openfusion.server.auth import BearerAuth, KeyGate, check_bind, insecure_warning, is_loopback
from openfusion.settings import Settings
from openfusion.store import Database, KeyStore

Serve = Callable[..., RunningServer]

# --- KeyStore ---------------------------------------------------------------------------------


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    yield database
    await database.aclose()


@pytest.fixture
def store(database: Database) -> KeyStore:
    return KeyStore(database)


async def test_create_and_verify(store: KeyStore) -> None:
    record, key = await store.create("laptop")
    assert key.startswith("ofk-") and len(key) > 40
    assert record.name == "laptop" and not record.revoked and not record.admin and record.id
    assert await store.verify(key) == record
    assert await store.verify(key + "x") is None
    assert await store.verify("ofk-" + "A" * 43) is None
    assert await store.verify("") is None
    other_record, other_key = await store.create("ci", admin=True)
    assert other_key != key and other_record.id != record.id and other_record.admin
    assert await store.verify(other_key) == other_record


async def test_only_the_hash_is_stored(store: KeyStore, tmp_path: Path) -> None:
    record, key = await store.create("laptop")
    dump = "\n".join(sqlite3.connect(tmp_path / "store.db").iterdump())
    assert key not in dump
    assert key.removeprefix("ofk-") not in dump
    assert hashlib.sha256(key.encode()).hexdigest() in dump
    assert record.hash not in repr(record)


async def test_revoke_by_id_and_name(store: KeyStore, database: Database) -> None:
    laptop, laptop_key = await store.create("laptop")
    ci, ci_key = await store.create("ci")
    assert (await store.revoke(laptop.id)).revoked
    assert await store.verify(laptop_key) is None
    assert await store.has_active_keys()
    assert (await store.revoke("ci")).id == ci.id
    assert await store.verify(ci_key) is None
    assert not await store.has_active_keys()
    assert [(r.name, r.revoked) for r in await store.list()] == [("laptop", True), ("ci", True)]
    assert [r.revoked for r in await KeyStore(database).list()] == [True, True]  # persisted
    assert (await store.revoke(laptop.id)).revoked  # twice is harmless


async def test_revoke_unknown_is_a_config_error(store: KeyStore) -> None:
    await store.create("laptop")
    with pytest.raises(ConfigError, match=r"'phone'.*openfusion keys list"):
        await store.revoke("phone")


async def test_names_are_unique_among_active_keys(store: KeyStore) -> None:
    await store.create("ci")
    with pytest.raises(ConfigError, match="active key named 'ci'"):
        await store.create("ci")
    await store.revoke("ci")
    record, key = await store.create("ci")
    assert await store.verify(key) == record
    with pytest.raises(ConfigError, match="bad key name"):
        await store.create("  ")


async def test_admin_flag_can_be_set_and_cleared(store: KeyStore) -> None:
    record, key = await store.create("ops")
    assert (await store.set_admin("ops", True)).admin
    assert (await store.verify(key)) == dataclasses.replace(record, admin=True)
    assert not (await store.set_admin(record.id, False)).admin


async def test_no_keys_at_first(store: KeyStore) -> None:
    assert await store.list() == []
    assert not await store.has_active_keys()
    assert await store.verify("ofk-anything") is None


async def test_two_stores_on_one_database_see_each_other(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    first, second = Database(url), Database(url)
    try:
        assert not await KeyStore(second).has_active_keys()
        record, key = await KeyStore(first).create("laptop")
        assert await KeyStore(second).verify(key) == record
        await KeyStore(second).revoke("laptop")
        assert await KeyStore(first).verify(key) is None
    finally:
        await first.aclose()
        await second.aclose()


def legacy_key_file(path: Path, *, revoked: bool = False) -> tuple[str, str]:
    """An ``api_keys.json`` as openfusion 0.1 wrote it; returns the key id and the key."""
    key = "ofk-" + "k" * 43
    record = {
        "id": "a1b2c3d4",
        "name": "old-laptop",
        "hash": hashlib.sha256(key.encode()).hexdigest(),
        "created": "2026-11-01T10:00:00+00:00",
        "revoked": revoked,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "keys": [record]}))
    return record["id"], key


async def test_the_key_file_of_the_first_releases_moves_into_the_database(
    store: KeyStore, tmp_path: Path
) -> None:
    path = tmp_path / "config" / "api_keys.json"
    key_id, key = legacy_key_file(path)
    assert await store.import_file(path) == 1
    assert not path.exists() and path.with_name("api_keys.json.imported").exists()
    record = await store.verify(key)
    assert record is not None and (record.id, record.name) == (key_id, "old-laptop")
    assert record.created == "2026-11-01T10:00:00+00:00" and not record.admin
    await store.revoke(key_id)
    legacy_key_file(path)  # the file comes back (a backup restored): nothing is added again
    assert await store.import_file(path) == 0
    assert await store.verify(key) is None  # and the revocation stands
    assert await store.import_file(tmp_path / "missing.json") == 0


@pytest.mark.parametrize("content", ["{not json", '{"keys": [{"id": "x"}]}', "[]"])
async def test_a_corrupt_key_file_is_a_config_error(
    store: KeyStore, tmp_path: Path, content: str
) -> None:
    path = tmp_path / "api_keys.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"api_keys\.json: not a valid API key file"):
        await store.import_file(path)
    assert path.exists()


def test_the_cli_and_server_find_keys_of_the_old_file(serve: Serve) -> None:
    settings = Settings.load()
    _, key = legacy_key_file(settings.config_dir / "api_keys.json")
    listing = CliRunner().invoke(main, ["keys", "list"])
    assert listing.exit_code == 0 and "old-laptop" in listing.output
    server = serve(settings)
    assert _get(server.url + "/v1/models", key) == 200
    assert _get(server.url + "/v1/models", "ofk-wrong") == 401


def _get(url: str, key: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


# --- BearerAuth -------------------------------------------------------------------------------


class Inner:
    """The wrapped app: records the scopes it saw and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


async def call(
    app: BearerAuth, path: str = "/v1/chat/completions", auth: str | None = None
) -> tuple[int, dict[bytes, bytes], Any]:
    headers = [(b"content-type", b"application/json")]
    if auth is not None:
        headers.append((b"authorization", auth.encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start"
    body = b"".join(m.get("body", b"") for m in sent[1:])
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = body
    return sent[0]["status"], dict(sent[0]["headers"]), parsed


async def test_no_store_or_no_keys_lets_everything_through(store: KeyStore) -> None:
    for auth_store in (None, store):
        inner = Inner()
        assert await call(BearerAuth(inner, auth_store)) == (200, {}, b"ok")
        assert len(inner.scopes) == 1


async def test_missing_key_is_401(store: KeyStore) -> None:
    await store.create("laptop")
    inner = Inner()
    status, headers, body = await call(BearerAuth(inner, store))
    assert status == 401
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"www-authenticate"] == b"Bearer"
    assert body["error"]["code"] == 401 and body["error"]["metadata"] == {}
    assert "Authorization: Bearer <key>" in body["error"]["message"]
    assert inner.scopes == []


@pytest.mark.parametrize("auth", ["Bearer ofk-wrong-key-123", "Basic dXNlcjpwYXNz", "Bearer "])
async def test_wrong_key_is_401_and_not_echoed(store: KeyStore, auth: str) -> None:
    await store.create("laptop")
    inner = Inner()
    status, _, body = await call(BearerAuth(inner, store), auth=auth)
    assert status == 401
    assert "Bearer <key>" in body["error"]["message"]
    token = auth.partition(" ")[2]
    assert not token or token not in json.dumps(body)
    assert inner.scopes == []


async def test_valid_key_passes_and_lands_in_state(store: KeyStore) -> None:
    record, key = await store.create("laptop")
    inner = Inner()
    app = BearerAuth(inner, store)
    assert (await call(app, auth=f"Bearer {key}"))[0] == 200
    assert (await call(app, "/v1/models", auth=f"bearer  {key} "))[0] == 200
    assert [s["state"]["api_key"] for s in inner.scopes] == [record, record]


async def test_revoked_key_is_401(store: KeyStore) -> None:
    _, key = await store.create("laptop")
    await store.create("ci")
    app = BearerAuth(Inner(), store)
    assert (await call(app, auth=f"Bearer {key}"))[0] == 200
    await KeyStore(store.db).revoke("laptop")  # `openfusion keys revoke`, elsewhere
    status, _, body = await call(app, auth=f"Bearer {key}")
    assert status == 401 and "revoked" in body["error"]["message"]


async def test_health_stays_open_and_other_paths_are_closed(store: KeyStore) -> None:
    await store.create("laptop")
    inner = Inner()
    app = BearerAuth(inner, store)
    assert (await call(app, "/health"))[0] == 200
    assert (await call(app, "/"))[0] == 401
    assert (await call(app, "/v1"))[0] == 401
    assert len(inner.scopes) == 1


async def test_lifespan_passes_through(store: KeyStore) -> None:
    await store.create("laptop")
    inner = Inner()

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("inner app sends nothing for lifespan here")

    await BearerAuth(inner, store)({"type": "lifespan"}, receive, send)
    assert inner.scopes == [{"type": "lifespan"}]


async def test_key_created_while_running_turns_auth_on(store: KeyStore) -> None:
    app = BearerAuth(Inner(), store)
    assert (await call(app))[0] == 200
    _, key = await KeyStore(store.db).create("laptop")  # `openfusion keys create` meanwhile
    assert (await call(app))[0] == 401
    assert (await call(app, auth=f"Bearer {key}"))[0] == 200


class Gated:
    """A key store whose reads wait at a gate, counting them."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.gate = asyncio.Event()
        self.reads = 0

    async def has_active_keys(self) -> bool:
        self.reads += 1
        await self.gate.wait()
        return await self.store.has_active_keys()

    async def verify(self, token: str) -> Any:
        self.reads += 1
        await self.gate.wait()
        return await self.store.verify(token)


async def test_requests_that_arrive_together_share_one_key_read(store: KeyStore) -> None:
    gated = Gated(store)
    app = BearerAuth(Inner(), gated)  # type: ignore[arg-type]
    calls = [asyncio.create_task(call(app)) for _ in range(5)]
    await eventually(lambda: gated.reads == 1, "the first read started")
    gated.gate.set()
    assert [(await c)[0] for c in calls] == [200] * 5 and gated.reads == 1
    _, key = await KeyStore(store.db).create("laptop")  # `openfusion keys create` meanwhile
    assert (await call(app))[0] == 401 and gated.reads == 2  # a new read: no cache
    gated.gate.clear()
    calls = [asyncio.create_task(call(app, auth=f"Bearer {key}")) for _ in range(5)]
    await eventually(lambda: gated.reads == 3, "the key's read started")
    calls[0].cancel()  # a client gone does not cancel the read the others wait for
    gated.gate.set()
    assert [(await c)[0] for c in calls[1:]] == [200] * 4 and gated.reads == 3


async def test_a_key_read_is_reused_for_the_ttl_and_an_unknown_token_never_is(
    store: KeyStore,
) -> None:
    gated = Gated(store)
    gated.gate.set()
    app = BearerAuth(Inner(), KeyGate(gated, ttl=0.5))  # type: ignore[arg-type]
    assert [(await call(app))[0] for _ in range(3)] == [200] * 3
    assert gated.reads == 1  # "no keys" is kept too
    _, key = await KeyStore(store.db).create("laptop")  # `openfusion keys create` meanwhile
    assert await seconds_until(401, lambda: call(app)) < 0.5 + 0.5  # the kept "no keys" lapsed
    assert gated.reads == 2
    assert [(await call(app, auth=f"Bearer {key}"))[0] for _ in range(3)] == [200] * 3
    assert gated.reads == 3  # the key's one read (auth stays on: no more "any key?" reads)
    assert [(await call(app, auth="Bearer ofk-nope"))[0] for _ in range(2)] == [401] * 2
    assert gated.reads == 5  # an unknown token is read each time
    await KeyStore(store.db).revoke("laptop")
    assert await seconds_until(401, lambda: call(app, auth=f"Bearer {key}")) < 0.5 + 0.5


async def seconds_until(
    status: int, request: Callable[[], Awaitable[tuple[int, Any, Any]]]
) -> float:
    """Seconds until ``request()`` answers ``status`` (asked every 20 ms, for at most 5 s)."""
    started = time.monotonic()
    for _ in range(250):
        if (await request())[0] == status:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    pytest.fail(f"no {status} within 5 s")


async def test_revoking_every_key_locks_instead_of_opening(store: KeyStore) -> None:
    _, key = await store.create("laptop")
    app = BearerAuth(Inner(), store)
    assert (await call(app, auth=f"Bearer {key}"))[0] == 200
    await store.revoke("laptop")
    assert (await call(app))[0] == 401
    assert (await call(app, auth=f"Bearer {key}"))[0] == 401


async def test_an_unreadable_database_fails_closed(store: KeyStore, tmp_path: Path) -> None:
    _, key = await store.create("laptop")
    app = BearerAuth(Inner(), store)
    assert (await call(app, auth=f"Bearer {key}"))[0] == 200
    with sqlite3.connect(tmp_path / "store.db") as db:
        db.execute("DROP TABLE api_keys")  # the database breaks under the running server
    status, _, body = await call(app, auth=f"Bearer {key}")
    assert status == 503
    assert "cannot read its API keys" in body["error"]["message"]
    assert key not in json.dumps(body)


# --- check_bind -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "has_keys", "insecure", "refused"),
    [
        ("127.0.0.1", False, False, False),
        ("127.0.0.5", False, False, False),
        ("::1", False, False, False),
        ("localhost", False, False, False),
        ("0.0.0.0", False, False, True),
        ("0.0.0.0", True, False, False),
        ("0.0.0.0", False, True, False),
        ("192.168.1.10", False, False, True),
        ("192.168.1.10", True, False, False),
        ("192.168.1.10", False, True, False),
        ("::", False, False, True),
        ("myhost.example", False, False, True),
    ],
)
def test_check_bind(host: str, has_keys: bool, insecure: bool, refused: bool) -> None:
    message = check_bind(host, has_keys, insecure)
    assert (message is not None) == refused
    if message is not None:
        assert host in message
        assert "openfusion keys create NAME" in message
        assert "--insecure-no-auth" in message


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("LOCALHOST", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("127.255.255.254", True),
        ("128.0.0.1", False),
        ("", False),
        ("localhost.example", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_insecure_warning_is_loud() -> None:
    warning = insecure_warning("0.0.0.0")
    assert "0.0.0.0" in warning and "WITHOUT AUTHENTICATION" in warning
    assert "openfusion keys create NAME" in warning


# --- keys CLI ---------------------------------------------------------------------------------


def _verify(key: str) -> Any:
    return in_store(Settings.load(), lambda store: store.keys.verify(key))


def test_cli_create_prints_the_key_once() -> None:
    result = CliRunner().invoke(main, ["keys", "create", "laptop"])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("ofk-") and "\n" not in key
    assert "cannot be shown again" in result.stderr
    record = _verify(key)
    assert record is not None and record.name == "laptop" and not record.admin


def test_cli_admin_keys() -> None:
    runner = CliRunner()
    made = runner.invoke(main, ["keys", "create", "ops", "--admin"])
    assert made.exit_code == 0, made.output
    assert "created admin key" in made.stderr
    assert _verify(made.stdout.strip()).admin
    plain = runner.invoke(main, ["keys", "create", "ci"]).stdout.strip()
    assert runner.invoke(main, ["keys", "admin", "ci", "on"]).exit_code == 0
    assert _verify(plain).admin
    listing = runner.invoke(main, ["keys", "list"], env={"COLUMNS": "200"})
    header, *lines = listing.output.splitlines()
    assert header.split()[4] == "admin"
    assert [line.split().count("yes") for line in lines] == [1, 1]  # admin; revoked is empty


def test_cli_list_shows_records_never_keys_or_hashes() -> None:
    runner = CliRunner()
    empty = runner.invoke(main, ["keys", "list"])
    assert empty.exit_code == 0 and "openfusion keys create NAME" in empty.output
    key = runner.invoke(main, ["keys", "create", "laptop"]).stdout.strip()
    runner.invoke(main, ["keys", "create", "ci"])
    result = runner.invoke(main, ["keys", "list"])
    assert result.exit_code == 0, result.output
    for record in in_store(Settings.load(), lambda store: store.keys.list()):
        assert record.id in result.output and record.name in result.output
        assert record.created[:16].replace("T", " ") in result.output
        assert record.hash not in result.output
    assert key not in result.output


def test_cli_revoke() -> None:
    runner = CliRunner()
    key = runner.invoke(main, ["keys", "create", "laptop"]).stdout.strip()
    result = runner.invoke(main, ["keys", "revoke", "laptop"])
    assert result.exit_code == 0, result.output
    assert "revoked" in result.output
    assert _verify(key) is None
    listing = runner.invoke(main, ["keys", "list"]).output
    assert "yes" in listing.splitlines()[1]


def test_cli_errors_are_one_line_messages() -> None:
    runner = CliRunner()
    unknown = runner.invoke(main, ["keys", "revoke", "phone"])
    assert unknown.exit_code == 1
    assert "no API key with id or name 'phone'" in unknown.output
    runner.invoke(main, ["keys", "create", "ci"])
    duplicate = runner.invoke(main, ["keys", "create", "ci"])
    assert duplicate.exit_code == 1 and "active key named 'ci'" in duplicate.output
    assert "Traceback" not in duplicate.output
