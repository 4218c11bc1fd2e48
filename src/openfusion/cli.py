"""``openfusion`` on the command line: a thin layer over the library.

Progress goes to stderr (a live table on a terminal, one line per event otherwise); the answer,
or with ``--json`` the whole result, goes to stdout, so ``openfusion ask ... > answer.txt`` works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging.config
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from openfusion.cli_store import db, keys, runs, with_store
from openfusion.engine import (
    AnswerDelta,
    Done,
    Fusion,
    FusionEvent,
    FusionResult,
    MemberEvent,
    StageEvent,
    ToolEvent,
)
from openfusion.engine.run import JUDGE_INDEX
from openfusion.errors import ConfigError, OpenFusionError
from openfusion.logs import LOG_FORMATS, LogFormat, log_config
from openfusion.presets import Preset, list_presets, load_preset
from openfusion.settings import ENV_LOG_FORMAT, Settings
from openfusion.store.recorder import StoreRecorder
from openfusion.types import Usage

if TYPE_CHECKING:
    from openfusion.evals import EvalRunner, Outcome, Record

STYLE = {"waiting": "dim", "running": "yellow", "done": "green", "failed": "red"}


def _short(arguments: str, limit: int = 40) -> str:
    """A tool call's arguments for one table cell: the values, cut to ``limit`` characters."""
    try:
        data = json.loads(arguments)
        text = ", ".join(repr(v) for v in data.values()) if isinstance(data, dict) else arguments
    except ValueError:
        text = arguments
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cost(cost: float | None) -> str:
    return "?" if cost is None else f"${cost:.4f}"


@dataclass
class _Row:
    name: str
    state: str = "waiting"
    started: float | None = None
    elapsed: float | None = None
    usage: Usage | None = None
    reason: str | None = None
    tools: list[str] = field(default_factory=list)

    def seconds(self) -> str:
        if self.elapsed is not None:
            return f"{self.elapsed:.1f}s"
        if self.started is not None:
            return f"{time.monotonic() - self.started:.1f}s"
        return ""


@dataclass
class LiveView:
    """The state of a run as the terminal shows it; rebuilt on each refresh."""

    rows: dict[str, _Row] = field(default_factory=dict)
    turns: int = 0
    """Calls of the caller model so far (the caller tier), one row each."""

    def update(self, event: FusionEvent) -> _Row | None:
        if isinstance(event, ToolEvent):
            key = "analysis" if event.index == JUDGE_INDEX else f"panel{event.index}"
            row = self.rows.setdefault(key, _Row(event.name))
            row.tools.append(
                f"{event.tool}({_short(event.arguments)})" + ("" if event.ok else " ✗")
            )
            return None
        if isinstance(event, MemberEvent):
            key, label = f"panel{event.index}", event.name
        elif isinstance(event, StageEvent) and event.stage == "caller":
            self.turns += event.state == "running"
            key, label = f"caller{self.turns}", f"caller · {event.model or 'turn'}"
        elif isinstance(event, StageEvent) and event.stage == "synthesis":
            key, label = event.stage, "judge · answer (below)"
        elif isinstance(event, StageEvent):
            key, label = event.stage, f"judge · {event.stage}"
        else:
            return None
        row = self.rows.setdefault(key, _Row(label))
        row.state = event.state
        if event.state == "running":
            row.started = time.monotonic()
        elif event.state in ("done", "failed"):
            row.elapsed, row.usage, row.reason = event.elapsed, event.usage, event.reason
        return row

    def __rich__(self) -> RenderableType:
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        for column in ("", "state", "tokens", "cost", "time"):
            table.add_column(column, justify="left" if column in ("", "state") else "right")
        total = Usage()
        for row in self.rows.values():
            state = row.state if row.reason is None else f"{row.state}: {row.reason}"
            if row.tools:
                state += f" · {'; '.join(row.tools)}"
            table.add_row(
                escape(row.name),
                f"[{STYLE[row.state]}]{escape(state)}[/]",
                str(row.usage.completion_tokens) if row.usage else "",
                _cost(row.usage.cost) if row.usage else "",
                row.seconds(),
            )
            total += row.usage or Usage()
        table.add_row("[bold]so far[/]", "", str(total.completion_tokens), _cost(total.cost), "")
        return Group(table)


@click.group()
@click.version_option(package_name="openfusion")
def main() -> None:
    """openfusion: ask a panel of models, let a judge fuse their answers."""


