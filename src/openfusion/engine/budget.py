"""A request's spending limit (``max_cost``): calls that could overrun it are not started.

Before a call, its worst case is reserved: the prompt, bounded from above by its size in UTF-8
bytes (a byte-level BPE token is at least one byte), plus the ``max_tokens`` of output the call
is sent with — which is cut to what the remaining budget can pay. After it, the reservation is
replaced by what the call really cost. Reservations make concurrent calls safe: together they
never exceed the limit.

An upstream that ignores ``max_tokens`` can still bill more than was reserved: that excess is
the budget's ``overshoot``, kept apart so it is reported (it is bounded: once a call overshoots,
nothing is left and no further call starts; only the calls already in flight can add to it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from openfusion.errors import ProviderError
from openfusion.types import CompletionRequest

DEFAULT_MAX_TOKENS = 4096
"""Output asked for (and reserved) by a call under a budget that sets no ``max_tokens``."""
MIN_OUTPUT_TOKENS = 16
"""A call the budget cannot pay this many output tokens for is not started: it could not say
anything useful."""
MESSAGE_OVERHEAD_TOKENS = 8
"""Tokens a chat template adds per message (role markers, separators), generously."""


class BudgetExceeded(ProviderError):
    reason = "budget"


@dataclass
class Budget:
    limit: float
    spent: float = 0.0
    reserved: float = 0.0
    refused: list[str] = field(default_factory=list)
    overshoot: float = 0.0
    """What calls cost beyond what was reserved for them (an upstream that ignored
    ``max_tokens``); included in ``spent``."""
    fit_output: bool = True
    """Cut a call's ``max_tokens`` to what is left (a request's ``max_cost``). ``False``: a
    call whose whole ``max_tokens`` does not fit is refused instead (an eval, where a cut
    answer would bias the score)."""

    @property
    def remaining(self) -> float:
        return self.limit - self.spent - self.reserved

    def reserve(self, model: str, worst_case: float | None) -> float:
        """Reserve the call's worst case, or raise ``BudgetExceeded`` (the call must not start)."""
        if worst_case is None:
            self.refused.append(model)
            raise BudgetExceeded(
                f"{model}: not started: its price is unknown, so its cost cannot be bounded "
                "by max_cost (run `openfusion models sync`, add it to prices.toml, or allow "
                "unpriced calls at a stated charge with [budget] unpriced_call_usd)"
            )
        if worst_case > self.remaining:
            self.refused.append(model)
            raise BudgetExceeded(
                f"{model}: not started: it could cost up to ${worst_case:.6f} and "
                f"${max(self.remaining, 0):.6f} of max_cost ${self.limit:.6f} is left"
            )
        self.reserved += worst_case
        return worst_case

    def refuse(self, model: str, message: str) -> BudgetExceeded:
        """The error for a call that does not fit (recorded as refused)."""
        self.refused.append(model)
        return BudgetExceeded(f"{model}: not started: {message}")

    def settle(self, reservation: float, cost: float | None) -> None:
        """Replace a reservation by the call's real cost (its worst case if that is unknown)."""
        self.reserved -= reservation
        charged = reservation if cost is None else cost
        self.spent += charged
        self.overshoot += max(charged - reservation, 0.0)

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "max_cost": self.limit,
            "spent": self.spent,
            "refused": list(self.refused),
        }
        if self.overshoot > 0:
            data["overshoot"] = self.overshoot
        return data


def prompt_token_bound(request: CompletionRequest) -> int:
    """At most how many prompt tokens ``request`` is: the UTF-8 bytes of everything it sends
    the model (messages, tool calls, tool definitions, the JSON schema) plus a per-message
    overhead. Byte-level BPE (GPT, Llama 3, Gemma with byte fallback...) never makes more
    tokens than bytes, so this bound holds without the model's tokenizer."""
    size = 0
    for message in request.messages:
        size += len(message.content.encode()) + MESSAGE_OVERHEAD_TOKENS
        for call in message.tool_calls:
            size += len(call.name.encode()) + len(call.arguments.encode()) + len(call.id)
    for tool in request.tools:
        spec = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        size += len(json.dumps(spec).encode()) + MESSAGE_OVERHEAD_TOKENS
    if request.json_schema is not None:
        size += len(json.dumps(request.json_schema).encode())
    return size + MESSAGE_OVERHEAD_TOKENS
