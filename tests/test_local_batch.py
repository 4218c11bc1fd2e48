"""Short answers decoded together (one llama.cpp context, one sequence per answer) against the
same requests decoded one at a time, on the real model (Gemma 3 270M)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from openfusion import Completion, CompletionRequest, Message
from openfusion.providers import local_batch
from openfusion.providers.local import LocalProvider

pytest.importorskip("llama_cpp", reason="the [local] extra (llama-cpp-python) is not installed")
pytestmark = pytest.mark.local_model

QUESTIONS = (
    "Who wrote Pride and Prejudice?",
    "What is the capital of Australia?",
    "Who composed the opera The Magic Flute?",
    "What is the largest ocean on Earth?",
    "What is 12 times 7?",
)
LIST = "Name the seven colours of the rainbow."
"""A question the model answers at length (until ``SHORT_MAX_TOKENS``)."""
PANEL = ((0.0, 1), (0.7, 2), (0.7, 3))
"""The local preset's members: one greedy, two sampled (temperature, seed)."""
FLUSH = "Name a colour of the rainbow."
"""Asked in between, so a question's prompt is not the one left in llama.cpp's cache."""


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[list[local_batch.Answer]]:
    """The answers of every batch decoded during the test (so a test knows batching ran)."""
    seen: list[list[local_batch.Answer]] = []
    decode = local_batch.decode_together

    def spy(llm: Any, tokens: Any, answers: Any) -> None:
        decode(llm, tokens, answers)
        seen.append(list(answers))

    monkeypatch.setattr(local_batch, "decode_together", spy)
    return seen


def ask(question: str, temperature: float = 0.0, seed: int = 0, **kwargs: Any) -> CompletionRequest:
    return CompletionRequest(
        model="gemma-3-270m",
        messages=(Message("user", question),),
        temperature=temperature,
        seed=seed,
        **kwargs,
    )


async def together(local: LocalProvider, requests: list[CompletionRequest]) -> list[Completion]:
    return list(await asyncio.gather(*(local.complete(r) for r in requests)))


async def alone(local: LocalProvider, request: CompletionRequest) -> Completion:
    await local.complete(ask(FLUSH))
    return await local.complete(request)


def same(a: Completion, b: Completion) -> tuple[Any, ...]:
    return (a.content, a.finish_reason, a.usage.prompt_tokens, a.usage.completion_tokens) == (
        b.content,
        b.finish_reason,
        b.usage.prompt_tokens,
        b.usage.completion_tokens,
    )


async def test_greedy_answers_decoded_together_equal_those_decoded_alone(
    local: LocalProvider, batches: list[list[local_batch.Answer]]
) -> None:
    for question in QUESTIONS:
        single = await alone(local, ask(question))
        # What the lone call evaluated: the prompt, then its answer but the last token (the
        # line end that stopped it is sampled, never evaluated).
        llm = local._loaded["gemma-3-270m"]
        prompt = local_batch.prompt_tokens(llm, local._prompt(ask(question), ())[0])
        evaluated = [int(t) for t in llm._input_ids]
        assert evaluated[: len(prompt)] == prompt
        await local.complete(ask(FLUSH))
        panel = await together(local, [ask(question, t, s) for t, s in PANEL])
        assert same(panel[0], single), (question, panel[0], single)
        assert all(c.content and c.usage.prompt_tokens == single.usage.prompt_tokens for c in panel)
        greedy = batches[-1][0].tokens  # token for token the lone answer (+ its line end)
        assert greedy[: len(evaluated) - len(prompt)] == evaluated[len(prompt) :], question
        assert len(greedy) - (len(evaluated) - len(prompt)) <= 1
    assert [len(batch) for batch in batches] == [len(PANEL)] * len(QUESTIONS)


async def test_a_seed_gives_the_same_answers_and_other_seeds_other_ones(
    local: LocalProvider, batches: list[list[local_batch.Answer]]
) -> None:
    question = "Name a famous painter."
    requests = [ask(question, 1.0, seed) for seed in range(3)]
    await local.complete(ask(FLUSH))  # each batch finds the same cache (its logits depend on it)
    first = await together(local, requests)
    await local.complete(ask(FLUSH))
    second = await together(local, requests)
    assert [c.content for c in first] == [c.content for c in second]
    others = []
    for seeds in ((3, 4, 5), (6, 7, 8)):
        others += await together(local, [ask(question, 1.0, seed) for seed in seeds])
    assert len({c.content for c in first + others}) > 2
    assert [len(batch) for batch in batches] == [3, 3, 3, 3]


