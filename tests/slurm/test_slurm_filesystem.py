"""Shared-file-system and writability checks, from hand-written mount tables and real directories."""

from __future__ import annotations

import pytest

from hpc_rlhf.slurm import mount_of, shared_path_problem, writable_dir_problem

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
10.0.0.5:/export/home /home nfs4 rw,vers=4.2 0 0
10.0.0.9@o2ib:/scratch /lus/scratch lustre rw 0 0
scratch2 /lus/scratch2 gpfs rw 0 0
/dev/sdb1 /home/me/local\\040disk xfs rw 0 0
weird /opt/thing fuse.mystery rw 0 0
"""


@pytest.mark.parametrize("path, mount_point, fs_type, sharing", [
    ("/", "/", "ext4", "local"),
    ("/usr/lib", "/", "ext4", "local"),
    ("/tmp/x", "/tmp", "tmpfs", "local"),
    ("/home/me/runs/ppo", "/home", "nfs4", "shared"),
    ("/lus/scratch/run", "/lus/scratch", "lustre", "shared"),
    ("/lus/scratch2/run", "/lus/scratch2", "gpfs", "shared"),  # not /lus/scratch: a prefix must end at a "/"
    ("/home/me/local disk/run", "/home/me/local disk", "xfs", "local"),  # the octal escape is decoded
    ("/opt/thing/a", "/opt/thing", "fuse.mystery", "unknown"),
])
def test_longest_mount_point_decides(path, mount_point, fs_type, sharing):
    mount = mount_of(path, MOUNTS)
    assert (mount.mount_point, mount.fs_type, mount.sharing) == (mount_point, fs_type, sharing)


def test_later_mount_on_the_same_point_wins():
    assert mount_of("/data/x", "a /data ext4 rw 0 0\nb /data nfs rw 0 0\n").fs_type == "nfs"


def test_shared_path_problem_only_for_local_paths_of_multi_node_jobs(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/runs {tmp_path}/runs nfs rw 0 0\n")
    local_run = tmp_path / "local_run"
    problem = shared_path_problem(local_run, num_nodes=2, mounts_file=str(mounts))
    assert problem is not None and str(local_run) in problem and "ext4" in problem and "2-node" in problem
    assert shared_path_problem(local_run, num_nodes=1, mounts_file=str(mounts)) is None
    assert shared_path_problem(tmp_path / "runs" / "a", num_nodes=6, mounts_file=str(mounts)) is None
    assert shared_path_problem(local_run, num_nodes=2, mounts_file=str(tmp_path / "missing")) is None


def test_writable_dir_problem(tmp_path):
    assert writable_dir_problem(tmp_path / "new" / "deeper") is None  # would be created inside tmp_path
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is not a directory" in writable_dir_problem(a_file / "run")
