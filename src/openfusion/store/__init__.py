"""What openfusion keeps: spend and budgets, API keys, runs — one SQL database (``Store``)."""

from openfusion.store.database import Database
from openfusion.store.keys import KeyRecord, KeyStore
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
from openfusion.store.run_views import RunFilter
from openfusion.store.runs import RunStore
from openfusion.store.store import Store

__all__ = [
    "NANO",
    "BudgetExhausted",
    "BudgetStatus",
    "Database",
    "KeyRecord",
    "KeyStore",
    "Reservation",
    "RunFilter",
    "RunStore",
    "SpendLedger",
    "SpendRecord",
    "SpendRow",
    "Store",
    "format_usd",
    "to_nano",
]
