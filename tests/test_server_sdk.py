"""The server as OpenAI/OpenRouter clients see it: the official ``openai`` SDK (and LangChain)
against a real ``uvicorn`` on 127.0.0.1, on scripted models and a mock upstream."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Annotated, Any

import aiohttp
import openai
import pytest
from helpers import create_key
from openai import AsyncOpenAI
from pydantic import Field
from server_fixtures import (
    ANALYSIS,
    ANALYSIS_COST,
    ANSWER,
    PANEL_COSTS,
    SYNTHESIS_COST,
    TOTAL_COST,
    Demo,
    RunningServer,
    post,
    setup_demo,
    sse_data,
    sse_events,
    write_config,
    write_preset,
)
from upstream_mock import MockUpstream, Reply

from openfusion.providers.scripted import Step
from openfusion.settings import Settings
from openfusion.tools import Source, Tool, ToolOutput, ToolRegistry
from openfusion.types import ToolCall

Serve = Callable[..., RunningServer]
Keywords = Annotated[str, Field(description="keywords")]
QUESTION = [{"role": "user", "content": "Who wrote Pride and Prejudice?"}]
PANEL_ANSWERS = {"Jane Austen.", "Austen, in 1813.", "It was Jane Austen."}


def sdk(server: RunningServer, api_key: str = "unused") -> AsyncOpenAI:
    # No retries: a 429 or 5xx must reach the test as it came.
    return AsyncOpenAI(base_url=server.base_url, api_key=api_key, max_retries=0)


def extra(model: Any) -> dict[str, Any]:
    """The fields of an SDK object that OpenAI's schema does not have (``cost``, ``fusion``)."""
    assert model.model_extra is not None
    return dict(model.model_extra)


async def raw_post(server: RunningServer, body: dict[str, Any]) -> tuple[int, str]:
    status, text, _ = await post(server, "/chat/completions", body)
    return status, text


# --- fusion models --------------------------------------------------------------------------


async def test_fusion_preset_answer_usage_fusion_object_and_generation(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="openfusion/demo", messages=QUESTION
        )
        completion = raw.parse()
        generation_id = raw.headers["X-Generation-Id"]
        record = await client.get(
            "/generation", cast_to=object, options={"params": {"id": generation_id}}
        )

    assert completion.id == generation_id and generation_id.startswith("gen-")
    assert completion.model == "openfusion/demo"
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"

    assert completion.usage is not None
    usage = extra(completion.usage)
    assert usage["cost"] == pytest.approx(TOTAL_COST)
    assert usage["cost_details"] == {
        "panel": pytest.approx(sum(PANEL_COSTS.values())),
        "analysis": pytest.approx(ANALYSIS_COST),
        "synthesis": pytest.approx(SYNTHESIS_COST),
    }
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert sorted(demo.models_called()) == ["a", "b", "c", "judge", "judge"]

    fusion = extra(completion)["fusion"]
    assert fusion["status"] == "ok"
    assert set(fusion["analysis"]) == set(ANALYSIS)
    assert fusion["analysis"]["consensus"] == ANALYSIS["consensus"]
    # "Response A" of the anonymised analysis is named as the panel member it stands for.
    assert fusion["analysis"]["unique_insights"][0]["model"] in {"demo/a", "demo/b", "demo/c"}
    assert {r["content"] for r in fusion["responses"]} == PANEL_ANSWERS
    assert {r["model"]: r["cost"] for r in fusion["responses"]} == {
        f"demo/{name}": pytest.approx(cost) for name, cost in PANEL_COSTS.items()
    }
    assert fusion["failed_models"] == []
    assert fusion["failure_reason"] is None

    assert isinstance(record, dict)
    data = record["data"]
    assert data["id"] == generation_id
    assert data["model"] == "openfusion/demo"
    assert data["streamed"] is False
    assert data["fusion_status"] == "ok"
    assert data["total_cost"] == pytest.approx(usage["cost"])
    assert data["cost_details"] == usage["cost_details"]
    assert data["tokens_prompt"] == completion.usage.prompt_tokens
    assert data["tokens_completion"] == completion.usage.completion_tokens
    assert sorted(r["cost"] for r in data["responses"]) == pytest.approx(
        sorted(PANEL_COSTS.values())
    )


