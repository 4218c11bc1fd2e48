"""The offline default's speed: one-line factual questions on ``openfusion/local`` (the fused
preset) against one greedy pass of ``local/gemma-3-270m``, in one run on one machine.

Both answer through the eval harness's own paths (``evals/configs.py``): the fused preset as
the server runs it, the single model as one panel member would be asked. The questions are
answered in turn, single then fused, so both see the same load, and each starts with the
question not yet in llama.cpp's prompt cache (the few-shot prefix is, for both). The goal
(issue 10): the fused median at most 5x the single one. Also printed: the fused runs' median
seconds per stage and tokens per second.

    python benchmarks/local_speed.py [--rounds 2] [--temperature 0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from openfusion import Fusion, Settings
from openfusion.engine.policy import Caller
from openfusion.evals.configs import Answerer, parse_config
from openfusion.presets import load_preset
from openfusion.providers import ProviderRegistry

QUESTIONS = (
    "Who wrote Pride and Prejudice?",
    "What is the capital of Australia?",
    "Which planet is known as the Red Planet?",
    "Who painted the ceiling of the Sistine Chapel?",
    "What is the chemical symbol for sodium?",
    "In which country is the city of Timbuktu?",
    "Who composed the opera The Magic Flute?",
    "What is the largest ocean on Earth?",
    "Which language has the most native speakers?",
    "What is the tallest mountain in Africa?",
)

FLUSH = "Name a colour of the rainbow."
"""Asked (untimed) before each timed question: llama.cpp keeps the prompt prefix it saw last,
so without it the second config would find the question already evaluated."""


async def measure(rounds: int, temperature: float | None) -> None:
    settings = Settings.load()
    registry = ProviderRegistry(settings)  # one registry: both configs share the loaded model
    caller = Caller.from_settings(registry, settings)
    single = Answerer(parse_config("local/gemma-3-270m", settings), settings, caller, None)
    single.temperature = temperature
    preset = load_preset("local", settings)
    fusion = Fusion(preset, settings=settings, caller=caller, recorder=None)
    await single.answer("What is the capital of France?", None)  # load the model once
    times: dict[str, list[float]] = {"single": [], "fused": []}
    stages: dict[str, list[float]] = {}
    rates: list[float] = []
    for _ in range(rounds):
        for question in QUESTIONS:
            await single.answer(FLUSH, None)  # the question is not in llama.cpp's cache...
            started = time.monotonic()
            answer = await single.answer(question, None)
            times["single"].append(time.monotonic() - started)
            await single.answer(FLUSH, None)  # ... for either config: both evaluate it
            started = time.monotonic()
            result = await fusion.run(question, temperature=temperature)
            times["fused"].append(time.monotonic() - started)
            for stage, seconds in result.timings.items():
                stages.setdefault(stage, []).append(seconds)
            if result.tokens_per_second:
                rates.append(result.tokens_per_second)
            print(f"  {question:48} single: {answer.content[:28]:30} fused: {result.content[:40]}")
    await registry.aclose()
    print()
    print(f"{'config':24} {'n':>3} {'median s':>9} {'p90 s':>7}")
    for name, label in (("single", "local/gemma-3-270m"), ("fused", "openfusion/local")):
        values = sorted(times[name])
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"{label:24} {len(values):>3} {statistics.median(values):>9.2f} {p90:>7.2f}")
    ratio = statistics.median(times["fused"]) / statistics.median(times["single"])
    print(f"\nfused / single median: {ratio:.1f}x (goal <= 5x)")
    per_stage = ", ".join(f"{s} {statistics.median(v):.2f}" for s, v in stages.items())
    print(f"fused median seconds per stage: {per_stage}")
    if rates:
        rate = statistics.median(rates)
        print(f"fused tokens/s (generated, over the model stages; median): {rate:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="times each question is asked")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sent with each question (as eval clients)"
    )
    args = parser.parse_args()
    asyncio.run(measure(args.rounds, args.temperature))


if __name__ == "__main__":
    main()
