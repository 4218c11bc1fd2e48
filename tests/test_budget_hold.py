"""A key's budget holds whatever the upstream does (issue 13, items 1 and 8): every call of a
request — the caller's, the panel's, the judge's — is admitted against its reservation, the
``max_tokens`` sent upstream is what the reservation can pay, and an upstream that bills more
than it was asked for has its excess recorded as the key's overshoot, bounded per request.

All against a real loopback upstream that ignores ``max_tokens`` and bills ten times the tokens
asked (``upstream_mock.ignoring_max_tokens``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from helpers import ANALYSIS, create_key, in_store
from server_fixtures import RunningServer, config_dir, write_config, write_preset
from upstream_mock import MockUpstream, Reply, ignoring_max_tokens

from openfusion.cli import main
from openfusion.providers import ProviderRegistry
from openfusion.settings import Settings
from openfusion.store import NANO, BudgetExhausted, SpendLedger, SpendRow, to_nano

Serve = Callable[..., RunningServer]

FACTOR = 10
"""How many times the tokens asked the upstream bills."""
BUDGET = 0.01
RESERVATION = 0.002
"""Held by each request (none sets ``max_cost``)."""
PRICES = """
["up/caller"]
prompt = 1.0
completion = 2.0
["up/a"]
prompt = 1.0
completion = 2.0
["up/b"]
prompt = 1.0
completion = 2.0
["up/judge"]
prompt = 1.0
completion = 2.0
"""
QUESTION = {"role": "user", "content": "Who wrote Pride and Prejudice?"}


def answer(body: Any) -> Reply:
    """Plain answers; the judge's analysis when JSON is asked for; the caller fuses first."""
    asked = int(body.get("max_tokens") or 4096)
    if body.get("response_format"):
        return Reply(json.dumps(ANALYSIS))
    offered = [t["function"]["name"] for t in body.get("tools", [])]
    fused = any(m.get("role") == "tool" for m in body.get("messages", []))
    if "fusion" in offered and not fused:
        call = ("call_1", "fusion", json.dumps({"prompt": "Who wrote it?"}))
        return Reply("", tool_calls=[call], finish_reason="tool_calls")
    return Reply("word " * (FACTOR * asked))


def setup(upstream: MockUpstream) -> tuple[Settings, ProviderRegistry, str, str]:
    """Models ``up/*`` on the upstream, preset ``tight`` (default), a key with ``BUDGET``."""
    write_config(
        'default_preset = "tight"\n'
        "[providers.up]\n"
        'type = "openai_compat"\n'
        f'base_url = "{upstream.base_url}"\n'
        'api_key_env = ""\n'
        "[server]\n"
        'models = ["up/*"]\n'
        f"default_reservation_usd = {RESERVATION}\n"
    )
    write_preset("tight", "up/judge", ["up/a", "up/b"])
    (config_dir() / "prices.toml").write_text(PRICES)
    settings = Settings.load()
    key_id, key = create_key(settings, "tight")
    return settings, ProviderRegistry(settings), key_id, key


async def post(
    session: aiohttp.ClientSession, server: RunningServer, key: str, body: dict[str, Any]
) -> tuple[int, dict[str, str], str]:
    async with session.post(
        server.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        return response.status, headers, await response.text()


def request(n: int) -> dict[str, Any]:
    """Half caller tier, half plain; every other one streamed."""
    body: dict[str, Any] = {"model": "up/caller", "messages": [QUESTION], "stream": n % 2 == 0}
    if n % 4 < 2:
        body["plugins"] = [{"id": "fusion"}]
    return body


async def test_fifty_concurrent_requests_hold_the_budget_or_report_the_overshoot(
    serve: Serve,
) -> None:
    async with MockUpstream() as upstream:
        for model in ("caller", "a", "b", "judge"):
            upstream.replies[model] = ignoring_max_tokens(answer, FACTOR)
        settings, registry, key_id, key = setup(upstream)
        async with SpendLedger(settings.database) as ledger:
            await ledger.set_budget(key_id, BUDGET)
        server = serve(settings, registry)
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(post(session, server, key, request(n)) for n in range(50))
            )
            await server.written(key)
            late = await post(session, server, key, request(0))  # once the dust has settled
        async with SpendLedger(settings.database) as ledger:
            status = await ledger.budget(key_id)
            per_request = {}
            for _, headers, _ in results:
                if "x-generation-id" in headers:
                    rows = await ledger.rows(headers["x-generation-id"])
                    per_request[headers["x-generation-id"]] = sum(r.cost_nano or 0 for r in rows)

    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 402}, codes
    assert 402 in codes, "a $0.01 key cannot pay for 50 requests"
    # Every call upstream was sent a max_tokens the request's reservation could pay.
    asked = [r.json.get("max_tokens") for r in upstream.requests]
    assert asked and all(isinstance(a, int) and a * 2e-6 <= RESERVATION for a in asked), asked
    # The ledger holds what the upstream billed, and the excess is on the key's record.
    assert status.reserved_nano == 0
    assert status.spent_nano == sum(per_request.values())
    overshoot = status.spent_nano - to_nano(BUDGET)
    assert overshoot > 0, "an upstream billing 10x must show up"
    assert status.overshoot_nano >= overshoot
    # Bounded: no request cost more than FACTOR times what it held.
    assert max(per_request.values()) <= FACTOR * to_nano(RESERVATION)
    # And the key's next request is a 402 that says where the money went.
    assert late[0] == 402
    metadata = json.loads(late[2])["error"]["metadata"]
    assert metadata["overshoot"] == status.overshoot_nano / NANO
    assert metadata["spent"] == status.spent_nano / NANO
    listing = await asyncio.to_thread(
        CliRunner().invoke, main, ["keys", "list"], env={"COLUMNS": "200"}
    )
    overshoot_usd = f"{status.overshoot_nano / NANO:.9f}".rstrip("0")
    assert "overshoot" in listing.output and overshoot_usd in listing.output


