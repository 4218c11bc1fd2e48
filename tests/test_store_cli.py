"""`openfusion keys` with budgets and rate limits: create --budget --rpm --tpm, budget ID
USD|none, limits ID --rpm --tpm, list."""

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


def test_rate_limits_set_listed_and_removed() -> None:
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "ci", "--rpm", "30"])
    assert created.exit_code == 0 and "key " in created.stderr
    assert "30 requests/min" in created.stderr
    record = in_store(Settings.load(), lambda store: store.keys.find("ci"))
    assert record is not None and (record.rpm, record.tpm) == (30, None)

    both = runner.invoke(main, ["keys", "limits", "ci", "--rpm", "10", "--tpm", "5000"])
    assert both.exit_code == 0, both.output
    assert "10 requests/min, 5000 tokens/min" in both.output
    listing = runner.invoke(main, ["keys", "list"], env={"COLUMNS": "200"})
    header, line = listing.output.splitlines()
    assert header.split()[-2:] == ["rpm", "tpm"] and line.split()[-2:] == ["10", "5000"]

    cleared = runner.invoke(main, ["keys", "limits", "ci"])
    assert cleared.exit_code == 0 and "no rate limits" in cleared.output
    record = in_store(Settings.load(), lambda store: store.keys.find("ci"))
    assert record is not None and (record.rpm, record.tpm) == (None, None)

    bad = runner.invoke(main, ["keys", "limits", "ci", "--rpm", "0"])
    assert bad.exit_code == 2 and "a whole number from 1, or `none`" in bad.output
