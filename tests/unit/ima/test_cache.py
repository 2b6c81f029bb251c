"""The engine's LMDB caches (imafs/ima/cache.py) read what the layout before the engine
split wrote: a state directory of an earlier mount keeps its digests, verity trees and
verdicts. The entries are written here byte by byte in that layout (database names
``digests``, ``trees``, ``done``; big-endian identity and version; the verdict key as
sha256 over the repr of (version, verdict key, fingerprints)), independently of the
code under test, so a change of name, format or key derivation fails here."""
from __future__ import annotations

import hashlib
import os
import struct

import pytest

from imafs.ima import hashing
from imafs.ima.verity import VeritySpec
from imafs.ima.engine import Engine, FileRef, OpenMode, Subject, settle
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import Namespace, NamespaceTree
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import parse_policy
from imafs.store import Store

MEASURE = "measure func=FILE_CHECK mask=MAY_READ\n"


def _old_identity(st) -> bytes:
    return struct.pack(">QQ", st.st_dev, st.st_ino)


def _old_version(st) -> tuple:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, 0)   # generation 0 (no ioctl)


def _write_old_state(cache: Store, path, root: Namespace, *, verdict: bool,
                     tree: bool) -> None:
    """What a mount of the earlier layout left in STATE/cache after one measured,
    read-only open by root of the file."""
    st = os.stat(path)
    data = path.read_bytes()
    version = _old_version(st)
    blob = struct.pack(">QQQQ", *version)
    for name, d in sorted({"sha256": hashlib.sha256(data).digest()}.items()):
        blob += bytes([len(name)]) + name.encode() + bytes([len(d)]) + d
    dbs = {name: cache.db(name) for name in ("digests", "trees", "done")}  # before the txn
    with cache.env.begin(write=True) as txn:
        txn.put(_old_identity(st), blob, db=dbs["digests"])
        if tree:
            with open(path, "rb") as f:
                t = hashing.hash_fd(f.fileno(), [], verity=VeritySpec()).tree
            txn.put(_old_identity(st), struct.pack(">QQQQ", *version) + t.to_bytes(),
                    db=dbs["trees"])
        if verdict:
            done_key = (0, (0, 0), 4, False, None)     # ns id, (fsuid, fsgid), MAY_READ
            fp = (root.fingerprint(),)
            h = hashlib.sha256(repr((tuple(version), done_key, fp)).encode()).digest()[:16]
            value = struct.pack("<II", 1, 0) + struct.pack("<II", 1, 0)   # measured by 0
            txn.put(_old_identity(st) + h, value, db=dbs["done"])


class World:
    def __init__(self, tmp, *, verify: bool):
        self.store = Store(str(tmp / "lmdb"))
        self.cache = Store(str(tmp / "cache"), sync=False)
        self.root = Namespace(id=0, name="", parent=None, policy=Policy(parse_policy(MEASURE)),
                              mlist=MeasurementList(self.store, 0), keyring=Keyring())
        self.engine = Engine(NamespaceTree(self.root), store=self.store,
                             cache_store=self.cache, verify_reads=verify)

    def open(self, path):
        fd = os.open(path, os.O_RDONLY)
        f = FileRef(fd=fd, st=os.fstat(fd), path=b"/f", readable=True,
                    reopen=lambda: os.open(path, os.O_RDONLY), getxattr=lambda n: None,
                    setxattr=lambda n, v: None)
        try:
            state = settle(self.engine.file_open(Subject(os.getpid(), 0, 0), f, OpenMode()))
            self.engine.file_release(state)
        finally:
            os.close(fd)

    def close(self):
        self.store.close()
        self.cache.close()


@pytest.fixture
def old_state(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(os.urandom(3 * 4096 + 17))
    made = []

    def make(*, verdict: bool, tree: bool, verify: bool):
        w = World(tmp_path, verify=verify)
        made.append(w)
        _write_old_state(w.cache, p, w.root, verdict=verdict, tree=tree)
        return w, p
    yield make
    for w in made:
        w.close()


def test_old_verdict_is_taken(old_state, monkeypatch):
    """The verdict an earlier mount kept decides the open: no policy matching, no
    hashing, nothing measured again."""
    w, p = old_state(verdict=True, tree=False, verify=False)
    calls = []
    real = Engine.get_action
    monkeypatch.setattr(Engine, "get_action", lambda *a: calls.append(1) or real(*a))
    count = w.root.mlist.count
    w.open(p)
    s = w.engine.stats()
    assert s["done_records"] == 1 and s["hashed_files"] == 0 and not calls
    assert w.root.mlist.count == count


def test_old_digests_are_taken(old_state):
    """Without a verdict, the digests an earlier mount cached spare the hashing: the
    open is decided and measured with them."""
    w, p = old_state(verdict=False, tree=False, verify=False)
    w.open(p)
    s = w.engine.stats()
    assert s["hashed_files"] == 0 and s["cache_hits"] == 1 and s["done_records"] == 0
    last = list(w.root.mlist.entries())[-1]
    assert last.file_digest[2] == hashlib.sha256(p.read_bytes()).digest()


def test_old_trees_are_taken(old_state):
    """With reads verified, the verity tree an earlier mount cached is loaded with the
    digests: nothing is hashed."""
    w, p = old_state(verdict=False, tree=True, verify=True)
    w.open(p)
    s = w.engine.stats()
    assert s["hashed_files"] == 0 and s["tree_loads"] == 1