async def test_openrouter_fusion_alias_runs_the_default_preset(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        completion = await client.chat.completions.create(
            model="openrouter/fusion", messages=QUESTION
        )
        models = [m.id async for m in client.models.list()]
    assert completion.choices[0].message.content == ANSWER
    assert completion.model == "openrouter/fusion"
    fusion = extra(completion)["fusion"]
    assert {r["model"] for r in fusion["responses"]} == {"demo/a", "demo/b", "demo/c"}
    assert {"openrouter/fusion", "openfusion/demo", "demo/judge", "demo/a"} <= set(models)


async def test_stream_matches_the_non_streamed_answer(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        whole = await client.chat.completions.create(model="openfusion/demo", messages=QUESTION)
        stream = await client.chat.completions.create(
            model="openfusion/demo", messages=QUESTION, stream=True
        )
        chunks = [chunk async for chunk in stream]
        record: Any = await client.get(
            "/generation", cast_to=object, options={"params": {"id": chunks[0].id}}
        )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == ANSWER
    assert len({c.id for c in chunks}) == 1
    *body, last = chunks
    assert all(c.usage is None for c in body)
    assert last.choices[0].finish_reason == "stop"
    assert last.usage is not None
    assert extra(last.usage)["cost"] == pytest.approx(TOTAL_COST)
    assert extra(last.usage)["cost_details"]["synthesis"] == pytest.approx(SYNTHESIS_COST)
    assert extra(last)["fusion"]["status"] == "ok"
    assert set(extra(last)["fusion"]["analysis"]) == set(ANALYSIS)
    assert record["data"]["streamed"] is True
    assert record["data"]["total_cost"] == pytest.approx(TOTAL_COST)
    assert record["data"]["cost_details"] == extra(last.usage)["cost_details"]


async def test_raw_stream_has_progress_comments_and_done(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    status, text = await raw_post(
        server, {"model": "openfusion/demo", "messages": QUESTION, "stream": True}
    )
    assert status == 200
    events = sse_events(text)
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith(("data: ", ": ")) for e in events)
    progress = [
        json.loads(e.removeprefix(": openfusion-progress "))
        for e in events
        if e.startswith(": openfusion-progress ")
    ]
    done = {p["model"] for p in progress if p["type"] == "panel" and p["state"] == "done"}
    assert done == {"demo/a", "demo/b", "demo/c"}
    stages = [(p["stage"], p["state"]) for p in progress if p["type"] == "judge"]
    assert ("analysis", "done") in stages and ("synthesis", "done") in stages
    data = sse_data(text)
    assert data[-1] == "[DONE]"
    assert data[-2]["usage"]["cost"] == pytest.approx(TOTAL_COST)
    deltas = [d["choices"][0]["delta"].get("content") or "" for d in data[:-1]]
    assert "".join(deltas) == ANSWER


async def test_keepalive_comments_while_the_panel_thinks(serve: Serve) -> None:
    demo = setup_demo("[server]\nkeepalive_seconds = 0.1\n", slow=Step("Slow: Austen.", delay=0.5))
    write_preset("slow", "demo/judge", ["demo/slow", "demo/a"])
    server = serve(demo.settings, demo.registry)
    status, text = await raw_post(
        server, {"model": "openfusion/slow", "messages": QUESTION, "stream": True}
    )
    assert status == 200
    assert ": OPENFUSION PROCESSING" in sse_events(text)
    assert sse_data(text)[-1] == "[DONE]"
    async with sdk(server) as client:  # the SDK skips the comments
        stream = await client.chat.completions.create(
            model="openfusion/slow", messages=QUESTION, stream=True
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == ANSWER


# --- errors ---------------------------------------------------------------------------------


def _error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "metadata"}
    assert body["error"]["code"] == exc.status_code
    return dict(body["error"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "error", "status", "fragments"),
    [
        ("openfusion/nope", openai.BadRequestError, 400, ["unknown preset 'nope'"]),
        ("nope/x", openai.BadRequestError, 400, ["unknown provider 'nope'"]),
        ("openfusion/keyless", openai.InternalServerError, 503, ["OPENROUTER_API_KEY"]),
    ],
)
async def test_request_errors_are_statuses_even_for_streams(
    serve: Serve,
    model: str,
    error: type[openai.APIStatusError],
    status: int,
    fragments: list[str],
    stream: bool,
) -> None:
    demo = setup_demo()
    write_preset(
        "keyless", "openrouter/openai/gpt-5.5", ["openrouter/google/gemini-3-flash-preview"]
    )
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model=model, messages=QUESTION, stream=stream)
    assert caught.value.status_code == status
    body = _error_body(caught.value)
    for fragment in fragments:
        assert fragment in body["message"]
    assert demo.provider.calls == []


@pytest.mark.parametrize(
    ("step", "error", "status", "reason"),
    [
        (
            Step(status=429, error="slow down: 20 requests per minute"),
            openai.RateLimitError,
            429,
            "rate_limited",
        ),
        (
            Step(status=500, error="the upstream exploded"),
            openai.InternalServerError,
            502,
            "all_panels_failed",
        ),
    ],
)
async def test_whole_panel_failing_maps_to_a_status(
    serve: Serve, step: Step, error: type[openai.APIStatusError], status: int, reason: str
) -> None:
    demo = setup_demo(x=step, y=step)
    write_preset("failing", "demo/judge", ["demo/x", "demo/y"])
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model="openfusion/failing", messages=QUESTION)
    assert caught.value.status_code == status
    body = _error_body(caught.value)
    assert step.error in body["message"]
    assert body["metadata"]["failure_reason"] == reason
    failed = body["metadata"]["failed_models"]
    assert [(f["model"], f["status"], f["message"]) for f in failed] == [
        ("demo/x", step.status, step.error),
        ("demo/y", step.status, step.error),
    ]
    assert "judge" not in demo.models_called()


