"""The runs API: ``GET /v1/fusion/runs``, ``GET /v1/fusion/runs/{id}``, ``GET /v1/generation``.

All three read the store, so every replica answers for every run. Who sees what: on a server
with API keys, a key sees its own runs only and an admin key (``openfusion keys create NAME
--admin``) sees all; another key's run is "not found", like one that does not exist. A server
without keys (loopback only) shows every run.

``GET /v1/fusion/runs`` — newest first, ``limit`` (1-200, default 50) per page, ``cursor`` (the
``next_cursor`` of the page before), and filters ``preset``, ``status``, ``kind``, ``key``
(admin keys), ``since`` / ``until`` (ISO 8601, UTC unless an offset is given) and ``q`` (text
in the question). ``GET /v1/fusion/runs/{id}`` — the whole run (``store/run_views.py``), also
while it runs: poll it to follow one live, sending its last ``ETag`` back in ``If-None-Match``
(a run that has not changed answers ``304 Not Modified``, without a body).

A run's end and spend are written just after its answer (``server/spend.py``): each read first
waits for what this process still has to write, so a client reading the run it was just
answered finds it whole, on this replica (another replica sees it within the flush interval).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from openfusion.server.errors import APIError
from openfusion.store import KeyRecord, RunFilter, RunStore
from openfusion.store.run_views import RUN_KINDS, RUN_STATUSES, parse_time

MAX_LIMIT = 200


class RunsAPI:
    def __init__(
        self, runs: RunStore, written: Callable[[str | None], Awaitable[None]] | None = None
    ) -> None:
        self.runs = runs
        self._written = written

    async def _pending(self, run_id: str | None) -> None:
        if self._written is not None:
            await self._written(run_id)

    async def list(self, request: Request) -> dict[str, Any]:
        params = request.query_params
        unknown = set(params) - {"limit", "cursor", "preset", "status", "kind", "key"}
        unknown -= {"since", "until", "q"}
        if unknown:
            raise APIError(400, f"{sorted(unknown)[0]}: not a filter of the runs list")
        query = RunFilter(
            preset=params.get("preset") or None,
            status=_choice(params.get("status"), "status", RUN_STATUSES),
            kind=_choice(params.get("kind"), "kind", RUN_KINDS),
            since=_time(params.get("since"), "since"),
            until=_time(params.get("until"), "until"),
            q=params.get("q") or None,
            limit=_limit(params.get("limit")),
            cursor=params.get("cursor") or None,
        )
        key = _key(request)
        wanted = params.get("key") or None
        if key is not None and not key.admin:
            if wanted not in (None, key.id):
                raise APIError(403, "key: only an admin key may list another key's runs")
            wanted = key.id
        query.key_id = wanted
        await self._pending(None)
        try:
            page, cursor = await self.runs.page(query)
        except ValueError as exc:
            raise APIError(400, f"cursor: {exc}") from exc
        return {"object": "list", "data": page, "next_cursor": cursor}

    async def get(self, request: Request) -> dict[str, Any]:
        run_id = request.path_params["run_id"]
        await self._pending(run_id)
        await self._check(request, run_id, "run")
        found = await self.runs.get(run_id)
        if found is None:
            raise _not_found("run", run_id)
        return found

    async def generation(self, request: Request) -> dict[str, Any]:
        generation_id = request.query_params.get("id", "")
        if not generation_id:
            raise APIError(400, "id: the query parameter is required, e.g. ?id=gen-...")
        await self._pending(generation_id)
        await self._check(request, generation_id, "generation")
        found = await self.runs.generation(generation_id)
        if found is None:
            raise _not_found("generation", generation_id)
        return {"data": found}

    async def _check(self, request: Request, run_id: str, what: str) -> None:
        """404 unless the run exists and the request's key may read it (ids are not secrets
        to rely on: another key's run is not found either)."""
        exists, owner = await self.runs.owner(run_id)
        key = _key(request)
        if not exists or (key is not None and not key.admin and owner != key.id):
            raise _not_found(what, run_id)


def _key(request: Request) -> KeyRecord | None:
    key = getattr(request.state, "api_key", None)
    return key if isinstance(key, KeyRecord) else None


def _not_found(what: str, run_id: str) -> APIError:
    return APIError(404, f"{what} {run_id!r} not found (or pruned, or another key's)")


def _choice(value: str | None, name: str, allowed: tuple[str, ...]) -> str | None:
    if not value:
        return None
    if value not in allowed:
        raise APIError(400, f"{name}: must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _limit(value: str | None) -> int:
    if value is None:
        return 50
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise APIError(400, f"limit: a whole number from 1 to {MAX_LIMIT}, not {value!r}")
    return int(value)


def _time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise APIError(400, f"{name}: an ISO 8601 time like 2026-12-01T09:30:00Z") from exc


def conditional_json(request: Request, data: Any) -> Response:
    """``data`` as JSON with an ``ETag`` (a hash of the body): a poller that sends it back in
    ``If-None-Match`` gets ``304 Not Modified`` and no body until the run changes."""
    body = json.dumps(data).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    wanted = request.headers.get("if-none-match", "")
    if etag in (tag.strip().removeprefix("W/") for tag in wanted.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(body, 200, headers, media_type="application/json")
