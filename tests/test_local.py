"""The embedded model end to end: real llama.cpp on Gemma 3 270M, a few tokens at a time."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import ANALYSIS_KEYS

from openfusion import CompletionRequest, Message, Settings, UpstreamError, load_preset
from openfusion.cli import main
from openfusion.engine.judge import Analysis, analysis_schema
from openfusion.providers.local import LocalProvider
from openfusion.types import ToolSpec

pytest.importorskip("llama_cpp", reason="the [local] extra (llama-cpp-python) is not installed")
pytestmark = pytest.mark.local_model


def ask(question: str, **kwargs: object) -> CompletionRequest:
    return CompletionRequest(
        model="gemma-3-270m",
        messages=(Message("user", question),),
        **kwargs,  # type: ignore[arg-type]
    )


async def test_short_answer_in_few_tokens(local: LocalProvider) -> None:
    completion = await local.complete(
        ask("What is the capital of Italy?", max_tokens=16, temperature=0.0)
    )
    assert completion.content
    assert "Question:" not in completion.content
    assert "Rome" in completion.content
    assert 0 < completion.usage.completion_tokens <= 16
    assert completion.usage.prompt_tokens > 20  # the few-shot prompt came along
    assert completion.usage.cost == 0.0


async def test_json_schema_output_always_parses(local: LocalProvider) -> None:
    labels = ["Response A", "Response B"]
    completion = await local.complete(
        ask(
            "Compare the responses to 'What is the capital of France?'. "
            "Response A: Paris. Response B: Lyon, since 1990.",
            max_tokens=768,  # 11 texts of <= 64 characters (a token can be one character)
            temperature=0.0,
            json_schema=analysis_schema(labels, 2, 64),
        )
    )
    analysis = Analysis.model_validate(json.loads(completion.content))
    for insight in analysis.unique_insights:
        assert insight.model in labels


async def test_generation_does_not_block_the_event_loop(local: LocalProvider) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await local.complete(ask("Name three colours.", max_tokens=24, temperature=0.0))
    task.cancel()
    # A blocked loop would tick about once; a free one ticks every 10 ms of generation.
    assert ticks >= 10


async def test_a_streamed_answer_starts_with_its_text_not_a_space(local: LocalProvider) -> None:
    for question in ("What is the capital of France?", "Explain why the sky is blue."):
        chunks = [c async for c in local.stream(ask(question, max_tokens=24, temperature=0.0))]
        text = "".join(c.delta for c in chunks)
        assert text and text == text.lstrip(), question


async def test_closing_a_stream_stops_generation(local: LocalProvider) -> None:
    # A long answer streams token by token (a short one goes out whole, once it is checked).
    question = "Write the numbers from one to one hundred."
    stream = local.stream(ask(question, max_tokens=200, temperature=0.0))
    received = [await anext(stream) for _ in range(2)]
    await stream.aclose()  # type: ignore[attr-defined]
    assert all(chunk.delta for chunk in received)
    # The single worker is free again: a new call answers rather than waiting out 200 tokens.
    completion = await local.complete(ask("What is 2 + 2?", max_tokens=8, temperature=0.0))
    assert completion.usage.completion_tokens <= 8


async def test_unknown_model_and_oversized_prompt(local: LocalProvider) -> None:
    with pytest.raises(UpstreamError, match="not configured") as info:
        await local.complete(CompletionRequest("nope", (Message("user", "hi"),)))
    assert info.value.status == 404
    with pytest.raises(UpstreamError, match="exceeds the local context"):
        await local.complete(ask("word " * 5000, max_tokens=8))


def test_ask_on_the_local_preset_end_to_end() -> None:
    """README command 1's ``ask``, through the CLI, on the default (local) preset."""
    assert "OPENROUTER_API_KEY" not in os.environ
    result = CliRunner().invoke(main, ["ask", "--json", "Who wrote Pride and Prejudice?"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "ok"
    assert len(data["responses"]) == len(load_preset("local", Settings.load()).panel)
    assert "Austen" in data["content"]
    assert set(data["analysis"]) == ANALYSIS_KEYS
    assert data["content"].strip()
    assert data["usage"]["total_tokens"] > 0
    assert data["usage"]["cost"] == 0.0


async def test_offered_tools_the_base_model_writes_a_tool_call(local: LocalProvider) -> None:
    spec = ToolSpec(
        "web_search",
        "Search for documents.",
        {
            "type": "object",
            "properties": {"query": {"type": "string"}, "max_results": {"type": "integer"}},
            "required": ["query"],
        },
    )
    completion = await local.complete(
        ask(
            "Who wrote Emma?", max_tokens=48, temperature=0.0, tools=(spec,), tool_choice="required"
        )
    )
    (call,) = completion.tool_calls
    assert call.name == "web_search"
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"query"}  # optional arguments keep their defaults
    assert arguments["query"].strip()


def test_offline_demo_searches_the_index(tmp_path: Path) -> None:
    """The README's demo: `openfusion index DOCS`, then `ask` on the local preset."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "emma.md").write_text("# Emma\n\nEmma is a novel by Jane Austen, published in 1815.\n")
    indexed = CliRunner().invoke(main, ["index", str(docs)])
    assert indexed.exit_code == 0, indexed.output
    result = CliRunner().invoke(main, ["ask", "--json", "Who wrote the novel Emma?"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["content"].startswith('"Emma is a novel by Jane Austen, published in 1815." [1]')
    assert [Path(s["url"]).name for s in data["sources"]] == ["emma.md"]
    assert Path(data["sources"][0]["url"].removeprefix("file://")).is_file()
    assert [c for r in data["responses"] for c in r["tool_calls"]] == []  # the engine searched
    unrelated = CliRunner().invoke(main, ["ask", "--json", "What is the capital of Italy?"])
    assert unrelated.exit_code == 0, unrelated.output
    answer = json.loads(unrelated.stdout)
    assert answer["sources"] == [] and "Emma" not in answer["content"]
    assert "Rome" in answer["content"]


def test_the_readme_library_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's library example, as written (it runs offline on the local preset)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    library = readme.split("## Library", 1)[1]
    code = library.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "consensus" in printed  # print(result.analysis, ...) ran


EXAMPLE_ANSWERS = ("Leo Tolstoy", "Jupiter", "1989", "Iron", "7")
LEAK_PRONE = (  # none of them is answered by an example's answer
    "What shade of blue is named after a Prussian city?",
    "Which planet has the most moons?",
    "In which year did the Soviet Union dissolve?",
    "What colour is a ripe banana?",
    "Which ocean lies between Africa and Australia?",
)


async def test_an_example_answer_is_never_taken_for_the_answer(local: LocalProvider) -> None:
    """Issue 10: a question about a shade of blue came back as the prompt's example answer.
    These questions draw the 270M model to the examples' answers; none may come back."""
    for question in LEAK_PRONE:
        completion = await local.complete(ask(question, temperature=0.0))
        assert completion.content.rstrip(".") not in EXAMPLE_ANSWERS, question
        assert "\n" not in completion.content


def test_a_tool_call_written_as_text_never_becomes_the_answer() -> None:
    """Issue 10: members wrote tool-call JSON as their answer and it reached the judge. A
    conversation whose earlier answers were tool calls draws the 270M model to write one again
    (no tools are offered); on the local preset that is a failed member, never the answer."""
    call = '{"tool": "web_search", "arguments": {"query": "%s"}}'
    messages = (
        Message("user", "Who founded the city of Rome?"),
        Message("assistant", call % "founder of Rome"),
        Message("user", "Who discovered penicillin?"),
        Message("assistant", call % "discovery of penicillin"),
        Message("user", "Who invented the telephone?"),
    )
    result = asyncio.run(_run_local(messages))
    assert result.failed_models, "the conversation no longer draws tool JSON: make it draw some"
    assert {f.reason for f in result.failed_models} == {"not_an_answer"}
    assert all(not r.content.lstrip().startswith("{") for r in result.responses)
    assert not result.content.lstrip().startswith("{")


async def _run_local(messages: tuple[Message, ...]) -> Any:
    from openfusion import Fusion

    async with Fusion.from_preset("local", recorder=None) as fusion:
        return await fusion.run(messages, temperature=0)