async def test_an_upstream_that_honours_max_tokens_never_passes_the_budget(serve: Serve) -> None:
    """The same load on an honest upstream (bills what it was asked, at most): no overshoot."""
    async with MockUpstream() as upstream:
        for model in ("caller", "a", "b", "judge"):
            upstream.replies[model] = ignoring_max_tokens(answer, 1)
        settings, registry, key_id, key = setup(upstream)
        async with SpendLedger(settings.database) as ledger:
            await ledger.set_budget(key_id, BUDGET)
        server = serve(settings, registry)
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(post(session, server, key, request(n)) for n in range(50))
            )
        await server.written(key)
        async with SpendLedger(settings.database) as ledger:
            status = await ledger.budget(key_id)

    assert {code for code, _, _ in results} <= {200, 402}
    assert 0 < status.spent_nano <= to_nano(BUDGET)
    assert status.overshoot_nano == 0


def test_keys_list_counts_only_live_reservations() -> None:
    """``keys list`` reads the budget with ``[server] reservation_ttl_seconds``: a crashed
    server's reservation stops being held once it is older than that."""
    write_config("[server]\nreservation_ttl_seconds = 60\n")
    settings = Settings.load()
    key_id, _ = create_key(settings, "ttl")

    async def hold() -> None:
        old = SpendLedger(settings.database, clock=lambda: 1_000.0)  # long ago
        async with old as ledger:
            await ledger.set_budget(key_id, 1.0)
            await ledger.reserve(key_id, 0.25)
        async with SpendLedger(settings.database) as ledger:
            await ledger.reserve(key_id, 0.125)

    asyncio.run(hold())
    listing = CliRunner().invoke(main, ["keys", "list"], env={"COLUMNS": "200"})
    assert "$0.125" in listing.output  # held
    assert "$0.875" in listing.output  # remaining: the stale $0.25 no longer counts
    assert "$0.25" not in listing.output
    assert in_store(settings, lambda store: store.ledger.budget(key_id)).reserved_nano == to_nano(
        0.125
    )


async def test_settling_past_a_reservation_adds_the_excess_to_the_keys_overshoot() -> None:
    write_config("")
    settings = Settings.load()
    key_id, _ = create_key(settings, "over")
    async with SpendLedger(settings.database) as ledger:
        await ledger.set_budget(key_id, 0.01)
        held = await ledger.reserve(key_id, 0.004)
        assert held is not None
        rows = [SpendRow("panel", "up/a", 0.003), SpendRow("synthesis", "up/judge", 0.005)]
        await ledger.settle(held.id, "gen-1", rows)
        status = await ledger.budget(key_id)
        assert (status.spent_nano, status.overshoot_nano) == (to_nano(0.008), to_nano(0.004))
        within = await ledger.reserve(key_id, 0.001)  # a request that stays within: no change
        assert within is not None
        await ledger.settle(within.id, "gen-2", [SpendRow("call", "up/a", 0.001)])
        assert (await ledger.budget(key_id)).overshoot_nano == to_nano(0.004)
        with pytest.raises(BudgetExhausted) as refused:
            await ledger.reserve(key_id, 0.005)
    assert refused.value.overshoot == 0.004
    assert "$0.004 of it beyond what its requests reserved" in str(refused.value)
