"""Provider adapters and the registry that resolves ``provider/model`` ids."""

from openfusion.providers.base import Provider, collect
from openfusion.providers.registry import ModelRef, ProviderRegistry

__all__ = ["ModelRef", "Provider", "ProviderRegistry", "collect"]
