"""The runs API on a real server: every kind of request is a run, with its calls; who may read
which run; a run read while it runs; bad filters; no secret in any record."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from helpers import create_key
from server_fixtures import (
    ANALYSIS_COST,
    ANSWER,
    PANEL_COSTS,
    SYNTHESIS_COST,
    RunningServer,
    setup_demo,
    write_config,
    write_preset,
)
from upstream_mock import MockUpstream, Reply

from openfusion.providers.scripted import Step
from openfusion.settings import Settings
from openfusion.store import to_nano
from openfusion.types import ToolCall

Serve = Callable[..., RunningServer]
QUESTION = [{"role": "user", "content": "Who wrote Pride and Prejudice?"}]


async def call(
    server: RunningServer,
    method: str,
    path: str,
    bearer: str | None = None,
    body: dict[str, Any] | None = None,
    **params: str,
) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, server.url + path, json=body, params=params, headers=headers
        ) as response,
    ):
        text = await response.text()
        data = json.loads(text) if text.startswith(("{", "[")) else text
        return response.status, data, {k.lower(): v for k, v in response.headers.items()}


async def ask(server: RunningServer, key: str | None = None, **body: Any) -> str:
    """Post a chat completion; its generation id (the run's id)."""
    status, data, headers = await call(
        server, "POST", "/v1/chat/completions", key, {"messages": QUESTION, **body}
    )
    assert status == 200, data
    return headers["x-generation-id"]


async def test_a_fusion_request_is_a_run_with_its_calls(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    run_id = await ask(server, model="openfusion/demo", temperature=0.2)
    status, run, _ = await call(server, "GET", f"/v1/fusion/runs/{run_id}")
    assert status == 200, run
    assert (run["id"], run["kind"], run["status"], run["source"]) == (
        run_id,
        "fusion",
        "ok",
        "server",
    )
    assert run["model"] == "openfusion/demo" and run["preset"] == "demo"
    assert run["answer"] == ANSWER and run["options"]["temperature"] == 0.2
    assert run["analysis"]["consensus"] == ["Jane Austen wrote it"]
    assert sorted(m["name"] for m in run["members"]) == ["demo/a", "demo/b", "demo/c"]
    calls = sorted((s["stage"], s["model"]) for s in run["timeline"] if s["kind"] == "model")
    assert calls == [
        ("analysis", "demo/judge"),
        ("panel", "demo/a"),
        ("panel", "demo/b"),
        ("panel", "demo/c"),
        ("synthesis", "demo/judge"),
    ]
    total = sum(PANEL_COSTS.values()) + ANALYSIS_COST + SYNTHESIS_COST
    assert to_nano(run["cost_breakdown"]["total"]) == to_nano(total) == to_nano(run["cost"])

    status, page, _ = await call(server, "GET", "/v1/fusion/runs")
    assert status == 200 and [r["id"] for r in page["data"]] == [run_id]
    assert page["next_cursor"] is None and page["data"][0]["question"] == QUESTION[0]["content"]


async def test_plain_and_caller_tier_requests_are_runs_too(serve: Serve) -> None:
    fusion_call = ToolCall("c1", "fusion", json.dumps({"prompt": "Who wrote P&P, really?"}))
    caller = [Step("", tool_calls=(fusion_call,), cost=0.01), Step("Austen.", cost=0.02)]
    demo = setup_demo(caller=caller)
    server = serve(demo.settings, demo.registry)
    plain = await ask(server, model="demo/a", stream=True)
    tiered = await ask(
        server,
        model="demo/caller",
        plugins=[{"id": "fusion", "analysis_models": ["demo/a", "demo/b"], "model": "demo/judge"}],
    )
    _, plain_run, _ = await call(server, "GET", f"/v1/fusion/runs/{plain}")
    assert (plain_run["kind"], plain_run["status"], plain_run["answer"]) == (
        "call",
        "ok",
        "Jane Austen.",
    )
    assert plain_run["options"]["stream"] is True
    assert [(s["kind"], s["stage"], s["model"]) for s in plain_run["timeline"]] == [
        ("model", "call", "demo/a")
    ]
    _, tier_run, _ = await call(server, "GET", f"/v1/fusion/runs/{tiered}")
    assert (tier_run["kind"], tier_run["answer"]) == ("caller", "Austen.")
    stages = [s["stage"] for s in tier_run["timeline"] if s["kind"] == "model"]
    assert stages.count("caller") == 2 and stages.count("panel") == 2 and "analysis" in stages
    assert sorted(m["name"] for m in tier_run["members"]) == ["demo/a", "demo/b"]
    _, page, _ = await call(server, "GET", "/v1/fusion/runs", kind="caller")
    assert [r["id"] for r in page["data"]] == [tiered]


async def test_a_request_refused_before_it_ran_leaves_no_run(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    status, _, _ = await call(
        server, "POST", "/v1/chat/completions", body={"model": "nowhere/x", "messages": QUESTION}
    )
    assert status == 400
    _, page, _ = await call(server, "GET", "/v1/fusion/runs")
    assert page["data"] == []


async def test_keys_see_their_own_runs_and_admins_see_all(serve: Serve) -> None:
    demo = setup_demo()
    alice_id, alice = create_key(demo.settings, "alice")
    _, bob = create_key(demo.settings, "bob")
    _, admin = create_key(demo.settings, "ops", admin=True)
    server = serve(demo.settings, demo.registry)
    mine = await ask(server, alice, model="demo/a")
    theirs = await ask(server, bob, model="demo/b")

    _, page, _ = await call(server, "GET", "/v1/fusion/runs", alice)
    assert [r["id"] for r in page["data"]] == [mine]
    assert page["data"][0]["key_id"] == alice_id
    for path in (f"/v1/fusion/runs/{theirs}", "/v1/generation"):
        status, error, _ = await call(server, "GET", path, alice, id=theirs)
        assert status == 404 and "not found" in error["error"]["message"]
    status, error, _ = await call(server, "GET", "/v1/fusion/runs", bob, key=alice_id)
    assert status == 403 and "admin key" in error["error"]["message"]

    _, every, _ = await call(server, "GET", "/v1/fusion/runs", admin)
    assert sorted(r["id"] for r in every["data"]) == sorted([mine, theirs])
    _, filtered, _ = await call(server, "GET", "/v1/fusion/runs", admin, key=alice_id)
    assert [r["id"] for r in filtered["data"]] == [mine]
    status, run, _ = await call(server, "GET", f"/v1/fusion/runs/{theirs}", admin)
    assert status == 200 and run["answer"] == "Austen, in 1813."
    status, generation, _ = await call(server, "GET", "/v1/generation", admin, id=theirs)
    assert status == 200 and generation["data"]["id"] == theirs
    assert (await call(server, "GET", "/v1/fusion/runs"))[0] == 401


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "done"}, "status: must be one of"),
        ({"limit": "0"}, "limit: a whole number"),
        ({"limit": "²"}, "limit: a whole number"),
        ({"since": "yesterday"}, "since: an ISO 8601 time"),
        ({"cursor": "!!"}, "cursor:"),
        ({"color": "red"}, "color: not a filter"),
        ({"kind": "x"}, "kind: must be one of"),
    ],
)
async def test_bad_filters_are_400s_that_name_the_field(
    serve: Serve, params: dict[str, str], field: str
) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    status, error, _ = await call(server, "GET", "/v1/fusion/runs", **params)
    assert status == 400 and error["error"]["message"].startswith(field), error
    assert (await call(server, "GET", "/v1/fusion/runs/nope"))[0] == 404


