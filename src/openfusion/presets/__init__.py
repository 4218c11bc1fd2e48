"""Presets: who sits on the panel, who judges, and with which limits and prompts.

Shipped presets are the ``*.toml`` files beside this module; users add or shadow them in
``<config dir>/presets/<name>.toml``. ``self:<model>`` is three samples of one model (different
seeds and temperatures) judged by the same model. A preset file::

    description = "..."
    judge = "openrouter/deepseek/deepseek-v4-pro"   # or a [judge] table: see below
    judge_fallbacks = ["openrouter/google/gemini-3-flash-preview"]     # optional
    panel = [
      { model = "openrouter/google/gemini-3-flash-preview", temperature = 0.7, seed = 1,
        fallbacks = ["openrouter/google/gemini-2.5-flash"] },  # optional, tried in order
      ...
    ]

    [policy]                      # optional
    min_panel = 2                 # quorum: answers needed
    straggler_seconds = 20        # once the quorum answered, wait at most this for the rest
    straggler_factor = 1.5        # ... or this multiple of the answered members' median latency

    [limits]                      # optional, max tokens per stage; analysis size bounds
    panel_max_tokens = 1024
    analysis_max_tokens = 2048
    synthesis_max_tokens = 2048
    max_completion_tokens = 16384 # cap of every inner call (panel and judge), reasoning included
    analysis_items = 5            # entries per list in the analysis
    analysis_chars = 300          # characters per text in the analysis

    [reasoning]                   # optional, sent to the models that support it
    effort = "low"                # xhigh, high, medium, low, minimal, none
    max_tokens = 2048             # reasoning tokens per call

    [tools]                       # optional: what panel members may call
    enabled = true
    allow = ["web_search", "web_fetch"]   # default: every configured tool
    max_tool_calls = 8            # per member (and the judge), at most 16
    first_call = "auto"           # "required": search before answering
    retrieve = false              # true: the engine searches with the question first
    judge = true                  # the judge may check claims with the tools before its analysis

    [prompts]                     # optional, template overrides, paths relative to this file
    synthesis = "my_synthesis.j2"

The judge as a table (instead of ``judge = "<model>"``)::

    [judge]
    model = "local/gemma-3-270m"
    mode = "select"               # "synthesise" (default): the judge writes the analysis and
                                  # the answer; "select": it picks the best-supported panel
                                  # answer (agreement, then its own likelihood of each), for
                                  # models too weak to write either (engine/select.py)
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openfusion.errors import ConfigError
from openfusion.settings import Settings, describe_validation_error
from openfusion.types import Effort, Reasoning

MAX_PANEL = 8
SELF_SAMPLES = ((0.7, 1), (0.9, 2), (1.1, 3))  # (temperature, seed) per sample of self:<model>
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    panel_max_tokens: int | None = Field(None, gt=0)
    analysis_max_tokens: int | None = Field(None, gt=0)
    synthesis_max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    """A cap on every inner call (panel and judge), reasoning tokens included."""
    analysis_items: int = Field(5, gt=0, le=20)
    """At most this many entries in each list of the judge's analysis."""
    analysis_chars: int = Field(300, gt=0)
    """At most this many characters in each text of the judge's analysis."""


MAX_TOOL_CALLS = 16


class ToolUse(BaseModel):
    """Which tools panel members may call, and how often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    allow: tuple[str, ...] | None = None
    """Tool names offered (``None``: every configured tool)."""
    max_tool_calls: int = Field(8, ge=0, le=MAX_TOOL_CALLS)
    first_call: Literal["auto", "required"] = "auto"
    """``required``: members must search before they answer (for models that would not)."""
    judge: bool = False
    """The judge may use the tools too, to check the panel's claims before its analysis."""
    retrieve: bool = False
    """The engine itself searches once with the question before the panel and keeps the hits
    that share the question's words (for a model too weak to write a query or to tell a relevant
    hit from an unrelated one); ``max_tool_calls`` still caps the members' own calls."""


class ReasoningConfig(BaseModel):
    """``reasoning`` sent to the preset's models that support it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    effort: Effort | None = None
    max_tokens: int | None = Field(None, gt=0)

    def to_reasoning(self) -> Reasoning | None:
        if self.effort is None and self.max_tokens is None:
            return None
        return Reasoning(self.effort, self.max_tokens)


class _Slot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    fallbacks: list[str] = Field(default_factory=list, max_length=MAX_PANEL)


class PanelPolicy(BaseModel):
    """When the panel is done: the quorum, and how long stragglers get once it is met."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_panel: int = Field(1, ge=1, le=MAX_PANEL)
    """Answers needed; fewer is a failed fusion."""
    straggler_seconds: float | None = Field(None, gt=0)
    """Once ``min_panel`` members answered, wait at most this long for the rest."""
    straggler_factor: float | None = Field(None, gt=0)
    """... or at most this multiple of the answered members' median latency."""


JudgeMode = Literal["synthesise", "select"]


class _Judge(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    mode: JudgeMode = "synthesise"


class _PresetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    judge: str | _Judge
    judge_fallbacks: list[str] = Field(default_factory=list, max_length=MAX_PANEL)
    panel: list[_Slot] = Field(min_length=1, max_length=MAX_PANEL)
    policy: PanelPolicy = Field(default_factory=PanelPolicy)
    tools: ToolUse = Field(default_factory=ToolUse)
    limits: Limits = Field(default_factory=Limits)
    reasoning: ReasoningConfig = Field(default_factory=ReasoningConfig)
    prompts: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PanelSlot:
    model: str
    temperature: float | None = None
    seed: int | None = None
    fallbacks: tuple[str, ...] = ()
    """Models that take the slot, in order, when ``model`` fails for good."""

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model, *self.fallbacks)


