"""Prices, and the cost of a call.

A call's cost is what the provider reported (OpenRouter's ``usage.cost``) when it reported one;
otherwise it is computed from the price catalog; otherwise it is ``None`` — unknown, never 0.

The catalog merges, later winning: the snapshot shipped in ``data/prices.json``; the OpenRouter
catalog saved by ``openfusion models sync`` (``<cache dir>/openrouter_models.json``); and the
user's ``<config dir>/prices.toml``::

    ["openai/gpt-5.5"]                 # USD per million tokens
    prompt = 1.25
    completion = 10.0
    request = 0.0                      # per call, optional

    [tools]                            # USD per tool call
    web_search = 0.005
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from openfusion.errors import ConfigError
from openfusion.types import Usage

PER_MILLION = 1_000_000
SYNC_FILE = "openrouter_models.json"
CHARS_PER_TOKEN = 4
"""For estimates of what a call used when the upstream never said (a stream cut short)."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per token (``prompt``, ``completion``, ``reasoning``) and per call (``request``)."""

    prompt: float
    completion: float
    request: float = 0.0
    reasoning: float | None = None
    """Price of reasoning tokens when it differs from ``completion`` (they are counted in
    ``completion_tokens``, as OpenAI and OpenRouter report them)."""

    def cost(self, usage: Usage) -> float:
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        reasoning_price = self.completion if self.reasoning is None else self.reasoning
        return (
            usage.prompt_tokens * self.prompt
            + (usage.completion_tokens - reasoning) * self.completion
            + reasoning * reasoning_price
            + self.request
        )


FREE = Price(0.0, 0.0)


class PriceCatalog:
    def __init__(
        self, prices: Mapping[str, Price], tool_prices: Mapping[str, float] | None = None
    ) -> None:
        self._prices = dict(prices)
        self._tool_prices = dict(tool_prices or {})

    @classmethod
    def load(cls, config_dir: Path, cache_dir: Path) -> PriceCatalog:
        shipped = json.loads(
            resources.files("openfusion").joinpath("data/prices.json").read_text("utf-8")
        )
        prices = {m: _per_million(m, p) for m, p in shipped["models"].items()}
        tools: dict[str, float] = dict(shipped.get("tools", {}))
        synced = cache_dir / SYNC_FILE
        if synced.exists():
            prices.update(parse_openrouter_models(_read_json(synced)))
        user = config_dir / "prices.toml"
        if user.exists():
            try:
                data = tomllib.loads(user.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{user}: not valid TOML: {exc}") from exc
            tools.update(data.pop("tools", {}))
            prices.update({m: _per_million(f"{user}: {m}", p) for m, p in data.items()})
        return cls(prices, tools)

    def price(self, model_id: str) -> Price | None:
        if model_id.startswith("local/"):  # in-process: costs electricity, not money
            return self._prices.get(model_id, FREE)
        return self._prices.get(model_id)

    def tool_price(self, tool: str) -> float | None:
        return self._tool_prices.get(tool)

    def priced(self, model_id: str, usage: Usage) -> Usage:
        """``usage`` with its cost filled in from the catalog, unless the provider gave one
        (or gave no usage at all: zero tokens counted is not zero tokens used)."""
        if usage.cost is not None or not usage.reported:
            return usage
        price = self.price(model_id)
        return replace(usage, cost=None if price is None else price.cost(usage))

    def estimated(self, model_id: str, prompt_chars: int, completion_text: str) -> Usage:
        """What a call that never reported usage consumed, estimated from its text and priced
        (cost ``None`` without a price); marked ``estimated``."""
        usage = Usage(
            prompt_tokens=-(-prompt_chars // CHARS_PER_TOKEN),
            completion_tokens=-(-len(completion_text) // CHARS_PER_TOKEN),
            cost=None,
            estimated=True,
        )
        return self.priced(model_id, usage)

    def worst_case(self, model_id: str, prompt_tokens: int, max_tokens: int) -> float | None:
        """The most a call can cost, or ``None`` when the model has no known price."""
        price = self.price(model_id)
        if price is None:
            return None
        return price.cost(Usage(prompt_tokens=prompt_tokens, completion_tokens=max_tokens))

    def __contains__(self, model_id: str) -> bool:
        return self.price(model_id) is not None


def parse_openrouter_models(data: Any) -> dict[str, Price]:
    """Prices from OpenRouter's ``GET /models`` body, keyed ``openrouter/<id>``.

    OpenRouter gives USD per token as strings; ``"-1"`` means variable (left unknown).
    """
    prices: dict[str, Price] = {}
    for entry in data.get("data", []) if isinstance(data, dict) else []:
        pricing = entry.get("pricing") if isinstance(entry, dict) else None
        if not isinstance(pricing, dict) or not isinstance(entry.get("id"), str):
            continue
        try:
            prompt, completion = float(pricing["prompt"]), float(pricing["completion"])
            request = float(pricing.get("request") or 0)
            reasoning = pricing.get("internal_reasoning")
            price = Price(prompt, completion, request, float(reasoning) if reasoning else None)
        except (KeyError, TypeError, ValueError):
            continue
        if min(prompt, completion) >= 0:
            prices[f"openrouter/{entry['id']}"] = price
    return prices


def save_sync(cache_dir: Path, body: Any) -> int:
    """Store a ``GET /models`` body atomically; returns how many priced models it holds."""
    count = len(parse_openrouter_models(body))
    if count == 0:
        raise ConfigError("the models list has no priced models; nothing saved")
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(body, file)
        os.replace(tmp, cache_dir / SYNC_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return count


def _per_million(where: str, raw: Any) -> Price:
    try:
        reasoning = raw.get("reasoning")
        return Price(
            prompt=float(raw["prompt"]) / PER_MILLION,
            completion=float(raw["completion"]) / PER_MILLION,
            request=float(raw.get("request", 0.0)),
            reasoning=None if reasoning is None else float(reasoning) / PER_MILLION,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"price {where}: needs numbers 'prompt' and 'completion' (USD per million tokens)"
        ) from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); run `openfusion models sync`") from exc
