"""Adapter for OpenAI-compatible chat completions APIs: OpenRouter, OpenAI, vLLM, Ollama, llama.cpp.

One ``aiohttp.ClientSession`` per provider, created on first use inside the running loop and
closed by ``aclose``. ``complete`` uses the non-streaming call; ``stream`` parses server-sent
events. Every failure becomes a ``ProviderError`` naming the provider and model, never the key.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, aclosing, contextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from openfusion.errors import (
    ConfigError,
    InvalidResponseError,
    MissingAPIKeyError,
    ProviderError,
    UpstreamError,
    UpstreamTimeout,
)
from openfusion.providers.base import HONOURS_ALL, ToolCallJoiner
from openfusion.settings import ProviderConfig, Settings, Timeouts
from openfusion.types import Chunk, Completion, CompletionRequest, Message, ToolCall, Usage

MAX_ERROR_TEXT = 500


def create(name: str, config: ProviderConfig, settings: Settings) -> OpenAICompatProvider:
    api_key: str | None = None
    if config.api_key_env:
        api_key = settings.api_key(config.api_key_env)
        if api_key is None:
            raise MissingAPIKeyError(name, config.api_key_env)
    if not config.base_url:
        raise ConfigError(
            f"provider {name!r} (type openai_compat) needs a base_url: set it under "
            f'[providers.{name}] in config.toml, e.g. base_url = "http://127.0.0.1:11434/v1"'
        )
    return OpenAICompatProvider(
        name,
        base_url=config.base_url,
        api_key=api_key,
        headers=config.headers,
        timeouts=settings.timeouts,
        supports_json_schema=bool(config.options.get("json_schema", True)),
        reasoning_param=str(config.options.get("reasoning_param", "reasoning")),
    )


class OpenAICompatProvider:
    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None,
        headers: dict[str, str],
        timeouts: Timeouts,
        supports_json_schema: bool = True,
        reasoning_param: str = "reasoning",
    ) -> None:
        """``reasoning_param``: how the upstream takes ``reasoning``: ``"reasoning"`` (the
        object ``{effort, max_tokens}``, as OpenRouter) or ``"reasoning_effort"`` (OpenAI's
        flat effort; a token budget cannot be expressed, so it is not honoured)."""
        if reasoning_param not in ("reasoning", "reasoning_effort"):
            raise ConfigError(
                f"provider {name!r}: options.reasoning_param must be 'reasoning' or "
                f"'reasoning_effort', not {reasoning_param!r}"
            )
        self.name = name
        self.supports_json_schema = supports_json_schema
        self.honours = HONOURS_ALL
        self._reasoning_param = reasoning_param
        self._base_url = base_url.rstrip("/")
        self._url = self._base_url + "/chat/completions"
        self._api_key = api_key
        self._headers = dict(headers)
        self._base_headers = {"content-type": "application/json"}
        """Every call's headers but the request's own, built once; names in lower case, so
        a later one replaces an earlier one whatever its case."""
        if api_key:
            self._base_headers["authorization"] = f"Bearer {api_key}"
        self._base_headers.update({k.lower(): v for k, v in headers.items()})
        self._timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAICompatProvider({self.name!r}, url={self._url!r})"

    async def complete(self, request: CompletionRequest) -> Completion:
        with self._translate_errors(request.model):
            async with self._post(request, stream=False) as resp:
                await self._check_status(resp, request.model)
                body = await resp.read()
        data = self._decode(body, request.model)
        return self._parse_completion(data, request.model)

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        usage: Usage | None = None
        finish_reason: str | None = None
        done = False
        calls = ToolCallJoiner()
        with self._translate_errors(request.model):
            async with self._post(request, stream=True) as resp:
                await self._check_status(resp, request.model)
                if resp.content_type == "application/json":  # server ignored "stream": true
                    data = self._decode(await resp.read(), request.model)
                    completion = self._parse_completion(data, request.model)
                    if completion.content:
                        yield Chunk(delta=completion.content)
                    yield Chunk(
                        usage=completion.usage,
                        finish_reason=completion.finish_reason,
                        tool_calls=completion.tool_calls,
                    )
                    return
                async with aclosing(_sse_data(resp.content)) as events:
                    async for event in events:
                        if event == "[DONE]":
                            done = True
                            break
                        data = self._decode(event, request.model)
                        self._raise_for_error_object(data, request.model)
                        if isinstance(data.get("usage"), dict):
                            usage = _parse_usage(data["usage"])
                        delta, reason = _stream_choice(data, calls)
                        finish_reason = reason or finish_reason
                        if delta:
                            yield Chunk(delta=delta)
        if not done and finish_reason is None:
            raise InvalidResponseError(
                f"{self._label(request.model)}: stream ended early, without a finish_reason "
                "or [DONE]; the upstream dropped the answer, retry the call"
            )
        yield Chunk(
            usage=usage or Usage(cost=None, reported=False),
            finish_reason=finish_reason,
            tool_calls=calls.calls(),
        )

    async def list_models(self) -> dict[str, Any]:
        """The upstream's ``GET /models`` body (OpenRouter's carries prices)."""
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        with self._translate_errors("models"):
            async with self._get_session().get(
                self._base_url + "/models", headers={**self._headers, **headers}
            ) as resp:
                await self._check_status(resp, "models")
                body = await resp.read()
        return self._decode(body, "models")

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    # -- request ---------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            t = self._timeouts
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_read=t.read),
                # aiohttp's default caps a session at 100 connections; a busy gateway's calls to
                # one provider should not queue behind that (benchmarks/upstream_client.py).
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._session

    def _post(
        self, request: CompletionRequest, *, stream: bool
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        headers = self._base_headers
        if request.headers:
            headers = {**headers, **{k.lower(): v for k, v in request.headers.items()}}
        body = orjson.dumps(self._body(request, stream))
        return self._get_session().post(self._url, data=body, headers=headers)

    def _body(self, request: CompletionRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [_wire_message(m) for m in request.messages],
        }
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in request.tools
            ]
            if request.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = request.parallel_tool_calls
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        optional = {
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "seed": request.seed,
            "stop": list(request.stop) or None,
            "top_p": request.top_p,
            "frequency_penalty": request.frequency_penalty,
            "presence_penalty": request.presence_penalty,
            "user": request.user,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if request.reasoning is not None:
            if self._reasoning_param == "reasoning_effort":
                if request.reasoning.effort is not None:
                    body["reasoning_effort"] = request.reasoning.effort
            else:
                body["reasoning"] = request.reasoning.to_dict()
        if request.response_format is not None:
            body["response_format"] = request.response_format
        elif request.json_schema is not None and self.supports_json_schema:
            # Not "strict": strict mode rejects bounds such as maxLength on some upstreams, and
            # the engine validates the answer against the schema anyway.
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "strict": False, "schema": request.json_schema},
            }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    # -- response --------------------------------------------------------------------------

    def _label(self, model: str) -> str:
        return f"{self.name}/{model}"

    async def _check_status(self, resp: aiohttp.ClientResponse, model: str) -> None:
        if 200 <= resp.status < 300:
            return
        text = (await resp.read()).decode("utf-8", errors="replace")
        try:
            detail = _error_text(json.loads(text))
        except ValueError:
            detail = None
        detail = detail or text.strip()[:MAX_ERROR_TEXT] or resp.reason or "no error text"
        raise UpstreamError(
            f"{self._label(model)}: HTTP {resp.status}: {detail}",
            status=resp.status,
            retry_after=_retry_after(resp.headers.get("Retry-After")),
        )

    def _decode(self, body: bytes | str, model: str) -> dict[str, Any]:
        try:
            data = orjson.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            text = body if isinstance(body, str) else body.decode("utf-8", errors="replace")
            snippet = text[:200]
            raise InvalidResponseError(
                f"{self._label(model)}: upstream answered with something that is not a JSON "
                f"object: {snippet!r}; check that base_url points at an OpenAI-compatible API"
            )
        return data

    def _raise_for_error_object(self, data: dict[str, Any], model: str) -> None:
        error = data.get("error")
        if not error:
            return
        code = error.get("code") if isinstance(error, dict) else None
        if isinstance(code, str) and code.isdigit():
            code = int(code)
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
        detail = _error_text(data) or "unspecified error"
        raise UpstreamError(f"{self._label(model)}: upstream error: {detail}", status=status)

    def _parse_completion(self, data: dict[str, Any], model: str) -> Completion:
        self._raise_for_error_object(data, model)
        choice = _first_choice(data)
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(content, str | None):
            raise InvalidResponseError(
                f"{self._label(model)}: response has no choices[0].message.content; "
                "check that base_url points at an OpenAI-compatible chat completions API"
            )
        usage = data.get("usage")
        return Completion(
            content=content or "",
            usage=_parse_usage(usage)
            if isinstance(usage, dict)
            else Usage(cost=None, reported=False),
            model=model,
            finish_reason=_str_or_none(choice.get("finish_reason")),
            tool_calls=_tool_calls(message.get("tool_calls")),
        )

    @contextmanager
    def _translate_errors(self, model: str) -> Iterator[None]:
        label = self._label(model)
        try:
            yield
        except TimeoutError as exc:  # before ClientConnectionError: ServerTimeoutError is both
            t = self._timeouts
            raise UpstreamTimeout(
                f"{label}: no complete answer in time (connect {t.connect}s, read {t.read}s, "
                f"total {t.total}s); raise [timeouts] in config.toml if the model is slow"
            ) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ProviderError(
                f"{label}: connection to {self._url} failed or was dropped: "
                f"{exc or type(exc).__name__}; check base_url and that the server is up",
                reason="connection_error",
            ) from exc
        except aiohttp.ClientError as exc:
            raise ProviderError(f"{label}: HTTP client error: {exc or type(exc).__name__}") from exc


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds, from either of its forms (seconds or an HTTP date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _wire_message(message: Message) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        wire["tool_call_id"] = message.tool_call_id
    return wire


def _tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    """``message.tool_calls`` of a completion; malformed entries are dropped, not guessed at."""
    calls: list[ToolCall] = []
    for item in raw if isinstance(raw, list) else []:
        function = item.get("function") if isinstance(item, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            arguments = function.get("arguments")
            calls.append(
                ToolCall(
                    id=str(item.get("id") or f"call_{len(calls)}"),
                    name=function["name"],
                    arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
                )
            )
    return tuple(calls)


def _parse_usage(usage: dict[str, Any]) -> Usage:
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    cost = usage.get("cost")
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        reasoning_tokens=_int(reasoning),
        cost=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _error_text(data: Any) -> str | None:
    """The upstream's own words from ``{"error": {"message": ..., "metadata": {"raw": ...}}}``."""
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, str):  # e.g. Ollama: {"error": "model not found"}
        return error[:MAX_ERROR_TEXT]
    if not isinstance(error, dict):
        return None
    text = str(error.get("message") or "")
    metadata = error.get("metadata")
    raw = metadata.get("raw") if isinstance(metadata, dict) else None
    if raw:
        raw_text = raw if isinstance(raw, str) else json.dumps(raw)
        text = f"{text} ({raw_text[:MAX_ERROR_TEXT]})" if text else raw_text[:MAX_ERROR_TEXT]
    return text or None


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    return choice if isinstance(choice, dict) else {}


