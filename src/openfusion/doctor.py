"""``openfusion doctor``: what would fail before a run spends money.

Stale model ids are the failure users of other councils hit most. For every preset's model
(panel, fallbacks, judges) this checks that its provider is configured and has its key, that the
price catalog knows it, and — with ``online`` — that the provider's ``/models`` lists it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from openfusion.cost import SYNC_FILE, PriceCatalog
from openfusion.errors import ConfigError, MissingAPIKeyError, OpenFusionError
from openfusion.presets import list_presets
from openfusion.providers import ModelRef, ProviderRegistry
from openfusion.settings import Settings

Level = Literal["ok", "warn", "error"]


@dataclass(frozen=True, slots=True)
class Finding:
    preset: str
    model: str
    level: Level
    message: str


async def check(settings: Settings, *, online: bool = False) -> list[Finding]:
    registry = ProviderRegistry(settings)
    prices = PriceCatalog.load(settings.config_dir, settings.cache_dir)
    synced = (settings.cache_dir / SYNC_FILE).exists()
    listed: dict[str, set[str] | str] = {}  # provider -> its model ids, or why they are unknown
    findings = []
    try:
        for preset in list_presets(settings):
            models = [m for slot in preset.panel for m in slot.models] + list(preset.judges)
            for model_id in dict.fromkeys(models):
                finding = await _check_model(
                    registry, prices, synced, listed, model_id, online=online
                )
                findings.append(Finding(preset.name, model_id, *finding))
    finally:
        await registry.aclose()
    return findings


async def _check_model(
    registry: ProviderRegistry,
    prices: PriceCatalog,
    synced: bool,
    listed: dict[str, set[str] | str],
    model_id: str,
    *,
    online: bool,
) -> tuple[Level, str]:
    try:
        ref = ModelRef.parse(model_id)
        provider = registry.provider(ref.provider)
    except MissingAPIKeyError as exc:
        return "error", f"key not set: export {exc.env_var}=..."
    except ConfigError as exc:
        return "error", str(exc)
    if online:
        list_models: Callable[[], Coroutine[Any, Any, dict[str, Any]]] | None = getattr(
            provider, "list_models", None
        )
        if list_models is not None:
            if ref.provider not in listed:
                try:
                    body = await list_models()
                    listed[ref.provider] = {e["id"] for e in body.get("data", []) if "id" in e}
                except OpenFusionError as exc:
                    listed[ref.provider] = f"unreachable: {exc}"
            known = listed[ref.provider]
            if isinstance(known, str):
                return "error", known
            if ref.model not in known:
                return "error", f"{ref.provider} does not list {ref.model!r}: a stale model id?"
    if model_id not in prices:
        if ref.provider == "openrouter" and synced:
            return "error", "not in OpenRouter's catalog (models sync): a stale model id?"
        hint = "run `openfusion models sync`" if ref.provider == "openrouter" else "see prices.toml"
        return "warn", f"no known price (cost shows as unknown unless reported); {hint}"
    return "ok", "configured, priced" + (", listed upstream" if online else "")
