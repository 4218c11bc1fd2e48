"""What is compared: each ``--configs`` entry, and how it answers one question.

An entry is a preset name (``local``, ``budget``), ``self:<model>``, a preset file
(``my_panel.toml``) — each a *fused* config, run by ``Fusion`` exactly as the server runs it —
or a model id (``provider/model``): a *single* config, which answers as one panel member
does (the panel's system prompt, the same tool loop and tools a ``self:<model>`` member gets,
through the same ``Caller``: retries, fallbacks, pricing), so ``m`` against ``self:m`` is one
pass against three passes fused.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from openfusion.engine.budget import Budget, BudgetExceeded
from openfusion.engine.fusion import Fusion, select_tools
from openfusion.engine.member import answer_with_tools
from openfusion.engine.policy import Caller
from openfusion.errors import ConfigError
from openfusion.presets import Preset, ToolUse, load_preset, load_preset_file
from openfusion.prompts import PromptSet
from openfusion.settings import Settings
from openfusion.tools import ToolRegistry
from openfusion.types import CompletionRequest, Message, Usage


@dataclass(frozen=True, slots=True)
class Answer:
    content: str
    status: Literal["ok", "error"]
    run_id: str
    usage: Usage
    latency_ms: int
    failures: tuple[str, ...] = ()
    """``model: reason (message)`` of each call that failed, and the run's failure reason."""
    budget_cut: bool = False
    """A call was not started because of ``--max-cost``: the answer is not a fair result."""
    panel: tuple[str, ...] = ()
    """A fused config: what each panel member answered (for the oracle score)."""


@dataclass(frozen=True, slots=True)
class EvalConfig:
    name: str
    preset: Preset | None = None
    model: str | None = None

    @property
    def kind(self) -> Literal["fused", "single"]:
        return "fused" if self.preset is not None else "single"

    @property
    def fingerprint(self) -> str:
        """Changes when what the config runs changes (its panel, judge, limits, tools...)."""
        if self.preset is None:
            text = f"single {self.model}"
        else:
            p = self.preset
            text = repr(
                (p.panel, p.judge, p.judge_fallbacks, p.limits, p.policy, p.tools, p.prompts)
            )
            if p.judge_mode != "synthesise":  # older results keep their fingerprints
                text += f" judge_mode={p.judge_mode}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_configs(text: str, settings: Settings) -> list[EvalConfig]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--configs is empty: e.g. --configs local,local/gemma-3-270m")
    if len(set(names)) != len(names):
        raise ConfigError(f"--configs names a config twice: {text}")
    return [parse_config(name, settings) for name in names]


def parse_config(name: str, settings: Settings) -> EvalConfig:
    if name.endswith(".toml"):
        return EvalConfig(name, preset=load_preset_file(Path(name)))
    if "/" in name and not name.startswith("self:"):
        return EvalConfig(name, model=name)
    return EvalConfig(name, preset=load_preset(name, settings))


class Answerer:
    """Answers questions for one config, within one dataset's tools."""

    def __init__(
        self,
        config: EvalConfig,
        settings: Settings,
        caller: Caller,
        tools: ToolRegistry | None,
        temperature: float | None = None,
    ) -> None:
        self.config = config
        self.temperature = temperature
        self.settings = settings
        self.caller = caller
        self.fusion: Fusion | None = None
        if config.preset is not None:
            self.fusion = Fusion(
                config.preset,
                settings=settings,
                caller=caller,
                tools=tools or ToolRegistry(),
            )
            self.tools: ToolRegistry | None = None
        else:
            use = ToolUse()
            self.tools = select_tools(tools, use, settings) if tools else None
            self.max_tool_calls = use.max_tool_calls
            self.prompts = PromptSet(settings.prompt_dirs)

    def check(self) -> None:
        """Raise ``ConfigError`` now for a model id, key or tool setting that cannot work."""
        if self.fusion is not None:
            self.fusion.check()
        else:
            assert self.config.model is not None
            self.caller.registry.resolve(self.config.model)

    async def answer(self, question: str, budget: Budget | None) -> Answer:
        if self.fusion is not None:
            return await self._fused(self.fusion, question, budget)
        return await self._single(question, budget)

    async def _fused(self, fusion: Fusion, question: str, budget: Budget | None) -> Answer:
        result = await fusion.run(question, budget=budget, temperature=self.temperature)
        failures = [f"{f.name}: {f.reason} ({f.message})" for f in result.failed_models]
        if result.failure_reason:
            failures.append(f"{result.failure_reason}: {result.failure_message or ''}".strip())
        judge_refused = (result.failure_message or "").startswith(f"{BudgetExceeded.reason}:")
        cut = judge_refused or any(f.reason == BudgetExceeded.reason for f in result.failed_models)
        return Answer(
            result.content,
            result.status,
            result.run_id,
            result.usage,
            result.latency_ms,
            tuple(failures),
            cut,
            tuple(r.content for r in result.responses),
        )

    async def _single(self, question: str, budget: Budget | None) -> Answer:
        assert self.config.model is not None
        run_id = uuid.uuid4().hex  # as Fusion names its runs
        tool_names = list(self.tools.names) if self.tools else []
        system = self.prompts.render(
            "panel_system", question=question, member_index=0, panel_size=1, tools=tool_names
        )
        request = CompletionRequest(
            model="",
            messages=(Message("system", system), Message("user", question)),
            temperature=self.temperature,
        )
        started = time.monotonic()
        answer = await answer_with_tools(
            self.caller,
            [self.config.model],
            request,
            self.tools,
            self.max_tool_calls,
            budget=budget,
        )
        latency = round((time.monotonic() - started) * 1000)
        error = answer.error
        if error is None and not answer.content.strip():
            return Answer("", "error", run_id, answer.usage, latency, ("empty_completion",))
        if error is not None:
            failure = f"{self.config.model}: {error.reason} ({error.message})"
            cut = error.reason == BudgetExceeded.reason
            return Answer("", "error", run_id, answer.usage, latency, (failure,), cut)
        return Answer(answer.content.strip(), "ok", run_id, answer.usage, latency)