async def test_not_found_generation_and_upstream_model(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.get("/generation", cast_to=object, options={"params": {"id": "gen-x"}})
        assert "gen-x" in _error_body(caught.value)["message"]
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="demo/missing", messages=QUESTION)
    body = _error_body(caught.value)
    assert "'missing' is not in the script" in body["message"]
    assert body["metadata"]["model"] == "demo/missing"
    assert body["metadata"]["upstream_status"] == 404


async def test_api_keys(serve: Serve) -> None:
    demo = setup_demo()
    _, key = create_key(demo.settings, "t")
    server = serve(demo.settings, demo.registry)
    async with sdk(server, api_key="ofk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="openfusion/demo", messages=QUESTION)
    body = _error_body(caught.value)
    assert "invalid or revoked API key" in body["message"]
    assert "ofk-wrong" not in body["message"]

    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.base_url + "/chat/completions",
            json={"model": "openfusion/demo", "messages": QUESTION},
        ) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert "missing API key" in (await resp.json())["error"]["message"]
        async with session.get(server.url + "/health") as resp:
            assert resp.status == 200
    assert demo.provider.calls == []

    async with sdk(server, api_key=key) as client:
        completion = await client.chat.completions.create(
            model="openfusion/demo", messages=QUESTION
        )
    assert completion.choices[0].message.content == ANSWER


async def test_whole_panel_failing_in_a_stream_is_an_error_event(serve: Serve) -> None:
    step = Step(status=500, error="the upstream exploded")
    demo = setup_demo(x=step, y=step)
    write_preset("failing", "demo/judge", ["demo/x", "demo/y"])
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        stream = await client.chat.completions.create(
            model="openfusion/failing", messages=QUESTION, stream=True
        )
        with pytest.raises(openai.APIError, match="the upstream exploded"):
            async for _ in stream:
                pass


