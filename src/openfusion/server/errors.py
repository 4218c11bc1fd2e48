"""Error bodies in OpenRouter's shape: ``{"error": {"code", "message", "metadata"}}``."""

from __future__ import annotations

import math
from typing import Any

import orjson
from pydantic import ValidationError

from openfusion.errors import ProviderError

DEFAULT_RETRY_AFTER = 5
"""Seconds a 429 tells the client to wait when the upstream did not say how long."""


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        metadata: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.metadata = metadata or {}
        self.headers: dict[str, str] = {}
        """Response headers, e.g. the ``X-Generation-Id`` of a run that failed."""
        if status == 429:  # a client that backs off needs to know for how long
            wait = DEFAULT_RETRY_AFTER if retry_after is None else math.ceil(retry_after)
            self.headers["Retry-After"] = str(max(wait, 1))

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "metadata": self.metadata}}

    def encode(self) -> bytes:
        return orjson.dumps(self.body())


def from_validation(exc: ValidationError) -> APIError:
    """A 400 whose message names every offending field, e.g. ``messages.0.role: ...``."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message += " (a field this server does not know; leave it out)"
        problems.append(f"{where}: {message}")
    return APIError(400, "invalid request: " + "; ".join(problems), {"fields": problems})


def upstream_status(reason: str, upstream: int | None) -> int:
    """Our status for a failed upstream call, from its reason and the upstream's status."""
    if reason in ("insufficient_credits", "budget"):
        return 402
    if reason == "rate_limited":
        return 429
    if reason == "timeout":
        return 408
    if upstream is not None and 400 <= upstream < 500:
        return {401: 502, 403: 502, 404: 404}.get(upstream, 400)
    return 502


def from_provider(exc: ProviderError, model: str) -> APIError:
    """Map a failed upstream call to our status; the upstream's own text is kept."""
    return APIError(
        upstream_status(exc.reason, exc.status),
        exc.message,
        {"model": model, "reason": exc.reason, "upstream_status": exc.status},
        retry_after=exc.retry_after,
    )
