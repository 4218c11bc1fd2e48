"""Budget reservations hot in Redis, the database the truth: concurrent holds from two
replicas never exceed the budget; a Redis that forgot everything is rebuilt from the database;
a Redis that cannot be reached falls back to the database's locked path."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
from click.testing import CliRunner
from helpers import REDIS_URL, in_store, redis_reachable
from redis.asyncio import Redis
from server_fixtures import write_config

from openfusion.cli import main
from openfusion.cluster import HotBudgets, Shared
from openfusion.cluster.budget import budget_key
from openfusion.errors import ConfigError
from openfusion.settings import Settings
from openfusion.store import BudgetExhausted, SpendLedger, SpendRow, to_nano

KEY = "team"


@pytest.fixture
async def ledger() -> AsyncIterator[SpendLedger]:
    async with SpendLedger(Settings.load().database) as ledger:
        await ledger.set_budget(KEY, 1.0)
        yield ledger


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def forget_everything(redis: Redis, prefix: str) -> None:
    """What a Redis restart without persistence does to openfusion's keys."""
    keys = [key async for key in redis.scan_iter(match=prefix + "*")]
    if keys:
        await redis.delete(*keys)


async def test_holds_are_rows_in_the_database_and_count_in_redis(
    ledger: SpendLedger, redis: Redis, redis_prefix: str
) -> None:
    hot = HotBudgets(redis, redis_prefix, ledger)
    held = await hot.reserve(KEY, 0.4)
    assert held is not None and held.amount_nano == to_nano(0.4)
    status = await ledger.budget(KEY)
    assert status.reserved_nano == to_nano(0.4)  # the database has it too
    await hot.reserve(KEY, 0.5)
    with pytest.raises(BudgetExhausted) as refused:
        await hot.reserve(KEY, 0.2)
    assert refused.value.reserved_nano == to_nano(0.9)
    assert (await ledger.budget(KEY)).reserved_nano == to_nano(0.9)  # the refused row is gone
    partial = await hot.reserve(KEY, 0.5, up_to=True)
    assert partial is not None and partial.amount_nano == to_nano(0.1)
    assert (await ledger.budget(KEY)).reserved_nano == to_nano(1.0)

    # Settle as the recorder does (the database first), then release in Redis.
    await ledger.settle(held.id, "gen-1", [SpendRow("panel", "m", 0.05)])
    await hot.release(held, to_nano(0.05))
    again = await hot.reserve(KEY, 0.35)
    assert again is not None  # 1.0 - 0.05 spent - 0.6 held = 0.35 left
    with pytest.raises(BudgetExhausted):
        await hot.reserve(KEY, 0.01)


async def test_a_key_without_budget_holds_nothing(
    ledger: SpendLedger, redis: Redis, redis_prefix: str
) -> None:
    hot = HotBudgets(redis, redis_prefix, ledger)
    assert await hot.reserve("free", 5.0) is None
    assert (await ledger.budget("free")).reserved_nano == 0


async def test_two_replicas_never_hold_more_than_the_budget(
    ledger: SpendLedger, redis: Redis, redis_prefix: str
) -> None:
    other = Redis.from_url(REDIS_URL)
    try:
        replicas = [
            HotBudgets(redis, redis_prefix, ledger),
            HotBudgets(other, redis_prefix, ledger),
        ]

        async def try_hold(hot: HotBudgets) -> bool:
            try:
                return await hot.reserve(KEY, 0.15) is not None
            except BudgetExhausted:
                return False

        granted = await asyncio.gather(*(try_hold(r) for r in replicas * 10))
    finally:
        await other.aclose()
    assert sum(granted) == 6  # 6 x 0.15 = 0.90 <= 1.0 < 7 x 0.15
    assert (await ledger.budget(KEY)).reserved_nano == 6 * to_nano(0.15)


