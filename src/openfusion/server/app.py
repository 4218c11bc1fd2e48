"""The ASGI app: OpenAI/OpenRouter-compatible routes over the fusion engine.

Plain ASGI routing (``server/asgi.py``; Starlette's ``Request`` and ``Response`` only), no
per-request pydantic beyond the one body validation, no per-chunk serialisation objects;
served by uvicorn with uvloop and httptools.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import logging.config
import random
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp

from openfusion.cluster import Shared, retry_after
from openfusion.cost import Price
from openfusion.engine import DEPTH_HEADER, FusionCallEvent, ToolEvent
from openfusion.engine.runlog import RunLog
from openfusion.engine.trace import RunStart
from openfusion.errors import ConfigError
from openfusion.logs import generation_id as current_generation
from openfusion.logs import log_config
from openfusion.presets import list_presets
from openfusion.providers import ProviderRegistry
from openfusion.redact import Redactor
from openfusion.server.asgi import EventStream, InFlightCap, Route, Routes
from openfusion.server.auth import BearerAuth, KeyGate
from openfusion.server.completions import (
    FLASH_ALIAS,
    FUSION_ALIAS,
    FUSION_PREFIX,
    Completions,
    Final,
    Output,
    Progress,
    Text,
)
from openfusion.server.errors import APIError, from_validation
from openfusion.server.guard import BrowserGuard
from openfusion.server.metrics import (
    CONTENT_TYPE_LATEST,
    MULTIPROC_ENV,
    Metrics,
    MetricsMiddleware,
)
from openfusion.server.runs_api import RunsAPI, conditional_json
from openfusion.server.schema import ChatCompletionRequest
from openfusion.server.spend import MeteredRun, Metering
from openfusion.server.sse import DONE, KEEPALIVE, ChunkEncoder, progress, with_keepalive
from openfusion.server.telemetry import Telemetry
from openfusion.server.ui import TraceViewer
from openfusion.settings import Settings
from openfusion.store import KeyRecord, Store
from openfusion.store.recorder import StoreRecorder
from openfusion.tools import ToolRegistry
from openfusion.types import Usage

_IDS = random.Random()
"""Generation ids: unique, not secret (a run is shown to its own key only). Not ``secrets``:
``os.urandom`` lets go of the GIL, and under load the store's thread held it for milliseconds
before this thread got it back (py-spy: 4% of a pass-through request)."""
GC_THRESHOLDS = (50_000, 20, 20)
"""``gc.set_threshold`` for a serving process (``tune_collector``)."""
log = logging.getLogger("openfusion.server")

DEPTH_HEADERS = (DEPTH_HEADER, "x-openfusion-depth")
SAMPLING_PARAMETERS = [
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "max_tokens",
    "seed",
    "stop",
    "response_format",
    "reasoning",
    "user",
]
SUPPORTED_PARAMETERS = [*SAMPLING_PARAMETERS, "tools", "tool_choice", "parallel_tool_calls"]
FUSION_PARAMETERS = [*SAMPLING_PARAMETERS, "plugins"]
MAX_DEPTH_DIGITS = 4
MAX_JSON_DEPTH = 64
"""Deepest nesting of a request body: real requests (tool schemas included) stay far below;
past ~1000 levels ``json`` and pydantic run out of stack."""
M = TypeVar("M", bound=BaseModel)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


@dataclass
class Started:
    """A request whose run has been planned: its outputs, and what it is recorded under."""

    outputs: AsyncIterator[Output]
    metered: MeteredRun
    generation_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Generation-Id": self.generation_id}


@dataclass
class Collected:
    """A whole run: the answer's pieces, the fusion calls it made, and its end."""

    texts: list[str]
    final: Final
    calls: list[FusionCallEvent]


class Renderer(Protocol):
    """How one API writes a run as server-sent events."""

    def head(self) -> bytes: ...

    def render(self, item: Output) -> bytes: ...

    def error(self, error: APIError) -> bytes: ...

    def tail(self) -> bytes: ...


