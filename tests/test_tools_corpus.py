"""The offline search backend: SQLite FTS5 index over local files, BM25 ranking."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest
from helpers import make_pdf

from openfusion.settings import Settings
from openfusion.tools import ToolError, ToolSettings, build_index, default_tools
from openfusion.tools import corpus as corpus_module
from openfusion.tools.chunking import chunk_text
from openfusion.tools.corpus import CorpusBackend, CorpusError, match_expression


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "nested").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "plants.md").write_text(
        "# Photosynthesis\n\nPlants capture sunlight with chlorophyll in their leaves and turn "
        "carbon dioxide and water into sugar.\n\nA volcano is mentioned here once.\n"
    )
    (root / "volcanoes.txt").write_text(
        "Volcanoes\n\nA volcano erupts when magma rises. Every volcano is different: a shield "
        "volcano has gentle slopes, a strato volcano is steep. Volcano monitoring saves lives.\n"
    )
    (root / "nested" / "tides.html").write_text(
        "<html><head><title>Ocean tides</title></head><body><nav>home | about</nav>"
        "<article><h1>Ocean tides</h1><p>The gravitational pull of the Moon raises two tidal "
        "bulges on the oceans, so most coasts see two high tides a day.</p>"
        "<p>Spring tides happen when the Sun and Moon line up.</p></article></body></html>"
    )
    (root / "nested" / "quantum.pdf").write_bytes(
        make_pdf("Quantum entanglement links the states of two particles.", "Entanglement")
    )
    (root / "image.png").write_bytes(b"\x89PNG not indexed")
    (root / ".git" / "hidden.md").write_text("# Hidden\n\nchlorophyll in a hidden folder\n")
    return root


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "index" / "corpus.sqlite"


async def search(db: Path, query: str, n: int = 5) -> list[tuple[str, str, str]]:
    found = await CorpusBackend(db).search(query, n)
    assert found.cost == 0.0
    return [(Path(h.url.removeprefix("file://")).name, h.title, h.snippet) for h in found.hits]


async def test_index_and_search_every_format(docs: Path, db: Path) -> None:
    seen: list[Path] = []
    stats = build_index([docs], db, progress=seen.append)
    assert stats.indexed == 4 and stats.unchanged == 0 and stats.chunks >= 4
    assert sorted(p.name for p in seen) == [
        "plants.md",
        "quantum.pdf",
        "tides.html",
        "volcanoes.txt",
    ]

    hits = await search(db, "chlorophyll sunlight")
    assert hits[0][:2] == ("plants.md", "Photosynthesis")
    assert "chlorophyll" in hits[0][2]
    assert all(name != "hidden.md" for name, _, _ in hits)

    assert (await search(db, "tidal bulges Moon"))[0][:2] == ("tides.html", "Ocean tides")
    assert (await search(db, "entanglement particles"))[0][:2] == ("quantum.pdf", "Entanglement")
    assert (await search(db, "magma"))[0][:2] == ("volcanoes.txt", "volcanoes.txt")


async def test_hit_carries_file_url_and_backend_name(docs: Path, db: Path) -> None:
    build_index([docs], db)
    found = await CorpusBackend(db).search("chlorophyll", 5)
    hit = found.hits[0]
    assert hit.url == (docs / "plants.md").resolve().as_uri()
    assert hit.source == "corpus"
    assert hit.url.startswith("file:///") and hit.url.endswith("/docs/plants.md")


async def test_bm25_ranks_the_document_about_the_term_first(docs: Path, db: Path) -> None:
    build_index([docs], db)
    hits = await search(db, "volcano")
    assert [name for name, _, _ in hits] == ["volcanoes.txt", "plants.md"]


async def test_one_hit_per_document_and_max_results(tmp_path: Path, db: Path) -> None:
    long_doc = tmp_path / "long.md"
    long_doc.write_text("\n\n".join(f"Paragraph {i} about glaciers. " * 8 for i in range(40)))
    (tmp_path / "other.md").write_text("# Other\n\n" + "filler words. " * 60 + "glaciers once.\n")
    build_index([long_doc, tmp_path / "other.md"], db)
    assert [name for name, _, _ in await search(db, "glaciers")] == ["long.md", "other.md"]
    assert len(await search(db, "glaciers", 1)) == 1


async def test_reindex_replaces_changed_files_only(docs: Path, db: Path) -> None:
    build_index([docs], db)
    plants = docs / "plants.md"
    plants.write_text("# Plant transport\n\nWater climbs through the xylem of a stem.\n")
    stats = build_index([docs], db)
    assert (stats.indexed, stats.unchanged, stats.removed) == (1, 3, 0)
    assert [n for n, _, _ in await search(db, "chlorophyll")] == []
    assert (await search(db, "xylem"))[0][:2] == ("plants.md", "Plant transport")
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM chunks JOIN documents d ON d.id = chunks.doc_id WHERE d.path = ?",
            (str(plants.resolve()),),
        ).fetchone()
        assert rows[0] == 1
        assert conn.execute("SELECT count(*) FROM documents").fetchone()[0] == 4

    (docs / "volcanoes.txt").unlink()
    stats = build_index([docs], db)
    assert (stats.indexed, stats.unchanged, stats.removed) == (0, 3, 1)
    assert [n for n, _, _ in await search(db, "magma")] == []


def test_touched_but_unchanged_file_is_not_reindexed(docs: Path, db: Path) -> None:
    build_index([docs], db)
    plants = docs / "plants.md"
    plants.write_text(plants.read_text())  # new mtime, same bytes
    stats = build_index([docs], db)
    assert (stats.indexed, stats.unchanged) == (0, 4)


async def test_a_failed_write_leaves_the_old_version_whole(
    docs: Path, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_index([docs], db)
    with sqlite3.connect(db) as conn:
        before = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    (docs / "plants.md").write_text("# New\n\nfresh words about ferns\n")
    # The second chunk cannot be stored: the write fails half-way through the file.
    monkeypatch.setattr(corpus_module, "chunk_text", lambda text: ["ferns chunk", object()])
    with pytest.raises(sqlite3.Error):
        build_index([docs / "plants.md"], db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == before
    assert (await search(db, "chlorophyll"))[0][0] == "plants.md"
    assert await search(db, "ferns") == []


def test_unsupported_file_given_explicitly_is_skipped(tmp_path: Path, db: Path) -> None:
    odd = tmp_path / "notes.docx"
    odd.write_bytes(b"PK")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 this is not really a pdf")
    stats = build_index([odd, broken], db)
    reasons = dict(stats.skipped)
    assert "unsupported type" in reasons[odd.resolve()]
    assert "not a readable PDF" in reasons[broken.resolve()]
    assert stats.indexed == 0


def test_missing_path_is_an_error(tmp_path: Path, db: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        build_index([tmp_path / "nope"], db)


@pytest.mark.parametrize(
    "query",
    ['foo "bar', "AND(", "NEAR(a b", "title:x", "-chlorophyll", "a OR", "x* ^y", "'; DROP"],
)
async def test_fts5_syntax_in_queries_is_harmless(docs: Path, db: Path, query: str) -> None:
    build_index([docs], db)
    await CorpusBackend(db).search(query, 5)  # must not raise sqlite3.OperationalError


@pytest.mark.parametrize("query", ['"', "*", "()", "  ", "^-:"])
async def test_query_without_words_is_a_clear_error(docs: Path, db: Path, query: str) -> None:
    build_index([docs], db)
    with pytest.raises(ToolError, match="no words to search for"):
        await CorpusBackend(db).search(query, 5)


def test_match_expression_quotes_every_term() -> None:
    assert match_expression('foo "bar AND(baz') == '"foo" OR "bar" OR "and" OR "baz"'
    assert match_expression("Foo foo FOO") == '"foo"'


async def test_missing_or_empty_index_says_how_to_build_it(tmp_path: Path, db: Path) -> None:
    with pytest.raises(ToolError, match=r"empty or missing: build it with `openfusion index PATH`"):
        await CorpusBackend(db).search("anything", 5)
    (tmp_path / "empty").mkdir()
    build_index([tmp_path / "empty"], db)
    with pytest.raises(ToolError, match="openfusion index PATH"):
        await CorpusBackend(db).search("anything", 5)


async def test_web_search_tool_over_the_corpus(docs: Path, tmp_path: Path) -> None:
    settings = Settings(config_dir=tmp_path / "config", cache_dir=tmp_path / "cache")
    build_index([docs], tmp_path / "cache" / "corpus.sqlite")
    tools = default_tools(settings, ToolSettings(code="off"))
    result = await tools.call("web_search", '{"query": "chlorophyll", "max_results": 2}')
    assert result.ok, result.error
    assert result.cost == 0.0
    assert result.sources[0].title == "Photosynthesis"
    assert "[1] Photosynthesis\nURL: file://" in result.content
    assert "UNTRUSTED-DATA" in result.content
    missing = await default_tools(
        settings, ToolSettings(code="off", corpus_path=tmp_path / "none.sqlite")
    ).call("web_search", '{"query": "x"}')
    assert missing.error is not None and "openfusion index PATH" in missing.error


def test_chunks_follow_paragraphs_and_overlap() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 60 for i in range(12)]
    chunks = chunk_text("\n\n".join(paragraphs))
    assert len(chunks) > 3
    assert all(len(c) <= 1000 for c in chunks)
    for before, after in itertools.pairwise(chunks):
        assert after[:40] in before, "each chunk starts with the end of the one before"
    assert chunks[0].startswith("Paragraph 0.") and "Paragraph 1." in chunks[0]
    assert "Paragraph 11." in chunks[-1]


def test_chunks_cut_long_paragraphs_and_words() -> None:
    text = "Short. " * 300 + "\n\n" + "x" * 2500
    chunks = chunk_text(text)
    assert all(len(c) <= 1000 for c in chunks)
    assert "".join(chunks).count("x") >= 2500
    assert chunk_text("") == [] and chunk_text("one line") == ["one line"]
