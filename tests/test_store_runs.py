"""Runs recorded by the library and the CLI: what a record holds, a run read while it runs,
recording off, a store that fails, crash recovery (only dead processes' runs), retention."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Annotated, Any

import pytest
from click.testing import CliRunner
from helpers import ANALYSIS, POSTGRES_URL, new_postgres_schema
from pydantic import Field
from sqlalchemy import event, func, insert, select, update

from openfusion import Fusion, PanelSlot, Preset, Settings
from openfusion.cli import main
from openfusion.engine.trace import CallRecord, FusionPlan, ModelCallEvent, RunEnd, RunStart
from openfusion.providers import ProviderRegistry
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.store import Database, RunFilter, SpendRow, Store, to_nano
from openfusion.store import recorder as recorder_module
from openfusion.store.database import SQLITE_NICENESS
from openfusion.store.recorder import SLICE, SLICES, LedgerEntry, StoreRecorder
from openfusion.store.runs import Instance, utcnow
from openfusion.store.schema import instances, run_spans, runs, spend
from openfusion.tools import Source, Tool, ToolOutput, ToolRegistry
from openfusion.types import Message, ToolCall, Usage

COSTS = {"a": 0.001, "b": 0.002, "analysis": 0.0004, "synthesis": 0.0005}
QUESTION = "Who wrote Emma?"
DOC = "https://books.example/emma"


def registry(settings: Settings, **extra: Step) -> ProviderRegistry:
    script: dict[str, Any] = {
        "a": Step("Jane Austen.", cost=COSTS["a"]),
        "b": Step("Austen, in 1815.", cost=COSTS["b"]),
        "judge": lambda r: (
            Step(json.dumps(ANALYSIS), cost=COSTS["analysis"])
            if r.json_schema is not None
            else Step("Jane Austen wrote Emma.", cost=COSTS["synthesis"])
        ),
    }
    script.update(extra)
    found = ProviderRegistry(settings)
    found.register("demo", ScriptedProvider(script))
    return found


PRESET = Preset.from_models(["demo/a", "demo/b"], "demo/judge")


def recording(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as a user has them: recording on (conftest turns it off for other tests)."""
    monkeypatch.delenv("OPENFUSION_RECORD")
    return Settings.load()


async def stored(settings: Settings, run_id: str) -> dict[str, Any] | None:
    async with Store.for_settings(settings) as store:
        return await store.runs.get(run_id)


async def test_the_library_records_a_run_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = recording(monkeypatch)
    async with Fusion(PRESET, settings=settings, registry=registry(settings)) as fusion:
        result = await fusion.run(QUESTION, temperature=0.3)
    assert settings.database.endswith(f"{settings.data_dir}/openfusion.db")
    run = await stored(settings, result.run_id)
    assert run is not None
    assert (run["status"], run["kind"], run["source"]) == ("ok", "fusion", "library")
    assert (run["question"], run["answer"]) == (QUESTION, result.content)
    assert run["messages"] == [{"role": "user", "content": QUESTION}]
    assert run["options"]["temperature"] == 0.3
    assert (run["preset"], run["judge"], run["model"]) == (
        "custom",
        "demo/judge",
        "openfusion/custom",
    )
    assert run["analysis"] == result.analysis
    assert run["usage"]["cost_details"] == result.cost_details
    assert to_nano(run["cost"]) == to_nano(result.usage.cost or -1)

    members = {m["name"]: m for m in run["members"]}
    assert {n: (m["status"], m["content"], m["cost"]) for n, m in members.items()} == {
        "demo/a": ("ok", "Jane Austen.", COSTS["a"]),
        "demo/b": ("ok", "Austen, in 1815.", COSTS["b"]),
    }
    kinds = sorted((s["kind"], s["name"]) for s in run["timeline"])
    assert kinds == [
        ("member", "demo/a"),
        ("member", "demo/b"),
        ("model", "demo/a"),
        ("model", "demo/b"),
        ("model", "demo/judge"),
        ("model", "demo/judge"),
        ("stage", "analysis"),
        ("stage", "panel"),
        ("stage", "synthesis"),
    ]
    for span in run["timeline"]:
        assert 0 <= span["start_ms"] <= span["end_ms"] <= run["latency_ms"]
    analysis_call = next(
        s for s in run["timeline"] if s["stage"] == "analysis" and s["kind"] == "model"
    )
    assert json.loads(analysis_call["content"]) == ANALYSIS  # the judge's raw output
    assert analysis_call["messages"][0]["role"] == "user" and analysis_call["tries"] == 1
    panel_call = next(s for s in run["timeline"] if s["kind"] == "model" and s["member"] == 0)
    assert [m["role"] for m in panel_call["messages"]] == ["system", "user"]

    costs = run["cost_breakdown"]
    assert to_nano(costs["total"]) == sum(to_nano(c) for c in COSTS.values())
    assert costs["by_member"] == {"demo/a": COSTS["a"], "demo/b": COSTS["b"]}
    assert costs["by_stage"] == {
        "panel": pytest.approx(COSTS["a"] + COSTS["b"]),
        "analysis": COSTS["analysis"],
        "synthesis": COSTS["synthesis"],
    }


