"""Every request field is honoured or refused, never dropped; and cost is never invented.

Pass-through requests go to a mock OpenAI-compatible upstream on 127.0.0.1, whose received
bodies show what was forwarded; fusion requests run on scripted models, whose received requests
show where each field went."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI
from server_fixtures import (
    RunningServer,
    config_dir,
    post,
    setup_demo,
    sse_data,
    write_config,
    write_preset,
)
from upstream_mock import MockUpstream, Reply

from openfusion.providers.base import HONOURS_ALL
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.settings import Settings
from openfusion.store import SpendLedger
from openfusion.types import Reasoning

Serve = Callable[..., RunningServer]
QUESTION = [{"role": "user", "content": "Who wrote Pride and Prejudice?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
PRICE = '["mock/m"]\nprompt = 1.0\ncompletion = 2.0\n'


async def chat(server: RunningServer, body: dict[str, Any]) -> tuple[int, str, dict[str, str]]:
    return await post(server, "/chat/completions", body)


def mock_provider(up: MockUpstream, options: str = "") -> Settings:
    """Provider ``mock`` at the mock upstream (its models served), and a price for ``mock/m``."""
    write_config(
        '[server]\nmodels = ["mock/*"]\n'
        f'[providers.mock]\ntype = "openai_compat"\nbase_url = "{up.base_url}"\n'
        f'api_key_env = ""\n{options}'
    )
    (config_dir() / "prices.toml").write_text(PRICE)
    return Settings.load()


# -- pass-through ---------------------------------------------------------------------------

FIELDS: dict[str, Any] = {
    "top_p": 0.9,
    "stop": ["END"],
    "seed": 7,
    "frequency_penalty": 0.5,
    "presence_penalty": -0.25,
    "response_format": {"type": "json_object"},
    "reasoning": {"effort": "low", "max_tokens": 300},
    "user": "user-42",
    "max_completion_tokens": 99,
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
}
FORWARDED = {**FIELDS, "max_tokens": 99}
del FORWARDED["max_completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_plain_call_forwards_every_field(serve: Serve, stream: bool) -> None:
    async with MockUpstream(Reply(content='{"ok": true}')) as up:
        server = serve(mock_provider(up))
        status, text, _ = await chat(
            server, {"model": "mock/m", "messages": QUESTION, "stream": stream, **FIELDS}
        )
    assert status == 200, text
    (request,) = up.requests
    for field, value in FORWARDED.items():
        if field == "tools":
            assert [t["function"]["name"] for t in request.json["tools"]] == ["get_weather"]
        else:
            assert request.json[field] == value, field


async def test_openais_flat_reasoning_effort(serve: Serve) -> None:
    async with MockUpstream() as up:
        server = serve(mock_provider(up, 'options.reasoning_param = "reasoning_effort"\n'))
        for field in ({"reasoning_effort": "high"}, {"reasoning": {"effort": "high"}}):
            status, text, _ = await chat(server, {"model": "mock/m", "messages": QUESTION, **field})
            assert status == 200, text
    for request in up.requests:  # OpenAI's own API takes the flat form only
        assert request.json["reasoning_effort"] == "high"
        assert "reasoning" not in request.json


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("logprobs", True, "log probabilities"),
        ("top_logprobs", 3, "log probabilities"),
        ("logit_bias", {"50256": -100}, "token ids"),
        ("audio", {"voice": "alloy"}, "text only"),
        ("modalities", ["text", "audio"], "text only"),
        ("functions", [{"name": "f"}], "send tools instead"),
        ("store", True, "stored completions are not offered"),
        ("top_k", 40, "not supported"),
        ("provider", {"order": ["x"]}, "provider routing"),
        ("frobnicate", 1, "does not know"),
        ("response_format", {"type": "yaml"}, "json_schema"),
        ("reasoning", {"effort": "extreme"}, "reasoning.effort"),
        ("tool_choice", "sometimes", "must be 'auto'"),
    ],
)
async def test_a_field_that_cannot_be_honoured_is_a_400_naming_it(
    serve: Serve, field: str, value: Any, why: str
) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    status, text, _ = await chat(server, {"model": "demo/a", "messages": QUESTION, field: value})
    assert status == 400, text
    message = json.loads(text)["error"]["message"]
    assert field in message and why in message
    assert demo.provider.calls == []


async def test_no_op_values_of_refused_fields_are_fine(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    body = {"logprobs": False, "store": False, "modalities": ["text"], "logit_bias": {}}
    status, text, _ = await chat(server, {"model": "demo/a", "messages": QUESTION, **body})
    assert status == 200, text


async def test_a_model_without_a_capability_refuses_its_field(serve: Serve) -> None:
    demo = setup_demo()
    demo.provider.honours = HONOURS_ALL - {"reasoning"}
    server = serve(demo.settings, demo.registry)
    body = {"messages": QUESTION, "reasoning": {"effort": "low"}}
    for model in ("demo/a", "local/gemma-3-270m"):  # the embedded model says so by itself
        status, text, _ = await chat(server, {"model": model, **body})
        assert status == 400, text
        assert json.loads(text)["error"]["message"].startswith(f"reasoning: {model} cannot")
    assert demo.provider.calls == []


async def test_streamed_tool_calls_are_relayed(serve: Serve) -> None:
    call = ("t1", "get_weather", '{"city": "Paris", "unit": "celsius"}')
    reply = Reply(content="", tool_calls=[call], finish_reason="tool_calls", chunk_size=5)
    async with MockUpstream(reply) as up:
        server = serve(mock_provider(up))
        async with AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="mock/m",
                messages=QUESTION,  # type: ignore[arg-type]
                tools=[WEATHER],  # type: ignore[list-item]
                stream=True,
            )
            chunks = [chunk async for chunk in stream]
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(t.id, t.function.name, t.function.arguments) for t in calls] == [call]  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- fusion requests ------------------------------------------------------------------------


async def test_a_fusion_puts_each_field_where_it_belongs(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    body = {
        "model": "openfusion/demo",
        "messages": QUESTION,
        "temperature": 1.2,
        "top_p": 0.8,
        "seed": 10,
        "stop": ["\n\n"],
        "max_tokens": 40,
        "response_format": {"type": "json_object"},
        "user": "user-42",
        "reasoning": {"effort": "minimal"},
        "tools": [WEATHER],  # offered tools a model may leave uncalled: a fusion always does
    }
    status, text, _ = await chat(server, body)
    assert status == 200, text
    members = {c.model: c for c in demo.provider.calls if c.model in ("a", "b", "c")}
    analysis, synthesis = [c for c in demo.provider.calls if c.model == "judge"]
    for index, name in enumerate(("a", "b", "c")):
        member = members[name]
        assert (member.temperature, member.top_p, member.seed) == (1.2, 0.8, 10 + index)
        assert (member.stop, member.response_format, member.max_tokens) == ((), None, None)
    assert analysis.temperature == 0.0  # whatever the request says
    assert analysis.json_schema is not None and analysis.response_format is None
    assert synthesis.stop == ("\n\n",)
    assert synthesis.max_tokens == 40
    assert synthesis.response_format == {"type": "json_object"}
    for call in demo.provider.calls:
        assert call.user == "user-42"
        assert call.reasoning == Reasoning("minimal")


@pytest.mark.parametrize(
    ("field", "value"),
    [("tool_choice", "required"), ("models", ["demo/a"])],
)
async def test_a_fusion_model_refuses_what_it_cannot_honour(
    serve: Serve, field: str, value: Any
) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    status, text, _ = await chat(
        server, {"model": "openfusion/demo", "messages": QUESTION, field: value}
    )
    assert status == 400, text
    assert json.loads(text)["error"]["message"].startswith(f"{field}:")
    assert demo.provider.calls == []


async def test_reasoning_goes_to_the_members_that_support_it(serve: Serve) -> None:
    demo = setup_demo()
    demo.provider.honours = HONOURS_ALL - {"reasoning"}
    thinker = ScriptedProvider({"t": Step("Austen, after some thought.")})
    demo.registry.register("deep", thinker)
    write_preset("mixed", "demo/judge", ["demo/a", "deep/t"])
    server = serve(demo.settings, demo.registry)
    plugin = {"id": "fusion", "reasoning": {"effort": "high", "max_tokens": 500}}
    status, text, _ = await chat(
        server, {"model": "openfusion/mixed", "messages": QUESTION, "plugins": [plugin]}
    )
    assert status == 200, text
    assert [c.reasoning for c in thinker.calls] == [Reasoning("high", 500)]
    assert all(c.reasoning is None for c in demo.provider.calls)


async def test_max_completion_tokens_caps_every_inner_call(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    plugin = {"id": "fusion", "max_completion_tokens": 64}
    status, text, _ = await chat(
        server, {"model": "openfusion/demo", "messages": QUESTION, "plugins": [plugin]}
    )
    assert status == 200, text
    assert all(c.max_tokens == 64 for c in demo.provider.calls)


async def test_the_fast_preset_answers_as_fusion_flash(serve: Serve) -> None:
    demo = setup_demo()
    write_preset("fast", "demo/judge", ["demo/a", "demo/b"])  # shadows the shipped one
    server = serve(demo.settings, demo.registry)
    status, text, _ = await chat(server, {"model": "openrouter/fusion-flash", "messages": QUESTION})
    assert status == 200, text
    assert sorted(demo.models_called()) == ["a", "b", "judge", "judge"]


# -- cost -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_response_without_usage_costs_null_not_zero(serve: Serve, stream: bool) -> None:
    async with MockUpstream(Reply(usage=None)) as up:
        settings = mock_provider(up)  # mock/m has a price: still no cost from zero tokens
        server = serve(settings)
        status, text, headers = await chat(
            server, {"model": "mock/m", "messages": QUESTION, "stream": stream}
        )
    assert status == 200, text
    usage = sse_data(text)[-2]["usage"] if stream else json.loads(text)["usage"]
    assert usage["cost"] is None
    await server.written()
    async with SpendLedger(settings.database) as ledger:
        (row,) = await ledger.rows(headers["x-generation-id"])
    assert (row.cost_nano, row.unpriced) == (None, True)


async def test_a_cut_pass_through_stream_is_charged_an_estimate(serve: Serve) -> None:
    reply = Reply(content="Jane Austen wrote it in 1813, her second novel.", cut_after=3)
    async with MockUpstream(reply) as up:
        settings = mock_provider(up)
        server = serve(settings)
        status, text, headers = await chat(
            server, {"model": "mock/m", "messages": QUESTION, "stream": True}
        )
    assert status == 200
    error = sse_data(text)[-2]
    assert error["choices"][0]["finish_reason"] == "error"
    await server.written()
    async with SpendLedger(settings.database) as ledger:
        (row,) = await ledger.rows(headers["x-generation-id"])
    assert (row.stage, row.model) == ("call", "mock/m")
    # 12 characters sent (3 tokens at 4 a token) and the prompt, at $1 / $2 per million.
    prompt = -(-len(QUESTION[0]["content"]) // 4)
    assert row.cost_nano == prompt * 1000 + 3 * 2000


async def test_models_lists_real_per_token_prices(serve: Serve) -> None:
    demo = setup_demo()
    server = serve(demo.settings, demo.registry)
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.base_url + "/models") as resp,
    ):
        entries = {e["id"]: e for e in (await resp.json())["data"]}
    assert {"openrouter/fusion", "openrouter/fusion-flash", "openfusion/fast"} <= set(entries)
    gpt = entries["openrouter/openai/gpt-5.5"]["pricing"]
    assert (gpt["prompt"], gpt["completion"]) == ("0.000005", "0.00003")
    assert entries["local/gemma-3-270m"]["pricing"]["prompt"] == "0"
    shipped = [e for i, e in entries.items() if i.startswith("openrouter/") and "fusion" not in i]
    assert shipped and all(float(e["pricing"]["prompt"]) > 0 for e in shipped)