@main.command()
@click.argument("question")
@click.option("--preset", "-p", help="Preset name or self:<model> (default: local without keys).")
@click.option("--panel", help="Comma-separated panel model ids; overrides the preset's panel.")
@click.option("--judge", help="Judge model id; overrides the preset's judge.")
@click.option("--temperature", type=click.FloatRange(0, 2), help="Panel sampling temperature.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result object as JSON.")
@click.option("--show-analysis", is_flag=True, help="Print the judge's analysis after the answer.")
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0, min_open=True),
    help="USD budget: calls that could overrun it are not started.",
)
@click.option(
    "--record/--no-record",
    default=None,
    help="Record the run in the store (default: [store] record, on unless OPENFUSION_RECORD=0).",
)
@click.option(
    "--caller",
    metavar="MODEL[,FALLBACK...]",
    help="Let MODEL decide whether to fuse (the caller tier): it gets the panel as a tool.",
)
@click.option(
    "--force-fusion", is_flag=True, help="With --caller: the caller must invoke the fusion."
)
def ask(
    question: str,
    preset: str | None,
    panel: str | None,
    judge: str | None,
    temperature: float | None,
    as_json: bool,
    show_analysis: bool,
    max_cost: float | None,
    record: bool | None,
    caller: str | None,
    force_fusion: bool,
) -> None:
    """Answer QUESTION with a fusion ('-' reads it from stdin)."""
    if question == "-":
        question = sys.stdin.read()
    if not question.strip():
        raise click.UsageError("the question is empty")
    callers = [m.strip() for m in (caller or "").split(",") if m.strip()]
    if caller is not None and not callers:
        raise click.UsageError("--caller needs a model id, e.g. --caller openai/gpt-5.5")
    if force_fusion and not callers:
        raise click.UsageError("--force-fusion goes with --caller MODEL")
    try:
        settings = Settings.load()
        if record is not None:
            settings = dataclasses.replace(
                settings, store=settings.store.model_copy(update={"record": record})
            )
        chosen = _preset(settings, preset, panel, judge)
        choice = "fusion" if force_fusion else None
        result = asyncio.run(
            _ask(chosen, settings, question, temperature, max_cost, (callers, choice), not as_json)
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    except OpenFusionError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    err = Console(stderr=True, highlight=False)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    elif show_analysis:
        err.print("\n[bold]analysis[/]")
        err.print_json(data=result.analysis) if result.analysis else err.print("(none)")
    _summary(err, result, recorded=settings.store.record)
    if result.status == "error":
        sys.exit(1)


def _preset(settings: Settings, name: str | None, panel: str | None, judge: str | None) -> Preset:
    base = load_preset(name or settings.preset_name, settings) if name or not panel else None
    if panel:
        models = [m.strip() for m in panel.split(",") if m.strip()]
        return Preset.from_models(models, judge or (base.judge if base else None))
    assert base is not None
    return dataclasses.replace(base, judge=judge or base.judge)


async def _ask(
    preset: Preset,
    settings: Settings,
    question: str,
    temperature: float | None,
    max_cost: float | None,
    caller: tuple[list[str], str | None],
    stream: bool,
) -> FusionResult:
    """The run, shown as it goes; ``caller``: the caller tier's models and tool choice."""
    callers, choice = caller
    err = Console(stderr=True, highlight=False)
    view = LiveView()
    heading = f"[bold]{escape(preset.name)}[/] · {len(preset.panel)} panel · judge {preset.judge}"
    if callers:
        heading += f" · caller {escape(callers[0])}"
    err.print(heading)
    result: FusionResult | None = None
    recorder = StoreRecorder.for_settings(settings, source="cli") if settings.store.record else None
    try:
        async with Fusion(preset, settings=settings, recorder=recorder) as fusion:
            if callers:
                events = fusion.call_stream(
                    callers,
                    question,
                    tool_choice=choice,
                    temperature=temperature,
                    max_cost=max_cost,
                )
            else:
                events = fusion.stream(question, temperature=temperature, max_cost=max_cost)
            with (
                Live(view, console=err, refresh_per_second=8, transient=False)
                if err.is_terminal
                else _Quiet() as live
            ):
                answering = False
                async for event in events:
                    row = view.update(event)
                    answering = answering or isinstance(event, AnswerDelta)
                    if not err.is_terminal and not answering:  # no line inside the answer
                        _log(err, event, row)
                    if answering or (
                        isinstance(event, StageEvent)
                        and event.stage == "synthesis"
                        and event.state == "running"
                    ):  # the answer streams to stdout below the table
                        live.stop()
                    if isinstance(event, AnswerDelta) and stream:
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
                    if isinstance(event, Done):
                        result = event.result
        if stream and result is not None and result.content:
            sys.stdout.write("\n")
    finally:
        if recorder is not None:
            await recorder.aclose()  # writes what is pending; a failure is logged, not raised
    assert result is not None
    return result


def _log(err: Console, event: FusionEvent, row: _Row | None) -> None:
    """Progress as plain lines, for a stderr that is not a terminal: calls and finished steps."""
    if isinstance(event, ToolEvent):
        mark = "" if event.ok else " (failed)"
        err.print(f"{event.name}: {event.tool}({_short(event.arguments)}){mark}")
    elif isinstance(event, StageEvent) and event.stage == "synthesis":
        return  # its line would land inside the answer streaming to stdout
    elif row is not None and row.state in ("done", "failed"):
        reason = f" ({row.reason})" if row.reason else ""
        err.print(f"{row.name}: {row.state}{reason} {row.seconds()}")


class _Quiet:
    """Stands in for ``rich.live.Live`` when stderr is not a terminal."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def stop(self) -> None:
        return None


def _summary(err: Console, result: FusionResult, *, recorded: bool) -> None:
    answered = len(result.responses)
    total = answered + len(result.failed_models)
    parts = [
        f"{answered}/{total} panel answered" if result.fused else "the caller did not fuse",
        "analysis ok" if result.analysis else "no analysis",
        f"{result.latency_ms / 1000:.1f}s",
        f"{result.usage.total_tokens} tokens",
        _cost(result.usage.cost),
    ]
    if recorded:
        parts.append(f"run {result.run_id}")
    err.print(f"[dim]{' · '.join(parts)}[/]")
    if result.sources:
        retrieved = ", ".join(str(s["url"]) for s in result.sources)
        err.print(f"[dim]retrieved by the panel:[/] {escape(retrieved)}")
    for bad in result.unverified_citations:
        where, citation = bad["where"], bad["citation"]
        err.print(
            f"[yellow]unverified[/] {escape(citation)} in {escape(where)}: no tool retrieved it"
        )
    if result.failure_reason:
        err.print(f"[red]{result.failure_reason}[/]: {escape(result.failure_message or '')}")
    for failure in result.failed_models:
        err.print(
            f"[red]failed[/] {escape(failure.name)}: {failure.reason} {escape(failure.message)}"
        )


@main.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List presets and the providers they use (`models sync` refreshes prices)."""
    if ctx.invoked_subcommand is None:
        _list_models()


@models.command("sync")
def models_sync() -> None:
    """Fetch OpenRouter's model catalog and prices (needs OPENROUTER_API_KEY)."""
    from openfusion.cost import save_sync
    from openfusion.providers import ProviderRegistry
    from openfusion.providers.openai_compat import OpenAICompatProvider

    async def fetch(settings: Settings) -> Any:
        registry = ProviderRegistry(settings)
        try:
            provider = registry.provider("openrouter")
            if not isinstance(provider, OpenAICompatProvider):
                raise ConfigError("provider 'openrouter' must be of type openai_compat to sync")
            return await provider.list_models()
        finally:
            await registry.aclose()

    try:
        settings = Settings.load()
        count = save_sync(settings.cache_dir, asyncio.run(fetch(settings)))
    except OpenFusionError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"saved prices of {count} OpenRouter models to {settings.cache_dir}")


