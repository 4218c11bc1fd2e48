"""ToolSettings (the [tools] table) and what default_tools builds from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from openfusion.settings import Settings, describe_validation_error
from openfusion.tools import ToolSettings, corpus_path, default_tools


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(config_dir=tmp_path / "config", cache_dir=tmp_path / "cache")


def test_defaults() -> None:
    ts = ToolSettings()
    assert (ts.search_backend, ts.max_results, ts.code, ts.output_max_chars) == (
        "corpus",
        5,
        "auto",
        8000,
    )
    assert (ts.fetch_max_bytes, ts.fetch_timeout, ts.fetch_allow_hosts) == (2 * 1024 * 1024, 15, ())
    assert (ts.code_timeout, ts.code_memory_mb) == (10, 256)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"serch_backend": "corpus"}, "serch_backend: Extra inputs are not permitted"),
        ({"search_backend": "google"}, "search_backend: Input should be 'corpus'"),
        ({"max_results": 21}, "max_results: Input should be less than or equal to 20"),
        ({"code": "docker"}, "code: Input should be 'auto'"),
        ({"fetch_allow_hosts": ["not a host!"]}, "neither a host name, an IP address nor a CIDR"),
    ],
)
def test_bad_values_name_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ToolSettings.model_validate(data)
    assert message in describe_validation_error(caught.value)


def test_allow_hosts_are_normalised() -> None:
    ts = ToolSettings.model_validate(
        {"fetch_allow_hosts": ["127.0.0.1", "[::1]", "10.0.0.0/8", "Intranet.Example."]}
    )
    assert ts.fetch_allow_hosts == ("127.0.0.1", "::1", "10.0.0.0/8", "intranet.example")


def test_corpus_path_defaults_to_the_cache_dir(settings: Settings, tmp_path: Path) -> None:
    assert corpus_path(settings, ToolSettings()) == tmp_path / "cache" / "corpus.sqlite"
    own = tmp_path / "elsewhere.sqlite"
    assert corpus_path(settings, ToolSettings(corpus_path=own)) == own


def test_default_tools_and_their_schemas(settings: Settings) -> None:
    tools = default_tools(settings, ToolSettings(code="off", max_results=7, output_max_chars=500))
    assert tools.names == ("web_search", "web_fetch")
    assert tools.output_max_chars == 500
    search, fetch = tools.specs()
    assert search.parameters["required"] == ["query"]
    assert search.parameters["properties"]["max_results"]["default"] == 7
    assert search.parameters["properties"]["max_results"]["maximum"] == 20
    assert fetch.parameters["required"] == ["url"]
    assert "cite" in search.description and "cite" in fetch.description


def test_deny_hosts_are_host_names() -> None:
    ts = ToolSettings.model_validate({"deny_hosts": ["HuggingFace.co.", "hf.co"]})
    assert ts.deny_hosts == ("huggingface.co", "hf.co")
    with pytest.raises(ValidationError, match="not a host name"):
        ToolSettings.model_validate({"deny_hosts": ["https://hf.co/x"]})
