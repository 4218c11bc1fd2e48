"""How a budget admits calls (issue 13, item 1): a conservative bound on the prompt, the
``max_tokens`` sent upstream cut to what is left, the real cost settled and any excess kept as
the overshoot, unpriced models refused unless a charge is stated, tool calls admitted too."""

from __future__ import annotations

import json
from typing import Any

import pytest
from upstream_mock import MockUpstream, Reply, ignoring_max_tokens

from openfusion import CompletionRequest, Message, ProviderRegistry, Settings
from openfusion.cost import Price, PriceCatalog
from openfusion.engine.budget import (
    MESSAGE_OVERHEAD_TOKENS,
    Budget,
    BudgetExceeded,
    prompt_token_bound,
)
from openfusion.engine.member import answer_with_tools
from openfusion.engine.policy import Caller, RetryPolicy
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.settings import ProviderConfig
from openfusion.tools import Tool, ToolOutput, ToolRegistry
from openfusion.types import ToolCall, ToolSpec

PRICE = Price(prompt=1e-6, completion=2e-6)


def scripted(
    settings: Settings, script: dict[str, Any], prices: dict[str, Price], **caller: Any
) -> tuple[Caller, ScriptedProvider]:
    provider = ScriptedProvider(script)
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    return Caller(
        registry, PriceCatalog(prices), policy=RetryPolicy(attempts=1), **caller
    ), provider


def test_the_prompt_bound_counts_bytes_tools_and_schema() -> None:
    text = "Wer schrieb »Stolz und Vorurteil«? 日本語"
    plain = CompletionRequest("m", (Message("user", text),))
    assert prompt_token_bound(plain) == len(text.encode()) + 2 * MESSAGE_OVERHEAD_TOKENS
    assert len(text.encode()) > len(text)  # multi-byte characters count as their bytes
    spec = ToolSpec("look_up", "Look a thing up.", {"type": "object", "properties": {}})
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fuller = CompletionRequest("m", plain.messages, tools=(spec,), json_schema=schema)
    assert prompt_token_bound(fuller) > prompt_token_bound(plain) + len(json.dumps(schema))


