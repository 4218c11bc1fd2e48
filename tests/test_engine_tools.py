"""Panel members with tools: the tool loop, its cap, tools off, and verified citations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import Field

from openfusion import Fusion, PanelSlot, Preset, ProviderRegistry, Settings
from openfusion.engine import ToolEvent
from openfusion.presets import ToolUse
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.tools import Source, Tool, ToolOutput, ToolRegistry, build_index
from openfusion.types import ToolCall

ANALYSIS = json.dumps(
    {
        "consensus": ["Austen"],
        "contradictions": [],
        "partial_coverage": [],
        "unique_insights": [],
        "blind_spots": [],
    }
)
DOC = "https://books.example/austen"
Query = Annotated[str, Field(description="keywords")]


def lookup_registry(calls: list[str]) -> ToolRegistry:
    async def lookup(query: Query) -> ToolOutput:
        """Look a fact up."""
        calls.append(query)
        source = Source("Austen biography", DOC, "Jane Austen wrote Pride and Prejudice.", "test")
        return ToolOutput(text=f"{DOC}: Jane Austen wrote it (1813).", sources=(source,), cost=0.01)

    return ToolRegistry([Tool.from_function(lookup)])


def search_call(query: str = "pride and prejudice author") -> ToolCall:
    return ToolCall("c1", "lookup", json.dumps({"query": query}))


def make(
    settings: Settings,
    script: dict[str, Any],
    tools: ToolRegistry | None,
    use: ToolUse | None = None,
    panel: tuple[str, ...] = ("s/a",),
) -> tuple[Fusion, ScriptedProvider]:
    provider = ScriptedProvider(script)
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    preset = Preset(
        "t", tuple(PanelSlot(m) for m in panel), judge="s/judge", tools=use or ToolUse()
    )
    return Fusion(preset, settings=settings, registry=registry, tools=tools), provider


async def test_member_searches_then_answers(settings: Settings) -> None:
    queries: list[str] = []
    script = {
        "a": [Step("", tool_calls=(search_call(),), cost=0.001), Step(f"Austen, see {DOC}.")],
        "judge": [Step(ANALYSIS), Step("Jane Austen wrote it [1].")],
    }
    fusion, provider = make(settings, script, lookup_registry(queries))
    events = [e async for e in fusion.stream("Who wrote Pride and Prejudice?")]
    result = events[-1].result  # type: ignore[union-attr]
    assert queries == ["pride and prejudice author"]
    (member,) = result.responses
    (record,) = member.tool_calls
    assert (record.name, json.loads(record.arguments), record.sources) == (
        "lookup",
        {"query": "pride and prejudice author"},
        (DOC,),
    )
    assert "UNTRUSTED-DATA" in record.result  # the model saw fenced data
    assert record.cost == 0.01
    assert member.usage.cost == pytest.approx(0.001 + 0.01)  # model calls plus the tool
    tool_events = [e for e in events if isinstance(e, ToolEvent)]
    assert [(e.name, e.tool, e.ok) for e in tool_events] == [("s/a", "lookup", True)]
    second = [c for c in provider.calls if c.model == "a"][1]
    assert second.messages[-1].role == "tool"
    assert second.messages[-2].tool_calls == (search_call(),)
    system = provider.calls[0].messages[0].content
    assert "lookup" in system  # the panel prompt names the tools


async def test_tool_calls_are_capped_at_16(settings: Settings) -> None:
    queries: list[str] = []
    script = {
        "a": lambda request: (
            Step("", tool_calls=(search_call(),)) if request.tools else Step("Done searching.")
        ),
        "judge": [Step(ANALYSIS), Step("Final.")],
    }
    fusion, provider = make(settings, script, lookup_registry(queries))
    result = await fusion.run("q", max_tool_calls=50)
    assert len(queries) == 16
    assert len(result.responses[0].tool_calls) == 16
    member_calls = [c for c in provider.calls if c.model == "a"]
    assert member_calls[-1].tools == ()  # the last turn offers no tools: it must answer
    assert result.responses[0].content == "Done searching."


async def test_empty_tool_list_turns_tools_off(settings: Settings) -> None:
    queries: list[str] = []
    script = {"a": Step("No tools."), "judge": [Step(ANALYSIS), Step("Final.")]}
    fusion, provider = make(settings, script, lookup_registry(queries))
    await fusion.run("q", tools=[])
    assert provider.calls[0].tools == ()
    assert "lookup" not in provider.calls[0].messages[0].content
    off, provider = make(settings, script, lookup_registry(queries), ToolUse(enabled=True))
    await off.run("q", max_tool_calls=0)
    assert provider.calls[0].tools == ()


async def test_required_first_call(settings: Settings) -> None:
    script = {
        "a": [Step("", tool_calls=(search_call(),)), Step("Answer.")],
        "judge": [Step(ANALYSIS), Step("Final.")],
    }
    fusion, provider = make(settings, script, lookup_registry([]), ToolUse(first_call="required"))
    await fusion.run("q")
    member_calls = [c for c in provider.calls if c.model == "a"]
    assert [c.tool_choice for c in member_calls] == ["required", "auto"]


async def test_citations_are_checked_against_retrieved_sources(settings: Settings) -> None:
    answer = "Jane Austen wrote it [1], in 1813 [3]."
    script = {
        "a": [Step("", tool_calls=(search_call(),)), Step(f"See {DOC} and https://made.up/x.")],
        "judge": [Step(ANALYSIS), Step(answer)],
    }
    fusion, _ = make(settings, script, lookup_registry([]))
    result = await fusion.run("q")
    assert result.sources == ({"number": 1, "title": "Austen biography", "url": DOC},)
    (annotation,) = result.annotations
    cited = annotation["url_citation"]
    assert cited["url"] == DOC
    assert answer[cited["start_index"] : cited["end_index"]] == "[1]"
    assert result.content == f"{answer}\n\nSources:\n[1] Austen biography — {DOC}"
    assert {"where": "answer", "citation": "[3]"} in result.unverified_citations
    assert {"where": "s/a", "citation": "https://made.up/x"} in result.unverified_citations
    assert result.analysis is not None
    assert set(result.analysis) == set(json.loads(ANALYSIS))  # unverified: beside it


async def test_streamed_answer_includes_the_sources_list(settings: Settings) -> None:
    from openfusion.engine import AnswerDelta, Done

    script = {
        "a": [Step("", tool_calls=(search_call(),)), Step("Austen.")],
        "judge": [Step(ANALYSIS), Step("Austen [1].")],
    }
    fusion, _ = make(settings, script, lookup_registry([]))
    events = [e async for e in fusion.stream("q")]
    streamed = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    done = events[-1]
    assert isinstance(done, Done)
    assert streamed == done.result.content
    assert streamed.endswith(f"[1] Austen biography — {DOC}")


async def test_web_search_is_offered_once_the_corpus_is_indexed(
    settings: Settings, tmp_path: Path
) -> None:
    script = {"a": Step("A."), "judge": [Step(ANALYSIS), Step("Final.")]}
    preset_tools = ToolUse(allow=("web_search",))
    fusion, _ = make(settings, script, None, preset_tools)
    assert fusion.tools is None  # no index yet: nothing to search
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "austen.md").write_text("# Austen\n\nJane Austen wrote Pride and Prejudice.\n")
    build_index([docs], settings.cache_dir / "corpus.sqlite")
    fusion, provider = make(settings, script, None, preset_tools)
    assert fusion.tools is not None
    assert fusion.tools.names == ("web_search",)
    await fusion.run("q")
    assert [t.name for t in provider.calls[0].tools] == ["web_search"]


async def test_a_member_failing_after_a_search_still_counts_its_spend(settings: Settings) -> None:
    script = {
        "a": [Step("", tool_calls=(search_call(),), cost=0.001), Step(status=400, error="nope")],
        "judge": [Step(ANALYSIS), Step("Final.")],
    }
    fusion, _ = make(settings, script, lookup_registry([]), panel=("s/a", "s/b"))
    fusion.registry.provider("s").script["b"] = Step("B answers.", cost=0.002)  # type: ignore[attr-defined, index]
    result = await fusion.run("q")
    (failure,) = result.failed_models
    assert (failure.name, failure.message) == ("s/a", "nope")
    assert failure.usage.cost == pytest.approx(0.001 + 0.01)  # the first turn and its search
    assert result.cost_details["panel"] == pytest.approx(0.001 + 0.01 + 0.002)


async def test_the_judge_checks_claims_with_the_tools_when_the_preset_allows(
    settings: Settings,
) -> None:
    queries: list[str] = []

    def judge(request: Any) -> Step:
        if request.json_schema is None:
            return Step("Jane Austen [1].")
        if request.messages[-1].role == "tool":  # it checked: now the analysis
            return Step(ANALYSIS)
        return Step("", tool_calls=(search_call("who wrote it, checked"),))

    script = {"a": Step("Austen."), "judge": judge}
    use = ToolUse(judge=True)
    fusion, provider = make(settings, script, lookup_registry(queries), use)
    events = [e async for e in fusion.stream("Who wrote Pride and Prejudice?")]
    result = events[-1].result  # type: ignore[union-attr]
    assert queries == ["who wrote it, checked"]
    assert result.analysis is not None and result.failure_reason is None
    # What the judge retrieved is a source like the panel's, and citable.
    assert result.sources == ({"number": 1, "title": "Austen biography", "url": DOC},)
    assert result.content.startswith("Jane Austen [1].")
    assert [(e.name, e.tool) for e in events if isinstance(e, ToolEvent)] == [("judge", "lookup")]
    first = next(c for c in provider.calls if c.model == "judge")
    assert [t.name for t in first.tools] == ["lookup"]
    assert "lookup" in first.messages[0].content  # the prompt tells it so
    assert all(c.temperature == 0.0 for c in provider.calls if c.json_schema is not None)

    plain, provider = make(settings, script, lookup_registry([]), ToolUse(judge=False))
    await plain.run("q")
    assert all(c.tools == () for c in provider.calls if c.model == "judge")