async def test_stop_max_tokens_finish_and_usage_are_each_requests_own(
    local: LocalProvider, batches: list[list[local_batch.Answer]]
) -> None:
    question = "Who wrote Pride and Prejudice?"
    requests = [
        ask(question, max_tokens=1, seed=1),  # "Jane", cut: length
        ask(question, stop=("Aus",), seed=2),  # "Jane", stopped
        ask(question, seed=3),  # "Jane Austen"
    ]
    await local.complete(ask(FLUSH))
    panel = await together(local, requests)
    assert [c.content for c in panel] == ["Jane", "Jane", "Jane Austen"]
    assert [c.finish_reason for c in panel] == ["length", "stop", "stop"]
    assert panel[0].usage.completion_tokens == 1
    assert len(batches) == 1
    for completion, request in zip(panel, requests, strict=True):
        assert same(completion, await alone(local, request)), request


async def test_a_cancelled_request_leaves_the_others_alone(
    local: LocalProvider, batches: list[list[local_batch.Answer]]
) -> None:
    # Cancelled while the batch gathers: its sequence writes nothing; the others answer
    # exactly as they would alone.
    requests = [ask(QUESTIONS[0], seed=s) for s in (1, 2, 3)]
    await local.complete(ask(FLUSH))
    tasks = [asyncio.create_task(local.complete(r)) for r in requests]
    await asyncio.sleep(0.002)  # all three wait for the worker, inside the gathering window
    tasks[1].cancel()
    kept = [await tasks[0], await tasks[2]]
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    (batch,) = batches
    assert (batch[1].finish, batch[1].tokens) == ("cancelled", [])
    single = await alone(local, requests[0])
    assert all(same(completion, single) for completion in kept)
    # Cancelled half-way through a long answer: it stops there, the others write on.
    await local.complete(ask(FLUSH))
    tasks = [asyncio.create_task(local.complete(ask(LIST, seed=s))) for s in (1, 2, 3)]
    await asyncio.sleep(0.3)  # a few tokens in (32 take a second or more)
    tasks[0].cancel()
    kept = [await tasks[1], await tasks[2]]
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    cancelled, *others = batches[-1]
    assert cancelled.finish == "cancelled"
    assert all(len(cancelled.tokens) < len(other.tokens) for other in others)
    assert all(c.finish_reason == "length" and c.usage.completion_tokens >= 30 for c in kept)


async def test_after_a_batch_the_prompt_is_cached_and_scoring_still_works(
    local: LocalProvider, batches: list[list[local_batch.Answer]]
) -> None:
    import llama_cpp

    question = "Who wrote Pride and Prejudice?"
    candidates = ["Jane Austen", "Charles Dickens"]
    await local.complete(ask(FLUSH))
    fresh = await local.loglikelihood(ask(question), candidates)
    await local.complete(ask(FLUSH))
    await together(local, [ask(question, t, s) for t, s in PANEL])
    llm = local._loaded["gemma-3-270m"]
    prompt = local_batch.prompt_tokens(llm, local._prompt(ask(question), ())[0])
    assert list(llm._input_ids) == prompt  # sequence 0 is the prompt, nothing more
    memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == len(prompt) - 1
    for seq_id in range(1, len(PANEL) + 1):  # the answers' cells are gone
        assert llama_cpp.llama_memory_seq_pos_max(memory, seq_id) == -1
    after = await local.loglikelihood(ask(question), candidates)
    assert after == pytest.approx(fresh, abs=1e-3)
    assert after[0] > after[1]
    assert len(batches) == 1


async def test_an_example_answer_written_in_a_batch_is_written_again(
    local: LocalProvider, batches: list[list[local_batch.Answer]]
) -> None:
    """The example-copy rule (test_local.py) holds for batched answers: an answer that is an
    example's (for a question that shares no word with that example's) is written again
    alone, its first token banned — the greedy one exactly as the lone path writes it."""
    examples = ("Leo Tolstoy", "Jupiter", "1989", "Iron", "7")
    questions = (  # the 270M model answers these with an example's answer at first
        "What is the biggest gas giant?",
        "Who is the most famous Russian author?",
        "Which metal do magnets attract?",
    )
    copied = 0
    for question in questions:
        await local.complete(ask(FLUSH))
        panel = await together(local, [ask(question, t, s) for t, s in PANEL])
        assert all(c.content.rstrip(".") not in examples for c in panel), question
        copied += sum(a.text.strip().rstrip(".") in examples for a in batches[-1])
        assert same(panel[0], await alone(local, ask(question))), question
    assert len(batches) == len(questions)
    assert copied >= 2  # the rule was exercised: batched answers were copies at first
