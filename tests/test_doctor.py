"""`openfusion doctor` and `openfusion models sync`, against a loopback /models endpoint."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner
from helpers import serve_app

from openfusion.cli import main
from openfusion.doctor import check
from openfusion.settings import Settings

MODELS = {
    "data": [
        {"id": "vendor/good", "pricing": {"prompt": "0.000001", "completion": "0.000004"}},
        {"id": "vendor/other", "pricing": {"prompt": "0.000002", "completion": "0.000002"}},
    ]
}


@pytest.fixture
async def models_server() -> AsyncIterator[str]:
    seen: list[str] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response(MODELS)

    app = web.Application()
    app.router.add_get("/api/v1/models", models)
    async with serve_app(app) as url:
        yield url + "/api/v1"


def configure(base_url: str) -> Path:
    """Point the `openrouter` provider at the loopback server; a preset with good and stale ids."""
    config = Path(os.environ["OPENFUSION_CONFIG_DIR"])
    (config / "presets").mkdir(parents=True)
    (config / "config.toml").write_text(
        f'[providers.openrouter]\ntype = "openai_compat"\nbase_url = "{base_url}"\n'
        'api_key_env = "OPENROUTER_API_KEY"\n'
    )
    (config / "presets" / "mine.toml").write_text(
        'judge = "openrouter/vendor/good"\n'
        'panel = [{ model = "openrouter/vendor/good" }, { model = "openrouter/vendor/gone" },'
        ' { model = "nowhere/x" }]\n'
    )
    return config


async def test_doctor_flags_stale_and_unconfigured_ids(
    models_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(models_server)
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-test")
    findings = {(f.preset, f.model): f for f in await check(Settings.load(), online=True)}
    assert findings["mine", "openrouter/vendor/good"].level in ("ok", "warn")
    gone = findings["mine", "openrouter/vendor/gone"]
    assert (gone.level, "stale model id" in gone.message) == ("error", True)
    assert "unknown provider 'nowhere'" in findings["mine", "nowhere/x"].message
    assert findings["local", "local/gemma-3-270m"].level == "ok"


async def test_doctor_offline_says_which_key_is_missing(models_server: str) -> None:
    configure(models_server)
    findings = await check(Settings.load())
    budget = [f for f in findings if f.preset == "budget"]
    assert budget and all("OPENROUTER_API_KEY" in f.message for f in budget)


async def test_models_sync_then_doctor_cli(
    models_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(models_server)
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-test")
    # The CLI runs its own event loop: off this one, which serves /models.
    synced = await asyncio.to_thread(CliRunner().invoke, main, ["models", "sync"])
    assert synced.exit_code == 0, synced.output
    assert "saved prices of 2 OpenRouter models" in synced.stdout
    cache = Path(os.environ["OPENFUSION_CACHE_DIR"]) / "openrouter_models.json"
    assert json.loads(cache.read_text()) == MODELS
    result = await asyncio.to_thread(
        CliRunner().invoke, main, ["doctor", "--online"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 1  # the stale id and the unknown provider are errors
    assert "does not list 'vendor/gone'" in result.stdout
    assert "sk-or-test" not in result.output
    offline = await asyncio.to_thread(CliRunner().invoke, main, ["doctor"], env={"COLUMNS": "200"})
    assert "not in OpenRouter's catalog" in offline.stdout  # the synced catalog knows it is gone


def test_models_sync_without_key_names_the_variable(models_server: str) -> None:
    configure(models_server)
    result = CliRunner().invoke(main, ["models", "sync"])
    assert result.exit_code == 1
    assert "OPENROUTER_API_KEY" in result.stderr
