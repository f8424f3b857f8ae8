"""Is a path on a file system that every node of a job sees? (run dirs, rollout shards and checkpoints must be.)

The answer comes from the mount table: the longest mount point that contains the path gives its file-system type.
Network and parallel file systems (NFS, Lustre, GPFS, BeeGFS, CephFS, WekaFS, ...) count as shared; tmpfs, overlay and
block-device file systems (ext4, xfs, ...) are local to a node. Only a multi-node job needs shared paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SHARED_FS_TYPES = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "fuse.cephfs", "ceph", "wekafs", "panfs", "cifs", "smb3",
    "glusterfs", "fuse.glusterfs", "orangefs", "pvfs2", "fuse.juicefs", "fuse.sshfs", "afs", "virtiofs",
})
LOCAL_FS_TYPES = frozenset({
    "tmpfs", "ramfs", "overlay", "aufs", "devtmpfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "vfat",
})
Sharing = Literal["shared", "local", "unknown"]


@dataclass(frozen=True)
class MountInfo:
    """The mount that holds a path."""

    mount_point: str
    fs_type: str
    device: str

    @property
    def sharing(self) -> Sharing:
        if self.fs_type in SHARED_FS_TYPES:
            return "shared"
        if self.fs_type in LOCAL_FS_TYPES:
            return "local"
        return "unknown"


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escape, char)
    return field


def mount_of(path: str, mounts_text: str) -> MountInfo | None:
    """The mount holding the absolute `path`, from the text of /proc/mounts (the last-mounted of equal points wins)."""
    best: MountInfo | None = None
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        device, mount_point, fs_type = _unescape(fields[0]), _unescape(fields[1]), fields[2]
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= len(best.mount_point)):
            best = MountInfo(mount_point, fs_type, device)
    return best


def mount_of_path(path: str | os.PathLike[str], mounts_file: str = "/proc/self/mounts") -> MountInfo | None:
    """The mount that holds `path` (resolved through symlinks; the nearest existing parent if it does not exist yet)."""
    resolved = Path(path).expanduser().resolve()
    try:
        text = Path(mounts_file).read_text()
    except OSError:
        return None
    return mount_of(str(resolved), text)


def shared_path_problem(path: str | os.PathLike[str], num_nodes: int,
                        mounts_file: str = "/proc/self/mounts") -> str | None:
    """Why `path` cannot serve a job on `num_nodes` nodes, or None when it can (or when that cannot be told)."""
    if num_nodes <= 1:
        return None
    mount = mount_of_path(path, mounts_file)
    if mount is None or mount.sharing != "local":
        return None
    return (f"{path} is on {mount.fs_type} mounted at {mount.mount_point}, which each node has its own copy of; a "
            f"{num_nodes}-node job needs it on a shared file system (NFS, Lustre, GPFS, ...)")


def writable_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the directory `path` (or, if missing, the nearest existing parent it would be created in) is not writable."""
    candidate = Path(path).expanduser().absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    if not candidate.is_dir():
        return f"{path}: {candidate} exists and is not a directory"
    if not os.access(candidate, os.W_OK | os.X_OK):
        return f"{path}: {candidate} is not writable by this user"
    return None
