"""No configured secret in what an upstream says back: the ``Redactor`` alone, then a real
loopback upstream that echoes the ``Authorization`` header it got and prints the key masked,
behind a real server — error bodies, ``failed_models``, stream error events (chat and Responses
API), the run record and the log must hold neither form."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import serve_app
from server_fixtures import RunningServer, demo_provider, write_config, write_preset

from openfusion.providers import ProviderRegistry
from openfusion.redact import REDACTED, Redactor
from openfusion.settings import ProviderConfig, Settings

KEY = "sk-or-ca5f0e7d3b2a91c4e6f8d0b2a4c6e8f05678"
OTHER_KEY = "sk-or-zz0000000000000000000000000000009999"


def masked(key: str) -> str:
    """The form providers print: the first 8 characters, stars, the last 4."""
    return f"{key[:8]}{'*' * 10}{key[-4:]}"


REDACTION_CASES = [
    (f"bad key {KEY}.", f"bad key {REDACTED}."),
    (f"Incorrect API key provided: {masked(KEY)}", f"Incorrect API key provided: {REDACTED}"),
    (f"key {KEY[:6]}...{KEY[-4:]} is invalid", f"key {REDACTED} is invalid"),
    (f"key {KEY[:9]}xxxxxxxx{KEY[-3:]}", f"key {REDACTED}"),
    (f"key {KEY[:5]}••••{KEY[-2:]}", f"key {REDACTED}"),
    (f'{{"auth": "Bearer {KEY}"}}', f'{{"auth": "Bearer {REDACTED}"}}'),
    ("Authorization: bearer abc123def456ghi", f"Authorization: bearer {REDACTED}"),
    # every spelling the quick pre-checks must let through to the regexes
    (f"key {KEY[:9]}XxXxX{KEY[-3:]}", f"key {REDACTED}"),
    (f"key {KEY[:7]}…{KEY[-4:]}", f"key {REDACTED}"),
    ("AUTHORIZATION: BEARER ABC123DEF456GHI", f"AUTHORIZATION: BEARER {REDACTED}"),
]


@pytest.mark.parametrize(("text", "expected"), REDACTION_CASES)
def test_secrets_and_their_masked_forms_are_redacted(text: str, expected: str) -> None:
    assert Redactor([KEY])(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        f"another key's mask: {masked(OTHER_KEY)}",  # not a form of a configured key
        "Wait... the answer is sk-*** or so",  # shows too little to be any key
        "send a Bearer token in the header",  # prose, not a credential
        "xxxxxxxx and ******** and ........",
    ],
)
def test_other_text_is_left_alone(text: str) -> None:
    assert Redactor([KEY])(text) == text


@pytest.mark.parametrize(("text", "expected"), REDACTION_CASES)
def test_a_record_is_redacted_wherever_its_strings_are(text: str, expected: str) -> None:
    """``value`` tests a record serialised and walks it only when that finds something: each
    case deep in a record orjson serialises (a time, an integer key), and in one it refuses
    (an integer past 64 bits: walked at once)."""
    serialisable = {"id": 1, "at": datetime(2026, 12, 1), 7: ("ok", [{"x": text}])}
    assert Redactor([KEY]).value(serialisable)[7][1][0]["x"] == expected
    refused = {"big": 2**70, "nested": [{"x": text}]}
    assert Redactor([KEY]).value(refused) == {"big": 2**70, "nested": [{"x": expected}]}


def test_a_secret_that_json_escapes_is_still_found_in_a_record() -> None:
    secret = 'pa"ss\\word-1234'
    assert Redactor([secret]).value({"a": [f"it is {secret}"]}) == {"a": [f"it is {REDACTED}"]}


def test_a_clean_record_is_returned_as_it_is() -> None:
    record = {"answer": "Paris. The capital of France — “Paris”…", "n": [1, 2.5, None]}
    assert Redactor().value(record) is record  # no secret: an ellipsis is no mask
    assert Redactor([KEY]).value(record) == record  # with one, "…" could be: walked, same


def test_secrets_come_from_the_settings(tmp_path: Any) -> None:
    providers = {
        "up": ProviderConfig(type="openai_compat", base_url="http://x", api_key_env="UP_KEY_VAR"),
        "hdr": ProviderConfig(
            type="openai_compat",
            base_url="http://x",
            headers={"Authorization": "Token t0k3n-abc", "X-Title": "openfusion-app"},
        ),
    }
    settings = Settings(
        config_dir=tmp_path,
        cache_dir=tmp_path,
        providers=providers,
        env={
            "UP_KEY_VAR": "upstream-secret-1",
            "TAVILY_API_KEY": "tvly-secret-22",
            "GITHUB_TOKEN": "ghp_secret_333",
            "HOME": "/home/someone",
            "SHORT_KEY": "1",
        },
    )
    redact = Redactor.from_settings(settings)
    assert set(redact.secrets) == {
        "upstream-secret-1",
        "tvly-secret-22",
        "ghp_secret_333",
        "Token t0k3n-abc",
        "t0k3n-abc",
    }
    assert redact.value({"a": ["x tvly-secret-22", ("ghp_secret_333",)], "n": 3}) == {
        "a": [f"x {REDACTED}", [REDACTED]],
        "n": 3,
    }


# -- through a real server ------------------------------------------------------------------


@pytest.fixture
async def echo_upstream() -> AsyncIterator[str]:
    """An OpenAI-compatible upstream that refuses every call, quoting the Authorization header
    it was sent and the key in masked form (as a misconfigured proxy and some providers do)."""

    async def refuse(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        message = f"invalid credentials: you sent {auth!r}; the key {masked(key)} is not valid"
        body = {"error": {"message": message, "metadata": {"raw": f"Authorization: {auth}"}}}
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    async with serve_app(app) as url:
        yield url + "/v1"


@pytest.fixture
def leaky_server(serve: Any, echo_upstream: str, monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    """A server with provider ``leaky`` (key ``KEY``) at the echoing upstream, and preset
    ``mixed``: panel ``leaky/m``, ``demo/a``, ``demo/b``, judge ``demo/judge``."""
    monkeypatch.setenv("LEAKY_API_KEY", KEY)
    write_config(
        f'[providers.leaky]\ntype = "openai_compat"\nbase_url = "{echo_upstream}"\n'
        'api_key_env = "LEAKY_API_KEY"\n'
    )
    write_preset("mixed", "demo/judge", ["leaky/m", "demo/a", "demo/b"])
    settings = Settings.load()
    registry = ProviderRegistry(settings)
    registry.register("demo", demo_provider())
    return serve(settings, registry)  # type: ignore[no-any-return]


def assert_clean(text: str) -> None:
    assert KEY not in text
    assert masked(KEY) not in text
    assert KEY[-12:] not in text  # no long piece of it either


async def request(server: RunningServer, path: str, body: dict[str, Any]) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.base_url + path, json=body) as resp,
    ):
        return resp.status, await resp.text()


USER = [{"role": "user", "content": "Who wrote Pride and Prejudice?"}]


async def test_an_echoed_key_reaches_no_client_record_or_log(
    leaky_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    # a plain call: the upstream's error becomes the error body
    status, text = await request(
        leaky_server, "/chat/completions", {"model": "leaky/m", "messages": USER}
    )
    assert status == 502, text
    error = json.loads(text)["error"]
    assert "invalid credentials" in error["message"] and REDACTED in error["message"]
    texts.append(text)

    # the same, streamed (chat and Responses API): the error travels as an event
    status, text = await request(
        leaky_server, "/chat/completions", {"model": "leaky/m", "messages": USER, "stream": True}
    )
    assert status == 200 and '"error"' in text and "invalid credentials" in text, text
    texts.append(text)
    status, text = await request(
        leaky_server, "/responses", {"model": "leaky/m", "input": "Who?", "stream": True}
    )
    assert status == 200 and "invalid credentials" in text, text
    texts.append(text)

    # a fusion: the member's failure is listed with its message
    status, text = await request(
        leaky_server, "/chat/completions", {"model": "openfusion/mixed", "messages": USER}
    )
    assert status == 200, text
    failed = json.loads(text)["fusion"]["failed_models"]
    assert [f["model"] for f in failed] == ["leaky/m"]
    assert "invalid credentials" in failed[0]["message"] and REDACTED in failed[0]["message"]
    texts.append(text)

    # every run record, spans and all
    async with aiohttp.ClientSession() as session:
        async with session.get(leaky_server.base_url + "/fusion/runs") as resp:
            runs = (await resp.json())["data"]
        assert len(runs) == 4
        for run in runs:
            async with session.get(f"{leaky_server.base_url}/fusion/runs/{run['id']}") as resp:
                record = await resp.text()
            assert "invalid credentials" in record
            texts.append(record)

    texts.append(caplog.text)
    for text in texts:
        assert_clean(text)
