"""The table benchmarks/gateways.py prints: pooled values with the per-round range, ratios to
the floor and to LiteLLM, the issue's goals as measured, and the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from load import percentile
from measure import Bench, Capacity, Row, StreamTimes

ROOT = Path(__file__).resolve().parents[1]


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.2f}"


def spread(values: list[float], scale: float = 1000.0, digits: int = 2) -> str:
    """`` [min-max]`` of per-round values, if there is more than one."""
    if len(values) < 2:
        return ""
    return f" [{scale * min(values):.{digits}f}-{scale * max(values):.{digits}f}]"


def added(pairs: list[tuple[list[float], list[float]]], q: float, sequential: int = 1) -> float:
    direct = [x for d, _ in pairs for x in d]
    gateway = [x for _, g in pairs for x in g]
    return percentile(gateway, q) - sequential * percentile(direct, q)


def per_round(
    pairs: list[tuple[list[float], list[float]]], q: float, sequential: int = 1
) -> list[float]:
    return [added([p], q, sequential) for p in pairs]


@dataclass
class Summary:
    """The numbers of a row that the ratios and goals need (seconds, requests/s)."""

    p50: float | None = None
    p99: float | None = None
    rps: float | None = None
    cpu: float | None = None
    first: float | None = None


def summarise(row: Row) -> Summary:
    s = Summary()
    if row.added and row.path == "pass":
        s.p50, s.p99 = added(row.added, 0.5), added(row.added, 0.99)
    if row.added and row.path == "fusion":
        s.p50 = added(row.added, 0.5, sequential=3)
    if row.throughput:
        requests = sum(t.requests for t in row.throughput)
        s.rps = requests / sum(t.seconds for t in row.throughput)
        s.cpu = sum(t.cpu for t in row.throughput) / max(1, requests)
    if row.streams:
        s.first = stream_added(row.streams, "first")
    return s


def stream_added(pairs: list[tuple[list[StreamTimes], list[StreamTimes]]], what: str) -> float:
    direct = [getattr(x, what) for d, _ in pairs for x in d]
    gateway = [getattr(x, what) for _, g in pairs for x in g]
    return percentile(gateway, 0.5) - percentile(direct, 0.5)


def ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs <= 0:
        return "-"
    return f"{ours / theirs:.2f}x"


def table(bench: Bench) -> list[str]:
    floor = next((summarise(r) for r in bench.rows if r.target.name == "floor"), Summary())
    litellm = next((summarise(r) for r in bench.rows if r.target.name == "LiteLLM"), Summary())
    header = [
        "gateway · path",
        "(a) added p50 / p99 ms, c=1",
        f"(b) overhead p50 ms, c=1 / c={bench.args.crowd}",
        f"(c) req/s, c={bench.args.concurrency}",
        "(c) CPU ms / req",
        "(e) stream: added first chunk / total ms",
        "(e) chunk gap ms (direct)",
        "vs floor: p50 · p99 · req/s · CPU",
        "vs LiteLLM: p50 · req/s",
        "(d) capacity",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in bench.rows:
        if row.target.broken is not None:
            cells = [f"not run: {row.target.broken}"] + [""] * (len(header) - 2)
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
            continue
        s = summarise(row)
        cells = [row.label]
        if row.path == "pass" and row.added:
            cells.append(
                f"{ms(s.p50 or 0)}{spread(per_round(row.added, 0.5))} / "
                f"{ms(s.p99 or 0)}{spread(per_round(row.added, 0.99))}"
            )
        else:
            cells.append("")
        if row.path == "fusion":
            c1 = f"{ms(s.p50 or 0)}{spread(per_round(row.added, 0.5, 3))}" if row.added else "-"
            crowd = added(row.crowded, 0.5, 3) if row.crowded else None
            crowd_cell = ms(crowd) + spread(per_round(row.crowded, 0.5, 3)) if crowd else "-"
            cells.append(f"{c1} / {crowd_cell}")
        else:
            cells.append("")
        if row.throughput:
            rates = [t.requests / t.seconds for t in row.throughput]
            cpus = [t.cpu / max(1, t.requests) for t in row.throughput]
            cells.append(f"{s.rps:.0f}{spread(rates, 1, 0)}")
            cells.append(f"{ms(s.cpu or 0)}{spread(cpus)}")
        else:
            cells += ["-", "-"]
        if row.streams:
            total = stream_added(row.streams, "total")
            gaps = [x.gap for _, g in row.streams for x in g]
            direct_gaps = [x.gap for d, _ in row.streams for x in d]
            cells.append(f"{ms(s.first or 0)} / {ms(total)}")
            cells.append(f"{ms(percentile(gaps, 0.5))} ({ms(percentile(direct_gaps, 0.5))})")
        else:
            cells += ["", ""]
        if row.path == "pass" and row.target.name != "floor":
            cells.append(
                " · ".join(
                    (
                        ratio(s.p50, floor.p50),
                        ratio(s.p99, floor.p99),
                        ratio(s.rps, floor.rps),
                        ratio(s.cpu, floor.cpu),
                    )
                )
            )
        else:
            cells.append("")
        if row.path == "pass" and row.target.name not in ("floor", "LiteLLM"):
            cells.append(f"{ratio(s.p50, litellm.p50)} · {ratio(s.rps, litellm.rps)}")
        else:
            cells.append("")
        cells.append(capacity_cell(row.capacity))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def capacity_cell(capacity: Capacity | None) -> str:
    if capacity is None:
        return ""
    p50 = f"{capacity.p50:.1f} s" if capacity.errors < capacity.requests else "-"
    return (
        f"{capacity.requests} at once: {capacity.errors} errors, last answer "
        f"{capacity.last_answer:.1f} s (p50 {p50}), peak RSS {capacity.peak_rss / 2**20:.0f} MB"
    )


def details(bench: Bench) -> list[str]:
    """What the table leaves out: per-cell load, errors. A gateway's CPU includes what it did
    after the cell until it idled (its writes of the cell's runs), so it can pass 100%."""
    lines = []
    for row in bench.rows:
        for i, t in enumerate(row.throughput, 1):
            lines.append(
                f"(c) {row.label} round {i}: {t.requests} requests in {t.seconds:.1f} s, "
                f"{t.errors} errors; CPU: gateway {t.cpu / t.seconds:.0%} (until idle), "
                f"load {t.client_cpu / t.seconds:.0%}, mock {t.mock_cpu / t.seconds:.0%}, "
                f"other gateways {t.others_cpu / t.seconds:.0%}"
            )
        lines += [f"errors {row.label}: {e}" for e in row.errors]
        if row.capacity is not None:
            lines += [f"(d) {n} x {failure}" for failure, n in row.capacity.failures]
    return lines


def goals(bench: Bench) -> list[str]:
    """The issue's goals, each as measured."""
    floor = next((summarise(r) for r in bench.rows if r.target.name == "floor"), Summary())
    litellm = next((summarise(r) for r in bench.rows if r.target.name == "LiteLLM"), Summary())
    ours = next((r for r in bench.rows if r.target.fusion and r.path == "pass"), None)
    fused = next((r for r in bench.rows if r.target.fusion and r.path == "fusion"), None)
    if ours is None or fused is None:
        return []
    s, f = summarise(ours), summarise(fused)

    def check(text: str, value: float | None, limit: float | None, at_most: bool = True) -> str:
        if value is None or limit is None:
            return f"- {text}: not measured"
        met = value <= limit if at_most else value >= limit
        return f"- {text}: {value:.2f} against {limit:.2f}: {'met' if met else 'MISSED'}"

    def times(x: float | None, k: float) -> float | None:
        return None if x is None else k * x

    lines = [f"Goals, for {ours.target.name}:"]
    lines.append(check("(a) added p50 ms <= 2x floor", times(s.p50, 1e3), times(floor.p50, 2e3)))
    lines.append(check("(a) added p99 ms <= 2x floor", times(s.p99, 1e3), times(floor.p99, 2e3)))
    lines.append(check("(b) fusion overhead ms at c=1 <= 3", times(f.p50, 1e3), 3.0))
    lines.append(check("(c) req/s >= 50% of floor", s.rps, times(floor.rps, 0.5), at_most=False))
    lines.append(check("(c) req/s >= 10x LiteLLM", s.rps, times(litellm.rps, 10), at_most=False))
    lines.append(check("(c) CPU ms/req <= 3x floor", times(s.cpu, 1e3), times(floor.cpu, 3e3)))
    cap = fused.capacity
    if cap is not None:
        ok = cap.errors == 0 and cap.peak_rss < 2**30 and cap.last_answer <= 10
        lines.append(
            f"- (d) {cap.requests} in flight: {cap.errors} errors, peak RSS "
            f"{cap.peak_rss / 2**20:.0f} MB, last answer {cap.last_answer:.1f} s "
            f"(goal: 0 errors, < 1 GB, <= 10 s): {'met' if ok else 'MISSED'}"
        )
    lines.append(check("(e) added first chunk ms <= 1", times(s.first, 1e3), 1.0))
    return lines


def machine_facts(litellm: str | None) -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("aiohttp", "uvicorn", "uvloop", "starlette")
    )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return [
        f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        f"Python {platform.python_version()}, {versions}, openfusion at {commit or '?'}"
        + (f", LiteLLM {litellm}" if litellm else ""),
    ]


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())