async def test_upstream_failing_mid_stream_ends_with_an_error_event(serve: Serve) -> None:
    async with MockUpstream(Reply(content="Hello from the mock upstream.", cut_after=2)) as up:
        write_config(
            '[server]\nmodels = ["mock/m"]\n'
            f'[providers.mock]\ntype = "openai_compat"\nbase_url = "{up.base_url}"\n'
        )
        server = serve(Settings.load())
        async with sdk(server) as client:
            stream = await client.chat.completions.create(
                model="mock/m", messages=QUESTION, stream=True
            )
            received: list[str] = []
            with pytest.raises(openai.APIError) as caught:
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content or "")
        assert "".join(received) == "Hello fr"  # two chunks of four characters got through
        assert "stream ended early" in caught.value.message

        status, text = await raw_post(
            server, {"model": "mock/m", "messages": QUESTION, "stream": True}
        )
    assert status == 200
    data = sse_data(text)
    assert data[-1] == "[DONE]"
    error = data[-2]
    assert error["error"]["code"] == 502
    assert "mock/m" in error["error"]["message"]
    assert error["choices"][0]["finish_reason"] == "error"
    assert all("error" not in d for d in data[:-2])


# --- plain models ---------------------------------------------------------------------------


async def test_plain_model_falls_back_to_the_next_in_models(serve: Serve) -> None:
    demo = setup_demo(down=Step(status=503, error="upstream overloaded"))
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        completion = await client.chat.completions.create(
            model="demo/down", messages=QUESTION, extra_body={"models": ["demo/a"]}
        )
        assert completion.choices[0].message.content == "Jane Austen."
        assert extra(completion.usage)["cost"] == pytest.approx(PANEL_COSTS["a"])
        assert "fusion" not in extra(completion)
        assert demo.models_called() == ["down", "a"]

        with pytest.raises(openai.InternalServerError) as caught:  # no fallback: the error
            await client.chat.completions.create(model="demo/down", messages=QUESTION)
    assert caught.value.status_code == 502
    assert "upstream overloaded" in _error_body(caught.value)["message"]


