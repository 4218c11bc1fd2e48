"""One panel member's tool loop: model → tool calls → results → model, then the answer.

The member may call tools up to ``max_tool_calls`` times; once that many were made it is asked
once more with no tools offered, so it always ends with an answer.
Tool output reaches the model fenced as untrusted data (the registry does that). Under a
budget, a tool call is admitted like a model call: its price is reserved before it runs (a
tool whose price is unknown is not run) and settled with what it cost.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from openfusion.engine.budget import Budget, BudgetExceeded
from openfusion.engine.policy import Caller
from openfusion.engine.result import ToolCallRecord
from openfusion.engine.trace import CallObserver
from openfusion.errors import ProviderError
from openfusion.tools import Source, ToolRegistry, ToolResult
from openfusion.types import CompletionRequest, Message, ToolCall, Usage

RESULT_PREVIEW = 500
"""Characters of each tool result kept in the member's record."""


@dataclass(frozen=True, slots=True)
class MemberAnswer:
    model: str
    content: str
    usage: Usage
    """Everything the member spent, also when it failed half-way (earlier turns were billed)."""
    tool_calls: tuple[ToolCallRecord, ...]
    sources: tuple[Source, ...]
    error: ProviderError | None = None


async def answer_with_tools(
    caller: Caller,
    models: Sequence[str],
    request: CompletionRequest,
    tools: ToolRegistry | None,
    max_tool_calls: int,
    *,
    first_call_required: bool = False,
    budget: Budget | None = None,
    on_tool: Callable[[ToolCallRecord, float], None] = lambda record, started: None,
    observe: CallObserver | None = None,
) -> MemberAnswer:
    """``on_tool`` gets each tool call when it is done (and when it started, ``monotonic``);
    ``observe`` each model call (see ``Caller.complete``)."""
    messages = list(request.messages)
    usage = Usage()
    records: list[ToolCallRecord] = []
    sources: list[Source] = []
    made = 0
    model = models[0]
    while True:
        offer = tools is not None and len(tools) > 0 and made < max_tool_calls
        choice = ("required" if first_call_required and made == 0 else "auto") if offer else None
        turn = dataclasses.replace(
            request,
            messages=tuple(messages),
            tools=tools.specs() if offer and tools is not None else (),
            tool_choice=choice,
        )
        try:
            call = await caller.complete(models, turn, budget, observe=observe)
        except ProviderError as exc:
            return MemberAnswer(model, "", usage, tuple(records), tuple(sources), exc)
        model = call.model
        usage += call.completion.usage
        wanted = call.completion.tool_calls if offer else ()
        if not wanted:
            return MemberAnswer(
                call.model, call.completion.content, usage, tuple(records), tuple(sources)
            )
        messages.append(Message("assistant", call.completion.content, tool_calls=wanted))
        for tool_call in wanted:
            assert tools is not None
            if made >= max_tool_calls:
                content = (
                    f"not run: the limit of {max_tool_calls} tool calls is reached; answer now"
                )
                messages.append(Message("tool", content, tool_call_id=tool_call.id))
                continue
            made += 1
            started = time.monotonic()
            result = await _run_tool(caller, tools, tool_call, budget)
            usage += Usage(cost=result.cost)
            sources.extend(result.sources)
            record = ToolCallRecord(
                name=tool_call.name,
                arguments=tool_call.arguments,
                result=result.content[:RESULT_PREVIEW],
                cost=result.cost,
                error=result.error,
                sources=tuple(s.url for s in result.sources),
            )
            records.append(record)
            on_tool(record, started)
            messages.append(Message("tool", result.content, tool_call_id=tool_call.id))


async def _run_tool(
    caller: Caller, tools: ToolRegistry, call: ToolCall, budget: Budget | None
) -> ToolResult:
    """Run one tool call; under a budget, its price (``prices.toml``'s ``[tools]``, else the
    tool's own) is reserved first and settled with what the call cost."""
    found = tools.get(call.name)
    if budget is None or found is None:  # an unknown tool costs nothing: it is an error
        return await tools.call(call.name, call.arguments)
    price = caller.prices.tool_price(found.name)
    try:
        reservation = budget.reserve(f"tool {found.name}", found.price if price is None else price)
    except BudgetExceeded as exc:
        error = f"{found.name}: {exc.message}"
        return ToolResult(content=f"Tool error. {error}", cost=0.0, error=error)
    try:
        result = await tools.call(call.name, call.arguments)
    except BaseException:  # cancelled: what it cost is unknown, so it costs the reservation
        budget.settle(reservation, None)
        raise
    budget.settle(reservation, result.cost)
    return result
