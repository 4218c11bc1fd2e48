"""Presets, settings and prompt templates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from openfusion import (
    ConfigError,
    Fusion,
    MissingAPIKeyError,
    ProviderRegistry,
    Reasoning,
    Settings,
    list_presets,
    load_preset,
)
from openfusion.cost import PriceCatalog
from openfusion.presets import PresetCache
from openfusion.providers.scripted import ScriptedProvider, Step

ANALYSIS = json.dumps(
    {
        "consensus": [],
        "contradictions": [],
        "partial_coverage": [],
        "unique_insights": [],
        "blind_spots": [],
    }
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_presets(settings: Settings) -> None:
    local = load_preset("local", settings)
    assert {s.model for s in local.panel} == {"local/gemma-3-270m"}
    assert len({s.seed for s in local.panel}) == len(local.panel) >= 3
    assert local.judge == "local/gemma-3-270m" and local.judge_mode == "select"
    budget = load_preset("budget", settings)
    assert [s.model for s in budget.panel] == [
        "openrouter/google/gemini-3-flash-preview",
        "openrouter/moonshotai/kimi-k2.6",
        "openrouter/deepseek/deepseek-v4-pro",
    ]
    assert {p.name for p in list_presets(settings)} >= {"local", "budget", "quality"}


def test_self_preset_is_n_samples_of_one_model(settings: Settings) -> None:
    preset = load_preset("self:openai/gpt-5.5", settings)
    assert [s.model for s in preset.panel] == ["openai/gpt-5.5"] * 3
    assert len({s.seed for s in preset.panel}) == 3
    assert preset.judge == "openai/gpt-5.5"
    with pytest.raises(ConfigError, match="needs a model"):
        load_preset("self:", settings)


def test_user_preset_adds_and_shadows(settings: Settings) -> None:
    write(
        settings.config_dir / "presets" / "mine.toml",
        'judge = "scripted/j"\npanel = [{ model = "scripted/a" }, { model = "scripted/b" }]\n',
    )
    write(
        settings.config_dir / "presets" / "budget.toml",
        'judge = "scripted/j"\npanel = [{ model = "scripted/x" }]\n',
    )
    assert [s.model for s in load_preset("mine", settings).panel] == ["scripted/a", "scripted/b"]
    assert load_preset("budget", settings).judge == "scripted/j"
    assert "mine" in {p.name for p in list_presets(settings)}


def test_the_preset_cache_reads_a_file_again_only_when_it_changes(settings: Settings) -> None:
    cache = PresetCache(settings)
    shipped = cache.load("budget")
    assert cache.load("budget") is shipped  # read once
    path = write(
        settings.config_dir / "presets" / "budget.toml",
        'judge = "scripted/j"\npanel = [{ model = "scripted/x" }]\n',
    )
    assert cache.load("budget").judge == "scripted/j"  # a user file appeared: it shadows
    kept = cache.load("budget")
    assert cache.load("budget") is kept
    path.write_text('judge = "scripted/k"\npanel = [{ model = "scripted/xy" }]\n', encoding="utf-8")
    assert cache.load("budget").judge == "scripted/k"  # edited (its size changed)
    path.unlink()
    assert cache.load("budget") == shipped  # gone: the shipped one again
    with pytest.raises(ConfigError, match="unknown preset"):
        cache.load("nope")
    assert cache.load("self:scripted/a").panel[0].model == "scripted/a"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('panel = [{ model = "a/b" }]', "judge: Field required"),
        ('judge = "a/b"\npanel = []', "panel: List should have at least 1 item"),
        ('judge = "a/b"\npanel = [' + '{ model = "a/b" },' * 9 + "]", "panel: List should have at"),
        ('judge = "a/b"\npanel = [{ model = "a/b", temperature = 5 }]', "panel.0.temperature"),
        ('judge = "a/b"\npanel = [{ model = "a/b", colour = "red" }]', "panel.0.colour"),
        ("judge = ", "not valid TOML"),
    ],
)
def test_bad_preset_names_the_field(settings: Settings, text: str, message: str) -> None:
    write(settings.config_dir / "presets" / "bad.toml", text)
    with pytest.raises(ConfigError, match=message):
        load_preset("bad", settings)


def test_unknown_and_unsafe_preset_names(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="known presets: budget, fast, local, quality"):
        load_preset("nope", settings)
    with pytest.raises(ConfigError, match="may only use"):
        load_preset("../../etc/passwd", settings)


def test_default_preset_follows_keys_and_config(tmp_path: Path) -> None:
    env = {"OPENFUSION_CONFIG_DIR": str(tmp_path)}
    assert Settings.load(env).preset_name == "local"
    assert Settings.load({**env, "OPENROUTER_API_KEY": "sk-or-x"}).preset_name == "budget"
    write(tmp_path / "config.toml", 'default_preset = "quality"\n')
    assert Settings.load(env).preset_name == "quality"
    assert Settings.load({**env, "OPENFUSION_PRESET": "self:local/x"}).preset_name == "self:local/x"


def test_bad_config_file_names_the_field(tmp_path: Path) -> None:
    write(tmp_path / "config.toml", '[timeouts]\nread = -1\n[providers.x]\nbase_url = "u"\n')
    with pytest.raises(ConfigError) as info:
        Settings.load({"OPENFUSION_CONFIG_DIR": str(tmp_path)})
    assert "timeouts.read" in str(info.value)
    assert "providers.x.type" in str(info.value)


def test_settings_repr_hides_keys(tmp_path: Path) -> None:
    settings = Settings.load({"OPENFUSION_CONFIG_DIR": str(tmp_path), "OPENAI_API_KEY": "sk-top"})
    assert "sk-top" not in repr(settings)


async def test_missing_key_names_the_variable_before_any_call(settings: Settings) -> None:
    fusion = Fusion.from_preset("budget", settings=settings)
    with pytest.raises(MissingAPIKeyError, match="OPENROUTER_API_KEY"):
        await fusion.run("q")


async def test_prompt_overrides_from_preset_and_user_dir(settings: Settings) -> None:
    config = settings.config_dir
    write(config / "prompts" / "panel_system.j2", "PANEL {{ panel_size }} {{ question }}")
    write(config / "presets" / "syn.j2", "SYNTH {{ responses|length }}: {{ question }}")
    write(
        settings.config_dir / "presets" / "custom.toml",
        'judge = "scripted/j"\npanel = [{ model = "scripted/a" }]\n'
        '[prompts]\nsynthesis = "syn.j2"\n',
    )
    provider = ScriptedProvider({"a": Step("A."), "j": [Step(ANALYSIS), Step("Final.")]})
    registry = ProviderRegistry(settings)
    registry.register("scripted", provider)
    fusion = Fusion(load_preset("custom", settings), settings=settings, registry=registry)
    await fusion.run("why?")
    assert provider.calls[0].messages[0].content == "PANEL 1 why?"
    assert provider.calls[-1].messages[0].content == "SYNTH 1: why?"


def test_a_template_is_read_once_per_process(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No file check per render: an edited prompt counts from the next start."""
    from openfusion.prompts import PromptSet

    path = write(settings.config_dir / "prompts" / "panel_system.j2", "ONE {{ question }}")
    prompts = PromptSet([path.parent])

    def render(prompts: PromptSet) -> tuple[str, str]:  # the user's template and a shipped one
        panel = prompts.render("panel_system", question="q", member_index=0, panel_size=1)
        return panel, prompts.render("fusion_tool", panel_size=3)

    first = render(prompts)
    assert first[0] == "ONE q"
    checks: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(
        os, "stat", lambda p, *a, **k: checks.append(str(p)) or real_stat(p, *a, **k)
    )
    path.write_text("TWO {{ question }}")
    assert render(prompts) == first
    assert checks == []
    assert render(PromptSet([path.parent]))[0] == "TWO q"  # a new process, as it were