async def test_upstream_key_never_leaves_the_server(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-secret-xyz"
    monkeypatch.setenv("MOCK_KEY", secret)
    caplog.set_level(logging.DEBUG)
    failure = Reply(status=500, error={"message": "internal upstream failure"})
    async with MockUpstream(failure) as up:
        write_config(
            f'[providers.keyed]\ntype = "openai_compat"\nbase_url = "{up.base_url}"\n'
            'api_key_env = "MOCK_KEY"\n'
        )
        write_preset("keyed", "keyed/judge", ["keyed/m", "keyed/n"])
        server = serve(Settings.load())
        for model in ("keyed/m", "openfusion/keyed"):
            for stream in (False, True):
                status, text = await raw_post(
                    server, {"model": model, "messages": QUESTION, "stream": stream}
                )
                assert "internal upstream failure" in text
                assert status == (200 if stream else 502)
    assert up.requests and all(
        r.headers["Authorization"] == f"Bearer {secret}" for r in up.requests
    )
    assert len(server.completions()) == 4
    for inbound in server.inbound:
        assert secret not in inbound.body.decode()
    assert secret not in caplog.text


# --- caller tier ----------------------------------------------------------------------------

FUSION_TOOL_BARE: Any = {"type": "openrouter:fusion", "parameters": {}}
FUSION_CALL = ToolCall("c1", "fusion", json.dumps({"prompt": "Who wrote P&P, really?"}))
CALLER_STEPS = [
    Step("", tool_calls=(FUSION_CALL,), cost=0.01),
    Step("The panel agrees: Jane Austen.", cost=0.02),
]


def _check_caller_run(demo: Demo, completion_fusion: dict[str, Any], panel: set[str]) -> None:
    caller = [c for c in demo.provider.calls if c.model == "caller"]
    assert len(caller) == 2
    assert [t.name for t in caller[0].tools] == ["fusion"]
    final = caller[1]
    assert final.tool_choice == "none"
    assistant, tool = final.messages[-2:]
    assert assistant.role == "assistant" and assistant.tool_calls == (FUSION_CALL,)
    assert tool.role == "tool" and tool.tool_call_id == "c1"
    result = json.loads(tool.content)
    assert set(result["analysis"]) == set(ANALYSIS)
    contents = {
        "demo/a": "Jane Austen.",
        "demo/b": "Austen, in 1813.",
        "demo/c": "It was Jane Austen.",
    }
    assert {r["model"]: r["content"] for r in result["responses"]} == {
        m: contents[m] for m in panel
    }
    # The panel answered the caller's tool prompt, and the judge only analysed (no synthesis).
    panel_calls = [c for c in demo.provider.calls if c.model in {"a", "b", "c"}]
    assert {f"demo/{c.model}" for c in panel_calls} == panel
    assert all(c.messages[-1].content == "Who wrote P&P, really?" for c in panel_calls)
    judge_calls = [c for c in demo.provider.calls if c.model == "judge"]
    assert len(judge_calls) == 1 and judge_calls[0].json_schema is not None
    assert completion_fusion["status"] == "ok"
    assert {r["model"] for r in completion_fusion["responses"]} == panel


@pytest.mark.parametrize("stream", [False, True])
async def test_caller_tier_fusion_tool(serve: Serve, stream: bool) -> None:
    demo = setup_demo(caller=CALLER_STEPS)
    server = serve(demo.settings, demo.registry)
    tool: Any = {  # OpenRouter's server tool: not a type the SDK's annotations know
        "type": "openrouter:fusion",
        "parameters": {"analysis_models": ["demo/a", "demo/b"], "model": "demo/judge"},
    }
    async with sdk(server) as client:
        if stream:
            chunks = [
                chunk
                async for chunk in await client.chat.completions.create(
                    model="demo/caller",
                    messages=QUESTION,
                    tools=[tool],
                    tool_choice="required",
                    stream=True,
                )
            ]
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            last = chunks[-1]
            usage, fusion = last.usage, extra(last)["fusion"]
        else:
            completion = await client.chat.completions.create(
                model="demo/caller",
                messages=QUESTION,
                tools=[tool],
                tool_choice="required",
            )
            content = completion.choices[0].message.content or ""
            usage, fusion = completion.usage, extra(completion)["fusion"]

    assert content == "The panel agrees: Jane Austen."
    _check_caller_run(demo, fusion, {"demo/a", "demo/b"})
    assert demo.provider.calls[0].tool_choice == "required"
    assert usage is not None
    caller_cost, panel_cost = 0.03, PANEL_COSTS["a"] + PANEL_COSTS["b"]
    assert extra(usage)["cost"] == pytest.approx(caller_cost + panel_cost + ANALYSIS_COST)
    assert extra(usage)["cost_details"] == {
        "caller": pytest.approx(caller_cost),
        "panel": pytest.approx(panel_cost),
        "analysis": pytest.approx(ANALYSIS_COST),
    }


async def test_caller_tier_fusion_plugin(serve: Serve) -> None:
    demo = setup_demo(caller=CALLER_STEPS)
    server = serve(demo.settings, demo.registry)
    plugin = {"id": "fusion", "analysis_models": ["demo/a", "demo/c"], "model": "demo/judge"}
    async with sdk(server) as client:
        completion = await client.chat.completions.create(
            model="demo/caller", messages=QUESTION, extra_body={"plugins": [plugin]}
        )
    assert completion.choices[0].message.content == "The panel agrees: Jane Austen."
    _check_caller_run(demo, extra(completion)["fusion"], {"demo/a", "demo/c"})
    assert demo.provider.calls[0].tool_choice == "auto"


async def test_caller_that_skips_the_tool_answers_alone(serve: Serve) -> None:
    demo = setup_demo(caller=Step("I know this one: Jane Austen.", cost=0.01))
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        completion = await client.chat.completions.create(
            model="demo/caller",
            messages=QUESTION,
            tools=[FUSION_TOOL_BARE],
            tool_choice="auto",
        )
    assert completion.choices[0].message.content == "I know this one: Jane Austen."
    assert "fusion" not in extra(completion)
    assert extra(completion.usage)["cost"] == pytest.approx(0.01)
    assert demo.models_called() == ["caller"]
    assert demo.provider.calls[0].tool_choice == "auto"


# --- LangChain ------------------------------------------------------------------------------


def test_langchain_chat_openai(serve: Serve) -> None:
    langchain_openai = pytest.importorskip(
        "langchain_openai", reason="langchain-openai is not installed (dev extra)"
    )
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    llm = langchain_openai.ChatOpenAI(
        base_url=server.base_url, api_key="x", model="openfusion/demo", max_retries=0
    )
    message = llm.invoke("Who wrote Pride and Prejudice?")
    assert message.content == ANSWER
    assert sorted(demo.models_called()) == ["a", "b", "c", "judge", "judge"]


# --- tool calls, citations, generation privacy ----------------------------------------------

WEATHER = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_plain_call_returns_its_tool_calls(serve: Serve, stream: bool) -> None:
    call = ToolCall("c9", "get_weather", '{"city": "Paris"}')
    demo = setup_demo(tooly=Step("", tool_calls=(call,)))
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        if not stream:
            done = await client.chat.completions.create(
                model="demo/tooly",
                messages=QUESTION,
                tools=WEATHER,  # type: ignore[arg-type]
            )
            (got,) = done.choices[0].message.tool_calls or []
            finish = done.choices[0].finish_reason
        else:
            chunks = [
                c
                async for c in await client.chat.completions.create(
                    model="demo/tooly",
                    messages=QUESTION,
                    tools=WEATHER,
                    stream=True,  # type: ignore[arg-type]
                )
            ]
            calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
            (got,) = calls
            finish = next(c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason)
    assert (got.id, got.function.name, got.function.arguments) == (
        call.id,
        call.name,
        call.arguments,
    )  # type: ignore[union-attr]
    assert finish == "tool_calls"


async def lookup(query: Keywords) -> ToolOutput:
    """Look a fact up."""
    hit = Source("Austen", "https://books.example/austen", "Austen wrote it.", "test")
    return ToolOutput(text="Austen wrote it.", sources=(hit,), cost=0.0)


async def test_citations_arrive_as_url_citation_annotations(serve: Serve) -> None:
    search = ToolCall("s1", "lookup", '{"query": "austen"}')
    demo = setup_demo(
        a=lambda r: Step("", tool_calls=(search,)) if r.tools else Step("Austen."),
        judge=lambda r: Step(json.dumps(ANALYSIS)) if r.json_schema else Step("Jane Austen [1]."),
    )
    tools = ToolRegistry([Tool.from_function(lookup)])
    server = serve(demo.settings, demo.registry, tools=tools)
    async with sdk(server) as client:
        done = await client.chat.completions.create(model="openfusion/demo", messages=QUESTION)
    message = done.choices[0].message
    assert message.content is not None
    assert message.content.startswith("Jane Austen [1].")
    assert "Sources:\n[1] Austen — https://books.example/austen" in message.content
    (annotation,) = message.annotations or []
    assert annotation.url_citation.url == "https://books.example/austen"
    start, end = annotation.url_citation.start_index, annotation.url_citation.end_index
    assert message.content[start:end] == "[1]"
    assert extra(done)["fusion"]["responses"][0]["tool_calls"][0]["name"] == "lookup"


async def test_a_key_reads_only_its_own_generations(serve: Serve) -> None:
    demo = setup_demo()
    _, alice = create_key(demo.settings, "alice")
    _, bob = create_key(demo.settings, "bob")
    server = serve(demo.settings, demo.registry)
    async with sdk(server, api_key=alice) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="openfusion/demo", messages=QUESTION
        )
        generation_id = raw.headers["X-Generation-Id"]
        mine = await client.get(
            "/generation", cast_to=object, options={"params": {"id": generation_id}}
        )
    assert mine["data"]["id"] == generation_id  # type: ignore[index]
    async with sdk(server, api_key=bob) as client:
        with pytest.raises(openai.NotFoundError):
            await client.get(
                "/generation", cast_to=object, options={"params": {"id": generation_id}}
            )


async def test_a_bad_fallback_is_named_as_models(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    status, text = await raw_post(
        server, {"model": "demo/a", "models": ["nowhere/x"], "messages": QUESTION}
    )
    assert status == 400
    assert json.loads(text)["error"]["message"].startswith("models: unknown provider 'nowhere'")
