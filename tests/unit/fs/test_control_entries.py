"""imafs.fs.control without a mount: the files of an ``entries`` row
(``digest_lists_loaded/LABEL``) -- one node per entry the securityfs lists, its key in
the node id, gone once the entry is."""
from __future__ import annotations

import errno
import os
import threading

import pyfuse3
import pytest
import trio
from pyfuse3 import FUSEError

from imafs.fs.control import ENTRIES, ControlDir
from imafs.ima.securityfs import FILES, SecurityfsError


class Ctx:
    pid, uid, gid, umask = os.getpid(), 0, 0, 0o22


class Session:
    def __init__(self, key):
        self.key = key
        self.lock = threading.Lock()

    def read(self, off, size):
        return f"list {self.key}\n".encode()[off:off + size]


class FakeFs:
    """Namespace 0 with two loaded lists (keys 3 and 9)."""

    def __init__(self):
        self.ns = type("Ns", (), {"id": 0, "path": "/", "children": {}})()
        self.lists = {"debian.list": 3, "rpm.list": 9}
        self.opened = []

    def target(self, pid, ns_id=None):
        return self.ns

    def entries(self, node, ns):
        return dict(self.lists)

    def open(self, node, ns, caller, flags, key=0):
        self.opened.append((node.name, key))
        if key not in self.lists.values():
            raise SecurityfsError(errno.ENOENT, "gone")
        return Session(key)

    def size(self, node, ns, uid, key=0):
        if key and key not in self.lists.values():
            raise SecurityfsError(errno.ENOENT, "gone")
        return 11 if key else 0


def test_entries_are_nodes_with_their_key():
    fs = FakeFs()
    ctl = ControlDir(fs)
    d = FILES.index(next(n for n in FILES if n.name == "digest_lists_loaded"))
    row = ENTRIES[d]
    assert FILES[row].entries

    async def main():
        top = await ctl.lookup(ctl.nodeid(0, 0), b"digest_lists_loaded", Ctx)
        a = await ctl.lookup(top.st_ino, b"rpm.list", Ctx)
        assert ctl.key(a.st_ino) == 9 and ctl.split(a.st_ino) == (1, row)
        assert a.st_size == 11
        with pytest.raises(FUSEError) as e:
            await ctl.lookup(top.st_ino, b"nope.list", Ctx)
        assert e.value.errno == errno.ENOENT
        h = await ctl.open(a.st_ino, os.O_RDONLY, Ctx)
        assert await ctl.read(h, 0, 100) == b"list 9\n"
        assert fs.opened[-1] == ("", 9)
        # the row itself, without a key, is no file
        with pytest.raises(FUSEError):
            await ctl.getattr(ctl.nodeid(1, row), Ctx)
        with pytest.raises(FUSEError):
            await ctl.open(ctl.nodeid(1, row), os.O_RDONLY, Ctx)
        # listed, sorted, each with its own node id
        dh = await ctl.opendir(top.st_ino, Ctx)
        seen = []

        def reply(token, name, attr, nxt):
            seen.append((name, attr.st_ino))
            return True
        real = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = reply
        try:
            await ctl.readdir(dh, 0, None)
        finally:
            pyfuse3.readdir_reply = real
        assert seen == [(b"debian.list", ctl.nodeid(1, row, 3)),
                        (b"rpm.list", ctl.nodeid(1, row, 9))]
        # removed: its node answers ENOENT
        del fs.lists["rpm.list"]
        with pytest.raises(FUSEError) as e:
            await ctl.getattr(a.st_ino, Ctx)
        assert e.value.errno == errno.ENOENT
    trio.run(main)
