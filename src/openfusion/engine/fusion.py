"""The library's entry point: ``Fusion`` runs fusions of one preset (the stages themselves are
``engine/run.py``).

``Fusion.stream`` yields progress events and the answer token by token; ``Fusion.run`` returns
the final ``FusionResult``. ``Fusion.call`` / ``Fusion.call_stream`` run the caller tier: a
model of your choice decides whether to fuse (``engine/caller_tier.py``). Failures of single
calls are data (``MemberFailure``, a ``failure_reason``); only configuration errors raise, and
they raise before any call is made. A bug that crashes a run ends it with ``unexpected_error``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from contextlib import aclosing, suppress
from types import TracebackType
from typing import Any, TypedDict, Unpack

from pydantic import ValidationError

from openfusion.engine.budget import Budget
from openfusion.engine.options import RunOptions
from openfusion.engine.policy import Caller
from openfusion.engine.result import Done, FusionEvent, FusionResult, MemberEvent, StageEvent
from openfusion.engine.run import FusionRun, RunContext, Tracer, total
from openfusion.engine.trace import (
    DEFAULT,
    RunEnd,
    RunRecorder,
    RunStart,
    RunTrace,
    RunTraceHandle,
    UseDefault,
)
from openfusion.errors import ConfigError
from openfusion.presets import MAX_TOOL_CALLS, Preset, ToolUse, load_preset
from openfusion.prompts import PromptSet
from openfusion.providers import ProviderRegistry
from openfusion.settings import Settings, describe_validation_error
from openfusion.tools import ToolRegistry, ToolSettings, corpus_path, default_tools
from openfusion.types import Message, ToolSpec, Usage

log = logging.getLogger("openfusion.engine")


class Fusion:
    """Runs fusions for one preset. Use as ``async with`` to keep providers (and the local
    model) loaded across runs; used bare, each run closes what it opened.

    ``caller`` carries retries, fallbacks, the circuit breaker and prices; pass one to share
    breaker state between fusions (the server does). ``recorder`` records each run: by default
    to the store the settings name (``[store] record``, on unless turned off); ``None`` records
    nothing.
    """

    def __init__(
        self,
        preset: Preset,
        *,
        settings: Settings | None = None,
        registry: ProviderRegistry | None = None,
        prompts: PromptSet | None = None,
        caller: Caller | None = None,
        tools: ToolRegistry | None = None,
        depth: int = 0,
        shuffle_seed: int | None = None,
        recorder: RunRecorder | UseDefault | None = DEFAULT,
    ) -> None:
        self.preset = preset
        self.settings = settings or Settings.load()
        self._owns_registry = registry is None and caller is None
        self.registry = caller.registry if caller else registry or ProviderRegistry(self.settings)
        self.caller = caller or Caller.from_settings(self.registry, self.settings)
        self.prompts = prompts or PromptSet(self.settings.prompt_dirs, preset.prompts)
        self.depth = depth
        self._rng = random.Random(shuffle_seed)
        self._entered = False
        self._available = tools
        self._recorder_choice = recorder
        self._default_recorder: RunRecorder | None = None
        self._close_lock = asyncio.Lock()

    @property
    def tools(self) -> ToolRegistry | None:
        """The tools panel members may call: of the available ones (the registry given, else
        the configured built-ins), those the preset allows — ``web_search`` on the corpus only
        once ``openfusion index`` has built it. ``None`` when there are none."""
        use = self.preset.tools
        if not use.enabled or (use.max_tool_calls == 0 and not use.retrieve):
            return None
        if self._available is None:
            self._available = configured_tools(self.settings)
        return select_tools(self._available, use, self.settings)

    @classmethod
    def from_preset(
        cls, name: str | None = None, *, settings: Settings | None = None, **kwargs: Any
    ) -> Fusion:
        """``name`` is a preset name or ``self:<model>``; ``None`` picks the default preset."""
        settings = settings or Settings.load()
        return cls(load_preset(name or settings.preset_name, settings), settings=settings, **kwargs)

    async def __aenter__(self) -> Fusion:
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered = False
        await self.aclose()

    async def aclose(self) -> None:
        async with self._close_lock:  # a second close waits for the first
            if self._owns_registry:
                await self.registry.aclose()
            if self._default_recorder is not None:
                recorder, self._default_recorder = self._default_recorder, None
                await recorder.aclose()

    @property
    def recorder(self) -> RunRecorder | None:
        """Where runs are recorded (``None``: nowhere)."""
        if self._recorder_choice is not DEFAULT:
            return self._recorder_choice
        if self._default_recorder is None and self.settings.store.record:
            from openfusion.store.recorder import StoreRecorder  # the store holds the SQL

            self._default_recorder = StoreRecorder.for_settings(self.settings, source="library")
        return self._default_recorder

    def check(self) -> None:
        """Resolve every model id of the preset now: raises ``ConfigError`` (unknown provider,
        missing API key, malformed id) before anything is spent."""
        for slot in self.preset.panel:
            for model_id in slot.models:
                self.registry.resolve(model_id)
        for model_id in self.preset.judges:
            self.registry.resolve(model_id)
        _ = self.tools  # a bad [tools] setting (a search backend without its key) fails now

    async def run(
        self, prompt: str | Sequence[Message], *, synthesise: bool = True, **args: Unpack[RunArgs]
    ) -> FusionResult:
        """Run a whole fusion and return its result (see ``stream`` for the arguments)."""
        return await _result(self.stream(prompt, synthesise=synthesise, **args))

    def stream(
        self, prompt: str | Sequence[Message], *, synthesise: bool = True, **args: Unpack[RunArgs]
    ) -> AsyncGenerator[FusionEvent, None]:
        """Yield progress events, the answer as ``AnswerDelta``s, and last a ``Done``.

        ``synthesise=False`` stops after the analysis (for a caller model that writes the
        answer itself). ``args`` (``RunArgs``): ``temperature`` overrides the panel's;
        ``max_cost`` (USD) is a budget: a call that could overrun it is not started; ``tools``
        names the tools members may use (``[]``: none) and ``max_tool_calls`` caps their calls
        (at most 16); ``run_id`` names the run (default: a new random id); ``budget`` is a
        limit shared with other runs (an eval's ``--max-cost``), used instead of ``max_cost``;
        ``options`` carries the rest of a request's fields (``RunOptions`` says where each
        goes); ``trace``
        receives everything the run does (see ``engine/trace.py``): without one, the run is
        recorded by ``recorder``. Closing the iterator early cancels every call still running.
        """
        messages = _as_messages(prompt)

        def work(context: RunContext) -> Coroutine[Any, Any, None]:
            return FusionRun(context, messages).execute(synthesise)

        recorded = RunStart("", "fusion", messages, f"openfusion/{self.preset.name}")
        return self._events(work, args, recorded, {"synthesise": synthesise})

    async def call(
        self, model: str | Sequence[str], prompt: str | Sequence[Message], **args: Unpack[CallArgs]
    ) -> FusionResult:
        """The caller tier, whole (see ``call_stream`` for the arguments)."""
        return await _result(self.call_stream(model, prompt, **args))

    def call_stream(
        self, model: str | Sequence[str], prompt: str | Sequence[Message], **args: Unpack[CallArgs]
    ) -> AsyncGenerator[FusionEvent, None]:
        """The caller tier: ``model`` (or the first of several that answers: fallbacks) is
        offered a ``fusion`` tool beside your ``functions``, decides whether the prompt deserves
        this preset's panel, gets the analysis and the panel's answers as the tool's result,
        and writes the answer.

        ``tool_choice``: ``"auto"`` (default), ``"required"`` (some tool), ``"fusion"`` (the
        fusion, invoked for it if the model cannot call tools), ``"none"``, or the name of one
        of ``functions``. A call to one of ``functions`` ends the run: the result carries it
        in ``tool_calls`` for you to run. The fusion runs at most ``max_fusions`` times (default
        1); an invocation past that is refused and the run ends with
        ``fusion_invocation_capped``. Every call, the caller's included, counts against
        ``max_cost``. ``options`` shape the caller's calls (and sampling the panel's too); the
        panel's ``reasoning`` is the preset's. The other arguments are ``stream``'s.
        """
        from openfusion.engine.caller_tier import CallerTier

        models = (model,) if isinstance(model, str) else tuple(model)
        for model_id in models:
            self.registry.resolve(model_id)  # a bad caller id is a ConfigError, before any call

        messages = _as_messages(prompt)

        def work(context: RunContext) -> Coroutine[Any, Any, None]:
            tier = CallerTier(
                context,
                models,
                messages,
                functions=tuple(args.get("functions", ())),
                tool_choice=args.get("tool_choice"),
                max_fusions=args.get("max_fusions", 1),
            )
            return tier.execute()

        recorded = RunStart("", "caller", messages, models[0])
        extra = {"tool_choice": args.get("tool_choice"), "max_fusions": args.get("max_fusions")}
        return self._events(work, args, recorded, extra)

    def tool_use(
        self, tools: Sequence[str] | None, max_tool_calls: int | None
    ) -> tuple[ToolRegistry | None, int]:
        """The tools a run's members may call (``tools`` names a subset) and how often."""
        registry = self.tools if tools is None else _subset(self.tools, tools)
        calls = self.preset.tools.max_tool_calls if max_tool_calls is None else max_tool_calls
        return registry, min(calls, MAX_TOOL_CALLS)

    async def _events(
        self,
        work: Callable[[RunContext], Coroutine[Any, Any, None]],
        args: RunArgs,
        recorded: RunStart,
        extra: dict[str, Any],
    ) -> AsyncGenerator[FusionEvent, None]:
        """Run ``work`` as a task and yield what it emits; closing the iterator cancels it.
        A crash of the work (a bug) ends the run with ``unexpected_error``. Without a
        ``trace``, the run is recorded by ``recorder`` as ``recorded`` says (``extra``: more of
        its options)."""
        try:
            self.check()
            run_id = args.get("run_id") or uuid.uuid4().hex
            queue: asyncio.Queue[FusionEvent | None] = asyncio.Queue()
            max_cost = args.get("max_cost")
            budget = args.get("budget")
            if budget is None and max_cost is not None:
                budget = Budget(max_cost)
            trace = args.get("trace")
            own: RunTraceHandle | None = None
            if trace is None and self.recorder is not None:
                options = {k: args.get(k) for k in ("temperature", "max_cost", "tools")}
                options |= {"max_tool_calls": args.get("max_tool_calls"), **extra}
                start = dataclasses.replace(recorded, id=run_id, options=options)
                trace = own = self.recorder.start_run(start)
            context = RunContext(
                self,
                _with_temperature(args.get("options"), args.get("temperature")),
                budget,
                queue.put_nowait,
                run_id,
                self.tool_use(args.get("tools"), args.get("max_tool_calls")),
                Tracer(trace, run_id),
            )
            started = time.monotonic()
            task = asyncio.create_task(work(context))
            task.add_done_callback(lambda _: queue.put_nowait(None))
            spent: list[Usage] = []
            end = RunEnd("cancelled")
            try:
                while (event := await queue.get()) is not None:
                    if isinstance(event, Done):
                        end = RunEnd.of(event.result)
                    spent.extend(_spent(event))
                    yield event
                error = None if task.cancelled() else task.exception()
                if isinstance(error, ConfigError):
                    end = RunEnd("error", failure_message=f"{type(error).__name__}: {error}")
                    raise error  # a template or setting found wrong mid-run: still the config's
                if error is not None and end.result is None:
                    log.error("fusion run %s crashed", run_id, exc_info=error)
                    crashed = Done(self._crashed(run_id, error, spent, started, budget))
                    context.trace(crashed)
                    end = RunEnd.of(crashed.result)
                    yield crashed
            finally:
                if not task.done():
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
                if own is not None:
                    own.finish(end)
        finally:
            if not self._entered:
                await self.aclose()

    def _crashed(
        self,
        run_id: str,
        error: BaseException | None,
        spent: list[Usage],
        started: float,
        budget: Budget | None,
    ) -> FusionResult:
        return FusionResult(
            status="error",
            content="",
            analysis=None,
            responses=(),
            failed_models=(),
            failure_reason="unexpected_error",
            failure_message=f"the run crashed: {type(error).__name__}: {error}",
            usage=total(spent),
            cost_details={},
            judge=self.preset.judge,
            latency_ms=round((time.monotonic() - started) * 1000),
            run_id=run_id,
            budget=budget.to_dict() if budget else None,
        )


