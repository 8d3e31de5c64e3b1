"""A read-only index beside its writer: no writer lock, follows the writer's commits, refuses writes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

from datamesh.core.errors import StorageError
from datamesh.core.result import Err
from datamesh.core.types import GeoRegion
from datamesh.storage.index import IndexConfig, SearchIndex
from tests.index.conftest import DIM, make_doc, random_vector

CONFIG = IndexConfig(dim=DIM, synchronous="NORMAL")
ROOT = Path(__file__).resolve().parents[2]

WRITER = """
import sys
from pathlib import Path
from datamesh.core.types import GeoRegion
from datamesh.storage.index import IndexConfig, SearchIndex
from tests.index.conftest import DIM, make_doc
config = IndexConfig(dim=DIM, synchronous="NORMAL")
index = SearchIndex.open(Path(sys.argv[1]), GeoRegion.EU_WEST, config=config).unwrap()
unit = (1.0,) + (0.0,) * (DIM - 1)
index.add_many([make_doc("a pelican in another process", tenant="acme", embedding=unit)]).unwrap()
index.close().unwrap()
"""


def test_readonly_index_sees_the_writers_commits_and_refuses_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    # Given a writer holding the region's index with one document,
    writer = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=CONFIG).unwrap()
    first = make_doc("the quick brown fox", tenant="acme", embedding=random_vector(rng))
    writer.add_many([first]).unwrap()
    # when a read-only handle opens it while the writer still holds the lock (no flock taken),
    reader = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=CONFIG, readonly=True).unwrap()
    try:
        assert [h.turn_id for h in reader.search("fox", tenant="acme").unwrap()] == [first.turn_id]
        # then documents the writer adds later are found by text and by vector after the refresh,
        later = make_doc("un zèbre très rapide", tenant="acme", embedding=random_vector(rng))
        other = make_doc("zèbre d'un autre locataire", tenant="globex", embedding=random_vector(rng))
        writer.add_many([later, other]).unwrap()
        assert [h.turn_id for h in reader.search("zèbre", tenant="acme").unwrap()] == [later.turn_id]
        assert reader.search(vector=later.embedding, tenant="acme", limit=1).unwrap()[0].turn_id == later.turn_id
        # removals too (vectors reconciled in memory),
        writer.remove_conversations([later.conversation_id]).unwrap()
        assert reader.search("zèbre", tenant="acme").unwrap() == []
        vector_hits = reader.search(vector=later.embedding, tenant="acme", limit=5).unwrap()
        assert later.turn_id not in {h.turn_id for h in vector_hits}
        # and every write through the read-only handle is refused.
        for refused in (
            reader.add_many([make_doc("nope", tenant="acme")]),
            reader.remove_conversations([first.conversation_id]),
            reader.flush(),
            reader.compact(),
        ):
            assert isinstance(refused, Err) and isinstance(refused.error, StorageError)
        assert reader.count().unwrap() == 2
    finally:
        reader.close().unwrap()
        writer.close().unwrap()


def test_readonly_index_follows_a_writer_in_another_process(tmp_path: Path) -> None:
    # Given an index created by this process and closed, and a read-only handle on it,
    SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=CONFIG).unwrap().close().unwrap()
    reader = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=CONFIG, readonly=True).unwrap()
    try:
        assert reader.search("pelican", tenant="acme").unwrap() == []
        # when another process opens it for writing (the reader holds no lock) and adds a document,
        out = subprocess.run(
            [sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        # then the reader finds it by text and by vector.
        assert len(reader.search("pelican", tenant="acme").unwrap()) == 1
        assert len(reader.search(vector=(1.0,) + (0.0,) * (DIM - 1), tenant="acme").unwrap()) == 1
    finally:
        reader.close().unwrap()


def test_readonly_open_of_a_missing_index_fails(tmp_path: Path) -> None:
    opened = SearchIndex.open(tmp_path, GeoRegion.US_EAST, config=CONFIG, readonly=True)
    assert isinstance(opened, Err) and isinstance(opened.error, StorageError)
    assert not (tmp_path / GeoRegion.US_EAST.value).exists()


def test_an_index_file_without_its_schema_yet_is_not_searched(tmp_path: Path) -> None:
    # Given a region whose writer has created text.sqlite but not yet its tables,
    from datamesh.storage.index import RegionalIndexes

    (tmp_path / "eu-west").mkdir()
    sqlite3.connect(tmp_path / "eu-west" / "text.sqlite").close()
    indexes = RegionalIndexes(tmp_path, config=CONFIG, readonly=True)
    # then a reader does not count it as an index yet; once the writer has opened it, it does.
    assert not indexes.exists(GeoRegion.EU_WEST)
    SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=CONFIG).unwrap().close().unwrap()
    assert indexes.exists(GeoRegion.EU_WEST)
    assert indexes.region(GeoRegion.EU_WEST).unwrap().search("x", tenant="acme").unwrap() == []
    indexes.close().unwrap()
