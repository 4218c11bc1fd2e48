"""The OpenAI-compatible adapter against a real loopback HTTP upstream (tests/upstream_mock.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from upstream_mock import MockUpstream, Reply

from openfusion.errors import (
    InvalidResponseError,
    MissingAPIKeyError,
    ProviderError,
    UpstreamError,
    UpstreamTimeout,
)
from openfusion.providers.base import Provider, collect
from openfusion.providers.openai_compat import OpenAICompatProvider, create
from openfusion.settings import ProviderConfig, Settings, Timeouts
from openfusion.types import Chunk, CompletionRequest, Message, Usage

SECRET = "sk-secret-123"
DEPTH_HEADER = "x-openrouter-fusion-depth"


def make_provider(
    base_url: str, tmp_path: Path, *, timeouts: Timeouts | None = None, **options: object
) -> OpenAICompatProvider:
    config = ProviderConfig(
        type="openai_compat", base_url=base_url, api_key_env="MOCK_KEY", options=options
    )
    settings = Settings(
        config_dir=tmp_path,
        cache_dir=tmp_path,
        timeouts=timeouts or Timeouts(),
        env={"MOCK_KEY": SECRET},
    )
    return create("mock", config, settings)


def ask(text: str = "Hi", model: str = "m", **kwargs: object) -> CompletionRequest:
    return CompletionRequest(model=model, messages=(Message("user", text),), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def up() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as upstream:
        yield upstream


@pytest.fixture
async def provider(up: MockUpstream, tmp_path: Path) -> AsyncIterator[OpenAICompatProvider]:
    p = make_provider(up.base_url, tmp_path)
    yield p
    await p.aclose()


async def error_of(provider: OpenAICompatProvider, *, stream: bool = False) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        if stream:
            async for _ in provider.stream(ask()):
                pass
        else:
            await provider.complete(ask())
    assert SECRET not in str(info.value)
    return info.value


async def test_is_a_provider(provider: OpenAICompatProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.supports_json_schema is True


async def test_complete_content_usage_and_cost(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(content="Paris.", cost=0.00123, reasoning_tokens=7)
    completion = await provider.complete(ask("Capital of France?", temperature=0.2, seed=1))
    assert completion.content == "Paris."
    assert completion.finish_reason == "stop"
    assert completion.model == "m"
    assert completion.usage == Usage(
        prompt_tokens=10, completion_tokens=5, reasoning_tokens=7, cost=0.00123
    )
    body = up.requests[0].json
    assert body["model"] == "m"
    assert body["messages"] == [{"role": "user", "content": "Capital of France?"}]
    assert body["temperature"] == 0.2
    assert body["seed"] == 1
    assert "max_tokens" not in body and "stop" not in body and "stream" not in body
    assert "response_format" not in body


async def test_cost_is_unknown_when_not_reported(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    completion = await provider.complete(ask())
    assert completion.usage.cost is None
    assert completion.usage.prompt_tokens == 10


async def test_missing_usage_is_zero_tokens_unknown_cost(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(usage=None)
    completion = await provider.complete(ask())
    assert completion.usage == Usage(cost=None, reported=False)


async def test_null_content_is_empty_string(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(
        body='{"choices": [{"message": {"role": "assistant", "content": null}, '
        '"finish_reason": "length"}]}'
    )
    completion = await provider.complete(ask())
    assert completion.content == ""
    assert completion.finish_reason == "length"


async def test_auth_and_request_headers_reach_upstream(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    await provider.complete(ask(headers={DEPTH_HEADER: "1"}))
    headers = {k.lower(): v for k, v in up.requests[0].headers.items()}
    assert headers["authorization"] == f"Bearer {SECRET}"
    assert headers[DEPTH_HEADER] == "1"


async def test_config_headers_sent_and_no_auth_without_key(
    up: MockUpstream, tmp_path: Path
) -> None:
    config = ProviderConfig(type="openai_compat", base_url=up.base_url, headers={"X-Title": "t"})
    p = create("ollama", config, Settings(config_dir=tmp_path, cache_dir=tmp_path))
    try:
        await p.complete(ask())
    finally:
        await p.aclose()
    headers = {k.lower(): v for k, v in up.requests[0].headers.items()}
    assert headers["x-title"] == "t"
    assert "authorization" not in headers


async def test_json_schema_becomes_response_format(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    await provider.complete(ask(json_schema=schema, max_tokens=50, stop=("END",)))
    body = up.requests[0].json
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "strict": False, "schema": schema},
    }
    assert body["max_tokens"] == 50
    assert body["stop"] == ["END"]


async def test_json_schema_option_off(up: MockUpstream, tmp_path: Path) -> None:
    p = make_provider(up.base_url, tmp_path, json_schema=False)
    try:
        assert p.supports_json_schema is False
        await p.complete(ask(json_schema={"type": "object"}))
    finally:
        await p.aclose()
    assert "response_format" not in up.requests[0].json


async def test_stream_reassembles_content(up: MockUpstream, provider: OpenAICompatProvider) -> None:
    up.default = Reply(content="The quick brown fox jumps.", cost=0.5, chunk_size=3)
    chunks: list[Chunk] = [c async for c in provider.stream(ask(headers={DEPTH_HEADER: "2"}))]
    assert len(chunks) > 3
    assert "".join(c.delta for c in chunks) == "The quick brown fox jumps."
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage == Usage(prompt_tokens=10, completion_tokens=5, cost=0.5)
    assert chunks[-1].finish_reason == "stop"
    body = up.requests[0].json
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert up.requests[0].headers[DEPTH_HEADER] == "2"


async def test_stream_without_usage_ends_with_unknown_cost(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(content="abc", usage=None)
    chunks = [c async for c in provider.stream(ask())]
    assert "".join(c.delta for c in chunks) == "abc"
    assert chunks[-1].usage == Usage(cost=None, reported=False)
    assert chunks[-1].finish_reason == "stop"


async def test_stream_skips_sse_comments(up: MockUpstream, provider: OpenAICompatProvider) -> None:
    up.default = Reply(content="abcdefghij", chunk_size=2, comments=True)
    completion = await collect(provider.stream(ask()), "m")
    assert completion.content == "abcdefghij"
    assert completion.usage.completion_tokens == 5


async def test_stream_consumer_can_stop_early(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(content="x" * 400, chunk_size=1)
    stream = provider.stream(ask())
    first = await anext(stream)  # type: ignore[call-overload]
    assert first.delta == "x"
    await stream.aclose()  # type: ignore[attr-defined]
    assert (await provider.complete(ask())).content == "x" * 400  # the session still works


@pytest.mark.parametrize(
    ("status", "reason"),
    [(429, "rate_limited"), (500, "upstream_error"), (402, "insufficient_credits")],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_http_errors_keep_upstream_message(
    up: MockUpstream, provider: OpenAICompatProvider, status: int, reason: str, stream: bool
) -> None:
    up.default = Reply(
        status=status,
        error={"code": status, "message": "Upstream says no", "metadata": {"raw": "raw detail"}},
    )
    exc = await error_of(provider, stream=stream)
    assert isinstance(exc, UpstreamError)
    assert exc.status == status
    assert exc.reason == reason
    assert "Upstream says no" in exc.message
    assert "raw detail" in exc.message
    assert "mock/m" in exc.message


async def test_http_error_with_plain_text_body(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(status=503, body="Service Unavailable: " + "z" * 2000)
    exc = await error_of(provider)
    assert isinstance(exc, UpstreamError)
    assert exc.status == 503
    assert "Service Unavailable" in exc.message
    assert len(exc.message) < 700


async def test_error_object_in_200_body(up: MockUpstream, provider: OpenAICompatProvider) -> None:
    up.default = Reply(status=200, error={"code": 429, "message": "Provider rate limited"})
    exc = await error_of(provider)
    assert isinstance(exc, UpstreamError)
    assert exc.status == 429
    assert exc.reason == "rate_limited"
    assert "Provider rate limited" in exc.message


async def test_error_object_without_code_is_502(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(status=200, error={"message": "Provider returned error"})
    exc = await error_of(provider)
    assert isinstance(exc, UpstreamError)
    assert exc.status == 502


async def test_error_event_in_stream(up: MockUpstream, provider: OpenAICompatProvider) -> None:
    event = '{"error": {"code": 502, "message": "Provider disconnected"}, "choices": []}'
    up.default = Reply(
        body=f'data: {{"choices": [{{"delta": {{"content": "Hi"}}}}]}}\n\ndata: {event}\n\n'
    )
    exc = await error_of(provider, stream=True)
    assert isinstance(exc, UpstreamError)
    assert exc.status == 502
    assert "Provider disconnected" in exc.message


@pytest.mark.parametrize("body", ["<html>Bad Gateway</html>", "[1, 2]", '{"choices": []}'])
async def test_not_a_completion_is_invalid_response(
    up: MockUpstream, provider: OpenAICompatProvider, body: str
) -> None:
    up.default = Reply(body=body)
    exc = await error_of(provider)
    assert isinstance(exc, InvalidResponseError)
    assert exc.reason == "invalid_response"


async def test_stream_cut_midway_is_invalid_response(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(content="a long answer that never ends", chunk_size=2, cut_after=3)
    deltas: list[str] = []
    with pytest.raises(InvalidResponseError, match="ended early"):
        async for chunk in provider.stream(ask()):
            deltas.append(chunk.delta)
    assert "".join(deltas) == "a long"


async def test_connection_reset_is_connection_error(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(reset=True)
    exc = await error_of(provider)
    assert type(exc) is ProviderError
    assert exc.reason == "connection_error"


async def test_stream_connection_reset_is_connection_error(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    up.default = Reply(content="abcdefgh", chunk_size=2, cut_after=2, reset=True)
    exc = await error_of(provider, stream=True)
    assert exc.reason == "connection_error"


async def test_unreachable_server_is_connection_error(tmp_path: Path) -> None:
    async with MockUpstream() as upstream:
        base_url = upstream.base_url
    p = make_provider(base_url, tmp_path)  # the port is closed now
    try:
        exc = await error_of(p)
    finally:
        await p.aclose()
    assert exc.reason == "connection_error"


@pytest.mark.parametrize("stream", [False, True])
async def test_timeout(up: MockUpstream, tmp_path: Path, stream: bool) -> None:
    up.default = Reply(delay=2.0)
    p = make_provider(up.base_url, tmp_path, timeouts=Timeouts(total=0.2))
    try:
        exc = await error_of(p, stream=stream)
    finally:
        await p.aclose()
    assert isinstance(exc, UpstreamTimeout)
    assert exc.reason == "timeout"


async def test_stall_mid_stream_is_timeout(up: MockUpstream, tmp_path: Path) -> None:
    up.default = Reply(content="abcdef", chunk_size=1, chunk_delay=2.0)
    p = make_provider(up.base_url, tmp_path, timeouts=Timeouts(read=0.2))
    try:
        exc = await error_of(p, stream=True)
    finally:
        await p.aclose()
    assert isinstance(exc, UpstreamTimeout)


def test_missing_key_names_the_variable(tmp_path: Path) -> None:
    config = ProviderConfig(
        type="openai_compat", base_url="http://127.0.0.1:9/v1", api_key_env="MOCK_KEY"
    )
    with pytest.raises(MissingAPIKeyError) as info:
        create("mock", config, Settings(config_dir=tmp_path, cache_dir=tmp_path, env={}))
    assert "MOCK_KEY" in str(info.value)
    assert info.value.env_var == "MOCK_KEY"


def test_missing_base_url_is_config_error(tmp_path: Path) -> None:
    from openfusion.errors import ConfigError

    settings = Settings(config_dir=tmp_path, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"'nobase'.*base_url"):
        create("nobase", ProviderConfig(type="openai_compat"), settings)


async def test_secret_not_in_repr_or_errors(
    up: MockUpstream, provider: OpenAICompatProvider
) -> None:
    assert SECRET not in repr(provider)
    up.default = Reply(status=401, error={"code": 401, "message": "bad key"})
    exc = await error_of(provider)
    assert SECRET not in exc.message and SECRET not in repr(exc)