class Server:
    def __init__(
        self,
        settings: Settings,
        registry: ProviderRegistry,
        store: Store,
        recorder: StoreRecorder,
        tools: ToolRegistry | None = None,
        *,
        shared: Shared,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.shared = shared
        self.completions = Completions(settings, registry, tools, shared.breaker)
        self.metrics = Metrics(
            self.completions.caller.breaker, multiprocess=bool(settings.env.get(MULTIPROC_ENV))
        )
        self.telemetry = telemetry
        self.metering = Metering(
            store.ledger,
            recorder,
            settings.server.default_reservation_usd,
            budgets=shared.budgets,
            after=self.settled,
        )
        self.runs = RunsAPI(store.runs, self.metering.written)

    async def chat(self, request: Request) -> Response:
        body = _validated(ChatCompletionRequest, await self._read_body(request))
        started = await self.start(request, body)
        if body.stream:
            stream = self.sse(started, ChatRenderer(started, body.model))
            return EventStream(stream, started.headers)
        whole = await self.collect(request, started)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(whole.texts)}
        final = whole.final
        if final.annotations:
            message["annotations"] = list(final.annotations)
        if final.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in final.tool_calls
            ]
        data = {
            "id": started.generation_id,
            "object": "chat.completion",
            "created": started.created,
            "model": body.model,
            "choices": [{"index": 0, "message": message, "finish_reason": final.finish_reason}],
            "usage": usage_dict(final),
        }
        if final.fusion is not None:
            data["fusion"] = final.fusion
        return json_response(data, headers=started.headers)

    async def responses(self, request: Request) -> Response:
        from openfusion.server.responses import ResponsesRequest, ResponseStream, response_body

        body = _validated(ResponsesRequest, await self._read_body(request))
        chat = body.to_chat()
        started = await self.start(request, chat)
        if body.stream:
            stream = self.sse(started, ResponseStream(started, body))
            return EventStream(stream, started.headers)
        whole = await self.collect(request, started)
        return json_response(response_body(started, body, whole), headers=started.headers)

    async def start(self, request: Request, body: ChatCompletionRequest) -> Started:
        """Plan the run (a bad request raises its ``APIError`` here, before any byte is sent),
        holding part of the key's budget first: the run may spend no more than that. The run
        is recorded from here on under its generation id."""
        depth = _depth(request)
        key = getattr(request.state, "api_key", None)
        key_id: str | None = key.id if key is not None else None
        if key is not None and (key.rpm or key.tpm):
            await self._admit(key)
        generation_id = f"gen-{int(time.time())}-{_IDS.getrandbits(64):016x}"
        metered = await self.metering.start(key_id, generation_id, body.max_cost)
        current_generation.set(generation_id)  # the logs of this run name it from here on
        metered.tpm = key.tpm if key is not None else None
        self.metrics.in_flight.inc()
        try:
            if metered.reservation is not None:
                body = body.model_copy(update={"max_cost": metered.reservation.amount})
            log = metered.record(_run_start(body, generation_id, key_id, metered))
            outputs = self.completions.plan(body, depth, log)
        except BaseException:
            metered.discard()  # refused before it ran: no run to keep
            await metered.settle()
            raise
        return Started(outputs, metered, generation_id, body.model)

    async def _admit(self, key: KeyRecord) -> None:
        """429 with ``Retry-After`` when the key is over its requests or tokens per minute."""
        wait = await self.shared.limiter.admit(key.id, key.rpm, key.tpm)
        if wait is None:
            return
        self.metrics.rate_limited.inc()
        limits = ", ".join(
            f"{value} {unit} per minute"
            for value, unit in ((key.rpm, "requests"), (key.tpm, "tokens"))
            if value
        )
        error = APIError(
            429,
            f"rate limit: API key {key.id} may send {limits}; retry in {retry_after(wait)} s",
            {"failure_reason": "rate_limited", "retry_after": round(wait, 3)},
        )
        error.headers["Retry-After"] = retry_after(wait)
        raise error

    def settled(self, run: MeteredRun) -> Awaitable[None] | None:
        """When a request's run has ended (before its answer does; the record is written
        after): its metrics, its trace, and — the one part that waits, returned to be awaited
        — its tokens against the key's per-minute limit."""
        self.metrics.in_flight.dec()
        if run.log is None:
            return None
        end = run.log.end
        cost = end.usage.cost if end is not None and end.usage is not None else None
        log.info(
            "%s run %s: %s in %s ms, cost %s",
            run.log.kind,
            run.generation_id,
            run.log.status,
            run.log.latency_ms,
            "unknown" if cost is None else f"${cost:.6f}",
        )
        self.metrics.observe_run(run.log)
        if self.telemetry is not None:
            self.telemetry.emit(run.log)
        if run.tpm and run.key_id is not None:
            return self.shared.limiter.charge(run.key_id, run_tokens(run.log))
        return None

    async def collect(self, request: Request, started: Started) -> Collected:
        """The whole run (cancelled if the client goes away), settled."""
        try:
            whole: Collected = await _until_disconnect(
                request, _collect(started.outputs, started.metered)
            )
        except APIError as exc:  # its run and spend are on record under this id
            started.metered.fail(exc)
            exc.headers.update(started.headers)
            raise
        finally:
            await started.metered.settle()
        return whole

    async def sse(self, started: Started, renderer: Renderer) -> AsyncIterator[bytes]:
        """The run as server-sent events, kept alive while it thinks; an error after the
        status line went out travels as an event."""
        try:
            yield renderer.head()
            keepalive = self.settings.server.keepalive_seconds
            # closed here, not when collected: closing it cancels the run's work
            async with aclosing(with_keepalive(started.outputs, keepalive)) as batches:
                async for batch in batches:
                    if batch is None:
                        yield KEEPALIVE
                        continue
                    events = []
                    for item in batch:
                        started.metered.see(item)
                        if data := renderer.render(item):
                            events.append(data)
                    if events:  # one event: join returns it as is
                        yield b"".join(events)
        except APIError as exc:
            started.metered.fail(exc)
            yield renderer.error(exc)
        except Exception:  # the status line is gone: the error has to travel as an event
            log.exception("stream %s failed", started.generation_id)
            error = APIError(500, "internal error; see the server log")
            started.metered.fail(error)
            yield renderer.error(error)
        finally:  # also when the client went away (the stream is cancelled or closed)
            await started.metered.settle()
        yield renderer.tail()

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.server.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(400, f"request body of {declared} bytes exceeds the {limit}-byte limit")
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise APIError(400, f"request body exceeds the {limit}-byte limit")
        except ClientDisconnect as exc:
            raise APIError(400, "the client went away while sending the body") from exc
        return bytes(body)

    async def models(self, request: Request) -> Response:
        try:
            presets = list_presets(self.settings)
        except ConfigError as exc:
            raise APIError(500, f"server configuration: {exc}") from exc
        completions = self.completions  # only what this server serves is listed
        presets = [p for p in presets if completions.serves_preset(p)]
        entries = [_fusion_entry(FUSION_ALIAS, "Fusion (default preset)")]
        if any(p.name == "fast" for p in presets):
            entries.append(_fusion_entry(FLASH_ALIAS, "Fusion, fast preset"))
        entries += [_fusion_entry(f"{FUSION_PREFIX}{p.name}", p.description) for p in presets]
        seen = sorted({m for p in presets for m in (p.judge, *(s.model for s in p.panel))})
        prices = self.completions.caller.prices
        entries += [_model_entry(model_id, prices.price(model_id)) for model_id in seen]
        return json_response({"object": "list", "data": entries})

    async def generation(self, request: Request) -> Response:
        return json_response(await self.runs.generation(request))

    async def run_list(self, request: Request) -> Response:
        return json_response(await self.runs.list(request))

    async def run(self, request: Request) -> Response:
        return conditional_json(request, await self.runs.get(request))

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def prometheus(self, request: Request) -> Response:
        """Prometheus metrics; with API keys, for an admin key only (like every run's trace)."""
        key = getattr(request.state, "api_key", None)
        if key is not None and not key.admin:
            raise APIError(
                403,
                "/metrics needs an admin key: `openfusion keys admin ID on` on the server",
            )
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")

    @functools.cached_property
    def _openapi(self) -> bytes:
        from openfusion.server.openapi import openapi_document

        return json.dumps(openapi_document()).encode()


