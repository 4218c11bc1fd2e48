"""Resolves ``provider/model`` ids to a provider instance and the provider's own model name.

``openrouter/google/gemini-3-flash-preview`` → provider ``openrouter`` (an ``openai_compat``
adapter), model ``google/gemini-3-flash-preview``. The adapter for a provider is picked by its
config's ``type`` through a table of factories, never by testing names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from openfusion.errors import ConfigError
from openfusion.providers.base import Provider
from openfusion.settings import ProviderConfig, Settings

ProviderFactory = Callable[[str, ProviderConfig, Settings], Provider]

# type -> "module:factory"; imported on first use so that e.g. llama.cpp loads only when needed.
ADAPTERS: dict[str, str] = {
    "openai_compat": "openfusion.providers.openai_compat:create",
    "local": "openfusion.providers.local:create",
    "scripted": "openfusion.providers.scripted:create",
}


@dataclass(frozen=True, slots=True)
class ModelRef:
    provider: str
    model: str

    @classmethod
    def parse(cls, model_id: str) -> ModelRef:
        provider, sep, model = model_id.strip().partition("/")
        if not sep or not provider or not model:
            raise ConfigError(
                f"model id {model_id!r} must look like 'provider/model', "
                "e.g. 'openrouter/google/gemini-3-flash-preview' or 'local/gemma-3-270m'"
            )
        return cls(provider, model)

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


class ProviderRegistry:
    """Builds each configured provider once, on first use, and closes them all at the end."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._instances: dict[str, Provider] = {}

    def register(self, name: str, provider: Provider) -> None:
        """Use ``provider`` for ids starting with ``name/`` (tests, embedding applications)."""
        self._instances[name] = provider

    def provider(self, name: str) -> Provider:
        if name in self._instances:
            return self._instances[name]
        config = self._settings.providers.get(name)
        if config is None:
            raise self._unknown(name)
        target = ADAPTERS.get(config.type)
        if target is None:
            raise ConfigError(
                f"provider {name!r} has unknown type {config.type!r}; "
                f"known types: {', '.join(sorted(ADAPTERS))}"
            )
        module_name, _, attr = target.partition(":")
        factory: ProviderFactory = getattr(importlib.import_module(module_name), attr)
        instance = factory(name, config, self._settings)
        self._instances[name] = instance
        return instance

    def check(self, model_id: str) -> None:
        """``ConfigError`` for a malformed id or an unknown provider, without building the
        provider (a model that is not going to be called must not load anything)."""
        name = ModelRef.parse(model_id).provider
        if name not in self._instances and name not in self._settings.providers:
            raise self._unknown(name)

    def _unknown(self, name: str) -> ConfigError:
        known = ", ".join(sorted({*self._settings.providers, *self._instances}))
        return ConfigError(f"unknown provider {name!r}; configured providers: {known}")

    def resolve(self, model_id: str) -> tuple[Provider, str]:
        ref = ModelRef.parse(model_id)
        return self.provider(ref.provider), ref.model

    async def aclose(self) -> None:
        instances, self._instances = list(self._instances.values()), {}
        for instance in instances:
            await instance.aclose()
