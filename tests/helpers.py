"""Helpers more than one test file needs."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

import pytest
from aiohttp import web
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from openfusion.settings import Settings
from openfusion.store import Store

T = TypeVar("T")

POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
"""The PostgreSQL that runs beside the tests here and in CI (each test uses a schema of its own:
the ``postgres_schema`` fixture)."""

REDIS_URL = "redis://127.0.0.1:6379/0"
"""The Redis that runs beside the tests here and in CI (each test uses a key prefix of its own:
the ``redis_prefix`` fixture)."""

ANALYSIS = {  # a judge's analysis in the contract's shape, as scripted judges return it
    "consensus": ["Jane Austen wrote it"],
    "contradictions": [],
    "partial_coverage": [],
    "unique_insights": [{"model": "Response A", "insight": "published 1813"}],
    "blind_spots": [],
}


ANALYSIS_KEYS = {
    "consensus",
    "contradictions",
    "partial_coverage",
    "unique_insights",
    "blind_spots",
}
"""The five keys of every fusion result's ``analysis`` (the API contract)."""


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1 until the block ends: ``http://127.0.0.1:PORT``."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def eventually(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Wait until ``condition()`` holds (polled); fail naming ``what`` if it never does."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.02)


def make_pdf(text: str, title: str = "") -> bytes:
    """A one-page PDF with ``text`` in Helvetica and ``title`` in its metadata."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Title ({title}) >>".encode(),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\n" % (len(objects) + 1)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def in_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    """``work(store)`` on the settings' store, from sync or async test code alike (in a thread
    with a loop of its own)."""

    async def run() -> T:
        async with Store.for_settings(settings) as store:
            return await work(store)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def create_key(settings: Settings, name: str, *, admin: bool = False) -> tuple[str, str]:
    """A new API key in the settings' store: its id and the key."""

    async def create(store: Store) -> tuple[str, str]:
        record, key = await store.keys.create(name, admin=admin)
        return record.id, key

    return in_store(settings, create)


def _postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@asynccontextmanager
async def new_postgres_schema() -> AsyncIterator[str]:
    """A fresh schema in the local PostgreSQL's ``test`` database, dropped afterwards (the test
    skips, saying why, when PostgreSQL is not there)."""
    if not _postgres_reachable():
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({POSTGRES_URL})")
    schema = f"openfusion_test_{uuid.uuid4().hex[:12]}"
    try:
        yield schema
    finally:
        engine = create_async_engine(POSTGRES_URL)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        except (OSError, SQLAlchemyError):
            pass  # the database could not be used: the test skipped before making the schema
        finally:
            await engine.dispose()


def redis_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


@asynccontextmanager
async def new_redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own in the local Redis, its keys deleted afterwards (the
    test skips, saying why, when Redis is not there)."""
    from redis.asyncio import Redis

    if not redis_reachable():
        pytest.skip(f"Redis is not reachable at 127.0.0.1:6379 ({REDIS_URL})")
    prefix = f"openfusion-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        redis = Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in redis.scan_iter(match=prefix + "*")]
            if keys:
                await redis.delete(*keys)
        finally:
            await redis.aclose()
