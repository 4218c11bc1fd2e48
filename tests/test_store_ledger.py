"""The spend ledger: exact sums, budgets, atomic reservations (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import POSTGRES_URL

from openfusion.errors import ConfigError
from openfusion.settings import Settings
from openfusion.store import (
    NANO,
    BudgetExhausted,
    Reservation,
    SpendLedger,
    SpendRow,
    format_usd,
    to_nano,
)


class Clock:
    """A clock the test moves by hand (epoch seconds)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SpendLedger]:
    async with SpendLedger(sqlite_url(tmp_path)) as ledger:
        yield ledger


# --- money -----------------------------------------------------------------------------------


def test_money_is_integer_nano_usd() -> None:
    assert to_nano(0.1) + to_nano(0.2) == to_nano(0.3) == 300_000_000
    assert 0.1 + 0.2 != 0.3  # the float sum is not exact; the nano sum is
    assert to_nano(1.0) == NANO
    assert [format_usd(n) for n in (NANO, 30_000_000, 6_900_000, 1, 0, -5)] == [
        "$1.00",
        "$0.03",
        "$0.0069",
        "$0.000000001",
        "$0.00",
        "-$0.000000005",
    ]
    with pytest.raises(ValueError, match="not an amount"):
        to_nano(float("nan"))


# --- reserve and settle ----------------------------------------------------------------------


async def test_settled_rows_sum_exactly(ledger: SpendLedger) -> None:
    costs = [0.1, 0.2, 0.3, 0.000_000_001, 1 / 3, 0.0069]
    await ledger.set_budget("k", 10.0)
    reservation = await ledger.reserve("k", 2.0)
    assert isinstance(reservation, Reservation) and reservation.amount_nano == 2 * NANO
    assert (await ledger.budget("k")).reserved_nano == 2 * NANO

    await ledger.settle(
        reservation.id, "gen-1", [SpendRow("panel", f"m{i}", c) for i, c in enumerate(costs)]
    )

    rows = await ledger.rows("gen-1")
    assert [r.cost_nano for r in rows] == [to_nano(c) for c in costs]
    assert [(r.key_id, r.stage, r.model, r.unpriced) for r in rows] == [
        ("k", "panel", f"m{i}", False) for i in range(len(costs))
    ]
    expected = sum(to_nano(c) for c in costs)
    assert expected == 100_000_000 + 200_000_000 + 300_000_000 + 1 + 333_333_333 + 6_900_000
    assert await ledger.spent("k") == expected
    status = await ledger.budget("k")
    assert (status.limit_nano, status.spent_nano, status.reserved_nano) == (10 * NANO, expected, 0)
    assert status.remaining_nano == 10 * NANO - expected


async def test_budget_exhausted_says_how_much_and_what_to_do(ledger: SpendLedger) -> None:
    await ledger.set_budget("k", 1.0)
    first = await ledger.reserve("k", 0.6)
    assert first is not None
    await ledger.settle(first.id, "gen-1", [SpendRow("call", "m", 0.55)])

    with pytest.raises(BudgetExhausted) as caught:
        await ledger.reserve("k", 0.5)
    error = caught.value
    assert (error.limit, error.spent) == (1.0, 0.55)
    assert (error.limit_nano, error.spent_nano, error.wanted_nano) == (NANO, 550_000_000, 5 * 10**8)
    assert "spent $0.55 of its $1.00 budget" in str(error)
    assert "`openfusion keys budget k USD`" in str(error)
    assert await ledger.reserve("k", 0.45) is not None  # exactly what is left still fits


async def test_up_to_holds_what_is_left(ledger: SpendLedger) -> None:
    await ledger.set_budget("k", 1.0)
    held = await ledger.reserve("k", 0.7)
    assert held is not None
    capped = await ledger.reserve("k", 1.0, up_to=True)
    assert capped is not None and capped.amount_nano == 300_000_000 and capped.amount == 0.3
    with pytest.raises(BudgetExhausted, match="held by requests in flight"):
        await ledger.reserve("k", 1.0, up_to=True)


