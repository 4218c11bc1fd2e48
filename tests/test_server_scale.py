"""The server's per-key rate limits (429 with Retry-After), /metrics, JSON logs with the
generation id, OpenTelemetry spans of each run, and the collector tuned for serving."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from helpers import create_key, in_store
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from server_fixtures import RunningServer, config_dir, setup_demo

from openfusion.logs import GenerationFilter, JSONFormatter, generation_id
from openfusion.providers.scripted import Step
from openfusion.server import app as server_app
from openfusion.server.telemetry import Telemetry
from openfusion.store import Store

Serve = Callable[..., RunningServer]
QUESTION = {"role": "user", "content": "Who wrote Pride and Prejudice?"}
FUSION = {"model": "openfusion/demo", "messages": [QUESTION]}


async def post(
    server: RunningServer, key: str, body: dict[str, Any] = FUSION
) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(server.url + "/v1/chat/completions", json=body) as response,
    ):
        headers = {k.lower(): v for k, v in response.headers.items()}
        return response.status, headers, await response.json()


async def get(server: RunningServer, path: str, key: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.get(server.url + path) as response,
    ):
        return response.status, await response.text()


async def test_requests_per_minute_give_429_with_retry_after(serve: Serve) -> None:
    demo = setup_demo()
    _, key = create_key(demo.settings, "team")
    _, other = create_key(demo.settings, "other")
    in_store(demo.settings, lambda store: store.keys.set_limits("team", 2, None))
    server = serve(demo.settings, demo.registry)
    assert [(await post(server, key))[0] for _ in range(2)] == [200, 200]
    status, headers, body = await post(server, key)
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 60
    assert body["error"]["metadata"]["failure_reason"] == "rate_limited"
    assert "may send 2 requests per minute" in body["error"]["message"]
    assert key not in json.dumps(body)  # the key's id, never the key
    assert (await post(server, other))[0] == 200  # a key without limits is not slowed


async def test_tokens_per_minute_count_every_inner_call(serve: Serve) -> None:
    demo = setup_demo()
    _, key = create_key(demo.settings, "team")
    in_store(demo.settings, lambda store: store.keys.set_limits("team", None, 10))
    server = serve(demo.settings, demo.registry)
    status, _, body = await post(server, key)
    assert status == 200 and body["usage"]["total_tokens"] >= 10  # five calls of a few tokens
    status, headers, _ = await post(server, key)
    assert status == 429 and "retry-after" in headers


async def test_metrics_count_requests_calls_tokens_and_cost(serve: Serve) -> None:
    demo = setup_demo()
    _, admin = create_key(demo.settings, "ops", admin=True)
    _, user = create_key(demo.settings, "user")
    server = serve(demo.settings, demo.registry)
    status, _, body = await post(server, user)
    assert status == 200

    assert (await get(server, "/metrics", user))[0] == 403  # only an admin key reads it
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + "/metrics") as response,
    ):
        assert response.status == 401
    status, text = await get(server, "/metrics", admin)
    assert status == 200
    samples = parse(text)
    route = 'route="/v1/chat/completions"'
    assert samples[f'openfusion_http_requests_total{{method="POST",{route},status="200"}}'] == 1
    assert samples['openfusion_http_requests_total{method="GET",route="/metrics",status="403"}']
    assert samples['openfusion_runs_total{kind="fusion",status="ok"}'] == 1
    assert samples["openfusion_runs_in_flight"] == 0
    for model in ("demo/a", "demo/b", "demo/c"):
        assert (
            samples[f'openfusion_inner_calls_total{{model="{model}",outcome="ok",stage="panel"}}']
            == 1
        )
    judge = 'model="demo/judge",outcome="ok"'
    assert samples[f'openfusion_inner_calls_total{{{judge},stage="analysis"}}'] == 1
    assert samples[f'openfusion_inner_calls_total{{{judge},stage="synthesis"}}'] == 1
    completion = sum(
        v
        for k, v in samples.items()
        if k.startswith("openfusion_tokens_total") and "completion" in k
    )
    assert completion == body["usage"]["completion_tokens"]
    cost = sum(v for k, v in samples.items() if k.startswith("openfusion_cost_usd_total"))
    assert cost == pytest.approx(body["usage"]["cost"])
    assert samples['openfusion_stage_seconds_count{stage="analysis"}'] == 1
    assert samples['openfusion_stage_seconds_count{stage="member"}'] == 3


async def test_metrics_show_the_breaker_of_a_failing_model(serve: Serve) -> None:
    demo = setup_demo(
        "[retries]\nattempts = 1\nbreaker_threshold = 1\n", c=Step(status=503, error="down")
    )
    server = serve(demo.settings, demo.registry)
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/chat/completions", json=FUSION) as r:
            assert r.status == 200
        async with session.get(server.url + "/metrics") as r:  # no keys: loopback, open
            samples = parse(await r.text())
    assert samples['openfusion_breaker_state{model="demo/c"}'] == 2  # open
    assert samples['openfusion_inner_calls_total{model="demo/c",outcome="failed",stage="panel"}']


def parse(text: str) -> dict[str, float]:
    """Prometheus text format: ``name{labels}`` (labels sorted) -> value."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if "{" in name:
            base, labels = name[:-1].split("{", 1)
            name = base + "{" + ",".join(sorted(labels.split(","))) + "}"
        samples[name] = float(value)
    return samples


def test_json_logs_carry_the_generation_id() -> None:
    formatter = JSONFormatter()
    record = logging.LogRecord(
        "openfusion.x", logging.WARNING, __file__, 1, "hi %s", ("there",), None
    )
    token = generation_id.set("gen-1-abc")
    try:
        line = json.loads(formatter.format(record))
    finally:
        generation_id.reset(token)
    assert line["message"] == "hi there" and line["level"] == "WARNING"
    assert line["generation_id"] == "gen-1-abc" and line["time"].endswith("Z")
    assert "generation_id" not in json.loads(formatter.format(record))  # outside a run


async def test_a_run_logs_under_its_generation_id(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """The line the server writes when a run ends, in the run's own task, names its run."""
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    caplog.handler.addFilter(GenerationFilter())  # as `serve --log-format json` configures
    with caplog.at_level(logging.INFO, logger="openfusion.server"):
        status, headers, _ = await post(server, "unused")
    assert status == 200
    lines = [json.loads(JSONFormatter().format(r)) for r in caplog.records]
    ended = [line for line in lines if line["message"].startswith("fusion run ")]
    assert len(ended) == 1 and ended[0]["generation_id"] == headers["x-generation-id"]
    assert ended[0]["message"].endswith("cost $0.006900") and ended[0]["level"] == "INFO"


async def test_spans_per_run_stage_member_and_call(serve: Serve) -> None:
    demo = setup_demo()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = serve(demo.settings, demo.registry, telemetry=Telemetry(provider))
    status, headers, body = await post(server, "unused")
    assert status == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    run = spans["openfusion.run"]
    assert run.attributes is not None
    assert run.attributes["openfusion.generation_id"] == headers["x-generation-id"]
    assert run.attributes["openfusion.cost_usd"] == pytest.approx(body["usage"]["cost"])
    panel = spans["openfusion.stage panel"]
    assert panel.parent is not None and panel.parent.span_id == run.context.span_id
    members = [s for s in spans.values() if s.name.startswith("openfusion.member")]
    assert len(members) == 3
    for member in members:
        assert member.parent is not None and member.parent.span_id == panel.context.span_id
    calls = [s for s in exporter.get_finished_spans() if s.name == "openfusion.call demo/judge"]
    stages = {spans["openfusion.stage analysis"].context.span_id}
    stages.add(spans["openfusion.stage synthesis"].context.span_id)
    assert {c.parent.span_id for c in calls if c.parent} == stages
    assert all(s.start_time <= s.end_time for s in exporter.get_finished_spans())
    assert run.start_time <= panel.start_time and panel.end_time <= run.end_time


async def test_a_server_whose_redis_is_down_still_limits_and_holds_budgets(
    serve: Serve,
) -> None:
    """Redis unreachable: rate limits fall back to this process, budgets to the database."""
    demo = setup_demo('redis_url = "redis://127.0.0.1:1/0"\n')
    prices = "".join(  # a key with a budget uses priced models only
        f'["demo/{m}"]\nprompt = 0\ncompletion = 0\nrequest = 0.001\n' for m in "abc"
    )
    (config_dir() / "prices.toml").write_text(
        prices + '["demo/judge"]\nprompt = 0\ncompletion = 0\nrequest = 0.001\n'
    )
    key_id, key = create_key(demo.settings, "team")

    async def limits(store: Store) -> None:
        await store.keys.set_limits("team", 2, None)
        await store.ledger.set_budget(key_id, 1.0)

    in_store(demo.settings, limits)
    server = serve(demo.settings, demo.registry)
    statuses = [(await post(server, key, {**FUSION, "max_cost": 0.5}))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    await server.written(key)
    budget = in_store(demo.settings, lambda store: store.ledger.budget(key_id))
    assert budget.spent_nano == 2 * 6_900_000 and budget.reserved_nano == 0  # as scripted


def test_a_served_app_tunes_the_collector_once_started(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = setup_demo()
    before = gc.get_threshold()
    try:
        serve(demo.settings, demo.registry)
        assert gc.get_threshold() == before  # a test's app leaves the collector alone
        server = serve(demo.settings, demo.registry, tune_gc=True)
        assert gc.get_threshold() == server_app.GC_THRESHOLDS
        assert gc.get_freeze_count() > 1000  # startup's objects: out of every collection
        assert server.url  # and it serves
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(server_app, "create_app", lambda settings, **kw: made.append(kw))
    server_app.app_from_env()  # what `openfusion serve` runs
    assert made == [{"tune_gc": True}]
