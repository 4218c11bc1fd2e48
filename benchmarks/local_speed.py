"""The offline default's speed: one-line factual questions on ``openfusion/local`` (the fused
preset) against one greedy pass of ``local/gemma-3-270m``, in one run on one machine.

Both answer through the eval harness's own paths (``evals/configs.py``): the fused preset as
the server runs it, the single model as one panel member would be asked. The questions are
answered in turn, single then fused, so both see the same load, and each starts with the
question not yet in llama.cpp's prompt cache (the few-shot prefix is, for both). The goal
(issue 10): the fused median at most 5x the single one. Also printed: the fused runs' median
seconds per stage and tokens per second.

The local provider decodes the panel's answers to one prompt together (one llama.cpp batch,
one sequence each). ``--one-at-a-time`` adds the fused preset on a second copy of the model
that decodes them one after the other (``options.sequences = 1``, as before batching), asked
in turn with the others, so the two are compared under the same load.

    python benchmarks/local_speed.py [--rounds 2] [--temperature 0] [--one-at-a-time]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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


async def measure(rounds: int, temperature: float | None, one_at_a_time: bool) -> None:
    settings = Settings.load()
    registry = ProviderRegistry(settings)  # one registry: both configs share the loaded model
    caller = Caller.from_settings(registry, settings)
    single = Answerer(parse_config("local/gemma-3-270m", settings), settings, caller, None)
    single.temperature = temperature
    preset = load_preset("local", settings)
    fusion = Fusion(preset, settings=settings, caller=caller, recorder=None)
    await single.answer("What is the capital of France?", None)  # load the model once
    configs = [("single", "local/gemma-3-270m"), ("fused", "openfusion/local")]
    registries = [registry]
    sequential: Fusion | None = None
    flush_sequential: Answerer | None = None
    if one_at_a_time:
        local = settings.providers["local"]
        local = local.model_copy(update={"options": {**local.options, "sequences": 1}})
        alone = dataclasses.replace(settings, providers={**settings.providers, "local": local})
        registries.append(ProviderRegistry(alone))
        caller_alone = Caller.from_settings(registries[-1], alone)
        sequential = Fusion(preset, settings=alone, caller=caller_alone, recorder=None)
        config = parse_config("local/gemma-3-270m", alone)
        flush_sequential = Answerer(config, alone, caller_alone, None)
        flush_sequential.temperature = temperature
        await flush_sequential.answer("What is the capital of France?", None)
        configs.append(("sequential", "local, one at a time"))
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    stages: dict[str, dict[str, list[float]]] = {"fused": {}, "sequential": {}}
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
                stages["fused"].setdefault(stage, []).append(seconds)
            if result.tokens_per_second:
                rates.append(result.tokens_per_second)
            if sequential is not None and flush_sequential is not None:
                await flush_sequential.answer(FLUSH, None)
                started = time.monotonic()
                other = await sequential.run(question, temperature=temperature)
                times["sequential"].append(time.monotonic() - started)
                for stage, seconds in other.timings.items():
                    stages["sequential"].setdefault(stage, []).append(seconds)
            print(f"  {question:48} single: {answer.content[:28]:30} fused: {result.content[:40]}")
    for each in registries:
        await each.aclose()
    print()
    print(f"{'config':24} {'n':>3} {'median s':>9} {'p90 s':>7}")
    for name, label in configs:
        values = sorted(times[name])
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"{label:24} {len(values):>3} {statistics.median(values):>9.2f} {p90:>7.2f}")
    ratio = statistics.median(times["fused"]) / statistics.median(times["single"])
    print(f"\nfused / single median: {ratio:.1f}x (goal <= 5x)")
    for name, label in (("fused", "fused"), ("sequential", "one at a time")):
        if stages[name]:
            per_stage = ", ".join(
                f"{s} {statistics.median(v):.2f}" for s, v in stages[name].items()
            )
            print(f"{label} median seconds per stage: {per_stage}")
    if rates:
        rate = statistics.median(rates)
        print(f"fused tokens/s (generated, over the model stages; median): {rate:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="times each question is asked")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sent with each question (as eval clients)"
    )
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="also time the fused preset with the panel decoded one answer after another",
    )
    args = parser.parse_args()
    asyncio.run(measure(args.rounds, args.temperature, args.one_at_a_time))


if __name__ == "__main__":
    main()