def test_unknown_template_variable_is_a_config_error(settings: Settings) -> None:
    from openfusion.prompts import PromptSet

    path = write(settings.config_dir / "t.j2", "{{ nope }}")
    with pytest.raises(ConfigError, match="'nope' is undefined"):
        PromptSet(overrides={"synthesis": path}).render("synthesis", question="q")
    with pytest.raises(ConfigError, match="unknown prompt template"):
        PromptSet(overrides={"sinthesis": path})


def test_the_price_snapshot_covers_every_shipped_preset(settings: Settings) -> None:
    catalog = PriceCatalog.load(settings.config_dir, settings.cache_dir)
    for preset in list_presets(settings):
        models = {preset.judge, *preset.judge_fallbacks}
        models |= {m for slot in preset.panel for m in slot.models}
        for model in models:
            assert catalog.price(model) is not None, f"{preset.name}: {model} has no price"


def test_the_fast_preset(settings: Settings) -> None:
    fast = load_preset("fast", settings)
    assert len(fast.panel) == 3 and fast.judge.startswith("openrouter/")
    assert fast.reasoning == Reasoning("low")
    assert fast.limits.max_completion_tokens == 4096
    assert fast.tools.judge and fast.tools.max_tool_calls == 4


def test_reasoning_and_max_completion_tokens_in_a_preset_file(settings: Settings) -> None:
    path = settings.config_dir / "presets" / "thinking.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        'judge = "s/j"\npanel = [{ model = "s/a" }]\n'
        '[reasoning]\neffort = "high"\nmax_tokens = 2000\n'
        "[limits]\nmax_completion_tokens = 8000\n"
    )
    preset = load_preset("thinking", settings)
    assert preset.reasoning == Reasoning("high", 2000)
    assert preset.limits.max_completion_tokens == 8000
    path.write_text('judge = "s/j"\npanel = [{ model = "s/a" }]\n[reasoning]\neffort = "max"\n')
    with pytest.raises(ConfigError, match=r"reasoning\.effort"):
        load_preset("thinking", settings)


def test_the_judge_as_a_table_names_its_mode(tmp_path: Path) -> None:
    from openfusion.presets import load_preset_file

    file = tmp_path / "picky.toml"
    panel = 'panel = [{ model = "scripted/a" }, { model = "scripted/b" }]\n'
    file.write_text(panel + '[judge]\nmodel = "scripted/j"\nmode = "select"\n')
    preset = load_preset_file(file)
    assert (preset.judge, preset.judge_mode) == ("scripted/j", "select")
    file.write_text(panel + 'judge = "scripted/j"\n')
    assert load_preset_file(file).judge_mode == "synthesise"
    file.write_text(panel + '[judge]\nmodel = "scripted/j"\nmode = "vote"\n')
    with pytest.raises(ConfigError, match="judge"):
        load_preset_file(file)