class ChatRenderer:
    """A run as chat completion chunks; progress as SSE comments."""

    def __init__(self, started: Started, model: str) -> None:
        self.encoder = ChunkEncoder(started.generation_id, model, started.created)
        self.spent = Usage()

    def head(self) -> bytes:
        return self.encoder.role()

    def render(self, item: Output) -> bytes:
        if isinstance(item, Text):
            return self.encoder.text(item.delta)
        if isinstance(item, Progress):
            if isinstance(item.event, FusionCallEvent):
                return b""
            if not isinstance(item.event, ToolEvent):  # tools count in their member
                self.spent += item.event.usage or Usage()
            return progress(item.event, self.spent.cost)
        if isinstance(item, Final):
            calls = self.encoder.tool_calls(item.tool_calls) if item.tool_calls else b""
            extra = {"fusion": item.fusion} if item.fusion is not None else {}
            delta = {"annotations": list(item.annotations)} if item.annotations else None
            return calls + self.encoder.final(item.finish_reason, usage_dict(item), extra, delta)
        return b""

    def error(self, error: APIError) -> bytes:
        return self.encoder.error(error)

    def tail(self) -> bytes:
        return DONE


def _fusion_entry(model_id: str, description: str) -> dict[str, Any]:
    """A fusion model: priced as the sum of its inner calls, so variable (OpenRouter's
    ``"-1"``); ``usage.cost`` of each response says what it cost."""
    return {
        "id": model_id,
        "name": model_id,
        "description": description,
        "context_length": None,
        "pricing": {"prompt": "-1", "completion": "-1", "request": "0"},
        "supported_parameters": FUSION_PARAMETERS,
    }


