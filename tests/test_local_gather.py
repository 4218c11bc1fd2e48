"""Which requests the local provider decodes together, and how a batch samples — without the
model: the decoding itself is replaced by a recorder (the real thing is in
test_local_batch.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from openfusion import Settings
from openfusion.prompts import PromptSet
from openfusion.providers.local import LocalProvider
from openfusion.types import Chunk, CompletionRequest, Message, ToolSpec, Usage

np = pytest.importorskip("numpy")

from openfusion.providers.local_batch import Sampler  # noqa: E402  (needs numpy)


class Recorder:
    """Stands in for the worker's decoding: notes each turn's requests, answers with the
    question, and can hold the worker busy for a while."""

    def __init__(self, provider: LocalProvider, *, busy: float = 0.0) -> None:
        self.turns: list[list[str]] = []
        self.busy = busy
        provider._generate = self.alone  # type: ignore[method-assign]
        provider._generate_together = self.together  # type: ignore[method-assign]

    def alone(
        self,
        request: CompletionRequest,
        stop: threading.Event,
        put: Callable[[Chunk], None],
        **_: Any,
    ) -> None:
        self.turns.append([_label(request)])
        time.sleep(self.busy)
        put(Chunk(delta=_label(request)))
        put(Chunk(usage=Usage(), finish_reason="stop"))

    def together(self, jobs: list[Any], prompt: str) -> None:
        self.turns.append([_label(job.request) for job in jobs])
        for job in jobs:
            job.put(Chunk(delta=_label(job.request)))
            job.put(Chunk(usage=Usage(), finish_reason="stop"))
            job.put(None)


def _label(request: CompletionRequest) -> str:
    return f"{request.messages[-1].content}#{request.seed}"


def provider(settings: Settings, **options: Any) -> LocalProvider:
    """A provider whose gathering window is wide enough for a loaded machine's event loop
    (10 ms by default: a panel's requests arrive within 1-2 ms of each other)."""
    options.setdefault("gather_seconds", 0.3)
    return LocalProvider(
        {"m": lambda: Path("unused.gguf")}, PromptSet(settings.prompt_dirs), **options
    )


def ask(question: str, seed: int = 0, **kwargs: Any) -> CompletionRequest:
    return CompletionRequest("m", (Message("user", question),), seed=seed, **kwargs)


async def answers(local: LocalProvider, requests: list[CompletionRequest]) -> list[str]:
    completions = await asyncio.gather(*(local.complete(r) for r in requests))
    return [c.content for c in completions]


async def test_a_panels_short_requests_for_one_prompt_are_decoded_together(
    settings: Settings,
) -> None:
    local = provider(settings)
    recorder = Recorder(local)
    requests = [ask("Who wrote Emma?", seed=s) for s in (1, 2, 3)]
    assert await answers(local, requests) == [_label(r) for r in requests]  # each its own
    assert recorder.turns == [[_label(r) for r in requests]]


async def test_a_lone_request_is_decoded_alone(settings: Settings) -> None:
    local = provider(settings)
    recorder = Recorder(local)
    await local.complete(ask("Who wrote Emma?"))
    await local.complete(ask("Who wrote Emma?", seed=1))  # after the first, not beside it
    assert recorder.turns == [["Who wrote Emma?#0"], ["Who wrote Emma?#1"]]


async def test_different_prompts_long_answers_tools_and_json_are_not_merged(
    settings: Settings,
) -> None:
    local = provider(settings)
    recorder = Recorder(local)
    spec = ToolSpec("web_search", "Search.", {"type": "object", "properties": {}})
    requests = [
        ask("Who wrote Emma?", seed=1),
        ask("Who wrote Persuasion?", seed=2),  # another prompt
        ask("Why is the sky blue?", seed=3),  # a long answer: alone, even beside its twin
        ask("Why is the sky blue?", seed=4),
        ask("Who wrote Emma?", seed=5, tools=(spec,)),
        ask("Who wrote Emma?", seed=6, json_schema={"type": "object"}),
        ask("Who wrote Emma?", seed=7, presence_penalty=0.5),
        CompletionRequest(
            "m", (Message("system", "Be brief."), Message("user", "Who wrote Emma?")), seed=8
        ),
        ask("Who wrote Emma?", seed=9),
    ]
    await answers(local, requests)
    assert ["Who wrote Emma?#1", "Who wrote Emma?#9"] in recorder.turns
    assert sorted(len(turn) for turn in recorder.turns) == [1] * 7 + [2]


async def test_requests_that_arrive_while_the_worker_is_busy_meet(settings: Settings) -> None:
    local = provider(settings, gather_seconds=0.0)  # no window: only the busy worker gathers
    recorder = Recorder(local, busy=0.2)
    first = asyncio.create_task(local.complete(ask("Why is the sky blue?")))
    await asyncio.sleep(0.05)  # the worker is on it
    requests = [ask("Who wrote Emma?", seed=s) for s in (1, 2, 3)]
    await answers(local, requests)
    await first
    assert recorder.turns == [["Why is the sky blue?#0"], [_label(r) for r in requests]]


async def test_a_batch_holds_at_most_sequences_requests(settings: Settings) -> None:
    local = provider(settings, sequences=2)
    recorder = Recorder(local)
    requests = [ask("Who wrote Emma?", seed=s) for s in (1, 2, 3)]
    await answers(local, requests)
    assert recorder.turns == [["Who wrote Emma?#1", "Who wrote Emma?#2"], ["Who wrote Emma?#3"]]


async def test_one_sequence_turns_batching_off(settings: Settings) -> None:
    local = provider(settings, sequences=1)
    recorder = Recorder(local)
    await answers(local, [ask("Who wrote Emma?", seed=s) for s in (1, 2)])
    assert recorder.turns == [["Who wrote Emma?#1"], ["Who wrote Emma?#2"]]


def test_the_sampler_is_greedy_at_temperature_zero_and_seeded_otherwise() -> None:
    logits = np.log(np.array([0.1, 0.6, 0.3], dtype=np.float32))
    assert {Sampler(0.0, None, seed)(logits) for seed in range(20)} == {1}

    def draws(seed: int) -> list[int]:
        sampler = Sampler(1.0, None, seed)
        return [sampler(logits) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert set(draws(7)) == {0, 1, 2}


def test_the_sampler_follows_the_softmax_within_top_p_and_min_p() -> None:
    logits = np.log(np.array([0.75, 0.25, 0.0001], dtype=np.float32))
    sampler = Sampler(1.0, None, 0)
    drawn = [sampler(logits) for _ in range(4000)]
    assert 0.72 < drawn.count(0) / len(drawn) < 0.78
    assert 2 not in drawn  # below min-p (and outside top-p 0.95)
    narrow = Sampler(1.0, 0.5, 0)
    assert {narrow(logits) for _ in range(200)} == {0}  # top-p 0.5: the first token is enough
    cold = Sampler(0.25, None, 0)  # a low temperature sharpens the choice
    assert [cold(logits) for _ in range(1000)].count(0) > 950
