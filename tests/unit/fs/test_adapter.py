"""imafs.fs.adapter (IntegrityHooks) against a fake engine, without a mount: one FUSE
request becomes one engine call with the caller, the file and the open mode it
describes; the engine's answer -- an OpenState, a Pending, None, bytes -- comes back
as it is; a refusal keeps its errno; a read the engine cannot verify ends in EIO
and in the kernel's pages of the file being dropped and never kept again."""
from __future__ import annotations

import errno
import os

import pytest

from helpers.mounts import wait_for
from imafs.fs import adapter as adapter_mod
from imafs.fs.adapter import IntegrityHooks
from imafs.fs.nodefd import NodeFds
from imafs.fs.inode import Caller, Denied, Inode
from imafs.ima.engine import AccessDenied, FileRef, OpenMode, OpenState, Pending, Subject

CALLER = Caller(pid=4242, uid=1000, gid=100)


class FakeEngine:
    """Records every call; answers what the test put in ``answers`` (an exception
    instance is raised)."""

    def __init__(self, verify_reads=False):
        self.verify_reads = verify_reads
        self.calls: list[tuple] = []
        self.answers: dict[str, object] = {}
        self.file = None

    def _answer(self, name, *args):
        self.calls.append((name, *args))
        a = self.answers.get(name)
        if isinstance(a, BaseException):
            raise a
        return a

    def active(self):
        return True

    def file_open(self, subject, f, mode, **kw):
        return self._answer("file_open", subject, f, mode)

    def file_read(self, state, fd, off, size):
        return self._answer("file_read", state, fd, off, size)

    def file_release(self, state):
        return self._answer("file_release", state)

    def file_written(self, state):
        return self._answer("file_written", state)

    def file_changed(self, key, size=None):
        return self._answer("file_changed", key, size)

    def measured_size(self, key):
        return self._answer("measured_size", key)

    def watches_attrs(self):
        return self._answer("watches_attrs")

    def inode_setattr(self, subject, key, change, apply, file=None):
        self.file = file() if file is not None else None
        self._answer("inode_setattr", subject, key, change)
        return apply()

    def inode_setxattr(self, subject, key, path, name, value, apply, file=None, st=None):
        self.file = file() if file is not None else None
        self.st = st                            # for the behaviour models' events
        stored = self._answer("inode_setxattr", subject, key, path, name, value)
        apply(stored or name)

    def modelled(self):
        return False

    def inode_getxattr(self, pid, name):
        return self._answer("inode_getxattr", pid, name)

    def inode_listxattr(self, pid, names):
        return self._answer("inode_listxattr", pid, names)


@pytest.fixture
def tree(tmp_path):
    """A root inode (the backing directory) and the inode of its file ``f``, as the
    overlay keeps them (nodes found again through fs/nodefd.py)."""
    (tmp_path / "f").write_bytes(b"0123456789" * 1000)
    rootfd = os.open(tmp_path, os.O_PATH)
    root = Inode(1, None, os.fstat(rootfd), None, b"")
    fds = root.fds = NodeFds(root, rootfd, str(tmp_path), 64)
    fd = os.open(tmp_path / "f", os.O_PATH)
    f = Inode(7, fds, os.fstat(fd), root, b"f")
    fds.identify(f, fd)
    fds.adopt(f, fd)
    yield root, f, tmp_path / "f"
    fds.close()


@pytest.fixture
def opened_fds():
    fds = []

    def open_(path, flags):
        fd = os.open(path, flags)
        fds.append(fd)
        return fd
    yield open_
    for fd in fds:
        os.close(fd)


@pytest.fixture
def invalidated(monkeypatch):
    """The inodes the adapter asked the kernel to drop (pyfuse3.invalidate_inode)."""
    got = []
    monkeypatch.setattr(adapter_mod.pyfuse3, "invalidate_inode",
                        lambda nodeid, attr_only=False: got.append((nodeid, attr_only)))
    return got


def handle(ref=None, tree=None) -> OpenState:
    """The engine's token of a read-only handle (``ref``: the adapter's nodeid)."""
    t = OpenState(iint=None, ns=None, file=None, readable=True, writable=False)
    t.ref, t.tree = ref, tree
    return t