async def test_a_member_with_tools_records_each_turn_and_tool_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = recording(monkeypatch)
    page = "Jane Austen wrote Emma (1815). " * 100

    async def lookup(query: Annotated[str, Field(description="keywords")]) -> ToolOutput:
        """Look a fact up."""
        return ToolOutput(page, (Source("Emma", DOC, "", "test"),), cost=0.01)

    call = ToolCall("c1", "lookup", json.dumps({"query": "emma author"}))
    searching = [Step("", tool_calls=(call,), cost=0.001), Step(f"Austen, see {DOC}.", cost=0.002)]
    found = registry(settings, a=searching)
    preset = Preset("t", (PanelSlot("demo/a"),), judge="demo/judge")
    tools = ToolRegistry([Tool.from_function(lookup)])
    async with Fusion(preset, settings=settings, registry=found, tools=tools) as fusion:
        result = await fusion.run(QUESTION)
    run = await stored(settings, result.run_id)
    assert run is not None
    member = [s for s in run["timeline"] if s["member"] == 0 and s["kind"] != "member"]
    assert [(s["kind"], s["name"]) for s in member] == [
        ("model", "demo/a"),
        ("tool", "lookup"),
        ("model", "demo/a"),
    ]
    first, tool, second = member
    assert first["tool_calls"] == [{"id": "c1", "name": "lookup", "arguments": call.arguments}]
    assert first["end_ms"] <= tool["start_ms"] <= tool["end_ms"] <= second["start_ms"]
    assert tool["arguments"] == call.arguments and tool["sources"] == [DOC]
    assert len(tool["result"]) == 500 and tool["cost"] == 0.01  # the result is cut
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    assert second["messages"][-1]["content"].endswith("more characters]")
    assert run["members"][0]["tool_calls"] == 1
    assert run["cost_breakdown"]["tools"] == 0.01
    assert run["cost_breakdown"]["by_model"]["tool:lookup"] == 0.01
    assert run["cost_breakdown"]["by_member"] == {"demo/a": pytest.approx(0.013)}


async def test_a_run_is_readable_while_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = recording(monkeypatch)
    slow = registry(settings, b=Step("Austen.", delay=1.5, cost=COSTS["b"]))
    async with Fusion(PRESET, settings=settings, registry=slow) as fusion:
        task = asyncio.create_task(fusion.run(QUESTION, run_id="run-live"))
        seen: dict[str, Any] = {}

        async def poll() -> None:
            while True:
                found = await stored(settings, "run-live")
                if found and found["members"] and found["members"][0]["status"] == "ok":
                    seen.update(found)
                    return
                await asyncio.sleep(0.05)

        await asyncio.wait_for(poll(), 10)
        result = await task
    assert seen["status"] == "running" and seen["finished_at"] is None
    assert [m["status"] for m in seen["members"]] == ["ok", "running"]
    assert seen["members"][0]["content"] == "Jane Austen."
    done = await stored(settings, "run-live")
    assert done is not None and done["status"] == "ok" and done["answer"] == result.content