def _model_entry(model_id: str, price: Price | None) -> dict[str, Any]:
    """A panel or judge model, with its price in OpenRouter's form: USD per token, as
    strings (``"-1"`` only when no price is known: add it to prices.toml)."""
    pricing = {"prompt": "-1", "completion": "-1", "request": "0"}
    if price is not None:
        pricing = {
            "prompt": per_token(price.prompt),
            "completion": per_token(price.completion),
            "request": per_token(price.request),
        }
    return {
        "id": model_id,
        "name": model_id,
        "context_length": None,
        "pricing": pricing,
        "supported_parameters": SUPPORTED_PARAMETERS,
    }


def _run_start(
    body: ChatCompletionRequest, generation_id: str, key_id: str | None, run: MeteredRun
) -> RunStart:
    """What the request's run record starts with (its kind is set when it is planned); its
    options (``metadata`` among them) are kept with it."""
    options = body.model_dump(mode="json", exclude={"messages"}, exclude_none=True)
    return RunStart(
        id=generation_id,
        kind="call",
        messages=tuple(m.to_message() for m in body.messages),
        model=body.model,
        options=options,
        key_id=key_id,
        reservation_id=run.reservation.id if run.reservation else None,
        streamed=bool(body.stream),
    )


def per_token(usd: float) -> str:
    """A price as OpenRouter writes it: plain decimal, no exponent (``"0.0000025"``)."""
    text = f"{usd:.12f}".rstrip("0").rstrip(".")
    return text or "0"