def test_an_open_is_one_engine_call_with_the_caller_the_file_and_the_mode(tree, opened_fds):
    _root, inode, path = tree
    eng = FakeEngine()
    state = object()
    eng.answers["file_open"] = state
    h = IntegrityHooks(eng)
    fd = opened_fds(path, os.O_RDWR | os.O_APPEND)
    assert h.open(CALLER, inode, fd, os.O_RDWR | os.O_APPEND, False) is state
    [(name, subject, f, mode)] = eng.calls
    assert name == "file_open"
    assert subject == Subject(4242, 1000, 100)
    assert isinstance(f, FileRef) and f.fd == fd and f.path == b"/f" and f.readable
    assert f.key == (os.stat(path).st_dev, os.stat(path).st_ino)
    assert f.st.st_size == 10_000
    assert mode == OpenMode(readable=True, writable=True, append=True)
    # an exec open, and a created file
    eng.calls.clear()
    fd = opened_fds(path, os.O_RDONLY)
    h.open(CALLER, inode, fd, os.O_RDONLY, True, created=True)
    assert eng.calls[0][3] == OpenMode(readable=True, exec_=True, created=True)
    eng.calls.clear()
    fd = opened_fds(path, os.O_WRONLY)
    h.open(CALLER, inode, fd, os.O_WRONLY, False)
    assert eng.calls[0][2].readable is False and eng.calls[0][3].writable


def test_the_file_ref_reads_the_backing_files_xattrs(tree, opened_fds):
    _root, inode, path = tree
    eng = FakeEngine()
    h = IntegrityHooks(eng)
    h.open(CALLER, inode, opened_fds(path, os.O_RDONLY), os.O_RDONLY, False)
    f = eng.calls[0][2]
    assert f.getxattr("user.none") is None                 # ENODATA: no value
    os.setxattr(path, "user.x", b"v")
    assert f.getxattr("user.x") == b"v"
    f.setxattr("user.y", b"w")
    assert os.getxattr(path, "user.y") == b"w"
    fd = f.reopen()
    try:
        assert os.read(fd, 10) == b"0123456789"
    finally:
        os.close(fd)


def test_a_pending_open_is_passed_through_unchanged(tree, opened_fds):
    _root, inode, path = tree
    eng = FakeEngine()
    p = Pending(lambda: "finished")
    eng.answers["file_open"] = p
    assert IntegrityHooks(eng).open(CALLER, inode, opened_fds(path, os.O_RDONLY),
                               os.O_RDONLY, False) is p


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM, errno.EIO])
def test_a_refusal_reaches_the_overlay_with_its_errno(tree, opened_fds, err):
    _root, inode, path = tree
    eng = FakeEngine()
    eng.answers["file_open"] = AccessDenied(err, "refused by the fake engine")
    with pytest.raises(Denied) as e:
        IntegrityHooks(eng).open(CALLER, inode, opened_fds(path, os.O_RDONLY), os.O_RDONLY, False)
    assert e.value.errno == err and e.value.reason == "refused by the fake engine"


