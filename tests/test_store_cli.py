"""`openfusion keys` with budgets: create --budget, budget ID USD|none, list."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner
from helpers import in_store

from openfusion.cli import main
from openfusion.settings import Settings
from openfusion.store import SpendLedger, SpendRow


def key_id(name: str) -> str:
    record = in_store(Settings.load(), lambda store: store.keys.find(name))
    assert record is not None
    return record.id


def spend(key: str, usd: float) -> None:
    async def record() -> None:
        async with SpendLedger(Settings.load().database) as ledger:
            await ledger.settle(None, "gen-cli", [SpendRow("call", "m", usd)], key_id=key)

    asyncio.run(record())


def test_create_with_a_budget_and_list_it() -> None:
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "ci", "--budget", "5"])
    assert created.exit_code == 0, created.output
    assert created.stdout.strip().startswith("ofk-")
    assert "budget $5.00: spent $0.00, remaining $5.00" in created.stderr
    runner.invoke(main, ["keys", "create", "laptop"])
    spend(key_id("ci"), 1.25)

    listing = runner.invoke(main, ["keys", "list"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    header, *lines = listing.output.splitlines()
    assert header.split() == [
        "id",
        "name",
        "created",
        "revoked",
        "admin",
        "budget",
        "spent",
        "remaining",
    ]
    ci = next(line for line in lines if " ci " in line)
    assert ci.split()[-3:] == ["$5.00", "$1.25", "$3.75"]
    laptop = next(line for line in lines if " laptop " in line)
    assert laptop.split()[-1] == "$0.00"  # spent; no budget, no remaining


def test_budget_sets_changes_and_removes() -> None:
    runner = CliRunner()
    runner.invoke(main, ["keys", "create", "ci"])
    spend(key_id("ci"), 0.5)

    by_name = runner.invoke(main, ["keys", "budget", "ci", "2"])
    assert by_name.exit_code == 0, by_name.output
    assert "budget $2.00: spent $0.50, remaining $1.50" in by_name.output
    lower = runner.invoke(main, ["keys", "budget", key_id("ci"), "0.25"])
    assert lower.exit_code == 0 and "remaining $0.00" in lower.output
    removed = runner.invoke(main, ["keys", "budget", "ci", "none"])
    assert removed.exit_code == 0 and "no budget (spent $0.50)" in removed.output


def test_budget_errors_say_what_to_do() -> None:
    runner = CliRunner()
    runner.invoke(main, ["keys", "create", "ci"])
    unknown = runner.invoke(main, ["keys", "budget", "phone", "5"])
    assert unknown.exit_code == 1 and "`openfusion keys list` shows them" in unknown.output
    bad = runner.invoke(main, ["keys", "budget", "ci", "five"])
    assert bad.exit_code == 2 and "like 5 or 0.50, or `none`" in bad.output
    negative = runner.invoke(main, ["keys", "create", "x", "--budget", "-1"])
    assert negative.exit_code == 2


def test_a_broken_database_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENFUSION_DATABASE_URL", "postgresql+asyncpg://u:hidden@127.0.0.1:1/x")
    runner = CliRunner()
    runner.invoke(main, ["keys", "create", "ci"])
    result = runner.invoke(main, ["keys", "budget", "ci", "5"])
    assert result.exit_code == 1
    assert "cannot open it" in result.output and "hidden" not in result.output