async def test_a_run_in_flight_is_readable_and_pages_filter(serve: Serve) -> None:
    demo = setup_demo(c=Step("Austen.", delay=2.0, cost=PANEL_COSTS["c"]))
    server = serve(demo.settings, demo.registry)
    done = await ask(server, model="demo/a")
    task = asyncio.create_task(ask(server, model="openfusion/demo"))
    running: dict[str, Any] = {}

    async def in_flight() -> bool:
        _, page, _ = await call(server, "GET", "/v1/fusion/runs", status="running")
        if not page["data"]:
            return False
        _, run, _ = await call(server, "GET", f"/v1/fusion/runs/{page['data'][0]['id']}")
        running.update(run)
        return sum(m["status"] == "ok" for m in run["members"]) == 2

    for _ in range(100):
        if await in_flight():
            break
        await asyncio.sleep(0.05)
    assert running["status"] == "running"
    assert sorted(m["status"] for m in running["members"]) == ["ok", "ok", "running"]
    status, generation, _ = await call(server, "GET", "/v1/generation", id=running["id"])
    assert status == 200 and generation["data"]["status"] == "running"
    assert generation["data"]["total_cost"] is None
    finished = await task
    assert finished == running["id"]
    _, page, _ = await call(server, "GET", "/v1/fusion/runs", limit="1")
    assert [r["id"] for r in page["data"]] == [finished]
    _, rest, _ = await call(server, "GET", "/v1/fusion/runs", cursor=page["next_cursor"])
    assert [r["id"] for r in rest["data"]] == [done] and rest["next_cursor"] is None
    _, found, _ = await call(server, "GET", "/v1/fusion/runs", preset="demo", q="PRIDE")
    assert [r["id"] for r in found["data"]] == [finished]