async def test_keys_without_budget_reserve_nothing_and_still_record(ledger: SpendLedger) -> None:
    assert await ledger.reserve("free", 5.0) is None
    await ledger.settle(None, "gen-1", [SpendRow("call", "m", 0.25)], key_id="free")
    await ledger.settle(None, "gen-2", [SpendRow("call", "m", 0.5)])  # a request without key
    assert await ledger.spent("free") == 250_000_000
    assert await ledger.spent(None) == 500_000_000
    status = await ledger.budget("free")
    assert status.limit_nano is None and status.remaining_nano is None


async def test_set_budget_replaces_and_removes(ledger: SpendLedger) -> None:
    await ledger.set_budget("k", 1.0)
    await ledger.set_budget("k", 2.5)
    assert (await ledger.budget("k")).limit_nano == 2_500_000_000
    await ledger.set_budget("k", 0)
    with pytest.raises(BudgetExhausted):
        await ledger.reserve("k", 0.01, up_to=True)
    await ledger.set_budget("k", None)
    assert await ledger.reserve("k", 100.0) is None
    with pytest.raises(ValueError, match="non-negative"):
        await ledger.set_budget("k", -1.0)


async def test_unpriced_calls_are_charged_the_rest_of_the_reservation(
    ledger: SpendLedger,
) -> None:
    await ledger.set_budget("k", 1.0)
    reservation = await ledger.reserve("k", 0.5)
    assert reservation is not None
    await ledger.settle(
        reservation.id, "gen-1", [SpendRow("panel", "a", 0.1), SpendRow("panel", "b", None)]
    )
    rows = await ledger.rows("gen-1")
    assert [(r.stage, r.model, r.cost_nano, r.unpriced) for r in rows] == [
        ("panel", "a", 100_000_000, False),
        ("panel", "b", None, True),
        ("unpriced_reserve", None, 400_000_000, False),
    ]
    assert await ledger.spent("k") == 500_000_000  # the whole reservation: never past the budget

    # Without a reservation there is nothing to charge it against: kept as unpriced only.
    await ledger.settle(None, "gen-2", [SpendRow("call", "c", None)], key_id="other")
    assert [(r.cost_nano, r.unpriced) for r in await ledger.rows("gen-2")] == [(None, True)]


async def test_a_run_that_spent_nothing_releases_its_reservation(ledger: SpendLedger) -> None:
    await ledger.set_budget("k", 1.0)
    reservation = await ledger.reserve("k", 1.0)
    assert reservation is not None
    await ledger.settle(reservation.id, "gen-1", [])
    assert await ledger.rows("gen-1") == []
    status = await ledger.budget("k")
    assert (status.spent_nano, status.reserved_nano, status.remaining_nano) == (0, 0, NANO)


async def test_spend_survives_a_restart(tmp_path: Path) -> None:
    async with SpendLedger(sqlite_url(tmp_path)) as first:
        await first.set_budget("k", 1.0)
        reservation = await first.reserve("k", 0.5)
        assert reservation is not None
        await first.settle(reservation.id, "gen-1", [SpendRow("call", "m", 0.3)])
        assert await first.reserve("k", 0.2) is not None  # in flight when the server stops

    async with SpendLedger(sqlite_url(tmp_path)) as second:
        status = await second.budget("k")
        assert (status.limit_nano, status.spent_nano) == (NANO, 300_000_000)
        assert status.reserved_nano == 200_000_000
        assert [r.cost_nano for r in await second.rows("gen-1")] == [300_000_000]
        with pytest.raises(BudgetExhausted):
            await second.reserve("k", 0.6)


async def test_stale_reservations_stop_counting(tmp_path: Path) -> None:
    clock = Clock()
    async with SpendLedger(sqlite_url(tmp_path), reservation_ttl=600, clock=clock) as ledger:
        await ledger.set_budget("k", 1.0)
        crashed = await ledger.reserve("k", 0.9)  # its server dies and never settles it
        assert crashed is not None
        clock.now += 599
        with pytest.raises(BudgetExhausted):
            await ledger.reserve("k", 0.5)
        clock.now += 2
        assert (await ledger.budget("k")).reserved_nano == 0
        live = await ledger.reserve("k", 0.5)
        assert live is not None
        assert (await ledger.budget("k")).reserved_nano == 500_000_000

        # A late settle of the stale reservation still records what was spent.
        await ledger.settle(crashed.id, "gen-late", [SpendRow("call", "m", 0.2)])
        assert await ledger.spent("k") == 200_000_000