async def test_recording_off_leaves_no_database(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.load()  # OPENFUSION_RECORD=0 (conftest)
    assert not settings.store.record
    await Fusion(PRESET, settings=settings, registry=registry(settings)).run(QUESTION)
    on = recording(monkeypatch)
    await Fusion(PRESET, settings=on, registry=registry(on), recorder=None).run(QUESTION)
    assert not (on.data_dir / "openfusion.db").exists()


async def test_a_store_that_fails_never_fails_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("OPENFUSION_DATABASE_URL", f"sqlite+aiosqlite:///{blocker}/x.db")
    settings = recording(monkeypatch)
    result = await Fusion(PRESET, settings=settings, registry=registry(settings)).run(QUESTION)
    assert result.status == "ok" and result.content == "Jane Austen wrote Emma."
    assert "runs are not recorded" in caplog.text


async def test_a_store_that_never_answers_does_not_hold_the_close(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(store, "init", hang)
    monkeypatch.setattr(recorder_module, "CLOSE_TIMEOUT", 0.2)
    recorder = StoreRecorder(store, source="library")
    recorder.start_run(RunStart("stuck", "call", (Message("user", QUESTION),)))
    await asyncio.wait_for(recorder.aclose(), 10)
    assert "did not answer in 0.2s: 1 run(s) not written" in caplog.text


def test_openfusion_ask_records_and_says_where(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Path(os.environ["OPENFUSION_CONFIG_DIR"]) / "script.json"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(json.dumps({"a": {"content": "Jane Austen.", "cost": 0.001}}))
    (script.parent / "config.toml").write_text(
        f'[providers.demo]\ntype = "scripted"\noptions.script = "{script}"\n'
    )
    monkeypatch.delenv("OPENFUSION_RECORD")
    runner = CliRunner(env={"COLUMNS": "200"})
    done = runner.invoke(main, ["ask", "--panel", "demo/a", "--judge", "demo/a", QUESTION])
    assert done.exit_code == 0, done.output
    found = re.search(r"run ([0-9a-f]{32})", done.stderr)
    assert found is not None, done.stderr
    run_id = found.group(1)
    shown = runner.invoke(main, ["runs", "show", run_id])
    assert shown.exit_code == 0, shown.output
    assert "ok · fusion" in shown.output and QUESTION in shown.output and "timeline" in shown.output
    exported = runner.invoke(main, ["runs", "export", run_id, "--json"])
    run = json.loads(exported.output)
    assert (run["id"], run["source"], run["status"]) == (run_id, "cli", "ok")
    listed = runner.invoke(main, ["runs", "list", "--json"])
    assert [r["id"] for r in json.loads(listed.output)] == [run_id]
    off = runner.invoke(main, ["ask", "--no-record", "--panel", "demo/a", QUESTION])
    assert off.exit_code == 0 and re.search(r"run [0-9a-f]{32}", off.stderr) is None
    assert len(json.loads(runner.invoke(main, ["runs", "list", "--json"]).output)) == 1


# --- crash recovery ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A store on SQLite, and on the local PostgreSQL (a schema of the test's own)."""
    if request.param == "sqlite":
        settings = Settings(config_dir=tmp_path / "config", cache_dir=tmp_path / "cache")
        async with Store.for_settings(settings) as opened:
            yield opened
        return
    async with (
        new_postgres_schema() as schema,
        Store(Database(POSTGRES_URL, schema=schema)) as opened,
    ):
        yield opened


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


async def record_in_flight(
    store: Store, run_id: str, key_id: str | None = None, **process: Any
) -> None:
    """A server run with one finished member call recorded, whose process then stopped without
    a word (its recorder dropped, as a kill -9 leaves it); ``process`` says what its instance
    row holds then (``pid``, ``host``: another process than this test's)."""
    recorder = StoreRecorder(store, source="server", flush_interval=0.01)
    await recorder.start()
    reservation = await store.ledger.reserve(key_id, 1.0) if key_id else None
    start = RunStart(
        run_id,
        "fusion",
        (Message("user", QUESTION),),
        key_id=key_id,
        reservation_id=reservation.id if reservation else None,
    )
    log = recorder.start_run(start)
    call = CallRecord(
        ("demo/a",),
        "demo/a",
        (),
        "Jane Austen.",
        (),
        Usage(cost=0.25),
        1,
        None,
        False,
        log.started,
        log.started + 0.1,
    )
    log.event(ModelCallEvent("panel", 0, call))
    for _ in range(500):  # committed (start and call are in one batch), not just taken
        if await store.runs.get(run_id) is not None:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the run was not written in 5 s")
    for task in recorder._tasks:
        task.cancel()
    await asyncio.gather(*recorder._tasks, return_exceptions=True)
    async with store.db.write() as conn:
        mine = instances.c.id == recorder.instance.id
        await conn.execute(update(instances).where(mine).values(**process))


async def test_only_dead_processes_runs_become_unfinished(store: Store) -> None:
    await store.ledger.set_budget("k", 5.0)
    await record_in_flight(store, "remote-run", host="elsewhere")
    await record_in_flight(store, "living-run", pid=os.getppid())
    await record_in_flight(store, "dead-run", key_id="k", pid=dead_pid())  # swept last
    assert (await store.ledger.budget("k")).reserved_nano == 10**9  # held: $1.00

    me = Instance.this_process("me", "server")
    assert await store.runs.sweep(me, lease=60) == 1
    status = {r["id"]: r["status"] for r in (await store.runs.page(RunFilter()))[0]}
    assert status == {"dead-run": "unfinished", "remote-run": "running", "living-run": "running"}
    dead = await store.runs.get("dead-run")
    assert dead is not None and "stopped before it ended" in dead["failure_message"]
    # What it recorded was spent: charged to its key, its reservation released.
    budget = await store.ledger.budget("k")
    assert (budget.spent_nano, budget.reserved_nano) == (250_000_000, 0)
    rows = await store.ledger.rows("dead-run")
    assert [(r.stage, r.model, r.cost_nano) for r in rows] == [("panel", "demo/a", 250_000_000)]

    # A process whose heartbeat stopped (another machine's) is dead after the lease.
    async with store.db.write() as conn:
        stale = utcnow() - timedelta(seconds=61)
        await conn.execute(
            update(instances).where(instances.c.host == "elsewhere").values(heartbeat_at=stale)
        )
    assert await store.runs.sweep(me, lease=60) == 1
    assert (await store.runs.get("remote-run") or {})["status"] == "unfinished"
    assert await store.runs.sweep(me, lease=60) == 0  # done once
    # A process of this host with this test's pid is a former incarnation of it (a container
    # restarted): dead, whatever its heartbeat.
    async with store.db.write() as conn:
        await conn.execute(update(instances).values(pid=os.getpid()))
    assert await store.runs.sweep(me, lease=60) == 1
    assert (await store.runs.get("living-run") or {})["status"] == "unfinished"


async def test_a_run_written_before_its_plan_gets_its_members_later(store: Store) -> None:
    """A write can come between a request's start and its plan (a reader hurried the writer):
    the plan's members and options still reach the stored request."""
    recorder = StoreRecorder(store, source="server", flush_interval=60)
    await recorder.start()
    log = recorder.start_run(RunStart("gen-early", "call", (Message("user", QUESTION),)))
    recorder.hurry()
    for _ in range(500):
        if await store.runs.get("gen-early") is not None:
            break
        await asyncio.sleep(0.01)
    log.kind = "fusion"
    log.event(FusionPlan("demo", "demo/judge", ((0, "a", "demo/a"), (1, "b", "demo/b"))))
    written = recorder.settle(log, RunEnd("ok", "x"))
    recorder.hurry()
    await asyncio.wait_for(written, 10)
    run = await store.runs.get("gen-early")
    assert run is not None and run["kind"] == "fusion" and run["preset"] == "demo"
    assert [m["model"] for m in run["members"]] == ["demo/a", "demo/b"]
    await recorder.aclose()


async def test_settle_writes_the_end_and_the_spend_in_one_go(store: Store) -> None:
    await store.ledger.set_budget("k", 1.0)
    reservation = await store.ledger.reserve("k", 0.5)
    assert reservation is not None
    # The writer gathers changes for a minute: a settled run waits for the batch, until a
    # reader hurries the writer (the wait_for below would time out long before the minute).
    recorder = StoreRecorder(store, source="server", flush_interval=60)
    await recorder.start()
    log = recorder.start_run(RunStart("gen-1", "call", (Message("user", QUESTION),), key_id="k"))
    for cost in (0.1, 0.2):
        record = CallRecord(("m",), "m", (), "x", (), Usage(cost=cost), 1, None, False, 0.0, 0.0)
        log.event(ModelCallEvent("call", None, record))
    end = RunEnd("ok", "x", Usage(cost=0.3))
    written = recorder.settle(log, end, LedgerEntry(reservation.id, "k"))
    await asyncio.sleep(0.2)
    assert not written.done()  # batched: nothing is written per settle
    assert await store.ledger.rows("gen-1") == []
    recorder.hurry()
    await asyncio.wait_for(written, 10)
    run = await store.runs.get("gen-1")
    assert run is not None and run["status"] == "ok"
    assert sum(r.cost_nano or 0 for r in await store.ledger.rows("gen-1")) == to_nano(
        0.1
    ) + to_nano(0.2)
    assert (await store.ledger.budget("k")).reserved_nano == 0
    await recorder.aclose()


async def test_insert_many_writes_what_sqlalchemy_core_writes(store: Store) -> None:
    """The writer's driver-level inserts bind every type as SQLAlchemy does: the same stored
    values, byte for byte (JSON ``None`` as ``null``, integers past 64 bits, times, booleans;
    SQLite's times by a processor of the writer's own)."""
    db = store.db
    await db.init()
    when = utcnow().replace(microsecond=0)
    run = {c.name: None for c in runs.c} | {
        "kind": "call",
        "status": "ok",
        "source": "server",
        "instance_id": "i",
        "question": "q",
        "request": {"messages": [{"role": "user", "content": "q"}], "big": 2**70},
        "answer": "a",
        "totals": {"cost": 0.5},
        "streamed": True,
        "created_at": when,
        "updated_at": when.replace(microsecond=5),
        # SQLite drops an aware time's zone (PostgreSQL refuses one in a naive column)
        "finished_at": when.replace(year=999, tzinfo=UTC if db.sqlite else None),
    }
    row = {"key_id": None, "stage": "call", "model": None, "cost_nano": None, "unpriced": False}
    async with db.write() as conn:
        await conn.execute(insert(runs), [run | {"id": "core"}])
        await db.insert_many(conn, runs, [run | {"id": "driver"}])
        await conn.execute(insert(spend), [row | {"generation_id": "core", "created_at": when}])
        spent = row | {"generation_id": "driver", "created_at": when}
        await db.insert_many(conn, spend, [spent, spent])
    prefix = f"{db.schema}." if db.schema else ""
    async with db.read() as conn:  # raw rows: what the driver stored, not what a type reads
        stored_runs = (await conn.exec_driver_sql(f"SELECT * FROM {prefix}runs")).all()
        stored_spend = (
            await conn.exec_driver_sql(f"SELECT generation_id, created_at FROM {prefix}spend")
        ).all()
    by_id = {r[0]: r[1:] for r in stored_runs}
    assert by_id["core"] == by_id["driver"] and len(by_id) == 2
    assert sorted(r[0] for r in stored_spend) == ["core", "driver", "driver"]
    assert len({r[1] for r in stored_spend}) == 1


async def test_a_run_that_ends_by_the_next_batch_is_written_once(store: Store) -> None:
    """A run still running in the batch that gathered its start waits for the next one: a
    request that ends by then is inserted once, not inserted and at once updated; a run that
    runs on is written as running by the second batch (crash recovery still finds it)."""
    recorder = StoreRecorder(store, source="server", flush_interval=0.05)
    await recorder.start()
    statements: list[str] = []  # what was done to the runs table

    def statement(*args: Any) -> None:
        if found := re.match(r"(INSERT INTO|UPDATE) (\w+\.)?runs\b", args[2]):
            statements.append(found[1])

    engine = store.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", statement)

    async def batches(count: int) -> None:
        for _ in range(count):
            await recorder._progress.wait()  # set (and replaced) after each batch

    quick = recorder.start_run(RunStart("gen-quick", "call", (Message("user", QUESTION),)))
    slow = recorder.start_run(RunStart("gen-slow", "call", (Message("user", QUESTION),)))
    await batches(1)  # both started in this batch's gathering: neither written yet
    assert await store.runs.get("gen-quick") is None and await store.runs.get("gen-slow") is None
    await asyncio.wait_for(recorder.settle(quick, RunEnd("ok", "x")), 10)
    assert statements == ["INSERT INTO"]
    run = await store.runs.get("gen-slow")
    assert run is not None and run["status"] == "running"
    event.remove(engine, "before_cursor_execute", statement)
    await asyncio.wait_for(recorder.settle(slow, RunEnd("ok", "y")), 10)
    assert (await store.runs.get("gen-slow") or {})["status"] == "ok"
    await recorder.aclose()


async def test_a_batch_of_many_runs_is_written_whole_in_slices(store: Store) -> None:
    """Hundreds of runs in one batch: every run, span and spend row is written, in ``SLICES``
    statements per kind, and the event loop turns between the parts."""
    recorder = StoreRecorder(store, source="server", flush_interval=60)
    await recorder.start()
    count = 3 * SLICES * SLICE + 5
    settled = []
    for n in range(count):
        log = recorder.start_run(RunStart(f"gen-{n}", "call", (Message("user", QUESTION),)))
        record = CallRecord(("m",), "m", (), "x", (), Usage(cost=0.01), 1, None, False, 0.0, 0.0)
        log.event(ModelCallEvent("call", None, record))
        settled.append(recorder.settle(log, RunEnd("ok", "x"), LedgerEntry(None, None)))
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    at_snapshot: list[int] = []  # the loop's turn at each run's snapshot
    snapshot = recorder._snapshot

    def spy(tracked: Any) -> Any:
        at_snapshot.append(turns)
        return snapshot(tracked)

    recorder._snapshot = spy  # type: ignore[method-assign]
    rows_bound: list[int] = []

    def statement(*args: Any) -> None:
        if args[-1]:  # executemany
            rows_bound.append(len(args[3]))

    engine = store.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", statement)
    counter = asyncio.create_task(count_turns())
    recorder.hurry()
    await asyncio.wait_for(asyncio.gather(*settled), 30)
    counter.cancel()
    event.remove(engine, "before_cursor_execute", statement)
    assert len(at_snapshot) == count and len(set(at_snapshot)) == SLICES
    part = -(-count // SLICES)
    assert max(rows_bound) == part and rows_bound.count(part) >= 3 * (SLICES - 1)
    assert sum(rows_bound) >= 3 * count  # runs, spans, spend
    async with store.db.read() as conn:
        statuses = (await conn.execute(select(runs.c.id, runs.c.status))).all()
    assert sorted(statuses) == sorted((f"gen-{n}", "ok") for n in range(count))
    for n in (0, SLICE, count - 1):
        run = await store.runs.get(f"gen-{n}")
        assert run is not None and [s["kind"] for s in run["timeline"]] == ["model"]
        assert [r.cost_nano for r in await store.ledger.rows(f"gen-{n}")] == [to_nano(0.01)]
    await recorder.aclose()


# --- retention -------------------------------------------------------------------------------


async def test_prune_by_age_then_by_size_keeps_spend_and_running_runs(store: Store) -> None:
    recorder = StoreRecorder(store, source="library", flush_interval=0.01)
    await recorder.start()
    for i in range(6):
        log = recorder.start_run(RunStart(f"run-{i}", "call", (Message("user", "x" * 20_000),)))
        if i:  # run-0 stays running
            log.finish(RunEnd("ok", "y" * 20_000))
    for _ in range(500):  # committed, not just taken by the writer (its dirty set empties first)
        written = (await store.runs.page(RunFilter()))[0]
        if sorted(r["status"] for r in written) == ["ok"] * 5 + ["running"]:
            break
        await asyncio.sleep(0.01)
    await store.ledger.settle(None, "run-1", [SpendRow("call", "m", 0.5)])
    async with store.db.write() as conn:
        old = utcnow() - timedelta(days=40)
        await conn.execute(
            update(runs).where(runs.c.id.in_(["run-0", "run-1", "run-2"])).values(created_at=old)
        )

    pruned = await store.runs.prune(keep_days=30, max_mb=0)
    assert (pruned.by_age, pruned.by_size) == (2, 0)
    left = sorted(r["id"] for r in (await store.runs.page(RunFilter()))[0])
    assert left == ["run-0", "run-3", "run-4", "run-5"]
    async with store.db.read() as conn:
        assert (
            await conn.scalar(
                select(func.count()).select_from(run_spans).where(run_spans.c.run_id == "run-1")
            )
            == 0
        )
        assert await conn.scalar(select(func.count()).select_from(spend)) == 1  # spend stays

    size = await store.runs.size_mb()
    assert size is not None and size > 0
    pruned = await store.runs.prune(keep_days=0, max_mb=size / 1000)
    assert pruned.by_size == 3  # every finished run; never the running one
    assert [r["id"] for r in (await store.runs.page(RunFilter()))[0]] == ["run-0"]
    await recorder.aclose()


def test_prune_command(monkeypatch: pytest.MonkeyPatch) -> None:
    done = CliRunner().invoke(main, ["runs", "prune", "--keep-days", "7"])
    assert done.exit_code == 0, done.output
    assert "pruned 0 run(s) older than 7 days" in done.output


async def test_runs_list_filters_and_pages(store: Store) -> None:
    recorder = StoreRecorder(store, source="server", flush_interval=0.01)
    await recorder.start()
    for i in range(5):
        start = RunStart(
            f"gen-{i}", "call", (Message("user", f"question {i}"),), key_id="k" if i % 2 else None
        )
        recorder.start_run(start).finish(RunEnd("ok" if i != 3 else "error"))
    await recorder.aclose()
    first, cursor = await store.runs.page(RunFilter(limit=2))
    second, cursor2 = await store.runs.page(RunFilter(limit=2, cursor=cursor))
    third, cursor3 = await store.runs.page(RunFilter(limit=2, cursor=cursor2))
    assert [r["id"] for r in first + second + third] == [f"gen-{i}" for i in range(4, -1, -1)]
    assert cursor3 is None
    assert [r["id"] for r in (await store.runs.page(RunFilter(key_id="k")))[0]] == [
        "gen-3",
        "gen-1",
    ]
    assert [r["id"] for r in (await store.runs.page(RunFilter(status="error")))[0]] == ["gen-3"]
    assert [r["id"] for r in (await store.runs.page(RunFilter(q="TION 2")))[0]] == ["gen-2"]
    assert (await store.runs.page(RunFilter(q="50%_")))[0] == []
    with pytest.raises(ValueError, match="not a cursor"):
        await store.runs.page(RunFilter(cursor="garbage!"))


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
async def test_sqlite_runs_in_threads_nicer_than_the_event_loop(tmp_path: Path) -> None:
    """The store's SQLite work yields the core to requests: aiosqlite's connection threads run
    ``SQLITE_NICENESS`` nicer than the event loop's thread (whatever that one's nice value)."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'nice.db'}")
    await db.init()
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        thread = raw.driver_connection._thread  # type: ignore[union-attr]
        ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == min(ours + SQLITE_NICENESS, 19)
    await db.aclose()
