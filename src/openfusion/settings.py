"""Settings: the one place that reads environment variables and the user's config file.

Everything else receives a ``Settings`` object. The config dir holds ``config.toml``, user
presets in ``presets/*.toml`` and prompt overrides in ``prompts/*.j2``.

``config.toml``::

    default_preset = "budget"          # else: "budget" when OPENROUTER_API_KEY is set, else "local"
    prompts_dir = "/path/to/templates" # optional; files here override the shipped templates
    database_url = "postgresql+asyncpg://user@db/openfusion"  # runs, spend, keys (the store);
                                       # default: SQLite, <data dir>/openfusion.db
    redis_url = "redis://127.0.0.1:6379/0"  # replicas share rate limits, budget reservations
                                       # and breaker state through it; default: none (per process)
    redis_prefix = "openfusion:"       # of every Redis key openfusion writes
    otlp_endpoint = "http://127.0.0.1:4318"  # OpenTelemetry spans of each run (OTLP/HTTP;
                                       # needs openfusion[otel]); default: none

    [providers.ollama]                 # any OpenAI-compatible server becomes "ollama/<model>"
    type = "openai_compat"
    base_url = "http://127.0.0.1:11434/v1"
    api_key_env = ""                   # no key needed

    [timeouts]
    connect = 10.0
    read = 120.0
    total = 600.0

    [retries]                          # per model, before its fallbacks are tried
    attempts = 3
    base_delay = 0.5                   # exponential backoff with jitter, or Retry-After
    max_retry_after = 30.0             # a longer Retry-After moves on to the fallback
    breaker_threshold = 5              # failures in a row that open a model's circuit
    breaker_cooldown = 30.0

    [server]
    max_depth = 1                      # fusion depth at which requests get one plain call
    keepalive_seconds = 3.0
    max_body_bytes = 1000000
    default_reservation_usd = 1.0      # held per request on a key with a budget, w/o max_cost
    reservation_ttl_seconds = 900.0    # older reservations (a crashed server's) stop counting
    models = ["openrouter/*"]          # model ids clients may use besides the members and
                                       # judges of the default preset and of user presets
    allowed_hosts = []                 # keyless server: Host names answered besides loopback
    cors_origins = []                  # browser origins allowed to call (CORS); none by default
    max_header_bytes = 16384           # a request's header block; larger: 431/400, not read
    header_timeout_seconds = 10.0      # to send a request's headers; also keep-alive idle time

    [budget]
    unpriced_call_usd = 0.01           # under a budget, a model without a price is refused,
                                       # unless this sets what each of its calls is charged

    [store]
    record = true                      # the library and `openfusion ask` record their runs
                                       # (OPENFUSION_RECORD=0 turns it off; a server always does)
    keep_days = 30                     # runs older than this are pruned (0: keep them)
    max_mb = 1000                      # and the oldest beyond this size (0: no cap)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openfusion.errors import ConfigError

ENV_CONFIG_DIR = "OPENFUSION_CONFIG_DIR"
ENV_CACHE_DIR = "OPENFUSION_CACHE_DIR"
ENV_PRESET = "OPENFUSION_PRESET"
ENV_DATABASE_URL = "OPENFUSION_DATABASE_URL"
ENV_REDIS_URL = "OPENFUSION_REDIS_URL"
ENV_REDIS_PREFIX = "OPENFUSION_REDIS_PREFIX"
ENV_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_LOG_FORMAT = "OPENFUSION_LOG_FORMAT"
ENV_DATA_DIR = "OPENFUSION_DATA_DIR"
ENV_RECORD = "OPENFUSION_RECORD"
DATABASE_FILE = "openfusion.db"


class ProviderConfig(BaseModel):
    """How to reach one provider. ``type`` picks the adapter (wire format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    base_url: str | None = None
    api_key_env: str | None = None
    """Name of the env var holding the key; empty or None means no key is sent."""
    headers: dict[str, str] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)


class Timeouts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    connect: float = Field(10.0, gt=0)
    read: float = Field(120.0, gt=0)
    total: float = Field(600.0, gt=0)