class RunArgs(TypedDict, total=False):
    """What a run takes besides its prompt (``Fusion.stream`` says what each is)."""

    temperature: float | None
    max_cost: float | None
    tools: Sequence[str] | None
    max_tool_calls: int | None
    run_id: str | None
    options: RunOptions | None
    trace: RunTrace | None
    budget: Budget | None
    """A limit shared with other runs (an eval's ``--max-cost``), used instead of
    ``max_cost``."""


class CallArgs(RunArgs, total=False):
    """What the caller tier takes besides ``RunArgs`` (``Fusion.call_stream`` says)."""

    functions: Sequence[ToolSpec]
    tool_choice: str | None
    max_fusions: int


def tool_settings(settings: Settings) -> ToolSettings:
    try:
        return ToolSettings.model_validate(dict(settings.tools))
    except ValidationError as exc:
        raise ConfigError(f"[tools] in config.toml: {describe_validation_error(exc)}") from exc


def configured_tools(settings: Settings) -> ToolRegistry:
    """The built-in tools as ``[tools]`` in config.toml sets them up (build once, share)."""
    return default_tools(settings, tool_settings(settings))


def select_tools(available: ToolRegistry, use: ToolUse, settings: Settings) -> ToolRegistry | None:
    """The tools of ``available`` that ``use`` allows: ``web_search`` on the corpus only once
    ``openfusion index`` has built it. ``None`` when there are none."""
    if not use.enabled or (use.max_tool_calls == 0 and not use.retrieve):
        return None
    names = [n for n in available.names if use.allow is None or n in use.allow]
    if "web_search" in names and not _corpus_ready(settings):
        names.remove("web_search")  # nothing to search yet: `openfusion index PATH`
    return _subset(available, names)


