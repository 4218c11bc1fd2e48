"""``POST /v1/responses`` as the official ``openai`` SDK sees it (``client.responses.create``,
streamed and not), on scripted models: the fusion_call item, the reference's live fusion
events in order, the caller tier's forms, input conversion, refusals."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from helpers import ANALYSIS
from openai import AsyncOpenAI
from server_fixtures import (
    ANSWER,
    TOTAL_COST,
    RunningServer,
    post,
    setup_demo,
    write_preset,
)

from openfusion.providers.scripted import Step
from openfusion.types import ToolCall

Serve = Callable[..., RunningServer]
QUESTION = "Who wrote Pride and Prejudice?"
FUSE = ToolCall("c1", "fusion", json.dumps({"prompt": QUESTION}))


def sdk(server: RunningServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def extra(model: Any, name: str) -> Any:
    """A field of an object the SDK parsed leniently: a ``fusion_call`` item or a fusion event
    (types it does not know, built as the nearest type it does), or ``usage.cost``."""
    assert name in model.model_fields_set or name in (model.model_extra or {}), (name, model)
    return getattr(model, name)


async def respond(server: RunningServer, body: dict[str, Any]) -> tuple[int, Any]:
    status, text, _ = await post(server, "/responses", body)
    return status, json.loads(text)


async def test_a_fusion_model_answers_with_a_fusion_call_item(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        raw = await client.responses.with_raw_response.create(
            model="openfusion/demo", input=QUESTION
        )
    response = raw.parse()
    assert response.id == raw.headers["X-Generation-Id"]
    assert response.status == "completed"
    assert response.output_text == ANSWER
    fusion, message = response.output
    assert (fusion.type, message.type) == ("fusion_call", "message")
    assert extra(fusion, "status") == "completed"
    assert set(extra(fusion, "analysis")) == set(ANALYSIS)
    assert {r["model"]: r["content"] for r in extra(fusion, "responses")} == {
        "demo/a": "Jane Austen.",
        "demo/b": "Austen, in 1813.",
        "demo/c": "It was Jane Austen.",
    }
    assert extra(fusion, "failed_models") == []
    assert extra(fusion, "sources") == []
    assert extra(fusion, "failure_reason") is None
    assert response.usage is not None
    assert response.usage.total_tokens == (
        response.usage.input_tokens + response.usage.output_tokens
    )
    assert extra(response.usage, "cost") == pytest.approx(TOTAL_COST)


async def test_streamed_fusion_events_come_in_the_reference_order(serve: Serve) -> None:
    demo = setup_demo(x=Step(status=503, error="x is down for maintenance"))
    write_preset("mixed", "demo/judge", ["demo/a", "demo/x", "demo/b"])
    server = serve(demo.settings, demo.registry)
    async with sdk(server) as client:
        stream = await client.responses.create(
            model="openfusion/mixed", input=QUESTION, stream=True
        )
        events = [event async for event in stream]
        with warnings.catch_warnings():  # its final model_dump warns of the unknown item type
            warnings.simplefilter("ignore", UserWarning)
            async with client.responses.stream(model="openfusion/mixed", input=QUESTION) as helper:
                async for _ in helper:
                    pass
                assert (await helper.get_final_response()).output_text == ANSWER

    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",  # the fusion_call
        "response.fusion_call.in_progress",
    ]
    panel = [e for e in events if e.type.startswith("response.fusion_call.panel.")]
    for model in ("demo/a", "demo/x", "demo/b"):
        mine = [e.type.rsplit(".", 1)[1] for e in panel if extra(e, "model") == model]
        assert mine == ["added", "failed" if model == "demo/x" else "completed"]
    completed = {
        extra(e, "model"): extra(e, "content") for e in panel if e.type.endswith(".completed")
    }
    assert completed.pop("demo/a") == "Jane Austen."
    assert completed.pop("demo/b") == "Austen, in 1813."
    (failed,) = [e for e in panel if e.type.endswith(".failed")]
    assert extra(failed, "message") == "x is down for maintenance"
    assert extra(failed, "status_code") == 503

    last_panel = max(i for i, e in enumerate(events) if e in panel)
    after = kinds[last_panel + 1 :]
    assert after[:4] == [
        "response.fusion_call.analysis.in_progress",
        "response.fusion_call.analysis.completed",
        "response.fusion_call.completed",
        "response.output_item.done",  # the fusion_call, whole
    ]
    analysing = events[last_panel + 1]
    assert extra(analysing, "judge_model") == "demo/judge"
    assert set(extra(events[last_panel + 2], "analysis")) == set(ANALYSIS)
    fusion_done = events[last_panel + 4]
    assert fusion_done.item.type == "fusion_call"
    assert extra(fusion_done.item, "failed_models")[0]["model"] == "demo/x"
    # Then the answer's text, and last the whole response.
    assert after[4:6] == ["response.output_item.added", "response.content_part.added"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == ANSWER
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1].response
    assert [o.type for o in final.output] == ["fusion_call", "message"]
    assert final.output_text == ANSWER
    assert extra(final.output[0], "status") == "completed"


@pytest.mark.parametrize("form", ["plugin", "tool"])
async def test_the_caller_tier_through_the_responses_api(serve: Serve, form: str) -> None:
    demo = setup_demo(caller=[Step("", tool_calls=(FUSE,), cost=0.01), Step("Austen, agreed.")])
    server = serve(demo.settings, demo.registry)
    params = {"analysis_models": ["demo/a", "demo/b"], "model": "demo/judge"}
    fusion_form: dict[str, Any] = (
        {"plugins": [{"id": "fusion", **params}]}
        if form == "plugin"
        else {"tools": [{"type": "openrouter:fusion", "parameters": params}]}
    )
    async with sdk(server) as client:
        stream = await client.responses.create(
            model="demo/caller", input=QUESTION, stream=True, extra_body=fusion_form
        )
        events = [event async for event in stream]
    kinds = [e.type for e in events]
    fusion_events = [k for k in kinds if k.startswith("response.fusion_call.")]
    assert fusion_events[0] == "response.fusion_call.in_progress"
    assert fusion_events[-1] == "response.fusion_call.completed"
    assert kinds.index("response.fusion_call.completed") < kinds.index("response.output_text.delta")
    final = events[-1].response
    assert [o.type for o in final.output] == ["fusion_call", "message"]
    assert final.output_text == "Austen, agreed."
    assert [r["model"] for r in extra(final.output[0], "responses")] == ["demo/a", "demo/b"]
    assert set(extra(final.usage, "cost_details")) == {"caller", "panel", "analysis"}


async def test_the_callers_function_call_is_an_output_item(serve: Serve) -> None:
    weather = ToolCall("w1", "get_weather", '{"city": "Paris"}')
    demo = setup_demo(caller=Step("", tool_calls=(weather,)))
    server = serve(demo.settings, demo.registry)
    tools: Any = [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
        {"type": "openrouter:fusion"},
    ]
    async with sdk(server) as client:
        response = await client.responses.create(model="demo/caller", input=QUESTION, tools=tools)
    (call,) = response.output
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == ("w1", "get_weather", '{"city": "Paris"}')
    (request,) = demo.provider.calls
    assert [t.name for t in request.tools] == ["fusion", "get_weather"]


async def test_input_items_become_the_conversation(serve: Serve) -> None:
    demo = setup_demo(echo=Step("Sunny, so yes."))
    server = serve(demo.settings, demo.registry)
    conversation: Any = [
        {"role": "user", "content": "Should I take an umbrella to Paris?"},
        {"type": "function_call", "call_id": "w1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "w1", "output": "sunny"},
        {"role": "user", "content": [{"type": "input_text", "text": "Well?"}]},
    ]
    schema = {"type": "object", "properties": {"yes": {"type": "boolean"}}}
    async with sdk(server) as client:
        response = await client.responses.create(
            model="demo/echo",
            input=conversation,
            instructions="Be brief.",
            max_output_tokens=50,
            text={"format": {"type": "json_schema", "name": "verdict", "schema": schema}},
            metadata={"ticket": "42"},
        )
    assert response.output_text == "Sunny, so yes."
    assert response.metadata == {"ticket": "42"}
    (request,) = demo.provider.calls
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool", "user"]
    assert request.messages[0].content == "Be brief."
    assert request.messages[2].tool_calls == (ToolCall("w1", "get_weather", "{}"),)
    assert (request.messages[3].tool_call_id, request.messages[3].content) == ("w1", "sunny")
    assert request.max_tokens == 50
    assert request.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": schema},
    }


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"previous_response_id": "resp_1"}, ["previous_response_id", "send the conversation"]),
        ({"store": True}, ["store", "cannot be fetched back"]),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            ["input.0.content.0", "only text parts"],
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, ["input.0.type", "not supported"]),
        ({"temperature": 3}, ["temperature"]),
        ({"frobnicate": 1}, ["frobnicate", "does not know"]),
        ({"tools": [{"type": "web_search_preview"}]}, ["tools.0.type", "unsupported tool type"]),
    ],
)
async def test_what_cannot_be_honoured_is_a_400_naming_it(
    serve: Serve, change: dict[str, Any], fragments: list[str]
) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    status, body = await respond(server, {"model": "demo/a", "input": QUESTION, **change})
    assert status == 400, body
    for fragment in fragments:
        assert fragment in body["error"]["message"]
    assert demo.provider.calls == []


async def test_a_failed_fusion_is_an_error_status_or_a_failed_event(serve: Serve) -> None:
    down = Step(status=500, error="the upstream exploded")
    demo = setup_demo(x=down, y=down)
    write_preset("failing", "demo/judge", ["demo/x", "demo/y"])
    server = serve(demo.settings, demo.registry)
    status, body = await respond(server, {"model": "openfusion/failing", "input": QUESTION})
    assert status == 502
    assert body["error"]["metadata"]["failure_reason"] == "all_panels_failed"
    async with sdk(server) as client:
        stream = await client.responses.create(
            model="openfusion/failing", input=QUESTION, stream=True
        )
        events = [event async for event in stream]
    assert [e.type for e in events if e.type.endswith(".panel.failed")] == [
        "response.fusion_call.panel.failed"
    ] * 2
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "all_panels_failed"
    assert "the upstream exploded" in failed.response.error.message
    (item,) = failed.response.output
    assert (extra(item, "status"), extra(item, "failure_reason")) == ("failed", "all_panels_failed")
    assert [f["model"] for f in extra(item, "failed_models")] == ["demo/x", "demo/y"]
