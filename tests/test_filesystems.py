"""Which filesystem holds a path, read from the mount table (it decides a small put's folder fsync)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from datamesh.core.filesystems import NAME_COMMITTED_WITH_FILE, filesystem_type, name_committed_with_file
from datamesh.core.result import Err
from datamesh.core.types import GeoRegion
from datamesh.storage.objects.filesystem import FilesystemObjectStore
from datamesh.storage.objects.router import open_object_stores_from_env
from tests.conftest import service_missing


def _device(path: Path) -> str:
    device = os.stat(path).st_dev
    return f"{os.major(device)}:{os.minor(device)}"


def test_the_type_is_what_findmnt_reports(tmp_path: Path) -> None:
    findmnt = shutil.which("findmnt")
    if findmnt is None:
        service_missing("findmnt", FileNotFoundError("util-linux's findmnt is not on PATH"))
    reported = subprocess.run(
        [findmnt, "-n", "-o", "FSTYPE", "--target", str(tmp_path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert filesystem_type(tmp_path) == reported
    assert name_committed_with_file(tmp_path) is (reported in NAME_COMMITTED_WITH_FILE)


def test_the_mount_of_the_paths_device_is_found_past_optional_fields(tmp_path: Path) -> None:
    # Given a mount table whose line for the path's device carries optional fields before "-"
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        f"36 35 {_device(tmp_path)} / /mnt/with\\040space rw,noatime shared:1 master:2 - xfs /dev/sdb1 rw\n"
    )
    # Then the type is the field after the separator
    assert filesystem_type(tmp_path, mountinfo=table) == "xfs"


def test_a_device_missing_from_the_table_or_an_unreadable_table_is_unknown(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text("22 1 0:21 / /proc rw,nosuid - proc proc rw\nnot a mount line\n")
    assert filesystem_type(tmp_path, mountinfo=table) is None
    assert filesystem_type(tmp_path, mountinfo=tmp_path / "absent") is None


def test_the_folder_fsync_setting_reaches_every_filesystem_store(tmp_path: Path) -> None:
    # Given DATAMESH_OBJECTS_FOLDER_FSYNC=always
    env = {"DATAMESH_OBJECTS_FOLDER_FSYNC": "always"}
    router = open_object_stores_from_env(env, default_url=(tmp_path / "objects").as_uri()).unwrap()
    # Then each region's store fsyncs a small put's folder, whatever the filesystem
    for region in GeoRegion:
        store = router.for_region(region).unwrap()
        assert isinstance(store, FilesystemObjectStore) and store.syncs_small_folders
    # And by default the filesystem decides
    router = open_object_stores_from_env({}, default_url=(tmp_path / "auto").as_uri()).unwrap()
    store = router.for_region(GeoRegion.EU_WEST).unwrap()
    assert isinstance(store, FilesystemObjectStore)
    assert store.syncs_small_folders is not name_committed_with_file(tmp_path)


def test_a_bad_folder_fsync_setting_names_the_variable_and_creates_nothing(tmp_path: Path) -> None:
    result = open_object_stores_from_env(
        {"DATAMESH_OBJECTS_FOLDER_FSYNC": "sometimes"}, default_url=(tmp_path / "objects").as_uri()
    )
    assert isinstance(result, Err) and result.error.variable == "DATAMESH_OBJECTS_FOLDER_FSYNC"
    assert "auto, always" in str(result.error)
    assert not (tmp_path / "objects").exists()
