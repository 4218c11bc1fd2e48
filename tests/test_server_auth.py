"""Server API keys: the key store on disk, the bearer middleware, the bind check, ``keys`` CLI."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from openfusion.cli import main
from openfusion.errors import ConfigError
from openfusion.server.auth import (
    BearerAuth,
    KeyStore,
    check_bind,
    insecure_warning,
    is_loopback,
)

# --- KeyStore ---------------------------------------------------------------------------------


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "config" / "api_keys.json"


@pytest.fixture
def store(path: Path) -> KeyStore:
    return KeyStore(path)


def test_create_and_verify(store: KeyStore) -> None:
    record, key = store.create("laptop")
    assert key.startswith("ofk-") and len(key) > 40
    assert record.name == "laptop" and not record.revoked and record.id
    assert store.verify(key) == record
    assert store.verify(key + "x") is None
    assert store.verify("ofk-" + "A" * 43) is None
    assert store.verify("") is None
    other_record, other_key = store.create("ci")
    assert other_key != key and other_record.id != record.id
    assert store.verify(other_key) == other_record


def test_only_the_hash_is_on_disk(store: KeyStore, path: Path) -> None:
    record, key = store.create("laptop")
    text = path.read_text()
    assert key not in text
    assert key.removeprefix("ofk-") not in text
    assert hashlib.sha256(key.encode()).hexdigest() in text
    assert json.loads(text)["keys"][0]["id"] == record.id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert record.hash not in repr(record)


def test_writes_leave_no_temp_files(store: KeyStore, path: Path) -> None:
    store.create("a")
    store.create("b")
    store.revoke("a")
    assert sorted(p.name for p in path.parent.iterdir()) == ["api_keys.json"]


def test_failed_write_keeps_old_file_and_no_temp(
    store: KeyStore, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create("a")
    before = path.read_text()

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.create("b")
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["api_keys.json"]


def test_revoke_by_id_and_name(store: KeyStore, path: Path) -> None:
    laptop, laptop_key = store.create("laptop")
    ci, ci_key = store.create("ci")
    assert store.revoke(laptop.id).revoked
    assert store.verify(laptop_key) is None
    assert store.has_active_keys()
    assert store.revoke("ci").id == ci.id
    assert store.verify(ci_key) is None
    assert not store.has_active_keys()
    assert [(r.name, r.revoked) for r in store.list()] == [("laptop", True), ("ci", True)]
    assert [r.revoked for r in KeyStore(path).list()] == [True, True]  # persisted
    assert store.revoke(laptop.id).revoked  # twice is harmless


def test_revoke_unknown_is_a_config_error(store: KeyStore) -> None:
    store.create("laptop")
    with pytest.raises(ConfigError, match=r"'phone'.*openfusion keys list"):
        store.revoke("phone")


def test_names_are_unique_among_active_keys(store: KeyStore) -> None:
    store.create("ci")
    with pytest.raises(ConfigError, match="active key named 'ci'"):
        store.create("ci")
    store.revoke("ci")
    record, key = store.create("ci")
    assert store.verify(key) == record
    with pytest.raises(ConfigError, match="bad key name"):
        store.create("  ")


def test_missing_file_means_no_keys(store: KeyStore, path: Path) -> None:
    assert store.list() == []
    assert not store.has_active_keys()
    assert store.verify("ofk-anything") is None
    assert not path.exists()


@pytest.mark.parametrize("content", ["{not json", '{"keys": [{"id": "x"}]}', "[]"])
def test_corrupt_file_is_a_config_error(store: KeyStore, path: Path, content: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"api_keys\.json: not a valid API key file"):
        store.list()


def test_second_instance_sees_first_instances_keys(store: KeyStore, path: Path) -> None:
    other = KeyStore(path)
    assert not other.has_active_keys()  # loaded (empty) before the key exists
    record, key = store.create("laptop")
    assert other.verify(key) == record
    assert KeyStore(path).verify(key) == record
    other.revoke("laptop")
    assert store.verify(key) is None  # and the first sees the second's revocation


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
    store.create("laptop")
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
    store.create("laptop")
    inner = Inner()
    status, _, body = await call(BearerAuth(inner, store), auth=auth)
    assert status == 401
    assert "Bearer <key>" in body["error"]["message"]
    token = auth.partition(" ")[2]
    assert not token or token not in json.dumps(body)
    assert inner.scopes == []


async def test_valid_key_passes_and_lands_in_state(store: KeyStore) -> None:
    record, key = store.create("laptop")
    inner = Inner()
    app = BearerAuth(inner, store)
    assert (await call(app, auth=f"Bearer {key}"))[0] == 200
    assert (await call(app, "/v1/models", auth=f"bearer  {key} "))[0] == 200
    assert [s["state"]["api_key"] for s in inner.scopes] == [record, record]


async def test_revoked_key_is_401(store: KeyStore) -> None:
    _, key = store.create("laptop")
    store.create("ci")
    app = BearerAuth(Inner(), store)
    assert (await call(app, auth=f"Bearer {key}"))[0] == 200
    KeyStore(store.path).revoke("laptop")
    status, _, body = await call(app, auth=f"Bearer {key}")
    assert status == 401 and "revoked" in body["error"]["message"]


async def test_health_stays_open_and_other_paths_are_closed(store: KeyStore) -> None:
    store.create("laptop")
    inner = Inner()
    app = BearerAuth(inner, store)
    assert (await call(app, "/health"))[0] == 200
    assert (await call(app, "/"))[0] == 401
    assert (await call(app, "/v1"))[0] == 401
    assert len(inner.scopes) == 1


async def test_lifespan_passes_through(store: KeyStore) -> None:
    store.create("laptop")
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
    _, key = KeyStore(store.path).create("laptop")  # `openfusion keys create` meanwhile
    assert (await call(app))[0] == 401
    assert (await call(app, auth=f"Bearer {key}"))[0] == 200


async def test_revoking_every_key_locks_instead_of_opening(store: KeyStore) -> None:
    _, key = store.create("laptop")
    app = BearerAuth(Inner(), store)
    assert (await call(app, auth=f"Bearer {key}"))[0] == 200
    store.revoke("laptop")
    assert (await call(app))[0] == 401
    store.path.unlink()
    assert (await call(app))[0] == 401


async def test_unreadable_key_file_fails_closed(store: KeyStore) -> None:
    _, key = store.create("laptop")
    app = BearerAuth(Inner(), store)
    store.path.write_text("{broken")
    status, _, body = await call(app, auth=f"Bearer {key}")
    assert status == 500
    assert "API key file" in body["error"]["message"]
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


def _cli_store() -> KeyStore:
    return KeyStore(Path(os.environ["OPENFUSION_CONFIG_DIR"]) / "api_keys.json")


def test_cli_create_prints_the_key_once() -> None:
    result = CliRunner().invoke(main, ["keys", "create", "laptop"])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("ofk-") and "\n" not in key
    assert "cannot be shown again" in result.stderr
    record = _cli_store().verify(key)
    assert record is not None and record.name == "laptop"


def test_cli_list_shows_records_never_keys_or_hashes() -> None:
    runner = CliRunner()
    empty = runner.invoke(main, ["keys", "list"])
    assert empty.exit_code == 0 and "openfusion keys create NAME" in empty.output
    key = runner.invoke(main, ["keys", "create", "laptop"]).stdout.strip()
    runner.invoke(main, ["keys", "create", "ci"])
    result = runner.invoke(main, ["keys", "list"])
    assert result.exit_code == 0, result.output
    for record in _cli_store().list():
        assert record.id in result.output and record.name in result.output
        assert record.created in result.output
        assert record.hash not in result.output
    assert key not in result.output


def test_cli_revoke() -> None:
    runner = CliRunner()
    key = runner.invoke(main, ["keys", "create", "laptop"]).stdout.strip()
    result = runner.invoke(main, ["keys", "revoke", "laptop"])
    assert result.exit_code == 0, result.output
    assert "revoked" in result.output
    assert _cli_store().verify(key) is None
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