def _stream_choice(data: dict[str, Any], calls: ToolCallJoiner) -> tuple[str, str | None]:
    """(content delta, finish_reason) of a streamed chunk; a usage-only chunk has neither.
    Pieces of tool calls go to ``calls``."""
    choice = _first_choice(data)
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    if isinstance(delta, dict) and "tool_calls" in delta:
        calls.add(delta["tool_calls"])
    return (content if isinstance(content, str) else ""), _str_or_none(choice.get("finish_reason"))


async def _sse_data(content: aiohttp.StreamReader) -> AsyncGenerator[str, None]:
    """The ``data`` of each server-sent event; comments (``: ...``) and other fields skipped."""
    buffer = b""
    data_lines: list[str] = []
    async for block in content.iter_any():
        buffer += block
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            if not line:  # a blank line ends an event
                if data_lines:
                    yield "\n".join(data_lines)
                    data_lines = []
                continue
            field, _, value = line.partition(":")
            if field == "data":
                data_lines.append(value.removeprefix(" "))
    if buffer.strip():
        field, _, value = buffer.decode("utf-8", errors="replace").strip().partition(":")
        if field == "data":
            data_lines.append(value.removeprefix(" "))
    if data_lines:  # a last event without its blank line
        yield "\n".join(data_lines)
