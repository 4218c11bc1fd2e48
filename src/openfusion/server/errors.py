"""Error bodies in OpenRouter's shape: ``{"error": {"code", "message", "metadata"}}``."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from openfusion.errors import ProviderError


class APIError(Exception):
    def __init__(self, status: int, message: str, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.metadata = metadata or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "metadata": self.metadata}}

    def encode(self) -> bytes:
        return json.dumps(self.body()).encode()


def from_validation(exc: ValidationError) -> APIError:
    """A 400 whose message names every offending field, e.g. ``messages.0.role: ...``."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        problems.append(f"{where}: {err['msg']}")
    return APIError(400, "invalid request: " + "; ".join(problems), {"fields": problems})


def from_provider(exc: ProviderError, model: str) -> APIError:
    """Map a failed upstream call to our status; the upstream's own text is kept."""
    status = 502
    if exc.reason in ("insufficient_credits", "budget"):
        status = 402
    elif exc.reason == "rate_limited":
        status = 429
    elif exc.reason == "timeout":
        status = 408
    elif exc.status is not None and 400 <= exc.status < 500:
        status = {401: 502, 403: 502, 404: 404}.get(exc.status, 400)
    return APIError(
        status,
        exc.message,
        {"model": model, "reason": exc.reason, "upstream_status": exc.status},
    )