async def test_unusable_databases_are_config_errors_without_secrets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a database URL"):
        SpendLedger("no url at all")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="database_url"):
        await SpendLedger(f"sqlite+aiosqlite:///{blocker}/sub/ledger.db").init()
    closed = SpendLedger("postgresql+asyncpg://user:s3cret-pw@127.0.0.1:1/db")
    with pytest.raises(ConfigError, match="cannot open it") as caught:
        await closed.init()
    await closed.aclose()
    assert "s3cret-pw" not in str(caught.value) and "***" in str(caught.value)


# --- settings --------------------------------------------------------------------------------


def test_database_url_setting(tmp_path: Path) -> None:
    config, data = tmp_path / "cfg", tmp_path / "data"
    dirs = {"OPENFUSION_CONFIG_DIR": str(config), "OPENFUSION_DATA_DIR": str(data)}
    default = Settings.load(dirs)
    assert default.database == f"sqlite+aiosqlite:///{data / 'openfusion.db'}"
    config.mkdir()
    (config / "openfusion.db").write_bytes(b"")  # where the first releases kept the ledger
    assert Settings.load(dirs).database == f"sqlite+aiosqlite:///{config / 'openfusion.db'}"
    (config / "config.toml").write_text('database_url = "sqlite+aiosqlite:////x/a.db"\n')
    assert Settings.load({"OPENFUSION_CONFIG_DIR": str(config)}).database.endswith("/x/a.db")
    env = {"OPENFUSION_CONFIG_DIR": str(config), "OPENFUSION_DATABASE_URL": POSTGRES_URL}
    from_env = Settings.load(env)
    assert from_env.database == POSTGRES_URL
    assert POSTGRES_URL not in repr(from_env)  # it may hold a password


# --- atomic under concurrency ----------------------------------------------------------------


async def race(first: SpendLedger, second: SpendLedger) -> list[Reservation]:
    """50 concurrent reservations of $0.03 against a $1 budget, from two ledgers."""
    await first.set_budget("k", 1.0)

    async def one(i: int) -> Reservation | None:
        try:
            return await (first if i % 2 else second).reserve("k", 0.03)
        except BudgetExhausted:
            return None

    results = await asyncio.gather(*(one(i) for i in range(50)))
    return [r for r in results if r is not None]


async def test_concurrent_reservations_never_pass_the_budget_sqlite(tmp_path: Path) -> None:
    async with (
        SpendLedger(sqlite_url(tmp_path)) as first,
        SpendLedger(sqlite_url(tmp_path)) as second,
    ):
        won = await race(first, second)
        assert len(won) == 33
        status = await second.budget("k")
        assert status.reserved_nano == 33 * 30_000_000 <= NANO


async def test_concurrent_reservations_never_pass_the_budget_postgres(
    postgres_schema: str,
) -> None:
    first = SpendLedger(POSTGRES_URL, schema=postgres_schema)
    second = SpendLedger(POSTGRES_URL, schema=postgres_schema)
    try:
        try:
            await first.init()
        except ConfigError as exc:
            pytest.skip(f"PostgreSQL at {POSTGRES_URL} cannot be used: {exc}")
        won = await race(first, second)
        assert len(won) == 33
        status = await second.budget("k")
        assert status.reserved_nano == 33 * 30_000_000 <= NANO

        await first.settle(
            won[0].id, "gen-pg", [SpendRow("call", "m", 0.1), SpendRow("x", None, 0.2)]
        )
        assert await second.spent("k") == to_nano(0.1) + to_nano(0.2)
    finally:
        await first.aclose()
        await second.aclose()
