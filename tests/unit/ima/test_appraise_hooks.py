"""imafs.ima.appraise_hooks without a mount: the inode hooks as the engine serves
them over real files -- a security.ima value that does not parse (EINVAL), private
names (EPERM), where a namespace's security.ima/security.evm is stored, the file's
verdicts made stale by a change, and the names a read or a listing goes to. EVM
around the same changes: tests/unit/ima/test_evm_hooks.py; the behaviour models'
inode events: tests/unit/ima/test_modelhooks.py."""
from __future__ import annotations

import errno
import os

import pytest

from imafs.assemble import namespace_tree
from imafs.ima import appraise as ap
from imafs.ima.engine import AccessDenied, Change, Engine, FileRef, OpenMode, Subject, settle
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.policy_parse import parse_policy
from imafs.store import Store

HOST_PID, CHILD_PID = 1001, 1002
HOST, CHILD = Subject(HOST_PID, 0, 0), Subject(CHILD_PID, 0, 0)
IMA = ap.hash_xattr("sha256", bytes(range(32)))


class Binder:
    def __init__(self):
        self.where = {HOST_PID: 0}

    def ns_of(self, pid):
        return self.where.get(pid)

    def bind(self, pid, ns_id):
        self.where[pid] = ns_id

    def members(self, ns_id):
        return [p for p, n in self.where.items() if n == ns_id]

    def remove(self, ns_id):
        pass


class World:
    """A root namespace that measures reads, a child ``c`` (CHILD_PID), a file ``f``."""

    def __init__(self, tmp):
        self.store = Store(str(tmp / "lmdb"), sync=False)
        self.binder = Binder()
        self.tree = namespace_tree(
            self.store, parse_policy("measure func=FILE_CHECK mask=MAY_READ\n"),
            keyring=Keyring(self.store, 0), mlist=MeasurementList(self.store, 0),
            binder=self.binder)
        self.engine = Engine(self.tree, store=self.store)
        self.child = self.tree.create(self.tree.root, "c", {})
        self.binder.bind(CHILD_PID, self.child.id)
        self.path = tmp / "f"
        self.path.write_bytes(b"content\n")
        self.fds = []

    @property
    def key(self):
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino)

    def open(self, subject=HOST):
        fd = os.open(self.path, os.O_RDONLY)
        self.fds.append(fd)
        f = FileRef(fd=fd, st=os.fstat(fd), path=b"/f", readable=True,
                    reopen=lambda: os.open(self.path, os.O_RDONLY),
                    getxattr=lambda n: None, setxattr=lambda n, v: None)
        return settle(self.engine.file_open(subject, f, OpenMode()))

    def setxattr(self, subject, name, value):
        """The name the hook stores ``name`` under (``apply``'s argument)."""
        stored = []
        self.engine.inode_setxattr(subject, self.key, b"/f", name, value, stored.append)
        return stored

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.store.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def refused(err, fn, *args):
    with pytest.raises(AccessDenied) as e:
        fn(*args)
    assert e.value.errno == err, e.value.reason
    return e.value.reason


def test_bad_security_ima_and_private_names_are_refused_before_anything(world):
    applied = []
    for value in (b"", b"\x04", b"\x99" + bytes(32)):
        refused(errno.EINVAL, world.engine.inode_setxattr, HOST, world.key, b"/f",
                b"security.ima", value, applied.append)
    private = world.child.xattr_name.encode()
    for who in (HOST, CHILD):
        for value in (IMA, None):
            assert "managed by imafs" in refused(
                errno.EPERM, world.engine.inode_setxattr, who, world.key, b"/f", private,
                value, applied.append)
    assert applied == []
    assert world.setxattr(HOST, b"security.ima", None) == [b"security.ima"]  # no parse


def test_each_namespace_stores_its_own_ima_and_evm(world):
    c = world.child
    assert world.setxattr(HOST, b"security.ima", IMA) == [b"security.ima"]
    assert world.setxattr(HOST, b"security.evm", b"\x02" + bytes(20)) == [b"security.evm"]
    assert world.setxattr(CHILD, b"security.ima", IMA) == [c.xattr_name.encode()]
    assert world.setxattr(CHILD, b"security.ima", None) == [c.xattr_name.encode()]
    assert world.setxattr(CHILD, b"security.evm", None) == [c.evm_xattr_name.encode()]
    assert world.setxattr(CHILD, b"user.x", b"v") == [b"user.x"]
    # a process no namespace holds changes neither (never taken for the host)
    refused(errno.EACCES, world.setxattr, Subject(4242, 0, 0), b"security.ima", IMA)


def test_a_change_makes_the_files_verdicts_stale(world):
    world.engine.file_release(world.open())
    ii = world.engine.iints.find(world.key)
    assert ii.verdicts
    world.setxattr(HOST, b"user.x", b"v")
    assert not ii.verdicts
    world.engine.file_release(world.open())
    assert ii.verdicts
    # a setattr that keeps the size: stale verdicts; one that changes it: a content
    # change through the mount too (the verified reads of open handles end)
    wgen = ii.wgen
    st = world.engine.inode_setattr(HOST, world.key, Change(mode=0o600),
                                    lambda: (os.chmod(world.path, 0o600),
                                             os.stat(world.path))[1])
    assert st.st_mode & 0o777 == 0o600 and not ii.verdicts and ii.wgen == wgen
    world.engine.file_release(world.open())
    world.engine.inode_setattr(HOST, world.key, Change(),
                               lambda: (os.truncate(world.path, 0), os.stat(world.path))[1])
    assert not ii.verdicts and ii.wgen == wgen + 1


def test_reads_and_listings_go_to_the_callers_own_names(world):
    c, eng = world.child, world.engine
    own_ima, own_evm = c.xattr_name.encode(), c.evm_xattr_name.encode()
    assert eng.inode_getxattr(HOST_PID, b"security.ima") is None
    assert eng.inode_getxattr(CHILD_PID, b"security.ima") == (own_ima, b"security.ima")
    assert eng.inode_getxattr(CHILD_PID, b"security.evm") == own_evm
    assert eng.inode_getxattr(HOST_PID, own_ima) == eng.xattrs.UNKNOWN
    names = [b"security.ima", own_evm, b"user.x"]
    assert eng.inode_listxattr(HOST_PID, names) == [b"user.x", b"security.ima"]
    assert eng.inode_listxattr(CHILD_PID, names) == [b"user.x", b"security.ima",
                                                      b"security.evm"]
