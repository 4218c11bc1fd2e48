"""``openfusion keys | runs | db``: the commands that manage what the store keeps.

Each command opens the configured store (``database_url``, else the SQLite file), brings its
schema to head, does its work and closes it; a database that cannot be used is a one-line error.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from openfusion.cluster import forget_budget
from openfusion.errors import ConfigError, StoreError
from openfusion.settings import Settings
from openfusion.store import BudgetStatus, RunFilter, Store, format_usd
from openfusion.store.recorder import LEASE
from openfusion.store.run_views import RUN_KINDS, RUN_STATUSES, parse_time
from openfusion.store.runs import Instance

T = TypeVar("T")


def with_store(work: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``work`` on the configured store."""

    async def run() -> T:
        async with Store.for_settings(settings) as store:
            return await work(store)

    try:
        settings = Settings.load()
        return asyncio.run(run())
    except (ConfigError, StoreError) as exc:
        raise click.ClickException(str(exc)) from exc


# -- keys -------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Manage the API keys that clients of `openfusion serve` send as Bearer tokens."""


def _parse_budget(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        usd = float(text)
    except ValueError:
        usd = -1.0
    if not (usd >= 0 and usd != float("inf")):
        raise click.BadParameter(
            f"{text!r}: give an amount of USD like 5 or 0.50, or `none` to remove the budget",
            param_hint="USD",
        )
    return usd


def _budget_line(status: BudgetStatus) -> str:
    if status.limit_nano is None:
        return f"no budget (spent {format_usd(status.spent_nano)})"
    remaining = status.remaining_nano or 0
    over = f" ({format_usd(status.overshoot_nano)} overshoot)" * bool(status.overshoot_nano)
    return (
        f"budget {format_usd(status.limit_nano)}: spent {format_usd(status.spent_nano)}{over}, "
        f"remaining {format_usd(max(remaining, 0))}"
    )


@keys.command("create")
@click.argument("name")
@click.option(
    "--budget",
    type=click.FloatRange(min=0),
    help="USD this key may spend in all (requests past it get 402); default: no limit.",
)
@click.option("--admin", is_flag=True, help="The key may read every key's runs (runs API).")
@click.option(
    "--rpm", type=click.IntRange(min=1), help="Requests per minute (429 past it); default: none."
)
@click.option(
    "--tpm",
    type=click.IntRange(min=1),
    help="Tokens per minute, all inner calls counted (429 past it); default: none.",
)
def keys_create(
    name: str, budget: float | None, admin: bool, rpm: int | None, tpm: int | None
) -> None:
    """Create a key called NAME and print it (only the key goes to stdout)."""

    async def create(store: Store) -> tuple[str, str, str | None]:
        record, key = await store.keys.create(name, admin=admin, rpm=rpm, tpm=tpm)
        if budget is None:
            return record.id, key, None
        try:
            await store.ledger.set_budget(record.id, budget)
            return record.id, key, _budget_line(await store.ledger.budget(record.id))
        except StoreError as exc:
            click.echo(key)
            raise click.ClickException(
                f"key {record.id} was created, but its budget was not set: {exc}. "
                f"Set it with `openfusion keys budget {record.id} {budget}`"
            ) from exc

    key_id, key, budget_line = with_store(create)
    click.echo(key)
    kind = "admin key" if admin else "key"
    click.echo(
        f"created {kind} {key_id} ({name.strip()}). Copy it now: it cannot be shown again (only "
        "its hash is kept). Clients send `Authorization: Bearer <key>`.",
        err=True,
    )
    if budget_line is not None:
        click.echo(f"key {key_id}: {budget_line}", err=True)
    if rpm is not None or tpm is not None:
        click.echo(f"key {key_id}: {_limits_line(rpm, tpm)}", err=True)


@keys.command("budget")
@click.argument("id_or_name")
@click.argument("usd")
def keys_budget(id_or_name: str, usd: str) -> None:
    """Set how many USD the key ID_OR_NAME may spend in all, or `none` for no limit.

    What it has spent already counts: a budget below that refuses its next request (402).
    """
    amount = _parse_budget(usd)

    async def limit(store: Store) -> str:
        record = await store.keys.find(id_or_name)
        if record is None:
            raise ConfigError(
                f"no API key with id or name {id_or_name!r}: `openfusion keys list` shows them"
            )
        await store.ledger.set_budget(record.id, amount)
        await forget_budget(Settings.load(), record.id)  # with Redis: from the next request
        return (
            f"key {record.id} ({record.name}): {_budget_line(await store.ledger.budget(record.id))}"
        )

    click.echo(with_store(limit))


def _parse_limit(text: str, name: str) -> int | None:
    if text.strip().lower() in ("none", "off"):
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise click.BadParameter(f"{text!r}: a whole number from 1, or `none`", param_hint=name)
    return int(text)


@keys.command("limits")
@click.argument("id_or_name")
@click.option("--rpm", default="none", show_default=True, help="Requests per minute, or none.")
@click.option("--tpm", default="none", show_default=True, help="Tokens per minute, or none.")
def keys_limits(id_or_name: str, rpm: str, tpm: str) -> None:
    """Set the key's rate limits (a sliding minute; 429 with Retry-After past them).

    Running servers apply them from the key's next request; with `redis_url` the replicas
    count together, else each server process counts its own requests.
    """
    requests, tokens = _parse_limit(rpm, "--rpm"), _parse_limit(tpm, "--tpm")
    record = with_store(lambda store: store.keys.set_limits(id_or_name, requests, tokens))
    click.echo(f"key {record.id} ({record.name}): {_limits_line(record.rpm, record.tpm)}")


def _limits_line(rpm: int | None, tpm: int | None) -> str:
    if rpm is None and tpm is None:
        return "no rate limits"
    return ", ".join(
        f"{value} {unit}/min" for value, unit in ((rpm, "requests"), (tpm, "tokens")) if value
    )


@keys.command("list")
def keys_list() -> None:
    """List the keys: id, name, created, revoked, admin, budget, spent, remaining; and, when
    a key has one, rate limits, overshoot (spent beyond what requests reserved: an upstream
    billed past max_tokens) and held (by requests in flight; reservations older than [server]
    reservation_ttl_seconds do not count). Never the key or its hash."""

    async def listing(store: Store) -> list[tuple[Any, BudgetStatus]]:
        return [(r, await store.ledger.budget(r.id)) for r in await store.keys.list()]

    rows = with_store(listing)
    if not rows:
        click.echo("no API keys yet: create one with `openfusion keys create NAME`", err=True)
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ["id", "name", "created", "revoked", "admin", "budget", "spent", "remaining"]
    limited = any(r.rpm or r.tpm for r, _ in rows)  # rate limit columns only when some key has one
    extra = {  # shown when some key has one, so the usual table stays narrow
        "overshoot": [s.overshoot_nano for _, s in rows],
        "held": [s.reserved_nano for _, s in rows],
    }
    shown = [name for name, values in extra.items() if any(values)]
    for column in columns + ["rpm", "tpm"] * limited + shown:
        table.add_column(column)
    for index, (record, status) in enumerate(rows):
        remaining = status.remaining_nano
        table.add_row(
            record.id,
            escape(record.name),
            record.created[:16].replace("T", " "),  # UTC, to the minute
            "yes" if record.revoked else "",
            "yes" if record.admin else "",
            "" if status.limit_nano is None else format_usd(status.limit_nano),
            format_usd(status.spent_nano),
            "" if remaining is None else format_usd(max(remaining, 0)),
            *(["" if v is None else str(v) for v in (record.rpm, record.tpm)] * limited),
            *(format_usd(extra[name][index]) if extra[name][index] else "" for name in shown),
        )
    Console(highlight=False).print(table)


@keys.command("revoke")
@click.argument("id_or_name")
def keys_revoke(id_or_name: str) -> None:
    """Revoke a key by its id or name; a running server refuses it from the next request on."""
    record = with_store(lambda store: store.keys.revoke(id_or_name))
    click.echo(f"revoked key {record.id} ({record.name})")


@keys.command("admin")
@click.argument("id_or_name")
@click.argument("state", type=click.Choice(["on", "off"]))
def keys_admin(id_or_name: str, state: str) -> None:
    """Let a key read every key's runs (on), or only its own (off)."""
    record = with_store(lambda store: store.keys.set_admin(id_or_name, state == "on"))
    click.echo(f"key {record.id} ({record.name}): admin {state}")


# -- runs -------------------------------------------------------------------------------------


@click.group()
def runs() -> None:
    """Look at recorded runs: list, show, export, prune."""


async def _swept(store: Store) -> None:
    """Mark the runs of processes that died as unfinished, before reading."""
    await store.runs.sweep(Instance.this_process(uuid.uuid4().hex, "cli"), lease=LEASE)


def _when(text: str | None, name: str) -> datetime | None:
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise click.BadParameter(
            f"{text!r}: an ISO 8601 time, e.g. 2026-12-01", param_hint=name
        ) from exc


@runs.command("list")
@click.option("--limit", "-n", default=20, show_default=True, type=click.IntRange(1, 200))
@click.option("--status", type=click.Choice(RUN_STATUSES))
@click.option("--kind", type=click.Choice(RUN_KINDS))
@click.option("--preset")
@click.option("--key", "key_id", help="Only the runs of this API key (its id).")
@click.option("--since", help="Runs started at or after this time (ISO 8601, UTC).")
@click.option("--search", "-s", help="Text the question contains.")
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON.")
def runs_list(
    limit: int,
    status: str | None,
    kind: str | None,
    preset: str | None,
    key_id: str | None,
    since: str | None,
    search: str | None,
    as_json: bool,
) -> None:
    """The most recent runs, newest first."""
    query = RunFilter(
        key_id=key_id,
        preset=preset,
        status=status,
        kind=kind,
        since=_when(since, "--since"),
        q=search,
        limit=limit,
    )

    async def page(store: Store) -> list[dict[str, Any]]:
        await _swept(store)
        return (await store.runs.page(query))[0]

    found = with_store(page)
    if as_json:
        click.echo(json.dumps(found, indent=2, ensure_ascii=False))
        return
    if not found:
        click.echo("no runs recorded (yet)", err=True)
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("id", "started", "status", "kind", "preset/model", "cost", "time", "question"):
        table.add_column(column, overflow="ellipsis", no_wrap=column != "question")
    for run in found:
        table.add_row(
            run["id"],
            (run["created_at"] or "")[:19].replace("T", " "),
            run["status"],
            run["kind"],
            escape(run["preset"] or run["model"] or ""),
            _usd(run["cost"]),
            _seconds(run["latency_ms"]),
            escape(run["question"].replace("\n", " ")[:80]),
        )
    Console(highlight=False).print(table)


@runs.command("show")
@click.argument("run_id")
def runs_show(run_id: str) -> None:
    """A run: question, answer, analysis, members, timeline, cost."""
    run = _get(run_id)
    out = Console(highlight=False)
    head = [run["status"], run["kind"], run["preset"] or run["model"] or "", run["source"]]
    head += [_usd(run["cost"]), _seconds(run["latency_ms"]), run["created_at"] or ""]
    out.print(f"[bold]run {escape(run['id'])}[/] · {escape(' · '.join(head))}")
    if run["failure_reason"] or run["failure_message"]:
        reason = run["failure_reason"] or "failed"
        out.print(f"[red]{escape(reason)}[/]: {escape(run['failure_message'] or '')}")
    out.print(f"\n[bold]question[/]\n{escape(run['question'])}")
    out.print(f"\n[bold]answer[/]\n{escape(run['answer'] or '(none)')}")
    if run["analysis"]:
        out.print("\n[bold]analysis[/]")
        out.print_json(data=run["analysis"])
    if run["members"]:
        members = Table(title="panel", title_justify="left", box=None, header_style="bold")
        for column in ("member", "status", "cost", "time", "answer"):
            members.add_column(column, overflow="fold")
        for member in run["members"]:
            failure = member["failure"] or {}
            text = member["content"] or failure.get("message") or ""
            members.add_row(
                escape(member["name"]),
                member["status"] + (f": {failure['reason']}" if failure else ""),
                _usd(member["cost"]),
                _seconds(member["latency_ms"]),
                escape(text[:200]),
            )
        out.print(members)
    timeline = Table(title="timeline", title_justify="left", box=None, header_style="bold")
    for column in ("start", "end", "what", "stage", "status", "cost"):
        timeline.add_column(column, justify="right" if column in ("start", "end") else "left")
    for span in run["timeline"]:
        end = span["end_ms"]
        timeline.add_row(
            f"{span['start_ms']} ms",
            "" if end is None else f"{end} ms",
            escape(f"{span['kind']} {span['name']}"),
            span["stage"] or "",
            span["status"],
            "" if span["kind"] in ("stage",) else _usd(span["cost"]),
        )
    out.print(timeline)
    costs = run["cost_breakdown"]
    by_stage = ", ".join(f"{k} {_usd(v)}" for k, v in costs["by_stage"].items())
    out.print(f"cost {_usd(costs['total'])}: {by_stage or 'nothing spent'}")


@runs.command("export")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, default=True, help="JSON (the only format).")
def runs_export(run_id: str, as_json: bool) -> None:
    """The whole run as JSON, as `GET /v1/fusion/runs/ID` gives it."""
    click.echo(json.dumps(_get(run_id), indent=2, ensure_ascii=False))


