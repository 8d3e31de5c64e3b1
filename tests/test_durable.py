"""Small files replaced whole: the temporary file is renamed over the old one and never left behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import pytest

from datamesh.core.durable import replace_durably
from datamesh.storage.ap.fenced import advance_fence, read_fence


def test_a_file_is_replaced_whole_and_no_temporary_file_stays(tmp_path: Path) -> None:
    target = tmp_path / "record"
    replace_durably(target, b"first")
    replace_durably(target, b"second, longer than the first")
    assert target.read_bytes() == b"second, longer than the first"
    assert [p.name for p in tmp_path.iterdir()] == ["record"]


def test_a_named_temporary_file_is_used_and_renamed_away(tmp_path: Path) -> None:
    target, temporary = tmp_path / "MANIFEST", tmp_path / "MANIFEST.tmp"
    temporary.write_bytes(b"left by a crash")
    replace_durably(target, b"{}", temporary=temporary, fsync=False)
    assert target.read_bytes() == b"{}" and not temporary.exists()


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``os.fsync`` is called on, in order."""
    seen: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def test_a_fence_advance_syncs_the_new_token_and_then_its_folder(tmp_path: Path, synced: list[str]) -> None:
    fence = tmp_path / "shard-000.fence"
    advance_fence(fence, 7)
    assert read_fence(fence) == 7
    assert synced[-1] == str(tmp_path), "the rename is not durable until the folder is synced"
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000.fence"]


def test_a_vector_snapshot_save_syncs_its_folder_after_the_rename(tmp_path: Path, synced: list[str]) -> None:
    pytest.importorskip("faiss")
    from datamesh.storage.index.vectors import VectorIndex

    snapshot = tmp_path / "vectors.faiss"
    VectorIndex(snapshot, 4, store=cast(Any, None)).save()  # the store is only read by open()
    assert snapshot.exists()
    assert synced[-1] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]