class RetrySettings(BaseModel):
    """Retries per model (timeouts, dropped connections, 408, 429, 5xx) and the breaker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(3, ge=1, le=10)
    base_delay: float = Field(0.5, ge=0)
    max_delay: float = Field(10.0, ge=0)
    max_retry_after: float = Field(30.0, ge=0)
    breaker_threshold: int = Field(5, ge=1)
    breaker_cooldown: float = Field(30.0, ge=0)


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_depth: int = Field(1, ge=0)
    """A fusion request arriving at this depth is answered by one call to its judge."""
    keepalive_seconds: float = Field(3.0, gt=0)
    """Interval of ``: OPENFUSION PROCESSING`` comment lines while a stream has nothing to say."""
    max_body_bytes: int = Field(1_000_000, gt=0)
    default_reservation_usd: float = Field(1.0, gt=0)
    """Held against a key's budget by a request without ``max_cost`` (capped to what is left)."""
    reservation_ttl_seconds: float = Field(900.0, gt=0)
    """A reservation older than this (its server crashed) no longer counts against a budget."""
    ui_session_hours: float = Field(12.0, gt=0)
    """How long a login to the trace viewer (``/ui``) lasts, unless its user logs out first."""
    models: tuple[str, ...] | None = None
    """Model ids clients may use (``*`` wildcards: ``"openrouter/*"``) besides the members
    and judges of the default preset and of the user's presets. Nothing else is called — in
    particular the embedded model is not loaded unless configured."""
    allowed_hosts: tuple[str, ...] = ()
    """Without API keys, the ``Host`` names (or ``name:port``) answered besides loopback ones;
    ``"*"``: any (see ``server/guard.py``)."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins (``https://app.example``) allowed to call the API; CORS is off without."""
    max_header_bytes: int = Field(16_384, ge=1024)
    """Largest request header block read; a larger one is refused before the app sees it."""
    header_timeout_seconds: float = Field(10.0, gt=0)
    """Seconds a client has to send a request's headers (from its first byte, or from the
    connection); an idle keep-alive connection is closed after as long."""
    max_in_flight: int = Field(4096, ge=0)
    """Requests one worker serves at once; past it a request gets 503 with ``Retry-After``
    (an overloaded event loop would otherwise slow every request, and fire timeouts). 0: no
    cap."""
    key_cache_seconds: float = Field(1.0, ge=0)
    """How long a read of the API keys is reused: a key created, revoked or changed by
    ``openfusion keys`` counts within this. 0: every request reads them."""


class BudgetSettings(BaseModel):
    """Budgets (``max_cost``, an API key's budget) and what they cannot price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unpriced_call_usd: float | None = Field(None, ge=0, allow_inf_nan=False)
    """What a call of a model without a known price is charged under a budget; ``None``
    (default): such calls are refused under a budget, since their cost has no bound."""


class StoreSettings(BaseModel):
    """The run store (the database itself is ``database_url``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    record: bool = True
    """The library and ``openfusion ask`` record their runs (a server always records)."""
    keep_days: float = Field(30.0, ge=0)
    """Runs older than this many days are pruned; 0 keeps them. Spend is never pruned."""
    max_mb: float = Field(1000.0, ge=0)
    """The oldest runs are pruned while the runs take more than this; 0: no cap."""


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_preset: str | None = None
    prompts_dir: Path | None = None
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "openfusion:"
    otlp_endpoint: str | None = None
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    tools: dict[str, Any] = Field(default_factory=dict)
    """The ``[tools]`` table, validated as ``openfusion.tools.ToolSettings`` where tools run."""
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)


BUILTIN_PROVIDERS: dict[str, ProviderConfig] = {
    "openrouter": ProviderConfig(
        type="openai_compat",
        base_url="https://openrouter.ai/api/v1",
        api_key_env="OPENROUTER_API_KEY",
        headers={"X-Title": "openfusion"},
    ),
    "openai": ProviderConfig(
        type="openai_compat",
        base_url="https://api.openai.com/v1",
        api_key_env="OPENAI_API_KEY",
        options={"reasoning_param": "reasoning_effort"},
    ),
    "local": ProviderConfig(type="local"),
    "scripted": ProviderConfig(type="scripted"),
}


