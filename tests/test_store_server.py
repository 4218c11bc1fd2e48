"""API-key budgets on the real server: 402 when exhausted, never overrun, exact spend rows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from helpers import REDIS_URL, create_key, in_store, new_redis_prefix
from redis.asyncio import Redis
from server_fixtures import (
    ANALYSIS_COST,
    PANEL_COSTS,
    SYNTHESIS_COST,
    RunningServer,
    config_dir,
    judge_script,
    run_server,
    setup_demo,
    sse_data,
)

from openfusion.providers.scripted import Step
from openfusion.settings import Settings
from openfusion.store import NANO, RunFilter, SpendLedger, Store, to_nano
from openfusion.store.recorder import StoreRecorder

Serve = Callable[..., RunningServer]

RUN_NANO = (
    sum(to_nano(c) for c in PANEL_COSTS.values()) + to_nano(ANALYSIS_COST) + to_nano(SYNTHESIS_COST)
)
"""What one demo fusion costs: 6_900_000 nano-USD ($0.0069)."""
MAX_COST = 0.0071
"""Enough for one demo fusion's worst case ($0.007 with the prices below), and no more."""
PRICES = """
["demo/a"]
prompt = 0
completion = 0
request = 0.001
["demo/b"]
prompt = 0
completion = 0
request = 0.002
["demo/c"]
prompt = 0
completion = 0
request = 0.003
["demo/judge"]
prompt = 0
completion = 0
request = 0.0005
"""
QUESTION = {"role": "user", "content": "Who wrote Pride and Prejudice?"}


def slow_panel(delay: float = 0.3) -> dict[str, Any]:
    """Panel members that take ``delay`` seconds, so concurrent requests overlap."""
    return {
        name: Step(content, delay=delay, cost=PANEL_COSTS[name])
        for name, content in (("a", "Jane Austen."), ("b", "Austen, 1813."), ("c", "Austen."))
    }


def setup(config: str = "", **extra: Any) -> tuple[Settings, Any, str]:
    """The demo preset with known prices; returns settings, registry and a new API key."""
    demo = setup_demo(config, **extra)
    (config_dir() / "prices.toml").write_text(PRICES)
    _, key = create_key(demo.settings, "metered")
    return demo.settings, demo.registry, key


def key_id(settings: Settings) -> str:
    return in_store(settings, lambda store: store.keys.list())[0].id


async def set_budget(settings: Settings, usd: float | None) -> None:
    async with SpendLedger(settings.database) as ledger:
        await ledger.set_budget(key_id(settings), usd)


def fusion(**extra: Any) -> dict[str, Any]:
    return {"model": "openfusion/demo", "messages": [QUESTION], **extra}


async def post(
    session: aiohttp.ClientSession, server: RunningServer, key: str | None, body: dict[str, Any]
) -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(
        server.base_url + "/chat/completions", json=body, headers=headers
    ) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        return response.status, headers, await response.text()


@pytest.fixture(params=["database", "redis"])
async def holds(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """Where reservations are checked: the database (locked: ``None``), or Redis (the key
    prefix of the test's own)."""
    if request.param == "database":
        yield None
        return
    async with new_redis_prefix() as prefix:
        yield prefix


async def test_concurrent_requests_never_overrun_a_budget(serve: Serve, holds: str | None) -> None:
    config = f'redis_url = "{REDIS_URL}"\nredis_prefix = "{holds}"\n' if holds else ""
    settings, registry, key = setup(config, **slow_panel())
    await set_budget(settings, 0.05)  # room for 7 reservations of MAX_COST at once
    server = serve(settings, registry)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(post(session, server, key, fusion(max_cost=MAX_COST)) for _ in range(20))
        )

    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 7 + [402] * 13
    for status, _, text in results:
        if status == 402:
            error = json.loads(text)["error"]
            assert error["code"] == 402
            assert "budget exhausted" in error["message"]
            assert "openfusion keys budget" in error["message"]
            assert set(error["metadata"]) == {"limit", "spent"}
            assert error["metadata"]["limit"] == 0.05
    await server.written(key)
    async with SpendLedger(settings.database) as ledger:
        status = await ledger.budget(key_id(settings))
    assert status.spent_nano == 7 * RUN_NANO <= to_nano(0.05)
    assert status.reserved_nano == 0  # every reservation was settled
    if holds:  # they were checked in Redis, which now holds the spend and nothing reserved
        redis = Redis.from_url(REDIS_URL)
        state = await redis.hgetall(f"{holds}budget:{key_id(settings)}")
        await redis.aclose()
        assert int(state[b"reserved"]) == 0 and int(state[b"spent"]) == 7 * RUN_NANO


