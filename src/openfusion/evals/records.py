"""An eval's output directory: ``run.json`` (what is compared) and ``results.jsonl`` (one
record a finished item and config, appended as it finishes).

Each record is one ``write`` of a whole line to a file opened for appending, then ``fsync``:
a crash loses at most the line being written, and a torn last line is cut off on the next
open. A later record for the same item and config supersedes an earlier one (a re-grade).
A rerun reads the records back and skips what is done, after checking that it compares the
same thing: the same configs (by fingerprint), items (by digest) and rubric grader.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from openfusion.errors import ConfigError

RESULTS = "results.jsonl"
MANIFEST = "run.json"

Key = tuple[str, str, str]
"""(dataset, item id, config)."""


@dataclass(frozen=True, slots=True)
class Record:
    dataset: str
    item_id: str
    item_digest: str
    config: str
    kind: str
    """``fused`` or ``single``."""
    grader: str
    """``exact``, ``alias``, ``numeric``, ``choice`` or ``rubric``."""
    run_id: str
    status: str
    """``ok``, or ``error`` when the config gave no answer (it then scores 0)."""
    answer: str
    score: float | None
    """0-100; ``None`` when grading failed (``grade_error``); a rerun grades it again."""
    cost: float | None
    """USD the answer cost (``None``: some part of it has no known price)."""
    latency_ms: int
    tokens: int = 0
    grading_cost: float | None = 0.0
    failures: tuple[str, ...] = ()
    axes: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    grade_error: str | None = None
    grader_model: str | None = None
    oracle: float | None = None
    """A fused config: the best score of its panel's answers (any member right: 100), graded
    as the answer is; the most a judge that selects could score. ``None`` for a single model
    and for rubric-graded items (their grading costs calls)."""

    @property
    def key(self) -> Key:
        return (self.dataset, self.item_id, self.config)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failures"] = list(self.failures)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        return cls(**{**data, "failures": tuple(data.get("failures", ()))})


@dataclass
class Manifest:
    configs: dict[str, str] = field(default_factory=dict)
    """Config name → fingerprint."""
    datasets: list[str] = field(default_factory=list)
    grader_model: str | None = None

    def merge(self, other: Manifest) -> Manifest:
        """This run's manifest with ``other`` (what is asked now) added; raises ``ConfigError``
        when ``other`` contradicts what the finished results were made with."""
        for name, fingerprint in other.configs.items():
            if self.configs.get(name, fingerprint) != fingerprint:
                raise ConfigError(
                    f"config {name!r} has changed since this output dir's results were made "
                    "(its panel, judge, limits or tools differ): use another --output"
                )
        if self.grader_model and other.grader_model and self.grader_model != other.grader_model:
            raise ConfigError(
                f"these results were graded by {self.grader_model}: scores from another "
                f"grader ({other.grader_model}) are never compared with them; use "
                f"--grader {self.grader_model} or another --output"
            )
        return Manifest(
            {**self.configs, **other.configs},
            list(dict.fromkeys([*self.datasets, *other.datasets])),
            self.grader_model or other.grader_model,
        )


class RunStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.results = directory / RESULTS
        self.manifest_path = directory / MANIFEST

    def open(self, asked: Manifest) -> tuple[Manifest, dict[Key, Record]]:
        """Create or reopen the directory; returns the merged manifest and the latest record
        per key. Raises ``ConfigError`` when the results there do not match what is asked."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.directory}: {exc.strerror or exc}") from exc
        manifest = self._read_manifest().merge(asked)
        self._write_manifest(manifest)
        return manifest, self.load()

    def load(self) -> dict[Key, Record]:
        """The latest record per key; a torn last line (a crash mid-write) is cut off."""
        if not self.results.exists():
            return {}
        raw = self.results.read_bytes()
        good = raw.rfind(b"\n") + 1
        if good < len(raw):
            with self.results.open("r+b") as file:
                file.truncate(good)
        records: dict[Key, Record] = {}
        for number, line in enumerate(raw[:good].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = Record.from_dict(json.loads(line))
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"{self.results}:{number} is not a result record ({exc}); "
                    "was the file edited? use another --output"
                ) from exc
            records[record.key] = record
        return records

    def append(self, record: Record) -> None:
        line = (json.dumps(record.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_manifest(self) -> Manifest:
        if not self.manifest_path.exists():
            return Manifest()
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            return Manifest(dict(data["configs"]), list(data["datasets"]), data["grader_model"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{self.manifest_path} is unreadable ({exc}): use another --output"
            ) from exc

    def _write_manifest(self, manifest: Manifest) -> None:
        write_atomic(self.manifest_path, json.dumps(asdict(manifest), indent=2) + "\n")


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file whole or not at all (a temporary file, then a rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(text.encode("utf-8") if isinstance(text, str) else text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