@dataclass(frozen=True)
class Settings:
    config_dir: Path
    cache_dir: Path
    providers: Mapping[str, ProviderConfig] = field(default_factory=lambda: dict(BUILTIN_PROVIDERS))
    default_preset: str | None = None
    prompts_dir: Path | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: RetrySettings = field(default_factory=RetrySettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    tools: Mapping[str, Any] = field(default_factory=dict)
    store: StoreSettings = field(default_factory=StoreSettings)
    data_dir: Path | None = None
    """Where the default SQLite database lives; ``None``: the config dir."""
    database_url: str | None = field(default=None, repr=False)
    """SQLAlchemy async URL of the store; ``None``: the SQLite file (see ``database``). Not in
    ``repr``: it may hold a password."""
    redis_url: str | None = field(default=None, repr=False)
    """Redis shared by the replicas (``None``: each process keeps its own limits, breaker and
    reservations go to the database). Not in ``repr``: it may hold a password."""
    redis_prefix: str = "openfusion:"
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector for the runs' spans (``None``: no spans)."""
    log_format: str = "text"
    """``json``: the server logs one JSON object a line (``serve --log-format json`` sets it)."""
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    """A snapshot of the environment, for API keys. Not shown in ``repr`` (it holds secrets)."""

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        config_dir = Path(env.get(ENV_CONFIG_DIR) or platformdirs.user_config_dir("openfusion"))
        cache_dir = Path(env.get(ENV_CACHE_DIR) or platformdirs.user_cache_dir("openfusion"))
        data_dir = Path(env.get(ENV_DATA_DIR) or platformdirs.user_data_dir("openfusion"))
        config = _read_config(config_dir / "config.toml")
        store = config.store
        if env.get(ENV_RECORD):
            store = store.model_copy(update={"record": _flag(ENV_RECORD, env[ENV_RECORD])})
        return cls(
            config_dir=config_dir,
            cache_dir=cache_dir,
            providers={**BUILTIN_PROVIDERS, **config.providers},
            default_preset=env.get(ENV_PRESET) or config.default_preset,
            prompts_dir=config.prompts_dir,
            timeouts=config.timeouts,
            retries=config.retries,
            tools=config.tools,
            server=config.server,
            budget=config.budget,
            store=store,
            data_dir=data_dir,
            database_url=env.get(ENV_DATABASE_URL) or config.database_url,
            redis_url=env.get(ENV_REDIS_URL) or config.redis_url,
            redis_prefix=env.get(ENV_REDIS_PREFIX) or config.redis_prefix,
            otlp_endpoint=env.get(ENV_OTLP_ENDPOINT) or config.otlp_endpoint,
            log_format=env.get(ENV_LOG_FORMAT) or "text",
            env=env,
        )

    @property
    def database(self) -> str:
        """The store's database URL: ``database_url``, else the SQLite file
        ``<data dir>/openfusion.db`` — or ``<config dir>/openfusion.db`` when that exists (where
        openfusion's first releases kept the spend ledger: it stays in use there)."""
        if self.database_url:
            return self.database_url
        path = self.config_dir / DATABASE_FILE
        if self.data_dir is not None and not path.exists():
            path = self.data_dir / DATABASE_FILE
        return f"sqlite+aiosqlite:///{path}"

    @property
    def prompt_dirs(self) -> list[Path]:
        """Where user prompt templates are looked for, first match winning."""
        return [d for d in (self.prompts_dir, self.config_dir / "prompts") if d]

    def api_key(self, env_var: str) -> str | None:
        return self.env.get(env_var) or None

    @property
    def preset_name(self) -> str:
        """The preset used when none is asked for: the configured one, else by available keys."""
        if self.default_preset:
            return self.default_preset
        return "budget" if self.api_key("OPENROUTER_API_KEY") else "local"


def _read_config(path: Path) -> ConfigFile:
    if not path.exists():
        return ConfigFile()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return ConfigFile.model_validate(data)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from exc


def _flag(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r}: use 1 or 0 (true/false, yes/no, on/off)")


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line account of a pydantic error that names each offending field."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
    )