async def test_a_redis_restart_rebuilds_from_the_database(
    ledger: SpendLedger, redis: Redis, redis_prefix: str
) -> None:
    hot = HotBudgets(redis, redis_prefix, ledger)
    first = await hot.reserve(KEY, 0.6)
    assert first is not None
    await ledger.settle(None, "gen-0", [SpendRow("panel", "m", 0.3)], key_id=KEY)  # spent
    await forget_everything(redis, redis_prefix)
    # Rebuilt: 1.0 - 0.3 spent - 0.6 held = 0.1 left; nothing over-committed.
    with pytest.raises(BudgetExhausted) as refused:
        await hot.reserve(KEY, 0.2)
    assert (refused.value.spent_nano, refused.value.reserved_nano) == (
        to_nano(0.3),
        to_nano(0.6),
    )
    # The release of a hold counted in the forgotten state changes nothing in the new one
    # (which read the hold from the database): it waits for the next rebuild instead.
    await ledger.settle(first.id, "gen-1", [SpendRow("panel", "m", 0.1)])
    await hot.release(first, to_nano(0.1))
    with pytest.raises(BudgetExhausted):
        await hot.reserve(KEY, 0.2)
    await forget_everything(redis, redis_prefix)  # the next rebuild reconciles
    assert await hot.reserve(KEY, 0.6) is not None  # 1.0 - 0.4 spent


async def test_the_hash_expires_so_budget_changes_arrive(
    ledger: SpendLedger, redis: Redis, redis_prefix: str
) -> None:
    hot = HotBudgets(redis, redis_prefix, ledger, refresh=0.3)
    assert await hot.reserve(KEY, 0.9) is not None
    await ledger.set_budget(KEY, 5.0)
    with pytest.raises(BudgetExhausted):  # the hash still has the old limit
        await hot.reserve(KEY, 1.0)
    await asyncio.sleep(0.4)  # expired: rebuilt with the new limit
    assert await hot.reserve(KEY, 1.0) is not None


async def test_unreachable_redis_reserves_in_the_database(
    ledger: SpendLedger, redis: Redis, redis_prefix: str
) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        down = HotBudgets(dead, redis_prefix, ledger)
        held = await down.reserve(KEY, 0.7)
        assert held is not None
        with pytest.raises(BudgetExhausted):  # the database's locked check
            await down.reserve(KEY, 0.7)
        await down.release(held, 0)  # nothing of it in Redis: no call, no error
    finally:
        await dead.aclose()
    up = HotBudgets(redis, redis_prefix, ledger)
    with pytest.raises(BudgetExhausted):  # built from the database: counts that hold
        await up.reserve(KEY, 0.7)


def test_keys_budget_applies_at_once_on_replicas_with_redis() -> None:
    """`openfusion keys budget` drops the key's Redis state: the next request rebuilds it."""
    if not redis_reachable():
        pytest.skip(f"Redis is not reachable at 127.0.0.1:6379 ({REDIS_URL})")
    prefix = f"openfusion-test-{uuid.uuid4().hex[:12]}:"
    write_config(f'redis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"\n')
    runner = CliRunner()
    assert runner.invoke(main, ["keys", "create", "ci", "--budget", "1"]).exit_code == 0
    record = in_store(Settings.load(), lambda store: store.keys.find("ci"))
    assert record is not None
    state = budget_key(prefix, record.id)

    async def redis_call(method: str, *args: object) -> object:
        client = Redis.from_url(REDIS_URL)
        try:
            return await getattr(client, method)(*args)
        finally:
            await client.aclose()

    asyncio.run(redis_call("hset", state, "limit", 1_000_000_000))
    changed = runner.invoke(main, ["keys", "budget", "ci", "5"])
    assert changed.exit_code == 0, changed.output
    assert asyncio.run(redis_call("exists", state)) == 0


def test_a_bad_redis_url_is_a_config_error() -> None:
    settings = Settings.load()
    bad = dataclasses.replace(settings, redis_url="http://127.0.0.1:6379")
    with pytest.raises(ConfigError, match=r"redis_url: .*redis://127\.0\.0\.1:6379/0"):
        Shared.for_settings(bad, SpendLedger(settings.database))
