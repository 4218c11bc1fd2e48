"""How well the local preset's select mode picks: TriviaQA items through ``openfusion/local``,
with what each rule would have chosen from the same panel answers.

For each item: the greedy member's answer (the panel's first, at temperature 0), the answer
selected, and whether any member was right (the oracle); then the accuracy of the selection
rule for several ``AGREEMENT_WEIGHT`` values (``engine/select.py``), of plain majority vote,
and of likelihood alone, all recomputed from the run's ``selection`` (votes and log-likelihood
per distinct answer). Tune on ``--offset 0 --limit 100``; measure elsewhere with
``openfusion eval --offset 100``.

    python benchmarks/local_select.py [--offset 0] [--limit 100] [--dump FILE.jsonl]

``--dump`` writes each item's panel answers and selection, to try other rules on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from openfusion import Fusion, Settings
from openfusion.evals.datasets import load_dataset
from openfusion.evals.graders import grade_alias
from openfusion.evals.items import Item

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 100.0)


def right(item: Item, answer: str) -> bool:
    return grade_alias(item, answer).score == 100.0


def pick(selection: list[dict[str, Any]], weight: float) -> str:
    """What the rule would pick with ``weight`` (``selection`` is in panel order)."""
    best = max(
        enumerate(selection),
        key=lambda p: (weight * (p[1]["votes"] - 1) + p[1]["loglik"], -p[0]),
    )
    return str(best[1]["answer"])


async def run(offset: int, limit: int, dump: str | None) -> None:
    items = load_dataset("triviaqa", limit, offset).items
    rows = []
    async with Fusion.from_preset("local", recorder=None) as fusion:
        for n, item in enumerate(items):
            result = await fusion.run(item.prompt, temperature=0)
            greedy = result.responses[0].content if result.responses else ""
            order = [r.content for r in result.responses]
            # the selection in panel order (first given first), as the engine breaks ties
            by_answer = {s["answer"]: s for s in result.selection}
            selection = [by_answer[a] for a in dict.fromkeys(order) if a in by_answer]
            if not selection:
                selection = [{"answer": greedy, "votes": 1, "loglik": 0.0}]
            rows.append((item, greedy, result.content, order, selection))
            if dump:
                record = {"item": item.id, "aliases": item.aliases, "panel": order}
                record |= {"selection": selection, "answer": result.content}
                with Path(dump).open("a", encoding="utf-8") as file:  # noqa: ASYNC230 - tiny
                    file.write(json.dumps(record) + "\n")
            ok = "+" if right(item, result.content) else " "
            said = f"greedy {greedy[:24]:26} → {result.content[:30]}"
            print(f"{n + offset:4} {ok} {item.prompt[:50]:52} {said}")
    n = len(rows)

    def rate(hits: int) -> str:
        return f"{100 * hits / n:5.1f}%"

    print(f"\n{n} TriviaQA items from {offset}")
    print(f"greedy member        {rate(sum(right(i, g) for i, g, *_ in rows))}")
    print(f"selected (shipped)   {rate(sum(right(i, c) for i, _, c, *_ in rows))}")
    print(
        f"oracle (any member)  {rate(sum(any(right(i, a) for a in o) for i, _, _, o, _ in rows))}"
    )
    print(f"likelihood only      {rate(sum(right(i, pick(s, 0.0)) for i, *_, s in rows))}")
    print(f"majority vote        {rate(sum(right(i, pick(s, 100.0)) for i, *_, s in rows))}")
    for weight in WEIGHTS[1:-1]:
        hits = sum(right(i, pick(s, weight)) for i, *_, s in rows)
        print(f"weight {weight:<5}         {rate(hits)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--dump", help="write each item's panel and selection here (JSONL)")
    args = parser.parse_args()
    Settings.load()  # fail early on a bad config
    asyncio.run(run(args.offset, args.limit, args.dump))


if __name__ == "__main__":
    main()