def test_no_engine_call_for_what_is_not_a_regular_file(tree, opened_fds):
    root, _inode, path = tree
    eng = FakeEngine()
    fd = opened_fds(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    assert IntegrityHooks(eng).open(CALLER, root, fd, os.O_RDONLY, False) is None
    assert eng.calls == []


def test_release_and_write_are_passed_through(tree):
    eng = FakeEngine()
    h = IntegrityHooks(eng)
    token = object()
    assert h.release(token) is None
    p = Pending(lambda: None)
    eng.answers["file_release"] = p
    assert h.release(token) is p
    h.wrote(token)
    assert eng.calls == [("file_release", token), ("file_release", token),
                         ("file_written", token)]


def test_a_setattr_is_one_engine_call_around_the_change(tree):
    """The engine gets the caller, the inode's key and the change, the overlay's
    ``apply`` to make it (its result comes back) and the file as a FileRef; a refusal
    keeps its errno and nothing is applied."""
    _root, inode, path = tree
    eng = FakeEngine()
    h = IntegrityHooks(eng)
    eng.answers["watches_attrs"] = True
    assert h.attr_hooks is True
    done = []
    st = h.setattr(CALLER, inode, None, None, 0o750,
                   lambda: done.append("applied") or os.stat(path))
    assert done == ["applied"] and st.st_size == 10_000
    name, subject, key, change = eng.calls[-1]
    assert (name, subject, key) == ("inode_setattr", Subject(4242, 1000, 100),
                                    (inode.dev, inode.ino))
    assert (change.uid, change.gid, change.mode) == (None, None, 0o750)
    assert eng.file.path == b"/f" and eng.file.st.st_size == 10_000
    eng.answers["inode_setattr"] = AccessDenied(errno.EPERM, "refused by EVM")
    with pytest.raises(Denied) as e:
        h.setattr(CALLER, inode, 4242, None, None, lambda: done.append("again"))
    assert e.value.errno == errno.EPERM and done == ["applied"]


def test_no_file_ref_for_what_is_not_a_regular_file(tree):
    root, _inode, _path = tree
    eng = FakeEngine()
    h = IntegrityHooks(eng)
    h.setattr(CALLER, root, None, None, 0o755, lambda: None)
    assert eng.file is None


def test_reads_verified_inline_in_a_thread_or_not_at_all(tree, opened_fds):
    _root, inode, path = tree
    eng = FakeEngine(verify_reads=True)
    h = IntegrityHooks(eng)
    try:
        token = handle(inode.nodeid)
        fd = opened_fds(path, os.O_RDONLY)
        eng.answers["file_read"] = b"verified"
        assert h.read(token, fd, 0, 8) == b"verified"
        assert eng.calls[-1] == ("file_read", token, fd, 0, 8)
        eng.answers["file_read"] = Pending(lambda: b"from the thread")
        r = h.read(token, fd, 4096, 15)
        assert type(r) is Pending and r.finish() == b"from the thread"
        # not verified: the overlay reads itself, and a verified open of the inode
        # later must not keep the pages the kernel may have cached meanwhile
        eng.answers["file_read"] = None
        assert h.read(token, fd, 0, 8) is None
        verified = handle(tree=object())
        assert h.opened(inode, verified, unchanged=True) is False
        assert verified.ref == inode.nodeid
        assert h.opened(inode, verified, unchanged=True) is True     # once
    finally:
        h.close()


def test_a_read_that_fails_verification_is_eio_and_drops_the_kernels_pages(
        tree, opened_fds, invalidated):
    _root, inode, path = tree
    eng = FakeEngine(verify_reads=True)
    h = IntegrityHooks(eng)
    try:
        token = handle(inode.nodeid)

        def mismatch():
            raise AccessDenied(errno.EIO, "/f: block 3 does not match its verity tree")
        eng.answers["file_read"] = Pending(mismatch)
        r = h.read(token, opened_fds(path, os.O_RDONLY), 12288, 4096)
        assert type(r) is Pending
        with pytest.raises(Denied) as e:
            r.finish()
        assert e.value.errno == errno.EIO and "block 3" in e.value.reason
        # the invalidation goes through its own thread (never the failing read's)
        assert wait_for(lambda: invalidated, 5.0)
        assert invalidated == [(inode.nodeid, False)]
        # and the next open of the inode may not keep what the kernel cached
        assert h.opened(inode, None, unchanged=True) is False
        assert h.opened(inode, None, unchanged=True) is True
    finally:
        h.close()


def test_xattr_hooks_ask_the_engine(tree):
    _root, inode, _path = tree
    eng = FakeEngine()
    h = IntegrityHooks(eng)
    stored = []
    eng.answers["inode_setxattr"] = b"security.imafs.ns3.ima"
    assert h.setxattr(CALLER, inode, b"security.ima", b"\x04\x04", stored.append) is None
    assert stored == [b"security.imafs.ns3.ima"]      # stored where the engine says
    assert eng.calls[-1] == ("inode_setxattr", Subject(4242, 1000, 100),
                             (inode.dev, inode.ino), b"/f", b"security.ima", b"\x04\x04")
    assert eng.file.path == b"/f"
    assert (eng.st.st_dev, eng.st.st_ino) == (inode.dev, inode.ino)
    eng.answers["inode_setxattr"] = None
    h.setxattr(CALLER, inode, b"user.x", b"v", stored.append)
    assert stored[-1] == b"user.x"
    eng.answers["inode_listxattr"] = [b"security.ima"]
    assert h.listxattr(CALLER, inode, [b"security.imafs.ns3.ima"]) == [b"security.ima"]
    eng.answers["inode_setxattr"] = AccessDenied(errno.EPERM, "not yours")
    with pytest.raises(Denied) as e:
        h.setxattr(CALLER, inode, b"security.ima", b"\x03", stored.append)
    assert e.value.errno == errno.EPERM and stored[-1] == b"user.x"   # nothing stored


def test_shown_size_is_the_measured_one_while_it_differs(tree):
    _root, _inode, path = tree
    eng = FakeEngine()
    h = IntegrityHooks(eng)
    st = os.stat(path)
    eng.answers["measured_size"] = None
    assert h.shown_size(st) is None
    eng.answers["measured_size"] = 10_000
    assert h.shown_size(st) is None
    eng.answers["measured_size"] = 4096
    assert h.shown_size(st) == 4096
    assert h.shown_size(os.stat(path.parent)) is None        # a directory