@dataclass(frozen=True)
class Preset:
    name: str
    panel: tuple[PanelSlot, ...]
    judge: str
    description: str = ""
    limits: Limits = field(default_factory=Limits)
    prompts: dict[str, Path] = field(default_factory=dict)
    """Template overrides: template name → file."""
    judge_fallbacks: tuple[str, ...] = ()
    policy: PanelPolicy = field(default_factory=PanelPolicy)
    tools: ToolUse = field(default_factory=ToolUse)
    reasoning: Reasoning | None = None
    """Sent to the panel and judge models that support it."""
    judge_mode: JudgeMode = "synthesise"
    """``select``: the judge picks a panel answer instead of writing one (``engine/select.py``)."""

    @property
    def judges(self) -> tuple[str, ...]:
        return (self.judge, *self.judge_fallbacks)

    @classmethod
    def from_models(cls, models: Sequence[str], judge: str | None = None) -> Preset:
        """An ad-hoc preset: these panel models, judged by ``judge`` (default: the first one)."""
        if not 1 <= len(models) <= MAX_PANEL:
            raise ConfigError(f"a panel has 1 to {MAX_PANEL} models, got {len(models)}")
        return cls(
            name="custom",
            panel=tuple(PanelSlot(m) for m in models),
            judge=judge or models[0],
        )


def load_preset(name: str, settings: Settings) -> Preset:
    if name.startswith("self:"):
        model = name.removeprefix("self:")
        if not model:
            raise ConfigError("preset 'self:<model>' needs a model, e.g. self:local/gemma-3-270m")
        panel = tuple(PanelSlot(model, t, s) for t, s in SELF_SAMPLES)
        return Preset(name, panel, judge=model, description=f"{len(panel)} samples of {model}")
    if not _NAME.match(name):
        raise ConfigError(f"preset name {name!r} may only use letters, digits, '.', '_' and '-'")
    user_file = settings.config_dir / "presets" / f"{name}.toml"
    if user_file.exists():
        return load_preset_file(user_file)
    shipped = resources.files(__package__).joinpath(f"{name}.toml")
    if shipped.is_file():
        return _parse(name, shipped.read_text(encoding="utf-8"), f"preset {name!r}", None)
    known = ", ".join(p.name for p in list_presets(settings))
    raise ConfigError(f"unknown preset {name!r}; known presets: {known}, or self:<model>")


class PresetCache:
    """``load_preset`` for a long-lived process (the server): a preset is read and validated
    once, and again only when its file in the config dir changes (appears, is edited, or goes
    away), so a request costs one ``stat`` instead of reading and validating TOML. Only
    named presets are kept (``self:<model>`` is built from its name, at no cost), at most
    ``size`` of them."""

    def __init__(self, settings: Settings, size: int = 64) -> None:
        self.settings = settings
        self.size = size
        self._kept: dict[str, tuple[tuple[int, int] | None, Preset]] = {}

    def load(self, name: str) -> Preset:
        if not _NAME.match(name):
            return load_preset(name, self.settings)
        version = _file_version(self.settings.config_dir / "presets" / f"{name}.toml")
        kept = self._kept.get(name)
        if kept is not None and kept[0] == version:
            return kept[1]
        preset = load_preset(name, self.settings)
        if len(self._kept) >= self.size:
            self._kept.clear()
        self._kept[name] = (version, preset)
        return preset


def _file_version(path: Path) -> tuple[int, int] | None:
    """When and how big ``path`` is (``None``: not there): what tells a changed file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def load_preset_file(path: Path) -> Preset:
    """A preset from a file anywhere (named after the file); template paths are relative to it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read preset file {path}: {exc.strerror or exc}") from exc
    return _parse(path.stem, text, str(path), path.parent)


def user_preset_names(settings: Settings) -> list[str]:
    """The names of the user's presets (``presets/*.toml`` in the config dir)."""
    user_dir = settings.config_dir / "presets"
    if not user_dir.is_dir():
        return []
    return sorted(p.stem for p in user_dir.glob("*.toml") if _NAME.match(p.stem))


def list_presets(settings: Settings) -> list[Preset]:
    """Every named preset, shipped and user (a user file shadows a shipped one of that name)."""
    shipped = resources.files(__package__).iterdir()
    names = {p.name.removesuffix(".toml") for p in shipped if p.name.endswith(".toml")}
    user_dir = settings.config_dir / "presets"
    if user_dir.is_dir():
        names |= {p.stem for p in user_dir.glob("*.toml")}
    return [load_preset(n, settings) for n in sorted(names) if _NAME.match(n)]


def _parse(name: str, text: str, where: str, base_dir: Path | None) -> Preset:
    try:
        data = _PresetFile.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_validation_error(exc)}") from exc
    if data.prompts and base_dir is None:
        raise ConfigError(f"{where}: shipped presets cannot override prompts")
    return Preset(
        name=name,
        panel=tuple(
            PanelSlot(s.model, s.temperature, s.seed, tuple(s.fallbacks)) for s in data.panel
        ),
        judge=data.judge if isinstance(data.judge, str) else data.judge.model,
        judge_mode="synthesise" if isinstance(data.judge, str) else data.judge.mode,
        description=data.description,
        limits=data.limits,
        judge_fallbacks=tuple(data.judge_fallbacks),
        policy=data.policy,
        tools=data.tools,
        reasoning=data.reasoning.to_reasoning(),
        prompts={k: (base_dir or Path()) / v for k, v in data.prompts.items()},
    )