@pytest.mark.parametrize("stream", [False, True])
async def test_ledger_rows_sum_exactly_to_the_reported_cost(serve: Serve, stream: bool) -> None:
    settings, registry, key = setup()
    await set_budget(settings, 1.0)
    server = serve(settings, registry)
    async with aiohttp.ClientSession() as session:
        status, headers, text = await post(session, server, key, fusion(stream=stream))
    assert status == 200, text
    if stream:
        usage = [d for d in sse_data(text) if isinstance(d, dict) and d.get("usage")][-1]["usage"]
    else:
        usage = json.loads(text)["usage"]
    generation_id = headers["x-generation-id"]

    await server.written(key)
    async with SpendLedger(settings.database) as ledger:
        rows = await ledger.rows(generation_id)
        budget = await ledger.budget(key_id(settings))
    assert sum(r.cost_nano or 0 for r in rows) == to_nano(usage["cost"]) == RUN_NANO
    assert sorted((r.stage, r.model) for r in rows) == [
        ("analysis", "demo/judge"),
        ("panel", "demo/a"),
        ("panel", "demo/b"),
        ("panel", "demo/c"),
        ("synthesis", "demo/judge"),
    ]
    assert {r.key_id for r in rows} == {key_id(settings)}
    assert not any(r.unpriced for r in rows)
    assert (budget.spent_nano, budget.reserved_nano) == (RUN_NANO, 0)


async def test_the_default_reservation_is_capped_to_what_is_left(serve: Serve) -> None:
    settings, registry, key = setup("[server]\ndefault_reservation_usd = 0.0071\n")
    await set_budget(settings, 2 * RUN_NANO / NANO + 0.00001)
    server = serve(settings, registry)
    async with aiohttp.ClientSession() as session:
        first = await post(session, server, key, fusion())
        await server.written(key)  # until then, the first request's reservation holds
        second = await post(session, server, key, fusion())
        await server.written(key)
        assert (first[0], second[0]) == (200, 200)
        # $0.00001 is left: the request runs with that as its max_cost, and no call fits.
        third = await post(session, server, key, fusion())
    assert third[0] != 200
    await server.written(key)
    async with SpendLedger(settings.database) as ledger:
        status = await ledger.budget(key_id(settings))
    assert status.spent_nano == 2 * RUN_NANO and status.reserved_nano == 0
    async with aiohttp.ClientSession() as session:
        await set_budget(settings, 2 * RUN_NANO / NANO)
        status_code, _, text = await post(session, server, key, fusion())
    assert status_code == 402, text
    assert json.loads(text)["error"]["metadata"]["spent"] == 2 * RUN_NANO / NANO


async def test_spend_survives_a_server_restart(serve: Serve) -> None:
    settings, registry, key = setup()
    await set_budget(settings, 0.01)
    with run_server(settings, registry) as first:  # stopped at the end of the block
        async with aiohttp.ClientSession() as session:
            status, _, text = await post(session, first, key, fusion(max_cost=MAX_COST))
        assert status == 200, text

    # A new app, with nothing of the first one but the database file.
    demo = setup_demo()
    second = serve(Settings.load(), demo.registry)
    async with aiohttp.ClientSession() as session:
        status, _, text = await post(session, second, key, fusion(max_cost=MAX_COST))
    assert status == 402, text
    metadata = json.loads(text)["error"]["metadata"]
    assert metadata == {"limit": 0.01, "spent": RUN_NANO / NANO}


