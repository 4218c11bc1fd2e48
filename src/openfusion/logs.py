"""Logging for the server: plain text (the default) or one JSON object per line.

``log_config("json")`` (given to uvicorn) makes every record of the root logger a line like::

    {"time": "2026-12-01T10:00:00.123Z", "level": "INFO", "logger": "openfusion.server",
     "message": "...", "generation_id": "gen-1764583200-4f3c...", "exc_info": "..."}

``generation_id`` is the request's (``X-Generation-Id``), taken (by ``GenerationFilter``) from
a context variable the server sets when it starts a run: every log line written while the run
works — by openfusion,
uvicorn or a library — carries it, including the tasks the run starts. No secret is logged:
records carry what the code logs, and no code logs a key or a request's headers.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

__all__ = [
    "LOG_FORMATS",
    "GenerationFilter",
    "JSONFormatter",
    "LogFormat",
    "generation_id",
    "log_config",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

generation_id: ContextVar[str | None] = ContextVar("openfusion_generation_id", default=None)
"""The generation id of the run the current task works for (``None``: none)."""


class GenerationFilter(logging.Filter):
    """Stamps each record with the generation id of the task that logs it (a handler may
    format it later, elsewhere: the id must be taken when the record is made)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "generation_id"):
            record.generation_id = generation_id.get()
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        gen = getattr(record, "generation_id", None) or generation_id.get()
        if gen is not None:
            entry["generation_id"] = gen
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_config(fmt: LogFormat, level: int = logging.INFO) -> dict[str, object]:
    """Route every logger through one stderr handler in ``fmt``; returns the ``log_config``
    for uvicorn, so its access and error logs come out the same way."""
    formatter = "json" if fmt == "json" else "text"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": JSONFormatter},
            "text": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "filters": {"generation": {"()": GenerationFilter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": formatter,
                "filters": ["generation"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": logging.getLevelName(level)},
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
