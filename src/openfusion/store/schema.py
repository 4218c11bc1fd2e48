"""The store's tables, as the code reads and writes them (the migrations create them).

::

    budgets       key_id PK, limit_nano                       one row per key that has a budget
    reservations  id PK, key_id, amount_nano, created_at      money held by requests in flight
    spend         id PK, key_id, generation_id, stage, model,  one row per inner call
                  cost_nano (NULL: unknown), unpriced, created_at
    api_keys      id PK, name, hash (sha256, unique), admin, revoked, created_at, revoked_at,
                  rpm, tpm (requests / tokens per minute; NULL: no limit),
                  overshoot_nano (spent beyond its requests' reservations)
    instances     id PK, host, pid, source, started_at, heartbeat_at    live processes
    runs          id PK (the generation id), kind, status, source, instance_id, key_id, ...
    run_spans     (run_id, seq) PK, kind, name, stage, member, status, start_ms, end_ms,
                  model, cost_nano, data (JSON)                           a run's timeline
    ui_sessions   hash PK (sha256 of the token), key_id, created_at,   trace viewer logins
                  expires_at

Money is integer nano-USD. Times are naive UTC (one form for SQLite and PostgreSQL's
``timestamp``). ``SCHEMA_REVISION`` is the Alembic revision these tables match; a test checks
that it is the migrations' head and that the migrated schema equals this metadata.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

SCHEMA_REVISION = "0005"

metadata = MetaData()

budgets = Table(
    "budgets",
    metadata,
    Column("key_id", String, primary_key=True),
    Column("limit_nano", BigInteger, nullable=False),
)

reservations = Table(
    "reservations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key_id", String, nullable=False, index=True),
    Column("amount_nano", BigInteger, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

spend = Table(
    "spend",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("key_id", String, nullable=True, index=True),
    Column("generation_id", String, nullable=False, index=True),
    Column("stage", String, nullable=False),
    Column("model", String, nullable=True),
    Column("cost_nano", BigInteger, nullable=True),
    Column("unpriced", Boolean, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("admin", Boolean, nullable=False),
    Column("revoked", Boolean, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("revoked_at", DateTime, nullable=True),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("overshoot_nano", BigInteger, nullable=False, server_default="0"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("source", String(16), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("source", String(16), nullable=False),
    Column("instance_id", String(32), nullable=False, index=True),
    Column("key_id", String(32), nullable=True, index=True),
    Column("reservation_id", String(32), nullable=True),
    Column("model", String(255), nullable=True),
    Column("preset", String(255), nullable=True, index=True),
    Column("judge", String(255), nullable=True),
    Column("question", Text, nullable=False),
    Column("request", JSON, nullable=False),
    Column("answer", Text, nullable=False),
    Column("analysis", JSON, nullable=True),
    Column("citations", JSON, nullable=True),
    Column("failure_reason", String(64), nullable=True),
    Column("failure_message", Text, nullable=True),
    Column("totals", JSON, nullable=True),
    Column("cost_nano", BigInteger, nullable=True),
    Column("streamed", Boolean, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
    Column("latency_ms", Integer, nullable=True),
    Index("ix_runs_created_at_id", "created_at", "id"),
)

run_spans = Table(
    "run_spans",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(255), nullable=False),
    Column("stage", String(16), nullable=True),
    Column("member", Integer, nullable=True),
    Column("status", String(16), nullable=False),
    Column("start_ms", Integer, nullable=False),
    Column("end_ms", Integer, nullable=True),
    Column("model", String(255), nullable=True),
    Column("cost_nano", BigInteger, nullable=True),
    Column("data", JSON, nullable=False),
)

ui_sessions = Table(
    "ui_sessions",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("key_id", String(32), nullable=False, index=True),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False, index=True),
)

alembic_version = Table(
    "alembic_version", MetaData(), Column("version_num", String(32), primary_key=True)
)
"""Alembic's own table (not part of ``metadata``): read to skip migrating when at head."""
