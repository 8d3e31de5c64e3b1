"""Which filesystem holds a path, and whether a file's fsync there also commits the file's new name.

POSIX makes a new name durable only once its folder is fsynced.  Three Linux filesystems commit a
name made *before* a file's fsync with that fsync, and a store may skip the folder's own fsync there:

* ext4 with a journal commits the transaction that holds the inode's latest change; linking the
  file changed its link count in the same transaction as the folder entry.  Without a journal
  (as on the machines this project is built and tested on), every new folder entry marks its inode
  ``EXT4_STATE_NEWENTRY`` (``ext4_add_entry``), and the inode's fsync then writes the parent
  folder too, and the parent's parent while that one is new as well (``ext4_sync_parent``);
* XFS forces its log up to the inode's latest change, which is logged with the folder entry;
* btrfs logs a new file's names in its tree log when the file is fsynced.

Anything else (overlayfs, NFS, FUSE, tmpfs, an unknown or unreadable mount table) gets the folder
fsync POSIX asks for.  A plain ``open(O_CREAT); write; fsync`` relies on the same behaviour for its
own name.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Filesystems whose fsync of a file commits the names the file was given before that fsync.
NAME_COMMITTED_WITH_FILE = frozenset({"ext4", "xfs", "btrfs"})

MOUNTINFO = Path("/proc/self/mountinfo")


def filesystem_type(path: str | Path, *, mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the mounted filesystem holding ``path`` (``"ext4"``, ``"overlay"``…), or ``None``
    when the mount table cannot be read or does not list the path's device."""
    device = os.stat(path).st_dev
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        table = mountinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in table.splitlines():
        # "36 35 98:0 /root /mnt rw,noatime master:1 - ext4 /dev/vda rw": optional fields end at "-"
        fields = line.split()
        if len(fields) > 3 and fields[2] == wanted and "-" in fields[6:]:
            after = fields.index("-", 6) + 1
            if after < len(fields):
                return fields[after]
    return None


def name_committed_with_file(path: str | Path) -> bool:
    """Whether a file's fsync under ``path`` also makes the file's new folder entry durable."""
    return filesystem_type(path) in NAME_COMMITTED_WITH_FILE
