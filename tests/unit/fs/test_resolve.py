"""imafs.fs.resolve: a path of the mount to a backing inode, never leaving the backing
tree -- symlinks followed inside it (an absolute target restarts at its root), ``..``
stopping at the root, loops and non-directories refused."""
from __future__ import annotations

import errno
import os

import pytest

from imafs.fs.resolve import MAX_SYMLINKS, resolve


@pytest.fixture
def tree(tmp_path):
    """root/ (the backing tree) beside outside/, with links that try to leave."""
    root, out = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    out.mkdir()
    (root / "etc" / "passwd").write_text("inside\n")
    (out / "etc").mkdir()
    (out / "etc" / "passwd").write_text("outside\n")
    os.symlink("/etc/passwd", root / "abs")                   # absolute: the root's
    os.symlink("../../outside/etc/passwd", root / "etc" / "up")
    os.symlink("etc", root / "rel")
    os.symlink("loop", root / "loop")
    fd = os.open(root, os.O_PATH)
    yield fd, root
    os.close(fd)


def read(fd_path):
    fd, rel = fd_path
    try:
        with open(f"/proc/self/fd/{fd}") as f:
            return f.read(), rel
    finally:
        os.close(fd)


def test_paths_stay_inside_the_backing_tree(tree):
    fd, _root = tree
    assert read(resolve(fd, "/etc/passwd")) == ("inside\n", "/etc/passwd")
    assert read(resolve(fd, "/abs")) == ("inside\n", "/etc/passwd")
    assert read(resolve(fd, "/rel/./passwd")) == ("inside\n", "/etc/passwd")
    assert read(resolve(fd, "/../../../etc/passwd")) == ("inside\n", "/etc/passwd")
    with pytest.raises(FileNotFoundError):           # ../../outside from /etc: the root's
        resolve(fd, "/etc/up")


def test_nofollow_loops_and_not_a_directory(tree):
    fd, root = tree
    lfd, rel = resolve(fd, "/abs", follow=False)
    try:
        assert rel == "/abs" and os.readlink(f"/proc/self/fd/{lfd}").endswith("/abs")
    finally:
        os.close(lfd)
    with pytest.raises(OSError) as e:
        resolve(fd, "/loop")
    assert e.value.errno == errno.ELOOP and MAX_SYMLINKS == 40
    with pytest.raises(NotADirectoryError):
        resolve(fd, "/etc/passwd/x")