async def test_a_client_that_leaves_mid_stream_settles_what_was_spent(serve: Serve) -> None:
    slow_answer = judge_script("Jane Austen wrote it, in 1813, as everyone knows by now.")
    steps = {"judge": lambda request: _slowed(slow_answer(request))}
    settings, registry, key = setup(**steps)
    await set_budget(settings, 1.0)
    server = serve(settings, registry)
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {key}"}
        async with session.post(
            server.base_url + "/chat/completions", json=fusion(stream=True), headers=headers
        ) as response:
            generation_id = response.headers["x-generation-id"]
            async for line in response.content:
                if line.startswith(b"data: ") and b'"content"' in line and b'"role"' not in line:
                    break  # the answer has started: the panel and the analysis are paid for
            response.close()

    async with SpendLedger(settings.database) as ledger:
        for _ in range(200):  # the settle runs after the disconnect is noticed
            if not (await ledger.budget(key_id(settings))).reserved_nano:
                break
            await asyncio.sleep(0.05)
        status = await ledger.budget(key_id(settings))
        rows = await ledger.rows(generation_id)
    assert status.reserved_nano == 0, "the reservation of a dropped stream was not settled"
    assert sorted(r.stage for r in rows) == ["analysis", "panel", "panel", "panel"]
    paid = sum(to_nano(c) for c in PANEL_COSTS.values()) + to_nano(ANALYSIS_COST)
    assert status.spent_nano == paid


def _slowed(step: Step) -> Step:
    """The judge's answer streamed slowly (its analysis, JSON, as it was)."""
    if step.content.startswith("{"):
        return step
    return Step(step.content, chunk_delay=0.3, cost=SYNTHESIS_COST)


async def test_requests_without_a_key_are_recorded_too(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    async with aiohttp.ClientSession() as session:
        status, headers, text = await post(session, server, None, fusion())
        assert status == 200, text
        async with session.get(
            server.base_url + "/generation", params={"id": headers["x-generation-id"]}
        ) as response:
            assert response.status == 200
            record = (await response.json())["data"]
    async with SpendLedger(demo.settings.database) as ledger:
        rows = await ledger.rows(headers["x-generation-id"])
        assert await ledger.spent(None) == RUN_NANO
    assert {r.key_id for r in rows} == {None} and len(rows) == 5
    assert to_nano(record["total_cost"]) == RUN_NANO


async def test_keys_without_budget_are_not_limited(serve: Serve) -> None:
    settings, registry, key = setup()
    server = serve(settings, registry)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(post(session, server, key, fusion()) for _ in range(3)))
    assert [status for status, _, _ in results] == [200, 200, 200]
    await server.written(key)
    async with SpendLedger(settings.database) as ledger:
        assert await ledger.spent(key_id(settings)) == 3 * RUN_NANO


async def test_requests_wait_for_a_writer_far_behind_rather_than_go_unrecorded(
    serve: Serve,
) -> None:
    """The writer gathers for a minute and may hold 4 runs: from the third waiting run on, a
    request waits for a write (``StoreRecorder.room``) instead of being answered without a
    record of its spend."""
    settings, registry, key = setup()
    store = Store.for_settings(settings)
    recorder = StoreRecorder(store, source="server", flush_interval=60, max_pending=4)
    server = serve(settings, registry, store=store, recorder=recorder)
    async with aiohttp.ClientSession() as session:
        for _ in range(8):
            status, _, text = await post(session, server, key, fusion())
            assert status == 200, text
    await server.written(key)
    async with SpendLedger(settings.database) as ledger:
        assert await ledger.spent(key_id(settings)) == 8 * RUN_NANO
    page, _ = in_store(settings, lambda s: s.runs.page(RunFilter()))
    assert len(page) == 8
