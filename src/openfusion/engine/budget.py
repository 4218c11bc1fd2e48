"""A request's spending limit (``max_cost``): calls that could overrun it are not started.

Before a call, its worst case (the prompt, estimated generously, plus ``max_tokens`` of output,
at the catalog's price) is reserved; after it, the reservation is replaced by what the call
really cost. Reservations make concurrent panel calls safe: together they never exceed the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openfusion.errors import ProviderError

DEFAULT_MAX_TOKENS = 4096
"""Assumed output of a call that sets no ``max_tokens``, for its worst case."""
CHARS_PER_TOKEN = 3
"""A generous estimate (real text runs ~4 characters a token), so the worst case is not low."""


class BudgetExceeded(ProviderError):
    reason = "budget"


@dataclass
class Budget:
    limit: float
    spent: float = 0.0
    reserved: float = 0.0
    refused: list[str] = field(default_factory=list)

    @property
    def remaining(self) -> float:
        return self.limit - self.spent - self.reserved

    def reserve(self, model: str, worst_case: float | None) -> float:
        """Reserve the call's worst case, or raise ``BudgetExceeded`` (the call must not start)."""
        if worst_case is None:
            self.refused.append(model)
            raise BudgetExceeded(
                f"{model}: not started: its price is unknown, so its cost cannot be bounded "
                "by max_cost (run `openfusion models sync` or add it to prices.toml)"
            )
        if worst_case > self.remaining:
            self.refused.append(model)
            raise BudgetExceeded(
                f"{model}: not started: it could cost up to ${worst_case:.6f} and "
                f"${max(self.remaining, 0):.6f} of max_cost ${self.limit:.6f} is left"
            )
        self.reserved += worst_case
        return worst_case

    def settle(self, reservation: float, cost: float | None) -> None:
        """Replace a reservation by the call's real cost (its worst case if that is unknown)."""
        self.reserved -= reservation
        self.spent += reservation if cost is None else cost

    def to_dict(self) -> dict[str, object]:
        return {"max_cost": self.limit, "spent": self.spent, "refused": list(self.refused)}


def estimate_prompt_tokens(text_chars: int) -> int:
    return text_chars // CHARS_PER_TOKEN + 1
