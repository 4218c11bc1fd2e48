"""What the server keeps between requests: the spend ledger and the API keys' budgets."""

from openfusion.store.ledger import (
    NANO,
    BudgetExhausted,
    BudgetStatus,
    Reservation,
    SpendLedger,
    SpendRecord,
    SpendRow,
    format_usd,
    to_nano,
)

__all__ = [
    "NANO",
    "BudgetExhausted",
    "BudgetStatus",
    "Reservation",
    "SpendLedger",
    "SpendRecord",
    "SpendRow",
    "format_usd",
    "to_nano",
]
