"""Real `openfusion serve` processes on one database (SQLite file, or PostgreSQL, with or
without Redis): a generation and a run are readable from every replica; kill -9 one with runs
in flight, restart it: those runs read ``unfinished``, the other replica's run in flight is
left alone, finished runs are intact, and the spend ledger equals the sum of the costs of the
calls the runs recorded. Two replicas on PostgreSQL and Redis share one key's budget and rate
limit under concurrent requests.

Slow (about 20 s per case): it starts server processes, each importing openfusion.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from helpers import ANALYSIS, POSTGRES_URL, REDIS_URL, create_key, in_store, new_redis_prefix
from server_fixtures import bound_socket, config_dir, write_config, write_preset
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from openfusion.engine.runlog import billed
from openfusion.settings import Settings
from openfusion.store import NANO, Store
from openfusion.store.schema import run_spans, runs, spend

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Who wrote Pride and Prejudice?"}]
SCRIPT = {
    "a": {"content": "Jane Austen.", "cost": 0.001},
    "b": {"content": "Austen, in 1813.", "cost": 0.002},
    "slow": {"content": "Too late.", "delay": 120, "cost": 0.004},
    "steady": {"content": "In a moment: Austen.", "delay": 2, "cost": 0.003},
    "judge": {
        "json": {"content": json.dumps(ANALYSIS), "cost": 0.0004},
        "text": {"content": "Jane Austen wrote it.", "cost": 0.0005},
    },
}


@dataclass(frozen=True)
class Shared:
    """What the replicas share: a database, and maybe Redis (a key prefix of the test's own)."""

    database_url: str
    redis_prefix: str | None = None


@pytest.fixture(params=["sqlite", "postgresql", "postgresql+redis"])
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[Shared]:
    """A SQLite file, or a PostgreSQL database of the test's own (and Redis)."""
    if request.param == "sqlite":
        yield Shared(Settings.load().database)
        return
    async with postgres_database() as url:
        if request.param == "postgresql":
            yield Shared(url)
            return
        async with new_redis_prefix() as prefix:
            yield Shared(url, prefix)


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A PostgreSQL database of the test's own, dropped after (skips if there is none)."""
    name = f"openfusion_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    except (OSError, SQLAlchemyError) as exc:
        await admin.dispose()
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} cannot be used: {exc}")
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def setup(shared: Shared) -> dict[str, str]:
    """Presets ``fast`` (a, b) and ``hang`` (a, slow: never done in the test's time), scripted
    models with known costs; the environment of the server processes."""
    script = config_dir() / "script.json"
    script.write_text(json.dumps(SCRIPT))
    write_config(f'[providers.demo]\ntype = "scripted"\noptions.script = "{script}"\n')
    write_preset("fast", "demo/judge", ["demo/a", "demo/b"])
    write_preset("hang", "demo/judge", ["demo/a", "demo/slow"])
    write_preset("steady", "demo/judge", ["demo/a", "demo/steady"])
    prices = {
        "a": 0.001,
        "b": 0.002,
        "slow": 0.004,
        "steady": 0.003,
        "judge": 0.0005,
    }  # a key's budget needs them
    (config_dir() / "prices.toml").write_text(
        "".join(
            f'["demo/{m}"]\nprompt = 0\ncompletion = 0\nrequest = {p}\n' for m, p in prices.items()
        )
    )
    env = dict(os.environ, OPENFUSION_DATABASE_URL=shared.database_url, OPENFUSION_RECORD="1")
    if shared.redis_prefix is not None:
        env.update(OPENFUSION_REDIS_URL=REDIS_URL, OPENFUSION_REDIS_PREFIX=shared.redis_prefix)
    env.pop("PYTHONWARNINGS", None)
    return env


