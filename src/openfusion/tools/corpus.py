"""The offline search backend: a SQLite FTS5 index over local files, ranked by BM25.

``build_index`` reads .md, .txt, .html/.htm and .pdf files (folders recursively, skipping
hidden ones), cuts their text into overlapping chunks and stores them in ``db_path``. Run it
again and only changed files are read again (same path, size and mtime: skipped; same content
hash: skipped); a changed file's chunks are replaced, a file gone from an indexed folder is
dropped. Each file is written in its own transaction, so a crash leaves every file either as it
was or fully re-indexed, never half-written, and a re-run picks up where it stopped.

``CorpusBackend`` answers ``web_search`` from that index: one hit per document (its best
chunk by BM25), with its title, the ``file://`` URL of the document and an FTS5 snippet. The
query is reduced to its words, each quoted, so no user text can be read as FTS5 syntax.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from openfusion.errors import OpenFusionError
from openfusion.settings import Settings
from openfusion.tools.base import Source, ToolError
from openfusion.tools.chunking import chunk_text
from openfusion.tools.extract import Extracted, ExtractionError, html_to_text, pdf_to_text
from openfusion.tools.search import SearchResults
from openfusion.tools.settings import ToolSettings, corpus_path

SCHEMA_VERSION = 1
SUPPORTED_SUFFIXES = (".md", ".txt", ".html", ".htm", ".pdf")
MAX_QUERY_TERMS = 32
TITLE_WEIGHT = 2.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    doc_id INTEGER NOT NULL REFERENCES documents(id),
    seq INTEGER NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    title, body, content='chunks', content_rowid='id',
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, title, body) VALUES (new.id, new.title, new.body);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, title, body)
    VALUES ('delete', old.id, old.title, old.body);
END;
"""

# The best chunk of each matching document (bm25: lower is better; titles weigh more) ...
_BEST_CHUNKS = f"""
WITH hits AS MATERIALIZED (
    SELECT rowid AS id, bm25(chunks_fts, {TITLE_WEIGHT}, 1.0) AS score
    FROM chunks_fts WHERE chunks_fts MATCH ?
)
SELECT hits.id, MIN(hits.score) AS best
FROM hits JOIN chunks c ON c.id = hits.id
GROUP BY c.doc_id ORDER BY best LIMIT ?
"""
# ... then a snippet of each of those chunks, with its document.
_SNIPPETS = """
SELECT chunks_fts.rowid, d.path, d.title, snippet(chunks_fts, 1, '', '', '…', 40)
FROM chunks_fts
JOIN chunks c ON c.id = chunks_fts.rowid
JOIN documents d ON d.id = c.doc_id
WHERE chunks_fts MATCH ? AND chunks_fts.rowid IN ({ids})
"""

_WORD = re.compile(r"\w+")
_ATX_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")
_SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_SPACE = re.compile(r"\s+")


class CorpusError(OpenFusionError):
    """The index cannot be built or read; the message says what to do."""


@dataclass(frozen=True, slots=True)
class IndexStats:
    indexed: int = 0
    """Files read and (re)written."""
    unchanged: int = 0
    removed: int = 0
    """Files dropped: gone from an indexed folder, or no longer readable."""
    chunks: int = 0
    """Chunks written in this run."""
    skipped: tuple[tuple[Path, str], ...] = ()
    """Files not indexed, with the reason."""


def build_index(
    paths: Sequence[Path],
    db_path: Path,
    progress: Callable[[Path], None] | None = None,
) -> IndexStats:
    """Index the supported files under ``paths`` into ``db_path`` (created if missing).

    ``progress`` is called with each file before it is read. Raises ``CorpusError`` for a path
    that does not exist or an index built by another version.
    """
    roots = [Path(p).expanduser().resolve() for p in paths]
    for root in roots:
        if not root.exists():
            raise CorpusError(f"{root} does not exist: give a file or a folder to index")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    indexed = unchanged = removed = chunks = 0
    skipped: list[tuple[Path, str]] = []
    with closing(_connect(db_path)) as conn:
        _ensure_schema(conn, db_path)
        seen: set[str] = set()
        for file in _files(roots, skipped):
            if progress is not None:
                progress(file)
            seen.add(str(file))
            outcome = _index_file(conn, file)
            if isinstance(outcome, int):
                indexed += 1
                chunks += outcome
            elif outcome is None:
                unchanged += 1
            else:
                skipped.append((file, outcome))
                removed += _remove(conn, [str(file)])
        for root in roots:
            if root.is_dir():
                removed += _remove(conn, _stale(conn, root, seen))
    return IndexStats(indexed, unchanged, removed, chunks, tuple(skipped))


