"""Shared fixtures. Every test runs with an empty config dir and env, and with sockets
limited to loopback: a connection anywhere else fails the test instead of leaving the machine."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers import new_postgres_schema, new_redis_prefix

from openfusion.settings import RetrySettings, Settings, StoreSettings

if TYPE_CHECKING:
    from server_fixtures import RunningServer

    from openfusion.providers.local import LocalProvider

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check(address: Any) -> None:
    if isinstance(address, tuple):
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise AssertionError(f"test tried to connect to non-loopback address {address!r}")


def _connect(self: socket.socket, address: Any) -> None:
    _check(address)
    _real_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    _check(address)
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(socket.socket, "connect", _connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _connect_ex)
    yield


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user config, no real keys: each test sees a fresh config dir."""
    for var in ("OPENROUTER_API_KEY", "OPENAI_API_KEY", "OPENFUSION_PRESET"):
        monkeypatch.delenv(var, raising=False)
    for var in ("OPENFUSION_DATABASE_URL", "OPENFUSION_REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    # The library records its runs unless told not to; tests of the engine need no store (the
    # server records in any case, and the recording tests turn it back on).
    monkeypatch.setenv("OPENFUSION_RECORD", "0")
    monkeypatch.setenv("OPENFUSION_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("OPENFUSION_DATA_DIR", str(tmp_path / "data"))
    # A cache of its own (corpus index, synced prices), but one model dir shared between
    # tests and runs: assembling Gemma takes seconds.
    cache = tmp_path / "cache"
    cache.mkdir()
    shared_models = Path.home() / ".cache" / "openfusion-tests" / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(shared_models)
    monkeypatch.setenv("OPENFUSION_CACHE_DIR", str(cache))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """One try per model: failure semantics without retries (tests of retries set their own)."""
    return Settings(
        config_dir=tmp_path / "config",
        cache_dir=tmp_path / "cache",
        retries=RetrySettings(attempts=1),
        store=StoreSettings(record=False),
    )


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Start real servers (``server_fixtures.run_server``); each one stops when the test ends."""
    from server_fixtures import run_server

    with ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(run_server(*args, **kwargs))


@pytest.fixture
async def postgres_schema() -> AsyncIterator[str]:
    """A fresh schema in the local PostgreSQL's ``test`` database (``helpers``)."""
    async with new_postgres_schema() as schema:
        yield schema


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A Redis key prefix of the test's own, cleaned up after (``helpers``)."""
    async with new_redis_prefix() as prefix:
        yield prefix


@pytest.fixture(scope="module")
def local() -> Iterator[LocalProvider]:
    """The embedded model's provider (for tests marked ``local_model``), once per module."""
    from openfusion.providers.local import create
    from openfusion.settings import ProviderConfig

    cache = Path.home() / ".cache" / "openfusion-tests"
    settings = Settings(config_dir=cache / "no-config", cache_dir=cache)
    provider = create("local", ProviderConfig(type="local"), settings)
    yield provider
    asyncio.run(provider.aclose())