@runs.command("prune")
@click.option("--keep-days", type=click.FloatRange(min=0), help="Default: [store] keep_days.")
@click.option("--max-mb", type=click.FloatRange(min=0), help="Default: [store] max_mb.")
def runs_prune(keep_days: float | None, max_mb: float | None) -> None:
    """Delete old runs: older than keep-days, then the oldest while the database is larger than
    max-mb (0 turns either off). The spend ledger is kept whole."""
    settings = Settings.load()
    days = settings.store.keep_days if keep_days is None else keep_days
    mb = settings.store.max_mb if max_mb is None else max_mb
    pruned = with_store(lambda store: store.runs.prune(keep_days=days, max_mb=mb))
    size = "" if pruned.size_mb is None else f"; {pruned.size_mb:.1f} MB in use"
    click.echo(
        f"pruned {pruned.by_age} run(s) older than {days:g} days and {pruned.by_size} over "
        f"{mb:g} MB{size}"
    )


def _get(run_id: str) -> dict[str, Any]:
    async def get(store: Store) -> dict[str, Any] | None:
        await _swept(store)
        return await store.runs.get(run_id)

    found = with_store(get)
    if found is None:
        raise click.ClickException(f"no run {run_id!r}: `openfusion runs list` shows them")
    return found


def _usd(value: float | None) -> str:
    return "?" if value is None else f"${value:.4f}"


def _seconds(ms: int | None) -> str:
    return "" if ms is None else f"{ms / 1000:.1f}s"


# -- db ---------------------------------------------------------------------------------------


@click.group()
def db() -> None:
    """The store's database: runs, spend, keys (SQLite, or PostgreSQL with database_url)."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Bring the database's schema to this version's (what `serve` also does when it starts)."""
    from openfusion.store.schema import SCHEMA_REVISION

    async def upgrade(store: Store) -> str:
        return store.db.where

    where = with_store(upgrade)
    click.echo(f"{where}: at schema revision {SCHEMA_REVISION}")