@main.command()
@click.option("--online", is_flag=True, help="Also ask each provider's /models (needs keys).")
def doctor(online: bool) -> None:
    """Check every preset's models: provider, key, price, and (--online) that they exist."""
    from openfusion.doctor import check

    try:
        findings = asyncio.run(check(Settings.load(), online=online))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    out = Console(highlight=False)
    table = Table(title="doctor", title_justify="left")
    for column in ("preset", "model", "", "finding"):
        table.add_column(column, overflow="fold")
    style = {"ok": "green", "warn": "yellow", "error": "red"}
    for f in findings:
        level = f"[{style[f.level]}]{f.level}[/]"
        table.add_row(f.preset, f.model, level, escape(f.message))
    out.print(table)
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warn" for f in findings)
    out.print(f"{errors} error(s), {warnings} warning(s)")
    if errors:
        sys.exit(1)


def _list_models() -> None:
    out = Console(highlight=False)
    try:
        settings = Settings.load()
        presets = list_presets(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    table = Table(title="presets", title_justify="left")
    for column in ("preset", "panel", "judge", "description"):
        table.add_column(column)
    default = settings.preset_name
    for preset in presets:
        name = f"{preset.name} (default)" if preset.name == default else preset.name
        panel = "\n".join(slot.model for slot in preset.panel)
        table.add_row(name, panel, preset.judge, preset.description)
    table.add_row("self:<model>", "3 samples of <model>", "<model>", "N copies of one model, fused")
    out.print(table)
    providers = Table(title="providers", title_justify="left")
    for column in ("provider", "type", "base url", "key"):
        providers.add_column(column)
    for name, config in sorted(settings.providers.items()):
        if config.api_key_env:
            is_set = "set" if settings.api_key(config.api_key_env) else "not set"
            key = f"{config.api_key_env} {is_set}"
        else:
            key = "not needed"
        providers.add_row(name, config.type, config.base_url or "in-process", key)
    out.print(providers)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def index(paths: tuple[Path, ...]) -> None:
    """Index local documents (.md .txt .html .pdf) for the offline `web_search` (corpus)."""
    from pydantic import ValidationError

    from openfusion.settings import describe_validation_error
    from openfusion.tools import ToolSettings, build_index, corpus_path

    err = Console(stderr=True, highlight=False)
    try:
        settings = Settings.load()
        tool_settings = ToolSettings.model_validate(dict(settings.tools))
        target = corpus_path(settings, tool_settings)
        stats = build_index(list(paths), target, progress=lambda p: err.print(f"[dim]{p}[/]"))
    except ValidationError as exc:
        raise click.ClickException(f"[tools]: {describe_validation_error(exc)}") from exc
    except OpenFusionError as exc:
        raise click.ClickException(str(exc)) from exc
    for path, why in stats.skipped:
        err.print(f"[yellow]skipped[/] {path}: {why}")
    click.echo(
        f"indexed {stats.indexed} file(s) ({stats.chunks} chunks), {stats.unchanged} unchanged, "
        f"{stats.removed} removed → {target}"
    )


@main.command("eval")
@click.option(
    "--dataset",
    "-d",
    "datasets",
    multiple=True,
    help="A .jsonl file, draco:PATH, triviaqa, freshqa, reasoning-gym:NAME, writingbench "
    "(repeat for several).",
)
@click.option("--configs", "-c", help="Comma-separated presets, self:<model>, preset files, ids.")
@click.option("--limit", type=click.IntRange(min=1), help="Items per dataset (the first N).")
@click.option(
    "--offset",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Skip this many items first (measure on items you did not tune on).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0, 2),
    help="Sent with every question, as a client would (fused panels keep their spread).",
)
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0, min_open=True),
    help="USD for the whole run (results already in --output count): stops before more.",
)
@click.option("--grader", help="Model id of the rubric grader (fixed for the comparison).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Output dir (resumable).")
@click.option("--no-tools", is_flag=True, help="No config gets tools (search, fetch, code).")
@click.option("--list-datasets", is_flag=True, help="List the dataset loaders and exit.")
def eval_command(
    datasets: tuple[str, ...],
    configs: str | None,
    limit: int | None,
    offset: int,
    temperature: float | None,
    concurrency: int,
    max_cost: float | None,
    grader: str | None,
    output: Path | None,
    no_tools: bool,
    list_datasets: bool,
) -> None:
    """Run datasets on fused and single configs; report score, cost and latency side by side.

    Writes results.jsonl/.csv, summary.md/.csv, PNG plots and report.html to --output. Rerun
    the same command to continue an interrupted run.
    """
    try:
        from openfusion import evals
    except ImportError as exc:
        raise click.ClickException(
            f"openfusion eval needs the [eval] extra ({exc.name} is missing): "
            "pip install 'openfusion[eval]'"
        ) from exc
    if list_datasets:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("dataset", "what"):
            table.add_column(column)
        for loader in evals.LOADERS.values():
            table.add_row(loader.usage, loader.description)
        table.add_row("FILE.jsonl", "your items: {id, prompt, answer|aliases|choices|rubric}")
        Console(highlight=False).print(table)
        return
    if not datasets or not configs:
        raise click.UsageError("give --dataset and --configs (or --list-datasets)")
    try:
        settings = Settings.load()
        loaded = [evals.load_dataset(spec, limit, offset) for spec in datasets]
        plan = evals.EvalPlan(
            datasets=loaded,
            configs=evals.parse_configs(configs, settings),
            output=output or Path("eval-" + "-".join(_slug(d.name) for d in loaded)),
            grader_model=grader,
            concurrency=concurrency,
            max_cost=max_cost,
            tools=not no_tools,
            temperature=temperature,
        )
        runner = evals.EvalRunner(plan, settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    err = Console(stderr=True, highlight=False)
    total = sum(len(d.items) for d in loaded) * len(plan.configs)
    err.print(
        f"[bold]eval[/] {', '.join(d.name for d in loaded)} · {total} answers · "
        f"configs {', '.join(c.name for c in plan.configs)} → {plan.output}"
    )
    outcome = None
    try:
        outcome = asyncio.run(_run_eval(runner, total, err))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished items are kept; rerun the command to go on")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    records = list(runner.store.load().values())
    if not records:
        raise click.ClickException("no results yet: nothing to report")
    meta: dict[str, object] = {
        "datasets": [d.name for d in loaded],
        "configs": [c.name for c in plan.configs],
        "grader_model": grader,
        "tools": plan.tools,
        "offset": offset,
        "temperature": temperature,
        "max_cost": max_cost,
        "spent": outcome.spent if outcome else None,
        "not_run": outcome.not_run if outcome else 0,
    }
    report = evals.write_report(plan.output, records, [c.name for c in plan.configs], meta)
    click.echo(report.markdown)
    if outcome and outcome.stopped_by_budget:
        err.print(
            f"[yellow]--max-cost reached[/]: {outcome.not_run} answer(s) not run; "
            "rerun with a higher --max-cost to finish"
        )
    err.print(f"[dim]report: {plan.output / 'report.html'}[/]")
    if outcome is None:
        sys.exit(130)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


async def _run_eval(runner: EvalRunner, total: int, err: Console) -> Outcome:
    """Run with a progress bar: answers done, running mean score per config, spend."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    scores: dict[str, list[float]] = {}
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        console=err,
        transient=False,
    )
    done_before = sum(r.score is not None for r in runner.store.load().values())
    task = progress.add_task("answers", total=total, completed=done_before, status="")

    def on_record(record: Record, spent: float) -> None:
        if record.score is not None:
            scores.setdefault(record.config, []).append(record.score)
        means = " · ".join(f"{c} {sum(v) / len(v):.1f}" for c, v in scores.items())
        progress.update(task, advance=1, status=f"{means} · spent ${spent:.4f}")
        if not err.is_terminal:
            err.print(f"{record.config} {record.item_id}: {record.score} ({record.status})")

    with progress:
        return await runner.run(on_record)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Serve a non-loopback address without API keys (anyone who can reach it spends).",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="json: one JSON object per line, with the request's generation_id.",
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log a line per request (off: a busy gateway spends about 6% of its CPU on it).",
)
def serve(
    host: str,
    port: int,
    workers: int,
    insecure_no_auth: bool,
    log_format: LogFormat,
    access_log: bool,
) -> None:
    """Serve the OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, ...)."""
    import uvicorn

    from openfusion.server.auth import check_bind, insecure_warning, is_loopback
    from openfusion.server.protocol import uvicorn_options

    try:
        settings = Settings.load()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    has_keys = with_store(lambda store: store.keys.has_active_keys())
    refusal = check_bind(host, has_keys, insecure_no_auth)
    if refusal:
        raise click.ClickException(refusal)
    err = Console(stderr=True, highlight=False)
    log = logging.getLogger("openfusion.cli")
    json_logs = log_format == "json"
    if json_logs:
        logging.config.dictConfig(log_config("json"))
        # Workers configure their logging in the app factory, not from uvicorn's log_config:
        # unpickling our formatter would import openfusion before a worker answers uvicorn's
        # 5-second health check, and a slow import would get it killed.
        os.environ[ENV_LOG_FORMAT] = "json"
    auth = "API keys required" if has_keys else "no API keys"
    banner = (
        f"openfusion on http://{host}:{port}/v1 · {auth} · default preset {settings.preset_name}"
    )
    viewer = "log in with a key" if has_keys else "this machine only, no keys"
    viewer_line = f"trace viewer at http://{host}:{port}/ui ({viewer})"
    if insecure_no_auth and not has_keys and not is_loopback(host):
        if json_logs:
            log.warning(insecure_warning(host))
        else:
            err.print(f"[bold red]{escape(insecure_warning(host))}[/]")
    if json_logs:  # every line on stderr is then a JSON object
        log.info(banner)
        log.info(viewer_line)
    else:
        err.print(banner)
        err.print(viewer_line)
    options: dict[str, Any] = {"log_config": None} if json_logs else {}
    uvicorn.run(
        "openfusion.server.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        log_level="info",
        access_log=access_log,
        **options,
        **uvicorn_options(settings.server.max_header_bytes, settings.server.header_timeout_seconds),
    )


main.add_command(keys)
main.add_command(runs)
main.add_command(db)
