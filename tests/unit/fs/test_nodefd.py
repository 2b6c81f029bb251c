"""fs/nodefd.py without a mount: nodes found again by file handle and by parent and
name, a bounded cache, pins, a replaced file never taken for the old one, and a
shortage of descriptors served by closing the cache."""
from __future__ import annotations

import errno
import os

import pytest

from imafs.fs.nodefd import NodeFds


class Node:
    def __init__(self, nodeid, st, parent, name):
        self.nodeid, self.dev, self.ino = nodeid, st.st_dev, st.st_ino
        self.parent, self.name = parent, name
        self.handle, self.btime = None, 0


def _tree(tmp_path, n=20):
    (tmp_path / "d").mkdir()
    for i in range(n):
        (tmp_path / "d" / f"f{i}").write_text(str(i))
    rootfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    root = Node(1, os.fstat(rootfd), None, b"")
    return root, rootfd


def _lookup(fds, parent, name, nodeid):
    with fds.pinned(parent) as pfd:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=pfd)
    node = Node(nodeid, os.fstat(fd), parent, name)
    fds.identify(node, fd)
    fds.adopt(node, fd)
    return node


@pytest.fixture(params=["handles", "names"])
def setup(request, tmp_path):
    root, rootfd = _tree(tmp_path)
    fds = NodeFds(root, rootfd, str(tmp_path), 8)
    if request.param == "names":
        fds.handles = False          # as on overlayfs without nfs_export=on
    else:
        assert fds.handles, "the test's file system exports no handles"
    yield fds, root, tmp_path
    fds.close()


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_bounded_and_found_again(setup):
    fds, root, tmp = setup
    before = _fd_count()
    d = _lookup(fds, root, b"d", 2)
    nodes = [_lookup(fds, d, f"f{i}".encode(), 10 + i) for i in range(20)]
    assert fds.count() <= 8
    assert _fd_count() - before <= 8
    if fds.handles:
        assert all(n.handle for n in nodes)
    else:
        assert all(n.handle is None and n.btime for n in nodes)
    for i, n in enumerate(nodes):           # every evicted node is reopened
        with fds.pinned(n) as fd:
            assert os.fstat(fd).st_ino == n.ino
            rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
            try:
                assert os.pread(rfd, 8, 0) == str(i).encode()
            finally:
                os.close(rfd)
    assert fds.stats["reopened"] > 0
    assert fds.count() <= 8


def test_replaced_file_is_stale(setup):
    fds, root, tmp = setup
    d = _lookup(fds, root, b"d", 2)
    a = _lookup(fds, d, b"f0", 10)
    for i in range(1, 20):                   # push it out of the cache
        _lookup(fds, d, f"f{i}".encode(), 10 + i)
    # replaced behind the mount: the same name, maybe even the same inode number
    os.unlink(tmp / "d" / "f0")
    (tmp / "d" / "f0").write_text("other")
    with pytest.raises(OSError) as e:
        with fds.pinned(a):
            pass
    assert e.value.errno == errno.ESTALE
    assert fds.stats["stale"] == 1


def test_renamed_parent_found_by_handle_only(setup):
    fds, root, tmp = setup
    d = _lookup(fds, root, b"d", 2)
    f = _lookup(fds, d, b"f1", 11)
    for i in range(2, 20):
        _lookup(fds, d, f"f{i}".encode(), 10 + i)
    fds.forget(d)                             # d's descriptor gone, d renamed behind
    os.rename(tmp / "d", tmp / "e")
    os.symlink("e", tmp / "d")                # a symlink where d was: never followed
    if fds.handles:
        with fds.pinned(f) as fd:
            assert os.fstat(fd).st_ino == f.ino
    else:
        with pytest.raises(OSError) as e:
            with fds.pinned(f):
                pass
        assert e.value.errno == errno.ESTALE


def test_pinned_never_closed(setup):
    fds, root, tmp = setup
    d = _lookup(fds, root, b"d", 2)
    a = _lookup(fds, d, b"f0", 10)
    slot = fds.pin(a)
    fd = slot.fd
    for i in range(1, 20):
        _lookup(fds, d, f"f{i}".encode(), 10 + i)
    fds.forget(a)
    os.fstat(fd)                              # still open: pinned
    assert os.fstat(fd).st_ino == a.ino
    fds.unpin(slot)
    with pytest.raises(OSError):              # closed by the last unpin
        os.fstat(fd)


def test_shortage_closes_the_cache_and_retries(setup):
    fds, root, tmp = setup
    d = _lookup(fds, root, b"d", 2)
    for i in range(20):
        _lookup(fds, d, f"f{i}".encode(), 10 + i)
    assert fds.count() > 0
    calls = []

    def opener():
        calls.append(fds.count())
        if len(calls) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return 42

    assert fds.call(opener) == 42
    assert calls[1] == 0                       # the cache was emptied before the retry
    assert fds.stats["shortages"] == 1