def _corpus_ready(settings: Settings) -> bool:
    config = tool_settings(settings)
    return config.search_backend != "corpus" or corpus_path(settings, config).exists()


def _subset(registry: ToolRegistry | None, names: Sequence[str]) -> ToolRegistry | None:
    """The registry's tools named in ``names`` (unknown names are ignored); None if none."""
    if registry is None:
        return None
    subset = ToolRegistry(output_max_chars=registry.output_max_chars)
    for tool in registry:
        if tool.name in names:
            subset.register(tool)
    return subset if len(subset) else None


async def _result(events: AsyncGenerator[FusionEvent, None]) -> FusionResult:
    async with aclosing(events):  # its cleanup (and the run's record) before we return
        async for event in events:
            if isinstance(event, Done):
                return event.result
    raise RuntimeError("fusion ended without a result")  # pragma: no cover - a bug if reached


def _with_temperature(options: RunOptions | None, temperature: float | None) -> RunOptions:
    options = options or RunOptions()
    if temperature is None:
        return options
    return dataclasses.replace(options, temperature=temperature)


def _spent(event: FusionEvent) -> list[Usage]:
    """What a finished call reported by ``event`` spent (tools count in their member)."""
    if isinstance(event, MemberEvent | StageEvent) and event.state in ("done", "failed"):
        return [event.usage] if event.usage is not None else []
    return []


def _as_messages(prompt: str | Sequence[Message]) -> tuple[Message, ...]:
    messages = (Message("user", prompt),) if isinstance(prompt, str) else tuple(prompt)
    if not any(m.role == "user" and m.content.strip() for m in messages):
        raise ConfigError("a fusion needs a non-empty user message")
    return messages