async def test_no_configured_secret_is_ever_in_the_store(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that echoes the key it was sent (in answers and in errors): the records
    hold ``[redacted]`` where the key was, and no header at all."""
    secret = "sk-or-v1-echoed-0123456789abcdef"
    monkeypatch.setenv("MOCK_KEY", secret)
    echo = Reply(content=f"You sent Authorization: Bearer {secret}", cost=0.001)
    failure = Reply(status=401, error={"message": f"key {secret} is not valid here"})
    async with MockUpstream() as up:
        up.replies["m"] = echo
        up.replies["n"] = failure
        up.replies["judge"] = lambda body: (
            Reply(
                json.dumps(
                    {
                        "consensus": [secret],
                        "contradictions": [],
                        "partial_coverage": [],
                        "unique_insights": [],
                        "blind_spots": [],
                    }
                )
            )
            if "response_format" in body
            else echo
        )
        write_config(
            f'[providers.keyed]\ntype = "openai_compat"\nbase_url = "{up.base_url}"\n'
            'api_key_env = "MOCK_KEY"\n'
        )
        write_preset("keyed", "keyed/judge", ["keyed/m", "keyed/n"])
        settings = Settings.load()
        server = serve(settings)
        for body in (
            {"model": "keyed/m"},
            {"model": "keyed/n"},
            {"model": "openfusion/keyed", "stream": True},
        ):
            await call(server, "POST", "/v1/chat/completions", body={"messages": QUESTION, **body})
        _, page, _ = await call(server, "GET", "/v1/fusion/runs")
        assert len(page["data"]) == 3
    assert all(r.headers["Authorization"] == f"Bearer {secret}" for r in up.requests)
    database = settings.database.removeprefix("sqlite+aiosqlite:///")
    with sqlite3.connect(database) as db:
        dump = "\n".join(db.iterdump())
    assert secret not in dump
    assert "[redacted]" in dump and "Authorization: Bearer [redacted]" in dump
    assert "authorization" not in dump.lower().replace("authorization: bearer [redacted]", "")


async def test_another_server_on_the_database_answers_for_the_generation(serve: Serve) -> None:
    demo = setup_demo()
    first = serve(demo.settings, demo.registry)
    run_id = await ask(first, model="openfusion/demo")
    await first.written()  # the first server writes the run's end just after its answer
    other = setup_demo()
    second = serve(other.settings, other.registry)
    status, data, _ = await call(second, "GET", "/v1/generation", id=run_id)
    assert status == 200
    record = data["data"]
    assert (record["id"], record["model"], record["fusion_status"]) == (
        run_id,
        "openfusion/demo",
        "ok",
    )
    assert sorted(r["cost"] for r in record["responses"]) == sorted(PANEL_COSTS.values())
