"""How runs read back: the JSON of the runs API (and of ``openfusion runs``), built from rows.

A run's detail is drawn for a page that shows the question, the answer with its citations, the
judge's analysis, each member's answer side by side, a timeline of every call, and a cost
breakdown; the same object while the run is in progress (``status: running``), with what it
has done so far. Times on the timeline are milliseconds from the run's start. Money is USD,
``null`` when a part of it is unknown.

A run's ``status``: ``running``, ``ok``, ``error``, ``cancelled`` (its client went away), or
``unfinished`` (its process died). A span's: ``waiting``, ``running``, ``ok``, ``failed``,
``cancelled`` (stopped mid-way: a straggler past the deadline, a client gone), or
``unfinished`` (its process died). ``updated_at`` moves whenever the record does: a page that
polls a run in progress redraws when it changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement

from openfusion.store.ledger import NANO
from openfusion.store.schema import runs

QUESTION_PREVIEW = 200
RUN_STATUSES = ("running", "ok", "error", "cancelled", "unfinished")
RUN_KINDS = ("fusion", "caller", "call")


@dataclass
class RunFilter:
    """Which runs to list. ``key_id`` set: that key's runs only."""

    key_id: str | None = None
    preset: str | None = None
    status: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = None
    """Text the question contains (case-insensitive)."""
    limit: int = 50
    cursor: str | None = None
    extra: list[ColumnElement[bool]] = field(default_factory=list)

    def conditions(self) -> list[ColumnElement[bool]]:
        where = list(self.extra)
        if self.key_id is not None:
            where.append(runs.c.key_id == self.key_id)
        if self.preset is not None:
            where.append(runs.c.preset == self.preset)
        if self.status is not None:
            where.append(runs.c.status == self.status)
        if self.kind is not None:
            where.append(runs.c.kind == self.kind)
        if self.since is not None:
            where.append(runs.c.created_at >= self.since)
        if self.until is not None:
            where.append(runs.c.created_at < self.until)
        if self.q:
            escaped = self.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(runs.c.question.ilike(f"%{escaped}%", escape="\\"))
        return where


def parse_time(text: str) -> datetime:
    """An ISO 8601 time as the store keeps times (naive UTC; UTC unless an offset is given).
    Raises ``ValueError``."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds") + "Z"


def usd(nano: int | None) -> float | None:
    return None if nano is None else nano / NANO


def summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """One line of a run list."""
    totals = row["totals"] or {}
    question = row["question"]
    if len(question) > QUESTION_PREVIEW:
        question = question[: QUESTION_PREVIEW - 1] + "…"
    return {
        "id": row["id"],
        "object": "fusion.run",
        "kind": row["kind"],
        "status": row["status"],
        "source": row["source"],
        "model": row["model"],
        "preset": row["preset"],
        "judge": row["judge"],
        "key_id": row["key_id"],
        "question": question,
        "created_at": iso(row["created_at"]),
        "finished_at": iso(row["finished_at"]),
        "latency_ms": row["latency_ms"],
        "cost": usd(row["cost_nano"]),
        "total_tokens": totals.get("total_tokens"),
        "failure_reason": row["failure_reason"],
    }


def detail(row: Mapping[str, Any], spans: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A whole run: request, answer, analysis, members, timeline, cost breakdown."""
    request = row["request"] or {}
    citations = row["citations"] or {}
    timeline = [_span(s) for s in spans]
    return {
        **summary(row),
        "question": row["question"],
        "updated_at": iso(row["updated_at"]),
        "messages": request.get("messages", []),
        "options": request.get("options", {}),
        "answer": row["answer"],
        "analysis": row["analysis"],
        "sources": citations.get("sources", []),
        "annotations": citations.get("annotations", []),
        "unverified_citations": citations.get("unverified_citations", []),
        "failure_message": row["failure_message"],
        "usage": row["totals"],
        "members": _members(request.get("members", []), timeline),
        "timeline": timeline,
        "cost_breakdown": cost_breakdown(spans),
    }


