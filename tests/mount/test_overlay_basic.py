"""Basic passthrough behaviour through a real mount (integrity off)."""
import errno
import os
import stat
import subprocess

import pytest

from helpers.mounts import run_as

pytestmark = pytest.mark.mount


def test_read_write_listing(plain_mount):
    m, b = plain_mount.mnt, plain_mount.backing
    (b / "a").write_text("hello")
    (b / "d").mkdir()
    (b / "d" / "e").write_bytes(b"x" * 100000)
    assert (m / "a").read_text() == "hello"
    assert sorted(os.listdir(m)) == ["a", "d"]
    assert (m / "d" / "e").read_bytes() == b"x" * 100000
    (m / "new").write_text("through the mount")
    assert (b / "new").read_text() == "through the mount"
    assert os.stat(m / "a").st_ino == os.stat(b / "a").st_ino


def test_symlink_not_followed_out_of_backing(plain_mount):
    m, b = plain_mount.mnt, plain_mount.backing
    os.symlink("/etc", b / "etc")
    assert os.readlink(m / "etc") == "/etc"
    assert stat.S_ISLNK(os.lstat(m / "etc").st_mode)
    # ".." at the mount root is the kernel's (the mount point's parent), never the
    # backing directory's parent
    assert os.stat(str(m) + "/..").st_ino == os.stat(m.parent).st_ino
    assert sorted(os.listdir(str(m) + "/../" + m.name)) == sorted(os.listdir(m))


def test_create_as_caller(plain_mount):
    m, b = plain_mount.mnt, plain_mount.backing
    os.chmod(b, 0o777)
    r = run_as(1234, 2345, ["sh", "-c", f"umask 022; echo hi > {m}/mine; mkdir {m}/dir; "
                                         f"ln -s x {m}/sl"], capture_output=True)
    assert r.returncode == 0, r.stderr
    for name in ("mine", "dir", "sl"):
        st = os.lstat(b / name)
        assert (st.st_uid, st.st_gid) == (1234, 2345), name
    assert stat.S_IMODE(os.stat(b / "mine").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(b / "dir").st_mode) == 0o755


def test_exec_through_mount(plain_mount):
    m, b = plain_mount.mnt, plain_mount.backing
    (b / "s.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(b / "s.sh", 0o755)
    assert subprocess.run([str(m / "s.sh")], capture_output=True, text=True).stdout == "ran\n"


def test_control_dir_absent_without_integrity(plain_mount):
    assert not (plain_mount.mnt / ".imafs").exists()


def test_open_nofollow_and_tar(plain_mount):
    # O_NOFOLLOW reaches OPEN (tar reads files so); a symlink is refused by the kernel
    m, b = plain_mount.mnt, plain_mount.backing
    (b / "f").write_text("hi\n")
    os.symlink("f", b / "l")
    fd = os.open(m / "f", os.O_RDONLY | os.O_NOFOLLOW)
    try:
        assert os.read(fd, 10) == b"hi\n"
    finally:
        os.close(fd)
    with pytest.raises(OSError) as ei:
        os.open(m / "l", os.O_RDONLY | os.O_NOFOLLOW)
    assert ei.value.errno == errno.ELOOP
    r = subprocess.run(["tar", "cf", "-", "f", "l"], cwd=m, capture_output=True)
    assert r.returncode == 0 and b"hi\n" in r.stdout, r.stderr


def test_file_grown_behind_the_mount_reads_whole_at_the_next_open(plain_mount):
    """The kernel caches a file's size for the attribute timeout; an open that finds
    the file changed behind the mount drops that, so the new bytes are read."""
    m, b = plain_mount.mnt, plain_mount.backing
    (b / "log").write_bytes(b"first\n")
    assert (m / "log").read_bytes() == b"first\n"
    with open(b / "log", "ab") as f:
        f.write(b"second line, appended behind the mount\n")
    assert (m / "log").read_bytes() == b"first\nsecond line, appended behind the mount\n"
    os.truncate(b / "log", 3)
    assert (m / "log").read_bytes() == b"fir"