def run_tokens(run: RunLog) -> int:
    """Prompt and completion tokens of every model call the run made."""
    total = 0
    for span in run.spans:
        if span.kind == "model":
            usage = span.data.get("usage") or {}
            total += (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
    return total


def usage_dict(final: Final) -> dict[str, Any]:
    usage = final.usage.to_dict()
    usage["cost_details"] = final.cost_details
    return usage


def _validated(model: type[M], raw: bytes) -> M:
    """The request body as ``model``, or a 400 that names what is wrong."""
    if not raw.strip():
        raise APIError(400, "empty request body: send a JSON object")
    try:
        data = orjson.loads(raw)
    except ValueError:
        try:  # NaN, Infinity, 1e400: not JSON, but read as numbers the field's check names them
            data = json.loads(raw)
        except ValueError as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise APIError(400, _too_deep()) from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    if _nesting(data) > MAX_JSON_DEPTH:
        raise APIError(400, _too_deep())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from exc


def _too_deep() -> str:
    return f"request body is nested deeper than {MAX_JSON_DEPTH} levels: flatten it"


def _nesting(data: Any) -> int:
    """How deep ``data`` nests (an object of strings: 1). Iterative: a deep body cannot
    exhaust the stack here, and it stops early past the limit, so it costs a walk over the
    request's few containers."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _depth(request: Request) -> int:
    """The fusion depth the request arrives at: ASCII digits only (``"²".isdigit()`` is true,
    ``int("²")`` fails), and few of them (a depth of a million digits is no depth)."""
    for header in DEPTH_HEADERS:
        value = request.headers.get(header)
        if value is not None:
            value = value.strip()
            if not (value.isascii() and value.isdigit() and len(value) <= MAX_DEPTH_DIGITS):
                raise APIError(400, f"header {header}: must be a non-negative integer, e.g. 0 or 1")
            return int(value)
    return 0


async def _collect(outputs: AsyncIterator[Output], run: MeteredRun) -> Collected:
    texts: list[str] = []
    calls: list[FusionCallEvent] = []
    final: Final | None = None
    async for item in outputs:
        run.see(item)
        if isinstance(item, Text):
            texts.append(item.delta)
        elif isinstance(item, Progress) and isinstance(item.event, FusionCallEvent):
            calls.append(item.event)
        elif isinstance(item, Final):
            final = item
    assert final is not None
    return Collected(texts, final, calls)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it if the client disconnects first (no orphan upstream calls).

    ``work`` runs in this task; a watcher task cancels it when the client goes away (one task
    per request, not three: this is every unstreamed request's path)."""
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone or current.uncancel():  # cancelled by someone else too: theirs to handle
            raise
        raise APIError(499, "client closed the request") from None
    finally:
        watcher.cancel()


def create_app(
    settings: Settings | None = None,
    *,
    registry: ProviderRegistry | None = None,
    store: Store | None = None,
    recorder: StoreRecorder | None = None,
    tools: ToolRegistry | None = None,
    shared: Shared | None = None,
    telemetry: Telemetry | None = None,
    tune_gc: bool = False,
) -> ASGIApp:
    """The app; spend, budgets, API keys and runs live in ``store`` (default: the store of
    ``settings.database``), written by ``recorder`` (default: one on ``store``); panel tools come
    from ``tools`` (default: the built-ins ``[tools]`` configures). ``shared``: rate limits,
    hot budgets and the breaker (default: through ``redis_url`` if set, else this process's);
    ``telemetry``: spans of each run (default: OTLP to ``otlp_endpoint`` if set, else none).
    The trace viewer answers under ``/ui``, behind the same key gate as the API (``server/ui``).
    ``tune_gc``: ``tune_collector()`` once started (a server process's; not for tests' apps)."""
    settings = settings or Settings.load()
    registry = registry or ProviderRegistry(settings)
    store = store or Store.for_settings(settings)
    recorder = recorder or StoreRecorder(
        store,
        source="server",
        redact=Redactor.from_settings(settings),
        keep_days=settings.store.keep_days,
        max_mb=settings.store.max_mb,
    )
    shared = shared or Shared.for_settings(settings, store.ledger)
    if telemetry is None and settings.otlp_endpoint:
        telemetry = Telemetry.otlp(settings.otlp_endpoint)
    server = Server(settings, registry, store, recorder, tools, shared=shared, telemetry=telemetry)
    gate = KeyGate(store.keys, ttl=settings.server.key_cache_seconds)
    viewer = TraceViewer(gate, store.sessions, server.runs)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await store.init()
        await recorder.start()  # also marks the runs of crashed processes unfinished
        await shared.start()
        if tune_gc:
            tune_collector()
        try:
            yield
        finally:
            await server.metering.drain()
            await recorder.aclose()
            await shared.aclose()
            await store.aclose()
            await registry.aclose()
            if telemetry is not None:
                telemetry.shutdown()

    app = Routes(
        [
            Route("/v1/chat/completions", server.chat, ["POST"]),
            Route("/v1/responses", server.responses, ["POST"]),
            Route("/v1/models", server.models),
            Route("/v1/generation", server.generation),
            Route("/v1/fusion/runs", server.run_list),
            Route("/v1/fusion/runs/{run_id}", server.run),
            Route("/health", server.health),
            Route("/metrics", server.prometheus),
            Route("/openapi.json", server.openapi),
        ],
        lifespan=lifespan,
    )
    options = settings.server
    guarded = BrowserGuard(
        app, allowed_hosts=options.allowed_hosts, cors_origins=options.cors_origins
    )
    api: ASGIApp = BearerAuth(guarded, gate)
    if options.cors_origins:
        api = CORSMiddleware(
            api,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", *DEPTH_HEADERS],
            expose_headers=["x-generation-id"],
        )
    # the viewer (/ui) checks keys and hosts itself
    capped = InFlightCap(viewer.mount(api), options.max_in_flight)
    return MetricsMiddleware(capped, server.metrics, app)


def app_from_env() -> ASGIApp:
    """The factory ``openfusion serve`` hands to uvicorn (each worker process builds its own,
    and sets up its JSON logs when ``OPENFUSION_LOG_FORMAT=json``)."""
    settings = Settings.load()
    if settings.log_format == "json":
        logging.config.dictConfig(log_config("json"))
    return create_app(settings, tune_gc=True)


def tune_collector() -> None:
    """Set the garbage collector up for serving: what startup built (modules, pydantic and
    SQLAlchemy internals, compiled templates) frozen out of every collection, and young
    objects collected every 50,000 allocations, not 700. A request allocates thousands of
    objects, nearly all freed by reference counting; at the defaults the collector ran several
    times per request and, every few hundred requests, walked the whole heap. Measured with
    ``benchmarks/gateways.py --baseline`` (one run, 2 cores): pass-through 1,526 → 2,372 req/s,
    fusion 377 → 499 req/s, 2,000 fusions in flight answered in 7.5 s, not 13.2 s, at the same
    peak RSS. A full collection still runs every 400 young ones (about every 20 million
    allocations), so garbage in reference cycles is freed within seconds under load."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
