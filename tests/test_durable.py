"""Small files replaced whole: the temporary file is renamed over the old one and never left behind."""

from __future__ import annotations

from pathlib import Path

from datamesh.core.durable import replace_durably


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
