"""Read-time verification in the engine, without a mount: the verity tree built in the
digest pass, ``Engine.file_read`` (good reads, changed blocks, shrunk and grown
files), violations and audit lines, the LMDB tree cache, and ``digest_type=verity``
(measurement of the fs-verity digest, sigv3 appraisal)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess

from helpers import testkeys as tk
import pytest

from imafs.ima import appraise as ap
from imafs.ima.verity import fsverity_digest_fd
from imafs.ima.audit import AuditLog
from imafs.ima.engine import (AccessDenied, Engine, FileRef, OpenMode, Pending,
                              ReadVerifyError, Subject, settle)
from imafs.ima.keys import Keyring, keyid_of
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import Namespace, NamespaceTree
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import parse_policy
from imafs.store import Store

BS = 4096
MEASURE = "measure func=FILE_CHECK mask=MAY_READ\n"
ME = Subject(os.getpid(), 0, 0)


class World:
    """An engine over an LMDB store in tmp; ``open()`` opens a backing file the way
    the FUSE adapter does."""

    def __init__(self, tmp, policy=MEASURE, *, verify=True, template="ima-ng", keys=()):
        self.tmp = tmp
        self.store = Store(str(tmp / "lmdb"))
        ring = Keyring(self.store, 0)
        for k in keys:
            ring.add(k)
        root = Namespace(id=0, name="", parent=None, policy=Policy(parse_policy(policy)),
                         mlist=MeasurementList(self.store, 0, template=template,
                                               hash_algo="sha256"),
                         keyring=ring, template=template, hash_algo="sha256")
        self.root = root
        self.audit_path = tmp / "audit.log"
        self.audit = AuditLog(str(self.audit_path))
        self.engine = Engine(NamespaceTree(root), store=self.store, audit=self.audit,
                             verify_reads=verify)
        self.fds = []

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.audit.close()
        self.store.close()

    def open(self, path, *, write=False, pread_nowait=None):
        fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        self.fds.append(fd)
        st = os.fstat(fd)
        spath = str(path)

        def getxattr(name):
            try:
                return os.getxattr(spath, name)
            except OSError:
                return None

        f = FileRef(fd=fd, st=st, path=os.fsencode("/" + os.path.basename(spath)),
                    readable=True, reopen=lambda: os.open(spath, os.O_RDONLY),
                    getxattr=getxattr, setxattr=lambda n, v: os.setxattr(spath, n, v),
                    pread_nowait=pread_nowait)
        state = settle(self.engine.file_open(ME, f, OpenMode(writable=write)))
        return state, fd

    def read(self, state, fd, off, size):
        """A verified read as a worker thread finishes it."""
        return settle(self.engine.file_read(state, fd, off, size))

    def audit_lines(self, type_="violation"):
        out = []
        for line in self.audit_path.read_text().splitlines():
            rec = json.loads(line)
            if rec["type"] == type_:
                out.append(rec)
        return out


@pytest.fixture
def world(tmp_path):
    worlds = []

    def make(*a, **kw):
        w = World(tmp_path / f"w{len(worlds)}", *a, **kw)
        worlds.append(w)
        return w
    for i in range(4):
        (tmp_path / f"w{i}").mkdir()
    yield make
    for w in worlds:
        w.close()


def data_file(tmp, name="f", size=5 * BS + 123, seed=1):
    p = tmp / name
    p.write_bytes(random.Random(seed).randbytes(size))
    return p


def fsverity_digest(path) -> bytes:
    with open(path, "rb") as f:
        return fsverity_digest_fd(f.fileno())


# ------------------------------------------------------------------ good reads
def test_tree_built_with_the_digest_and_reads_verified(tmp_path, world):
    w = world()
    p = data_file(tmp_path)
    data = p.read_bytes()
    state, fd = w.open(p)
    assert state.tree is not None and state.verifiers == (w.root,)
    assert state.tree.verity_digest == fsverity_digest(p)
    assert w.engine.stats()["hashed_files"] == 1      # one pass: digest and tree
    for off, size in [(0, BS), (0, 128 << 10), (BS, 2 * BS), (100, 10), (5 * BS, 4096),
                      (5 * BS + 100, 4096), (len(data), 4096), (len(data) + BS, 10),
                      (3 * BS + 17, 0), (BS - 1, 2)]:
        assert w.read(state, fd, off, size) == data[off:off + size], (off, size)
    assert w.root.mlist.violations == 0


def test_no_tree_when_not_measured_or_verify_off(tmp_path, world):
    p = data_file(tmp_path)
    w = world("measure func=BPRM_CHECK\n")
    state, fd = w.open(p)
    assert state.tree is None and w.read(state, fd, 0, 10) is None
    w2 = world(verify=False)
    state, fd = w2.open(p)
    assert state.tree is None and w2.read(state, fd, 0, 10) is None


def test_empty_file(tmp_path, world):
    w = world()
    p = data_file(tmp_path, size=0)
    state, fd = w.open(p)
    assert state.tree.data_size == 0
    assert w.read(state, fd, 0, 4096) == b""
    p.write_bytes(b"x")
    with pytest.raises(ReadVerifyError):
        w.read(state, fd, 0, 4096)


# ------------------------------------------------------------------ changes behind
def test_changed_block_is_eio_with_violation_and_audit(tmp_path, world):
    w = world()
    p = data_file(tmp_path)
    data = p.read_bytes()
    state, fd = w.open(p)
    before = w.root.mlist.count
    with open(p, "r+b") as f:            # same size, one byte of block 2
        f.seek(2 * BS + 5)
        f.write(bytes([data[2 * BS + 5] ^ 0xFF]))
    # blocks 0-1 are unchanged and still served
    assert w.read(state, fd, 0, 2 * BS) == data[:2 * BS]
    with pytest.raises(ReadVerifyError) as ei:
        w.read(state, fd, BS, 4 * BS)
    assert ei.value.errno == errno.EIO and isinstance(ei.value, AccessDenied)
    # a violation entry: zero digest, PCR 10, counted
    assert w.root.mlist.violations == 1
    assert w.root.mlist.count == before + 1
    last = list(w.root.mlist.entries())[-1]
    assert last.pcr == 10 and set(last.file_digest[2]) == {0}
    (rec,) = w.audit_lines()
    assert rec["cause"] == "read-verify" and rec["path"] == "/f" and rec["offset"] == BS
    assert rec["block"] == 2
    assert rec["expected"] == state.tree.block_hash(2).hex()
    changed = bytearray(data[2 * BS:3 * BS])
    changed[5] ^= 0xFF
    assert rec["found"] == hashlib.sha256(changed).hexdigest()
    # one violation per handle; the verdicts and cached digests are forgotten
    with pytest.raises(ReadVerifyError):
        w.read(state, fd, 2 * BS, BS)
    assert w.root.mlist.violations == 1
    assert state.iint.version is None and state.iint.tree is None
    assert w.engine.digests.get(state.iint.key, state.file.version) is None
    assert w.engine.trees.get(state.iint.key, state.file.version) is None


def test_truncated_file_is_eio(tmp_path, world):
    w = world()
    p = data_file(tmp_path)
    data = p.read_bytes()
    state, fd = w.open(p)
    os.truncate(p, 2 * BS)               # at a block boundary: blocks 2.. are gone
    assert w.read(state, fd, 0, 2 * BS) == data[:2 * BS]
    with pytest.raises(ReadVerifyError):
        w.read(state, fd, 2 * BS, BS)
    (rec,) = w.audit_lines()
    assert rec["what"] == "short" and rec["block"] == 2 and rec["found"] == ""
    state2, fd2 = w.open(p)              # reopened: measured again, verified again
    os.truncate(p, BS + 10)              # mid-block
    with pytest.raises(ReadVerifyError):
        w.read(state2, fd2, 0, 2 * BS)


def test_grown_file_is_eio_past_the_measured_end(tmp_path, world):
    w = world()
    p = data_file(tmp_path)
    data = p.read_bytes()
    state, fd = w.open(p)
    with open(p, "ab") as f:
        f.write(b"appended")
    # reads inside the measured file still pass...
    assert w.read(state, fd, 0, 5 * BS) == data[:5 * BS]
    # ...a read reaching past its end does not, not even past EOF
    with pytest.raises(ReadVerifyError):
        w.read(state, fd, 5 * BS, 2 * BS)
    with pytest.raises(ReadVerifyError):
        w.read(state, fd, len(data), BS)
    (rec,) = w.audit_lines()
    assert rec["what"] == "past-end"


def test_a_writer_through_the_mount_stops_verification(tmp_path, world):
    w = world()
    p = data_file(tmp_path)
    state, fd = w.open(p)
    wstate, wfd = w.open(p, write=True)
    assert wstate.tree is None           # a writer's own reads are never verified
    os.pwrite(wfd, b"new", 0)
    assert w.read(state, fd, 0, 3) is None   # known change: unverified
    w.engine.file_release(wstate)
    assert w.root.mlist.violations == 1   # the kernel's ToMToU, not a read-verify one
    assert [r["cause"] for r in w.audit_lines()] == ["ToMToU"]


def test_fresh_open_after_a_change_is_measured_again(tmp_path, world):
    w = world()
    p = data_file(tmp_path)
    state, fd = w.open(p)
    n = w.root.mlist.count
    st = os.stat(p)
    with open(p, "r+b") as f:
        f.write(b"Z")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))   # mtime restored, ctime moves
    with pytest.raises(ReadVerifyError):
        w.read(state, fd, 0, BS)
    state2, fd2 = w.open(p)
    assert state2.tree is not state.tree and state2.tree.verity_digest == fsverity_digest(p)
    assert w.root.mlist.count == n + 2       # the violation and the new measurement
    # while the handle of the old version is open, a changed block is served to nobody
    # (one page cache serves both handles); unchanged blocks are
    with pytest.raises(ReadVerifyError):
        w.read(state2, fd2, 0, BS)
    assert w.read(state2, fd2, BS, BS) == p.read_bytes()[BS:2 * BS]
    w.engine.file_release(state)
    assert w.read(state2, fd2, 0, BS) == p.read_bytes()[:BS]


# ------------------------------------------------------------------ LMDB
def test_tree_cached_in_lmdb_across_engines(tmp_path, world):
    p = data_file(tmp_path, size=300 * BS + 7)
    data = p.read_bytes()
    w = world()
    state, _fd = w.open(p)
    tree = state.tree
    w.close()
    w.fds = []
    # the same store, a new engine (a remount): no rehash, the same tree
    w2 = World.__new__(World)
    w2.__init__(tmp_path / "w0")
    try:
        state2, fd2 = w2.open(p)
        assert w2.engine.stats()["hashed_files"] == 0 and w2.engine.stats()["tree_loads"] == 1
        assert state2.tree == tree
        assert w2.read(state2, fd2, 100 * BS, 128 << 10) == \
            data[100 * BS:100 * BS + (128 << 10)]
    finally:
        w2.close()


def test_digests_cached_without_a_tree_are_hashed_again(tmp_path, world):
    p = data_file(tmp_path)
    w = world(verify=False)
    state, _fd = w.open(p)
    assert state.tree is None
    w.close()
    w.fds = []
    w2 = World(tmp_path / "w0", verify=True)
    try:
        state2, _fd2 = w2.open(p)
        assert state2.tree is not None and w2.engine.stats()["hashed_files"] == 1
    finally:
        w2.close()


# ------------------------------------------------------------------ digest_type=verity
def test_measure_digest_type_verity(tmp_path, world):
    p = data_file(tmp_path)
    w = world("measure func=FILE_CHECK mask=MAY_READ digest_type=verity\n", verify=False)
    _state, _fd = w.open(p)
    e = list(w.root.mlist.entries())[-1]
    assert e.template == "ima-ngv2"      # the namespace default (ima-ng) lacks d-ngv2
    assert e.fields[0] == b"verity:sha256:\0" + fsverity_digest(p)
    w2 = world("measure func=FILE_CHECK mask=MAY_READ digest_type=verity\n", verify=False,
               template="ima-sig")
    w2.open(p)
    assert list(w2.root.mlist.entries())[-1].template == "ima-sigv2"
    w3 = world("measure func=FILE_CHECK mask=MAY_READ template=ima-ngv2\n", verify=False)
    w3.open(p)
    assert list(w3.root.mlist.entries())[-1].fields[0].startswith(b"ima:sha256:\0")


SIGV3 = "appraise func=FILE_CHECK digest_type=verity appraise_type=sigv3\n"


def _cert():
    return tk.der(tk.cert(tk.key("rsa")))


def test_appraise_sigv3(tmp_path, world):
    p = data_file(tmp_path)
    kid = keyid_of(tk.cert(tk.key("rsa")))
    w = world(SIGV3, keys=[_cert()])
    assert w.engine.verify_reads
    # no signature
    with pytest.raises(AccessDenied) as ei:
        w.open(p)
    assert ei.value.errno == errno.EACCES
    os.setxattr(p, "security.ima", ap.sign_v3(tk.key("rsa"), "sha256", fsverity_digest(p), kid))
    w2 = world(SIGV3, keys=[_cert()])
    state, fd = w2.open(p)
    assert state.tree is not None and state.verifiers == (w2.root,)
    # a v2 signature over the flat digest is not enough
    flat = hashlib.sha256(p.read_bytes()).digest()
    q = data_file(tmp_path, "g", seed=2)
    os.setxattr(q, "security.ima", ap.sign_v2(tk.key("rsa"), "sha256", flat, kid))
    with pytest.raises(AccessDenied):
        w2.open(q)
    # changed: the read fails, a fresh open is refused
    with open(p, "r+b") as f:
        f.seek(3 * BS)
        f.write(b"evil")
    with pytest.raises(ReadVerifyError):
        w2.read(state, fd, 3 * BS, BS)
    with pytest.raises(AccessDenied) as ei:
        w2.open(p)
    assert ei.value.errno == errno.EACCES


def test_appraise_sigv3_sha512(tmp_path, world):
    p = data_file(tmp_path)
    kid = keyid_of(tk.cert(tk.key("rsa")))
    with open(p, "rb") as f:
        vd = fsverity_digest_fd(f.fileno(), "sha512")
    os.setxattr(p, "security.ima", ap.sign_v3(tk.key("rsa"), "sha512", vd, kid))
    w = world(SIGV3, keys=[_cert()])
    state, _fd = w.open(p)
    assert state.tree is not None


@pytest.mark.skipif(not os.path.exists("/usr/bin/fsverity"), reason="fsverity-utils missing")
def test_tree_digest_matches_fsverity_utils(tmp_path, world):
    w = world()
    p = data_file(tmp_path, size=129 * BS + 1)
    state, _ = w.open(p)
    out = subprocess.run(["fsverity", "digest", str(p)], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    assert out == state.tree.verity_digest_text


def test_inline_reads_leave_failures_to_the_thread_path(tmp_path, world):
    """With the adapter's RWF_NOWAIT read, a read whose blocks are in the page cache
    is verified inline; a mismatch is a Pending (nothing recorded on the event loop),
    whose finish() records the violation and raises EIO."""
    from imafs.fs import sysio
    w = world()
    p = data_file(tmp_path)
    data = p.read_bytes()
    state, fd = w.open(p, pread_nowait=sysio.pread_nowait)
    got = w.engine.file_read(state, fd, BS, 2 * BS)
    assert type(got) is not Pending and bytes(got) == data[BS:3 * BS]
    with open(p, "r+b") as f:
        f.seek(BS)
        f.write(b"!")
    pending = w.engine.file_read(state, fd, BS, 2 * BS)
    assert type(pending) is Pending
    assert w.root.mlist.violations == 0 and not state.failed   # nothing recorded...
    with pytest.raises(ReadVerifyError):                        # ...until it is finished
        pending.finish()
    assert w.root.mlist.violations == 1