def generation(row: Mapping[str, Any], spans: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What ``GET /v1/generation`` says of a generation (a server run)."""
    totals = row["totals"] or {}
    members = [s for s in spans if s["kind"] == "member" and s["status"] in ("ok", "failed")]
    responses = [
        {
            "model": s["model"],
            "name": s["name"],
            "cost": usd(s["cost_nano"]),
            **(s["data"].get("usage") or {}),
        }
        for s in members
        if s["status"] == "ok" or s["cost_nano"] != 0
    ]
    return {
        "id": row["id"],
        "model": row["model"],
        "status": row["status"],
        "created_at": row["created_at"].strftime("%Y-%m-%dT%H:%M:%SZ"),
        "streamed": row["streamed"],
        "tokens_prompt": totals.get("prompt_tokens"),
        "tokens_completion": totals.get("completion_tokens"),
        "total_cost": usd(row["cost_nano"]) if row["status"] != "running" else None,
        "cost_details": totals.get("cost_details"),
        "responses": responses,
        "fusion_status": totals.get("fusion_status"),
    }


def cost_breakdown(spans: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the run's calls cost, by stage, model and member (tools count in their member's
    stage and under ``tools``). A part that includes an unknown cost is ``null``."""
    by_stage: dict[str, int | None] = {}
    by_model: dict[str, int | None] = {}
    by_member: dict[str, int | None] = {}
    tools: int | None = 0
    total: int | None = 0
    unpriced: list[str] = []
    names = {s["member"]: s["name"] for s in spans if s["kind"] == "member"}
    for span in spans:
        if span["kind"] not in ("model", "tool") or span["status"] not in ("ok", "failed"):
            continue
        cost = span["cost_nano"]
        if cost is None:
            unpriced.append(span["name"])
        total = _add(total, cost)
        stage = span["stage"] or "call"
        by_stage[stage] = _add(by_stage.get(stage, 0), cost)
        if span["kind"] == "tool":
            tools = _add(tools, cost)
            key = f"tool:{span['name']}"
        else:
            key = span["model"] or span["name"]
        by_model[key] = _add(by_model.get(key, 0), cost)
        if span["member"] is not None:
            member = names.get(span["member"], str(span["member"]))
            by_member[member] = _add(by_member.get(member, 0), cost)
    return {
        "total": usd(total),
        "by_stage": {k: usd(v) for k, v in by_stage.items()},
        "by_model": {k: usd(v) for k, v in by_model.items()},
        "by_member": {k: usd(v) for k, v in by_member.items()},
        "tools": usd(tools),
        "unpriced": unpriced,
    }


def _add(total: int | None, cost: int | None) -> int | None:
    return None if total is None or cost is None else total + cost


def _span(span: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "seq": span["seq"],
        "kind": span["kind"],
        "name": span["name"],
        "stage": span["stage"],
        "member": span["member"],
        "status": span["status"],
        "start_ms": span["start_ms"],
        "end_ms": span["end_ms"],
        "model": span["model"],
        "cost": usd(span["cost_nano"]),
        **span["data"],
    }


def _members(
    planned: Sequence[Mapping[str, Any]], timeline: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Each panel member with its answer (or failure), side by side."""
    spans = {s["member"]: s for s in timeline if s["kind"] == "member"}
    out = []
    for member in planned:
        span = spans.get(member["index"], {})
        out.append(
            {
                "index": member["index"],
                "name": member["name"],
                "model": span.get("model") or member["model"],
                "status": span.get("status", "waiting"),
                "content": span.get("content"),
                "usage": span.get("usage"),
                "cost": span.get("cost"),
                "latency_ms": span.get("latency_ms"),
                "tool_calls": span.get("tool_calls", 0),
                "failure": span.get("failure"),
                "tries": span.get("tries"),
                "start_ms": span.get("start_ms"),
                "end_ms": span.get("end_ms"),
            }
        )
    return out