def _connect(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(db_path, isolation_level=None)  # transactions are explicit


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _ensure_schema(conn: sqlite3.Connection, db_path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        raise CorpusError(
            f"{db_path} was built by another version of openfusion (schema {version}): "
            "delete it and run `openfusion index PATH` again"
        )
    try:
        conn.executescript(
            f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;"
        )
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _files(roots: Sequence[Path], skipped: list[tuple[Path, str]]) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            if root.suffix.lower() in SUPPORTED_SUFFIXES:
                yield root
            else:
                skipped.append((root, f"unsupported type (index {', '.join(SUPPORTED_SUFFIXES)})"))
            continue
        for file in sorted(root.rglob("*")):
            hidden = any(part.startswith(".") for part in file.relative_to(root).parts)
            if file.is_file() and not hidden and file.suffix.lower() in SUPPORTED_SUFFIXES:
                yield file


def _index_file(conn: sqlite3.Connection, file: Path) -> int | str | None:
    """Chunks written, ``None`` when unchanged, or the reason the file was skipped."""
    try:
        stat = file.stat()
        row = conn.execute(
            "SELECT id, mtime_ns, size, sha256 FROM documents WHERE path = ?", (str(file),)
        ).fetchone()
        if row is not None and (row[1], row[2]) == (stat.st_mtime_ns, stat.st_size):
            return None
        data = file.read_bytes()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    digest = hashlib.sha256(data).hexdigest()
    if row is not None and row[3] == digest:
        with _transaction(conn):
            conn.execute(
                "UPDATE documents SET mtime_ns = ?, size = ? WHERE id = ?",
                (stat.st_mtime_ns, stat.st_size, row[0]),
            )
        return None
    try:
        title, text = _read_document(file, data)
    except ExtractionError as exc:
        return str(exc)
    pieces = chunk_text(text)
    if not pieces:
        return "no text found"
    with _transaction(conn):
        if row is not None:
            conn.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
            conn.execute("DELETE FROM documents WHERE id = ?", (row[0],))
        doc_id = conn.execute(
            "INSERT INTO documents (path, title, mtime_ns, size, sha256) VALUES (?, ?, ?, ?, ?)",
            (str(file), title, stat.st_mtime_ns, stat.st_size, digest),
        ).lastrowid
        conn.executemany(
            "INSERT INTO chunks (doc_id, seq, title, body) VALUES (?, ?, ?, ?)",
            [(doc_id, seq, title, body) for seq, body in enumerate(pieces)],
        )
    return len(pieces)


def _read_document(file: Path, data: bytes) -> tuple[str, str]:
    """(title, text) of a file: title from its heading or metadata, else its file name."""
    suffix = file.suffix.lower()
    if suffix == ".pdf":
        extracted = pdf_to_text(data)
    elif suffix in (".html", ".htm"):
        extracted = html_to_text(data)
    else:
        text = data.decode("utf-8", errors="replace")
        heading = _markdown_title(text) if suffix == ".md" else None
        extracted = Extracted(title=heading, text=text)
    return extracted.title or file.name, extracted.text


def _markdown_title(text: str) -> str | None:
    lines = text.splitlines()[:50]
    for i, line in enumerate(lines):
        if match := _ATX_HEADING.match(line):
            return match.group(1)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and _SETEXT_UNDERLINE.match(nxt):
            return line.strip()
    return None


def _stale(conn: sqlite3.Connection, root: Path, seen: set[str]) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    rows = conn.execute(
        "SELECT path FROM documents WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)
    ).fetchall()
    return [path for (path,) in rows if path not in seen]


def _remove(conn: sqlite3.Connection, paths: list[str]) -> int:
    removed = 0
    for path in paths:
        with _transaction(conn):
            row = conn.execute("SELECT id FROM documents WHERE path = ?", (path,)).fetchone()
            if row is not None:
                conn.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
                conn.execute("DELETE FROM documents WHERE id = ?", (row[0],))
                removed += 1
    return removed


def match_expression(query: str) -> str:
    """An FTS5 MATCH expression for free text: its words, each quoted, any of them (OR).

    Operators, quotes and parentheses in the query are dropped, so ``foo "bar`` or ``AND(``
    cannot be a syntax error. Raises ``ToolError`` when no word is left.
    """
    terms: list[str] = []
    for word in _WORD.findall(query):
        term = word.lower()
        if term not in terms:
            terms.append(term)
    if not terms:
        raise ToolError(f"the query {query!r} has no words to search for: use plain keywords")
    return " OR ".join(f'"{term}"' for term in terms[:MAX_QUERY_TERMS])


def missing_index_message(db_path: Path) -> str:
    return (
        f"the local search corpus {db_path} is empty or missing: build it with "
        "`openfusion index PATH` (a folder of .md, .txt, .html or .pdf files), or set "
        "search_backend under [tools] in config.toml to an online backend"
    )


def create(settings: Settings, tool_settings: ToolSettings) -> CorpusBackend:
    return CorpusBackend(corpus_path(settings, tool_settings))


class CorpusBackend:
    """``web_search`` over the local index. Free: each query costs 0.0."""

    name = "corpus"
    price = 0.0

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    async def search(self, query: str, max_results: int) -> SearchResults:
        expression = match_expression(query)
        hits = await asyncio.to_thread(self._search, expression, max_results)
        return SearchResults(hits=hits, cost=0.0)

    def _search(self, expression: str, max_results: int) -> tuple[Source, ...]:
        if not self.db_path.is_file():
            raise ToolError(missing_index_message(self.db_path))
        uri = f"{self.db_path.resolve().as_uri()}?mode=ro"
        try:
            with closing(sqlite3.connect(uri, uri=True)) as conn:
                if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    raise ToolError(missing_index_message(self.db_path))
                if conn.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is None:
                    raise ToolError(missing_index_message(self.db_path))
                best = conn.execute(_BEST_CHUNKS, (expression, max_results)).fetchall()
                ids = [chunk_id for chunk_id, _ in best]
                rows = conn.execute(
                    _SNIPPETS.format(ids=", ".join("?" * len(ids))), (expression, *ids)
                ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise ToolError(
                f"the local search corpus {self.db_path} cannot be read ({exc}): rebuild it "
                "with `openfusion index PATH`"
            ) from exc
        by_id = {
            chunk_id: Source(
                title=title,
                url=Path(path).as_uri(),
                snippet=_SPACE.sub(" ", snippet).strip(),
                source=self.name,
            )
            for chunk_id, path, title, snippet in rows
        }
        return tuple(by_id[chunk_id] for chunk_id in ids if chunk_id in by_id)
