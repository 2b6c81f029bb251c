"""imafs.fs.control without a mount: the FUSE face of the control directory -- node
ids from securityfs's table, refusals as FUSE errors, and one call of an open's
session at a time however many requests on its handle come at once."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import trio
from pyfuse3 import FUSEError

from imafs.fs.control import CHILDREN, ControlDir
from imafs.ima.securityfs import FILES, SecurityfsError


class Ctx:
    pid, uid, gid, umask = os.getpid(), 0, 0, 0o22


class FakeFs:
    """What ControlDir asks of a Securityfs: every process is in namespace ``ns``."""

    def __init__(self, session):
        self.session = session
        self.ns = type("Ns", (), {"id": 0, "path": "/", "children": {}})()

    def target(self, pid, ns_id=None):
        if ns_id not in (None, 0):
            raise SecurityfsError(errno.EACCES, "not yours")
        return self.ns

    def open(self, node, ns, caller, flags):
        if node.name == "violations" and flags & os.O_ACCMODE:
            raise SecurityfsError(errno.EACCES, "read-only")
        return self.session

    def size(self, node, ns, uid):
        return 7


class SlowSession:
    def __init__(self):
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0

    def write(self, data):
        self.inside += 1
        self.most = max(self.most, self.inside)
        time.sleep(0.05)
        self.inside -= 1
        return len(data)

    def close(self):
        raise SecurityfsError(errno.EFBIG, "over the limit")


def test_calls_of_one_open_are_serialized_and_refusals_are_fuse_errors():
    s = SlowSession()
    ctl = ControlDir(FakeFs(s))
    policy = FILES.index(next(n for n in FILES if n.name == "policy"))

    async def main():
        h = await ctl.open(ctl.nodeid(0, policy), os.O_WRONLY, Ctx)
        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(ctl.write, h, 0, b"measure func=BPRM_CHECK\n")
        with pytest.raises(FUSEError) as e:
            await ctl.release(h)
        assert e.value.errno == errno.EFBIG
    trio.run(main)
    assert s.most == 1


def test_nodes_follow_the_table():
    ctl = ControlDir(FakeFs(SlowSession()))
    names = {n.decode() for n in CHILDREN[0]}
    assert names == {n.name for n in FILES if n.parent == 0}
    pcrs = FILES.index(next(n for n in FILES if n.name == "pcrs"))
    assert set(CHILDREN[pcrs]) == {b"sha1", b"sha256"}
    violations = FILES.index(next(n for n in FILES if n.name == "violations"))

    async def main():
        a = await ctl.lookup(ctl.nodeid(0, 0), b"violations", Ctx)
        assert a.st_ino == ctl.nodeid(1, violations) and a.st_size == 7    # ns 0's own
        with pytest.raises(FUSEError) as e:
            await ctl.open(ctl.nodeid(1, violations), os.O_WRONLY, Ctx)
        assert e.value.errno == errno.EACCES
        with pytest.raises(FUSEError) as e:     # only in one's own view
            await ctl.lookup(ctl.nodeid(1, 0), b"ns-create", Ctx)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(FUSEError) as e:     # another namespace's files
            await ctl.getattr(ctl.nodeid(5, violations), Ctx)
        assert e.value.errno == errno.EACCES
    trio.run(main)