@contextmanager
def server(
    env: dict[str, str], *options: str, stderr: IO[bytes] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    sock = bound_socket()
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-c", "from openfusion.cli import main; main()", "serve"]
    process = subprocess.Popen(
        [*command, "--port", str(port), *options],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr or subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)


def wait_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server at {url} exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise AssertionError(f"the server at {url} did not start in 60 s")


async def get(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def ask(session: aiohttp.ClientSession, url: str, preset: str) -> str:
    body = {"model": f"openfusion/{preset}", "messages": QUESTION}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        await response.read()
        return response.headers["X-Generation-Id"]


async def recorded_and_charged(settings: Settings) -> tuple[int, int]:
    """The sum of the costs of the calls recorded by runs that ended (finished or unfinished),
    and the sum of the spend ledger, in nano-USD."""

    async def sums(store: Store) -> tuple[int, int]:
        ended = select(runs.c.id).where(runs.c.status != "running")
        async with store.db.read() as conn:
            query = select(run_spans).where(run_spans.c.run_id.in_(ended))
            spans = (await conn.execute(query)).mappings().all()
            charged = await conn.scalar(select(func.coalesce(func.sum(spend.c.cost_nano), 0)))
        calls = [s["cost_nano"] for s in spans if billed(s["kind"], s["status"], s["cost_nano"])]
        return sum(c or 0 for c in calls), int(charged or 0)

    return await asyncio.to_thread(in_store, settings, sums)


async def test_replicas_share_runs_and_a_killed_one_leaves_unfinished_runs(
    shared: Shared,
) -> None:
    env = setup(shared)
    settings = Settings.load({**env})
    key_id, key = create_key(settings, "team")
    await asyncio.to_thread(in_store, settings, lambda store: store.ledger.set_budget(key_id, 10))
    headers = {"Authorization": f"Bearer {key}"}
    with server(env) as (a, a_url), server(env) as (b, b_url):
        await asyncio.to_thread(wait_up, a_url, a)
        await asyncio.to_thread(wait_up, b_url, b)
        async with aiohttp.ClientSession(headers=headers) as session:
            finished = await ask(session, a_url, "fast")
            await get(session, a_url + "/v1/generation", id=finished)  # A writes it, then B reads
            generation = (await get(session, b_url + "/v1/generation", id=finished))["data"]
            assert generation["id"] == finished and generation["status"] == "ok"
            assert round(generation["total_cost"] * NANO) == 3_900_000
            before = await get(session, f"{b_url}/v1/fusion/runs/{finished}")
            in_flight = [
                asyncio.create_task(ask(session, url, "hang")) for url in (a_url, a_url, b_url)
            ]
            try:
                ids = await all_started(session, b_url)
                os.kill(a.pid, signal.SIGKILL)
                a.wait(10)
                with server(env) as (restarted, restarted_url):
                    await asyncio.to_thread(wait_up, restarted_url, restarted)
                    listed = (await get(session, restarted_url + "/v1/fusion/runs"))["data"]
                    status = {r["id"]: r["status"] for r in listed if r["id"] in ids}
                    after = await get(session, f"{restarted_url}/v1/fusion/runs/{finished}")
            finally:
                for task in in_flight:
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)
    # A's two runs in flight are unfinished; B's, in flight on a live replica, is not.
    assert sorted(status.values()) == ["running", "unfinished", "unfinished"], status
    assert {**after, "updated_at": None} == {**before, "updated_at": None}  # intact
    # The finished run, and member a of each run in flight (B's was cancelled at the end).
    calls, charged = await recorded_and_charged(settings)
    assert calls == charged == 3_900_000 + 3 * 1_000_000
    budget = await asyncio.to_thread(in_store, settings, lambda s: s.ledger.budget(key_id))
    assert (budget.spent_nano, budget.reserved_nano) == (charged, 0)


async def test_sigterm_answers_the_runs_in_flight_and_records_them(shared: Shared) -> None:
    """A server told to stop (SIGTERM) finishes the requests it holds, then writes what its
    batched recorder still has: each run ``ok``, its spend charged, no reservation left."""
    env = setup(shared)
    settings = Settings.load({**env})
    key_id, key = create_key(settings, "team")
    await asyncio.to_thread(in_store, settings, lambda store: store.ledger.set_budget(key_id, 10))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        with server(env) as (process, url):
            await asyncio.to_thread(wait_up, url, process)
            asks = [asyncio.create_task(ask(session, url, "steady")) for _ in range(3)]
            deadline = time.monotonic() + 30
            while len((await get(session, url + "/v1/fusion/runs", status="running"))["data"]) < 3:
                assert time.monotonic() < deadline, "the runs did not start"
                await asyncio.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            ids = await asyncio.gather(*asks)  # answered, not cut
            # uvicorn re-raises the signal once it has shut down gracefully
            assert await asyncio.to_thread(process.wait, 30) in (0, -signal.SIGTERM)

    async def statuses(store: Store) -> list[str]:
        async with store.db.read() as conn:
            rows = await conn.execute(select(runs.c.status).where(runs.c.id.in_(ids)))
            return sorted(r[0] for r in rows)

    assert await asyncio.to_thread(in_store, settings, statuses) == ["ok", "ok", "ok"]
    calls, charged = await recorded_and_charged(settings)
    assert calls == charged == 3 * (1_000_000 + 3_000_000 + 900_000)
    budget = await asyncio.to_thread(in_store, settings, lambda s: s.ledger.budget(key_id))
    assert (budget.spent_nano, budget.reserved_nano) == (charged, 0)


async def all_started(session: aiohttp.ClientSession, url: str) -> set[str]:
    """Wait until three runs are in flight, each with its first member's answer recorded."""
    deadline = time.monotonic() + 30
    while True:
        page = await get(session, url + "/v1/fusion/runs", status="running")
        found = [await get(session, f"{url}/v1/fusion/runs/{r['id']}") for r in page["data"]]
        if len(found) == 3 and all(r["members"][0]["status"] == "ok" for r in found):
            return {r["id"] for r in found}
        assert time.monotonic() < deadline, "the runs did not start"
        await asyncio.sleep(0.1)


RUN_NANO = 3_900_000
"""What a ``fast`` run costs (``SCRIPT``): a 0.001 + b 0.002 + analysis 0.0004 + answer 0.0005.
Its worst case at the prices of ``setup`` is 0.004, so a request's ``max_cost`` of 0.0041
fits it, and $0.02 holds four such requests at once."""


async def test_two_replicas_share_a_budget_and_a_rate_limit(tmp_path: Path) -> None:
    """PostgreSQL and Redis; one key with a budget of $0.02 and 10 requests a minute; 16
    concurrent requests spread over both replicas."""
    async with postgres_database() as url, new_redis_prefix() as prefix:
        env = setup(Shared(url, prefix))
        settings = Settings.load({**env})
        key_id, key = create_key(settings, "team")
        _, admin = create_key(settings, "ops", admin=True)

        async def limit(store: Store) -> None:
            await store.ledger.set_budget(key_id, 0.02)
            await store.keys.set_limits(key_id, 10, None)

        await asyncio.to_thread(in_store, settings, limit)
        log_path = tmp_path / "a.log"
        with (
            log_path.open("wb") as log,
            server(env, "--log-format", "json", stderr=log) as (a, a_url),
            server(env) as (b, b_url),
        ):
            await asyncio.to_thread(wait_up, a_url, a)
            await asyncio.to_thread(wait_up, b_url, b)
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as team:
                urls = [a_url, b_url] * 8
                answers = await asyncio.gather(*(send(team, url) for url in urls))
                ok = [
                    (url, gen)
                    for url, (status, gen) in zip(urls, answers, strict=True)
                    if status == 200 and gen is not None
                ]
                statuses = sorted(status for status, _ in answers)
                for url in (a_url, b_url):  # each writes what it answered (reading waits for it)
                    await get(team, url + "/v1/fusion/runs", limit="1")
                # Every run and generation is visible from both replicas.
                for url in (a_url, b_url):
                    listed = (await get(team, url + "/v1/fusion/runs", limit="100"))["data"]
                    assert {r["id"] for r in listed} == {gen for _, gen in ok}
                    for _, gen in ok:
                        data = (await get(team, url + "/v1/generation", id=gen))["data"]
                        assert round(data["total_cost"] * NANO) == RUN_NANO
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as ops:
                refused = 0.0
                for url in (a_url, b_url):
                    async with ops.get(url + "/metrics") as response:
                        assert response.status == 200
                        text = await response.text()
                    refused += sum(
                        float(line.split()[-1])
                        for line in text.splitlines()
                        if line.startswith("openfusion_rate_limited_total ")
                    )
        # The rate limit held across both: 10 admitted in the minute, 6 refused with 429.
        assert statuses.count(429) == 6 and refused == 6
        # The budget held: what was admitted either ran (200) or did not fit (402).
        assert statuses.count(200) + statuses.count(402) == 10 and ok
        budget = await asyncio.to_thread(in_store, settings, lambda s: s.ledger.budget(key_id))
        assert budget.spent_nano == len(ok) * RUN_NANO <= budget.limit_nano
        assert budget.reserved_nano == 0
        calls, charged = await recorded_and_charged(settings)
        assert calls == charged == budget.spent_nano
        # Replica A's log: one JSON object a line; its runs' lines carry their generation ids.
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        tagged = {line["generation_id"] for line in lines if "generation_id" in line}
        assert {gen for url, gen in ok if url == a_url} <= tagged
        assert key not in log_path.read_text()


async def send(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    body = {"model": "openfusion/fast", "messages": QUESTION, "max_cost": 0.0041}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        await response.read()
        if response.status == 429:
            assert response.headers["Retry-After"].isdigit()
        return response.status, response.headers.get("X-Generation-Id")
