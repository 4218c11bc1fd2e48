"""The trace viewer in headless Chromium: a real fused run (scripted models, a real tool call,
a judge with a full analysis) recorded by a real server with API keys, then read in the browser
as a user would — refused without a key, the login, the run list and its search, a run's page
(answer and citations, analysis, panel answers, timeline, cost chart), and a run followed live.

Needs Debian's ``chromium`` (``/usr/bin/chromium``, or ``OPENFUSION_TEST_CHROMIUM``) and the
``playwright`` package (dev extra); Playwright's own browser downloads are never used. Screenshots
go to ``test-artifacts/`` at the root of the checkout (ignored by git).
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from helpers import create_key
from pydantic import Field
from server_fixtures import RunningServer, setup_demo

from openfusion.providers.scripted import Step
from openfusion.tools import Source, Tool, ToolOutput, ToolRegistry
from openfusion.types import CompletionRequest, ToolCall

CHROMIUM = Path(os.environ.get("OPENFUSION_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
DOC = "https://books.example/austen"
QUESTION = "Who wrote Pride and Prejudice, and when was it published?"
LIVE_QUESTION = "Who wrote Emma?"
ANSWER = "Jane Austen wrote Pride and Prejudice [1]; it was published in 1813."
ANSWERS = {
    "b": "Austen, in 1811.",
    "c": "It was Jane Austen; it first appeared anonymously.",
    "a": f"Jane Austen, published 1813 ({DOC}).",
}
ANALYSIS = {
    "consensus": ["Jane Austen wrote Pride and Prejudice"],
    "contradictions": [
        {
            "topic": "Year of publication",
            "stances": [
                {"model": "Response A", "stance": "It was published in 1813."},
                {"model": "Response B", "stance": "It was published in 1811."},
            ],
        }
    ],
    "partial_coverage": [
        {"models": ["Response A", "Response C"], "point": "It first appeared anonymously"}
    ],
    "unique_insights": [{"model": "Response B", "insight": "Austen sold the copyright for £110"}],
    "blind_spots": ["None mentions the draft's first title, First Impressions"],
}
COSTS = {"a": 0.001, "a2": 0.0015, "b": 0.002, "c": 0.003, "tool": 0.01}
COSTS |= {"analysis": 0.0004, "synthesis": 0.0005}

Serve = Callable[..., RunningServer]


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (.ci/run does)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'"
    )
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


def question_of(request: CompletionRequest) -> str:
    return next(m.content for m in request.messages if m.role == "user")


def member_a(request: CompletionRequest) -> Step:
    """Looks the fact up first, then answers (two model calls and a tool call)."""
    if any(m.role == "tool" for m in request.messages):
        return Step(ANSWERS["a"], cost=COSTS["a2"])
    call = ToolCall("c1", "lookup", json.dumps({"query": "pride and prejudice author"}))
    return Step("", tool_calls=(call,), cost=COSTS["a"])


def member_c(request: CompletionRequest) -> Step:
    """Slow on the live question, so that the browser sees that run in progress."""
    delay = 4.0 if LIVE_QUESTION in question_of(request) else 0.0
    return Step(ANSWERS["c"], delay=delay, cost=COSTS["c"])


def judge(request: CompletionRequest) -> Step:
    if request.json_schema is not None:
        return Step(json.dumps(ANALYSIS), cost=COSTS["analysis"])
    return Step(ANSWER, cost=COSTS["synthesis"])


def lookup_tools() -> ToolRegistry:
    async def lookup(query: Annotated[str, Field(description="keywords")]) -> ToolOutput:
        """Look a fact up."""
        source = Source("Austen biography", DOC, "Jane Austen wrote it (1813).", "test")
        return ToolOutput(text=f"{DOC}: Jane Austen (1813).", sources=(source,), cost=COSTS["tool"])

    return ToolRegistry([Tool.from_function(lookup)])


def ask(server: RunningServer, key: str, question: str) -> str:
    body = {"model": "openfusion/demo", "messages": [{"role": "user", "content": question}]}
    request = urllib.request.Request(
        server.base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return str(response.headers["X-Generation-Id"])


def test_the_trace_viewer_in_a_browser(serve: Serve, browser: Any) -> None:
    from playwright.sync_api import expect

    demo = setup_demo(a=member_a, b=Step(ANSWERS["b"], cost=COSTS["b"]), c=member_c, judge=judge)
    _, alice = create_key(demo.settings, "alice")
    _, admin = create_key(demo.settings, "ops", admin=True)
    server = serve(demo.settings, demo.registry, tools=lookup_tools())
    run_id = ask(server, alice, QUESTION)
    ARTIFACTS.mkdir(exist_ok=True)

    # No key: the page sends the browser to the login, and the data answers 401.
    stranger = browser.new_context()
    page = stranger.new_page()
    page.goto(f"{server.url}/ui/runs/{run_id}")
    expect(page).to_have_url(f"{server.url}/ui/login?next=/ui/runs/{run_id}")
    expect(page.locator("h1")).to_have_text("Log in")
    assert QUESTION not in page.content()
    assert stranger.request.get(f"{server.url}/ui/api/runs/{run_id}").status == 401
    page.fill("#key", "ofk-not-a-key")
    page.click("button[type=submit]")
    expect(page.locator("p.error")).to_contain_text("not an active API key")
    stranger.close()

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(f"{server.url}/ui")
    page.fill("#key", admin)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{server.url}/ui")
    expect(page.locator("#who")).to_have_text("key ops (admin: every run)")

    # The run list, and its search.
    rows = page.locator("tr[data-run]")
    expect(rows).to_have_count(1)
    expect(rows.first.locator("td.q a")).to_have_text(QUESTION)
    expect(rows.first.locator(".badge")).to_have_text("ok")
    expect(rows.first.locator("td.num").first).to_have_text("$0.0184")
    page.fill("input[name=q]", "Emma")
    expect(page.locator("td.empty")).to_have_text("No run matches these filters.")
    expect(page).to_have_url(f"{server.url}/ui?q=Emma")
    page.fill("input[name=q]", "pride")
    expect(rows).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "trace-viewer-list.png"), full_page=True)

    # A run's page.
    rows.first.locator("td.q a").click()
    expect(page).to_have_url(f"{server.url}/ui/runs/{run_id}")
    expect(page.locator("#question")).to_have_text(QUESTION)
    answer = page.locator("#answer-text")
    expect(answer).to_have_text(ANSWER)  # the engine's appended "Sources:" drawn as a list
    cite = answer.locator("a.cite")
    expect(cite).to_have_text("[1]")
    expect(page.locator("#source-1 a")).to_have_attribute("href", DOC)
    expect(page.locator("#source-1 a")).to_have_text("Austen biography")
    cite.click()
    expect(page).to_have_url(f"{server.url}/ui/runs/{run_id}#source-1")

    analysis = page.locator("#analysis")
    expect(analysis.locator("ul.consensus li")).to_have_text(ANALYSIS["consensus"])
    expect(analysis.locator(".topic h4")).to_have_text("Year of publication")
    stances = analysis.locator(".topic .stance")
    expect(stances).to_have_count(2)
    expect(stances.locator("div")).to_have_text(
        ["It was published in 1813.", "It was published in 1811."]
    )
    speakers = stances.locator(".who").all_text_contents()
    assert len(set(speakers)) == 2 and set(speakers) <= {"demo/a", "demo/b", "demo/c"}
    boxes = [stances.nth(i).bounding_box() for i in range(2)]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] < boxes[1]["x"]  # side by side
    expect(analysis).to_contain_text("It first appeared anonymously")
    expect(analysis.locator(".row .chip")).to_have_count(3)  # two covering, one insight
    expect(analysis).to_contain_text("Austen sold the copyright for £110")
    expect(analysis.locator("ul.blind li")).to_have_text(ANALYSIS["blind_spots"])

    members = page.locator("#panel article.member")
    expect(members).to_have_count(3)
    expect(members.locator(".name")).to_have_text(["demo/a", "demo/b", "demo/c"])
    expect(members.locator(".content")).to_have_text([ANSWERS["a"], ANSWERS["b"], ANSWERS["c"]])
    expect(members.first.locator(".stats")).to_contain_text("1 tool call")
    cards = [members.nth(i).bounding_box() for i in range(3)]
    assert cards[0]["y"] == cards[1]["y"] == cards[2]["y"]  # side by side on a wide screen

    chart = page.locator("#timeline-chart svg")
    expect(chart.locator("rect[data-kind=stage]")).to_have_count(3)
    expect(chart.locator("rect[data-kind=member]")).to_have_count(3)
    expect(chart.locator("rect[data-kind=model]")).to_have_count(6)  # a twice, b, c, judge twice
    expect(chart.locator("rect[data-kind=tool]")).to_have_count(1)
    stage = {
        n: chart.locator(f"rect[data-kind=stage][data-name={n}]").bounding_box()
        for n in ("panel", "analysis", "synthesis")
    }
    assert stage["panel"]["x"] < stage["analysis"]["x"] < stage["synthesis"]["x"]
    assert stage["panel"]["x"] + stage["panel"]["width"] <= stage["analysis"]["x"] + 1
    tool = chart.locator("rect[data-kind=tool]").bounding_box()
    member = chart.locator("rect[data-kind=member][data-name='demo/a']").bounding_box()
    # inside its member's bar; a bar is at least 2 px wide, so a tool call ending as its member
    # did may stick out by that much
    member_end = member["x"] + member["width"]
    assert (
        member["x"] <= tool["x"] <= member_end and tool["x"] + tool["width"] <= member_end + 2 + 1
    )

    expect(page.locator("#cost h2")).to_contain_text("total $0.0184")
    bars = page.locator("#cost-by-model rect[data-name]")
    names = bars.evaluate_all("bars => bars.map(b => b.dataset.name)")
    assert names == ["tool:lookup", "demo/c", "demo/a", "demo/b", "demo/judge"]  # costliest first
    widths = bars.evaluate_all("bars => bars.map(b => b.getBBox().width)")
    assert widths == sorted(widths, reverse=True) and widths[0] > 3 * widths[-1]
    stages = page.locator("#cost-by-stage rect[data-name]")
    assert stages.evaluate_all("bars => bars.map(b => b.dataset.name)") == [
        "panel",
        "synthesis",
        "analysis",
    ]
    page.screenshot(path=str(ARTIFACTS / "trace-viewer-run.png"), full_page=True)

    # A run in progress is followed live, without reloading the page.
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(ask(server, alice, LIVE_QUESTION)))
    worker.start()
    try:
        for _ in range(100):  # until the server has recorded it as running
            listed = context.request.get(f"{server.url}/ui/api/runs?status=running").json()
            if listed["data"]:
                break
            page.wait_for_timeout(50)
        page.goto(f"{server.url}/ui?status=running")
        live_row = page.locator("tr[data-run]")
        expect(live_row).to_have_count(1)
        live_row.locator("td.q a").click()
        expect(page.locator("#question")).to_have_text(LIVE_QUESTION)
        page.evaluate("window.__sameDocument = true")
        expect(page.locator(".meta .badge")).to_have_text("running")
        expect(page.locator(".meta .live")).to_be_visible()
        slow = page.locator("#panel article.member[data-member='demo/c']")
        expect(slow.locator(".badge")).to_have_text("running")
        page.screenshot(path=str(ARTIFACTS / "trace-viewer-live.png"), full_page=True)
        expect(page.locator(".meta .badge")).to_have_text("ok", timeout=20_000)
        expect(slow.locator(".content")).to_have_text(ANSWERS["c"])
        expect(page.locator("#answer-text")).to_have_text(ANSWER)
        assert page.evaluate("window.__sameDocument") is True
    finally:
        worker.join(60)
    assert done and page.url == f"{server.url}/ui/runs/{done[0]}"

    # Logging out ends the session: the next page goes back to the login.
    page.click("#logout button")
    expect(page).to_have_url(f"{server.url}/ui/login")
    page.goto(f"{server.url}/ui")
    expect(page.locator("h1")).to_have_text("Log in")
    assert errors == []
    context.close()