async def test_max_tokens_sent_is_what_the_budget_can_pay(settings: Settings) -> None:
    caller, provider = scripted(settings, {"m": Step("ok", cost=None)}, {"s/m": PRICE})
    request = CompletionRequest("", (Message("user", "hi"),))  # sets no max_tokens
    budget = Budget(limit=0.001)
    await caller.complete(["s/m"], request, budget)
    (sent,) = provider.calls
    prompt = prompt_token_bound(request) * PRICE.prompt
    assert sent.max_tokens == int((0.001 - prompt) // PRICE.completion)
    assert 16 <= sent.max_tokens < 4096
    # Plenty of budget: the request's own max_tokens (or the default) goes out unchanged.
    await caller.complete(["s/m"], request, Budget(limit=10.0))
    assert provider.calls[-1].max_tokens == 4096


async def test_a_budget_that_cannot_pay_a_short_answer_refuses_the_call(
    settings: Settings,
) -> None:
    caller, provider = scripted(settings, {"m": Step("ok", cost=None)}, {"s/m": PRICE})
    request = CompletionRequest("", (Message("user", "hi"),), max_tokens=1000)
    budget = Budget(limit=prompt_token_bound(request) * PRICE.prompt + 15 * PRICE.completion)
    with pytest.raises(BudgetExceeded, match="not enough for 16 tokens"):
        await caller.complete(["s/m"], request, budget)
    assert provider.calls == []
    assert budget.refused == ["s/m"]


async def test_an_upstream_billing_past_max_tokens_is_charged_and_its_excess_kept(
    settings: Settings,
) -> None:
    """The real cost is settled (10x the tokens asked), and the budget says by how much it
    went past what was reserved; after that, nothing else starts."""
    async with MockUpstream() as upstream:
        upstream.replies["m"] = ignoring_max_tokens(lambda body: Reply("lots"), 10)
        settings = Settings(
            config_dir=settings.config_dir,
            cache_dir=settings.cache_dir,
            providers={"up": ProviderConfig(type="openai_compat", base_url=upstream.base_url)},
        )
        registry = ProviderRegistry(settings)
        caller = Caller(registry, PriceCatalog({"up/m": PRICE}), policy=RetryPolicy(attempts=1))
        request = CompletionRequest("", (Message("user", "hi"),))
        budget = Budget(limit=0.001)
        try:
            call = await caller.complete(["up/m"], request, budget)
            with pytest.raises(BudgetExceeded):
                await caller.complete(["up/m"], request, budget)
        finally:
            await registry.aclose()
    (sent,) = upstream.requests
    asked = sent.json["max_tokens"]
    assert call.completion.usage.completion_tokens == 10 * asked
    assert budget.spent == pytest.approx(call.completion.usage.cost)
    assert budget.spent > budget.limit
    assert budget.overshoot == pytest.approx(budget.spent - budget.limit, rel=1e-3)
    assert budget.to_dict()["overshoot"] == budget.overshoot


async def test_an_unpriced_model_runs_under_a_budget_only_at_a_stated_charge(
    settings: Settings,
) -> None:
    refused, provider = scripted(settings, {"m": Step("x", cost=None)}, {})
    with pytest.raises(BudgetExceeded, match="unpriced_call_usd"):
        await refused.complete(["s/m"], CompletionRequest("", (Message("user", "q"),)), Budget(1))
    assert provider.calls == []

    allowed, provider = scripted(settings, {"m": Step("x", cost=None)}, {}, unpriced_call_usd=0.002)
    budget = Budget(limit=0.003)
    call = await allowed.complete(["s/m"], CompletionRequest("", (Message("user", "q"),)), budget)
    assert call.completion.usage.cost == 0.002
    assert budget.spent == 0.002
    with pytest.raises(BudgetExceeded):  # $0.001 left: a second call does not fit
        await allowed.complete(["s/m"], CompletionRequest("", (Message("user", "q"),)), budget)
    # Without a budget its cost stays unknown: the charge is what a budget holds, not a price.
    free = await allowed.complete(["s/m"], CompletionRequest("", (Message("user", "q"),)))
    assert free.completion.usage.cost is None


def test_unpriced_call_usd_is_read_from_config(tmp_path: Any) -> None:
    (tmp_path / "config.toml").write_text("[budget]\nunpriced_call_usd = 0.05\n")
    settings = Settings.load({"OPENFUSION_CONFIG_DIR": str(tmp_path)})
    assert settings.budget.unpriced_call_usd == 0.05
    caller = Caller.from_settings(ProviderRegistry(settings), settings)
    assert caller.unpriced_call_usd == 0.05


def _paid_search(price: float | None, cost: float | None) -> Tool:
    async def search(query: str) -> ToolOutput:
        """Search."""
        return ToolOutput(text=f"found {query}", cost=cost)

    return Tool.from_function(search, price=price)


SEARCH = ToolCall("t1", "search", json.dumps({"query": "austen"}))


async def _member(settings: Settings, tool: Tool, budget: Budget) -> Any:
    script = {"m": [Step("", tool_calls=(SEARCH,), cost=0.0), Step("Austen.", cost=0.0)]}
    caller, _ = scripted(settings, script, {"s/m": Price(0.0, 0.0)})
    request = CompletionRequest("", (Message("user", "who?"),))
    return await answer_with_tools(caller, ["s/m"], request, ToolRegistry([tool]), 4, budget=budget)


async def test_a_tool_call_is_admitted_and_charged_against_the_budget(settings: Settings) -> None:
    budget = Budget(limit=0.01)
    answer = await _member(settings, _paid_search(price=0.005, cost=0.004), budget)
    (record,) = answer.tool_calls
    assert record.error is None and record.cost == 0.004
    assert budget.spent == pytest.approx(0.004)
    assert budget.reserved == 0


async def test_a_tool_the_budget_cannot_pay_or_price_is_not_run(settings: Settings) -> None:
    for tool, why in (
        (_paid_search(price=0.02, cost=0.02), "could cost up to"),
        (_paid_search(price=None, cost=0.0), "price is unknown"),
    ):
        budget = Budget(limit=0.01)
        answer = await _member(settings, tool, budget)
        (record,) = answer.tool_calls
        assert record.error is not None and why in record.error
        assert "found" not in record.result  # the tool never ran
        assert budget.spent == 0
        assert answer.content == "Austen."  # the member still answers
