"""imafs.ima.engine without a mount: Engine.file_open (process_measurement) driven
with FileRefs over temporary files and LMDB stores in a temporary directory.

First the decision itself: a measurement in the list, appraisal that passes and
refuses, and the Pending of a cold open, which finish() completes in one hashing
pass without deciding again. Then what the engine remembers between opens: the
per-version verdict that lets a repeated read-only open skip policy matching (the
kernel's IMA_DONE_MASK), and the memo of verified signatures that spares a remount
the public-key operations; each of those tests checks both that the shortcut is
taken and that it is not taken when the answer could differ."""
from __future__ import annotations

import errno
import hashlib
import os

import pytest

from helpers import testkeys as tk

from imafs.ima import appraise as ap
from imafs.ima import collect
from imafs.ima import engine as engine_mod
from imafs.ima.engine import (AccessDenied, Engine, FileRef, OpenMode, OpenState, Pending,
                              Subject, settle)
from imafs.ima.keys import Keyring, VerifiedSignatures, keyid_of
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import Namespace, NamespaceTree
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import parse_policy
from imafs.store import Store

ROOT = Subject(os.getpid(), 0, 0)
APPRAISE = "appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig\n"
MEASURE = "measure func=FILE_CHECK mask=MAY_READ\n"


class World:
    def __init__(self, path, policy, certs=(), *, verify=False):
        self.store = Store(str(path / "lmdb"))
        self.cache = Store(str(path / "cache"), sync=False)
        self.ring = Keyring(self.store, 0, persist_keys=False)   # as the root keyring
        for c in certs:
            self.ring.add(c)
        self.ring.verified = VerifiedSignatures(self.cache)
        self.root = Namespace(id=0, name="", parent=None, policy=Policy(parse_policy(policy)),
                              mlist=MeasurementList(self.store, 0), keyring=self.ring)
        self.engine = Engine(NamespaceTree(self.root), store=self.store,
                             cache_store=self.cache, verify_reads=verify)
        self.fds = []

    def ref(self, path, *, write=False) -> FileRef:
        """A FileRef as the adapter makes one: the caller's descriptor, its fstat."""
        fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
        self.fds.append(fd)
        return FileRef(fd=fd, st=os.fstat(fd), path=b"/" + os.path.basename(path).encode(),
                       readable=True, reopen=lambda: os.open(path, os.O_RDONLY),
                       getxattr=lambda n: _getxattr(path, n),
                       setxattr=lambda n, v: os.setxattr(path, n, v))

    def open(self, path, subject=ROOT, *, write=False):
        f = self.ref(path, write=write)
        return settle(self.engine.file_open(subject, f, OpenMode(writable=write)))

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.store is not None:
            self.store.close()
            self.cache.close()
            self.store = None


def _getxattr(path, name):
    try:
        return os.getxattr(path, name)
    except OSError:
        return None


@pytest.fixture
def worlds(tmp_path):
    made = []

    def make(name, *a, **kw):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        w = World(d, *a, **kw)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


@pytest.fixture
def counted(monkeypatch):
    """Counts of Engine.get_action calls (policy matching) and of public-key
    verifications."""
    n = {"decide": 0, "verify": 0}
    real_decide, real_verify = Engine.get_action, ap.verify_signature

    def decide(self, *a, **kw):
        n["decide"] += 1
        return real_decide(self, *a, **kw)

    def verify(*a, **kw):
        n["verify"] += 1
        return real_verify(*a, **kw)
    monkeypatch.setattr(Engine, "get_action", decide)
    monkeypatch.setattr(ap, "verify_signature", verify)
    return n


def _signed(tmp_path, name, priv, cert, data=b"signed content\n"):
    p = tmp_path / name
    p.write_bytes(data)
    os.setxattr(p, "security.ima",
                ap.sign_v2(priv, "sha256", hashlib.sha256(data).digest(), keyid_of(cert)))
    return p


@pytest.fixture
def hashed(monkeypatch):
    """The hashing passes over files: one entry (the algorithms asked for) per pass."""
    passes = []
    real = collect.hashing.hash_fd

    def hash_fd(fd, algos, **kw):
        passes.append(sorted(algos))
        return real(fd, algos, **kw)
    monkeypatch.setattr(collect.hashing, "hash_fd", hash_fd)
    return passes


# --- the decision ----------------------------------------------------------------


def test_a_measured_open_records_the_files_digest_once(tmp_path, worlds, hashed):
    w = worlds("m", MEASURE)
    p = tmp_path / "f"
    p.write_bytes(b"measured\n" * 1000)
    state = w.open(p)
    assert isinstance(state, OpenState) and state.readable and not state.writable
    assert state.iint.readers == 1
    entries = list(w.root.mlist.entries())
    assert [e.name for e in entries] == [b"boot_aggregate", b"/f"]
    assert entries[1].pcr == 10
    assert entries[1].file_digest[2] == hashlib.sha256(p.read_bytes()).digest()
    assert hashed == [["sha256"]]
    w.engine.file_release(state)
    assert state.iint.readers == 0
    w.engine.file_release(w.open(p))                  # the same version: no new entry
    assert w.root.mlist.count == 2 and len(hashed) == 1


def test_no_policy_no_work_and_not_a_regular_file_is_none(tmp_path, worlds, hashed):
    w = worlds("n", "")
    p = tmp_path / "f"
    p.write_bytes(b"x")
    assert not w.engine.active()
    state = w.open(p)
    assert isinstance(state, OpenState) and state.decisions == []
    assert hashed == [] and w.root.mlist.count == 1
    w2 = worlds("n2", MEASURE)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        d = FileRef(fd=fd, st=os.fstat(fd), path=b"/", readable=True, reopen=lambda: -1,
                    getxattr=lambda n: None, setxattr=lambda n, v: None)
        assert w2.engine.file_open(ROOT, d, OpenMode()) is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("form", ["sha256", "sha1", "sha512"])
def test_appraisal_passes_a_right_hash_and_refuses_a_wrong_one(tmp_path, worlds, form):
    w = worlds("h", "appraise func=FILE_CHECK mask=MAY_READ\n")
    good, bad, none = tmp_path / "good", tmp_path / "bad", tmp_path / "none"
    for q in (good, bad, none):
        q.write_bytes(b"appraised content\n")
    digest = hashlib.new(form, b"appraised content\n").digest()
    os.setxattr(good, "security.ima", ap.hash_xattr(form, digest))
    os.setxattr(bad, "security.ima", ap.hash_xattr(form, bytes(len(digest))))
    w.engine.file_release(w.open(good))
    for q in (bad, none):
        with pytest.raises(AccessDenied) as e:
            w.open(q)
        assert e.value.errno == errno.EACCES
        assert w.engine.iints.get((os.stat(q).st_dev, os.stat(q).st_ino)).readers == 0


def test_appraisal_with_a_signature(tmp_path, worlds):
    priv, other = tk.key("ec"), tk.key("ec", 1)
    cert = tk.der(tk.cert(priv))
    w = worlds("s", APPRAISE, [cert])
    ok = _signed(tmp_path, "ok", priv, tk.cert(priv))
    wrong = _signed(tmp_path, "wrong", other, tk.cert(other))
    changed = _signed(tmp_path, "changed", priv, tk.cert(priv))
    with open(changed, "ab") as f:
        f.write(b"!")
    w.engine.file_release(w.open(ok))
    for q in (wrong, changed):
        with pytest.raises(AccessDenied):
            w.open(q)


def test_a_cold_open_is_pending_and_finish_completes_it_without_deciding_again(
        tmp_path, worlds, hashed, counted, monkeypatch):
    """The inline attempt decides (events, get_action) and returns a Pending without
    hashing or recording anything; finish() -- the worker thread -- hashes once and
    completes that very decision: get_action and the events are not redone."""
    n_events = []
    real_events = engine_mod.events

    def events(*a, **kw):
        n_events.append(1)
        return real_events(*a, **kw)
    monkeypatch.setattr(engine_mod, "events", events)
    w = worlds("p", MEASURE + APPRAISE.replace(" appraise_type=imasig", ""))
    p = tmp_path / "f"
    p.write_bytes(b"pending\n" * 5000)
    os.setxattr(p, "security.ima", ap.hash_xattr("sha256", hashlib.sha256(p.read_bytes()).digest()))
    f = w.ref(p)
    r = w.engine.file_open(ROOT, f, OpenMode())
    assert type(r) is Pending
    assert hashed == [] and counted["decide"] == 1 and len(n_events) == 1
    assert w.root.mlist.count == 1                       # nothing recorded yet
    ii = w.engine.iints.get(f.key)
    assert ii.readers == 0 and not ii.lock.locked()      # nothing counted, lock free
    state = r.finish()
    assert isinstance(state, OpenState) and state.iint is ii and ii.readers == 1
    assert hashed == [["sha256"]]                        # one pass for measure + appraise
    assert counted["decide"] == 1 and len(n_events) == 1     # not decided again
    assert [e.name for e in w.root.mlist.entries()] == [b"boot_aggregate", b"/f"]
    assert not ii.lock.locked()
    # warm: the next open answers inline, no thread, no hashing, no matching
    r2 = w.engine.file_open(ROOT, w.ref(p), OpenMode())
    assert isinstance(r2, OpenState)
    assert hashed == [["sha256"]] and counted["decide"] == 1


def test_a_refusal_comes_from_finish(tmp_path, worlds):
    w = worlds("r", APPRAISE)
    p = tmp_path / "unsigned"
    p.write_bytes(b"no signature\n")
    r = w.engine.file_open(ROOT, w.ref(p), OpenMode())
    assert type(r) is Pending
    with pytest.raises(AccessDenied) as e:
        r.finish()
    assert e.value.errno == errno.EACCES
    ii = w.engine.iints.get((os.stat(p).st_dev, os.stat(p).st_ino))
    assert ii.readers == 0 and not ii.lock.locked()


def test_a_busy_file_is_pending_even_when_warm(tmp_path, worlds, hashed):
    """Waiting for the file's lock is work for a worker thread too: an open that finds
    the lock taken returns a Pending, which finishes once the lock is free."""
    w = worlds("b", MEASURE)
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    w.engine.file_release(w.open(p))
    f = w.ref(p)
    ii = w.engine.iints.get(f.key)
    ii.lock.acquire()
    try:
        r = w.engine.file_open(ROOT, f, OpenMode())
        assert type(r) is Pending
    finally:
        ii.lock.release()
    assert isinstance(r.finish(), OpenState)
    assert len(hashed) == 1 and w.root.mlist.count == 2


# --- what the engine remembers between opens -------------------------------------


def test_repeated_read_only_opens_skip_matching(tmp_path, worlds, counted):
    w = worlds("a", MEASURE)
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    w.engine.file_release(w.open(p))
    assert counted["decide"] == 1
    for _ in range(5):
        w.engine.file_release(w.open(p))
    assert counted["decide"] == 1                 # done for this version
    assert w.root.mlist.count == 2                # boot aggregate + one measurement
    # another caller (other fsuid) is matched again: rules may look at uid
    w.engine.file_release(w.open(p, Subject(os.getpid(), 1000, 1000)))
    assert counted["decide"] == 2
    # a policy change re-derives everything
    w.root.set_policy(Policy(parse_policy("measure func=FILE_CHECK mask=MAY_READ pcr=11\n")))
    w.engine.file_release(w.open(p))
    assert counted["decide"] == 3 and w.root.mlist.count == 3
    w.engine.file_release(w.open(p))
    assert counted["decide"] == 3
    # a new version (changed behind the engine) is measured again
    p.write_bytes(b"y" * 100)
    w.engine.file_release(w.open(p))
    assert counted["decide"] == 4 and w.root.mlist.count == 4


def test_no_shortcut_while_a_writer_holds_the_file(tmp_path, worlds, counted):
    """An open-writers violation must still be seen by every reader."""
    w = worlds("a", MEASURE)
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    w.engine.file_release(w.open(p))
    writer = w.open(p, write=True)
    before = counted["decide"]
    r = w.open(p)
    assert counted["decide"] == before + 1
    assert w.root.mlist.violations == 1           # open_writers
    w.engine.file_release(r)
    w.engine.file_release(writer)


def test_denials_are_not_short_cut(tmp_path, worlds, counted):
    """A refused open is decided each time (and refused each time)."""
    priv = tk.key("ec")
    cert = tk.cert(priv)
    w = worlds("a", APPRAISE, [tk.der(cert)])
    p = tmp_path / "unsigned"
    p.write_bytes(b"no signature")
    for i in range(3):
        with pytest.raises(AccessDenied):
            w.open(p)
        assert counted["decide"] == i + 1


def test_key_removal_ends_the_shortcut(tmp_path, worlds, counted):
    priv = tk.key("ec")
    cert = tk.cert(priv)
    w = worlds("a", APPRAISE, [tk.der(cert)])
    p = _signed(tmp_path, "s", priv, cert)
    w.engine.file_release(w.open(p))
    w.engine.file_release(w.open(p))
    assert counted["decide"] == 1
    assert w.ring.remove(keyid_of(cert)) == 1
    with pytest.raises(AccessDenied):
        w.open(p)


def test_verified_signatures_survive_a_remount(tmp_path, worlds, counted):
    priv = tk.key("rsa")
    cert = tk.cert(priv)
    files = [_signed(tmp_path, f"s{i}", priv, cert, b"content %d\n" % i) for i in range(4)]
    w = worlds("state", APPRAISE, [tk.der(cert)])
    for p in files:
        w.engine.file_release(w.open(p))
    assert counted["verify"] == 4
    w.close()
    # the same state, another policy (so no kept verdict applies: appraised again)
    w2 = worlds("state", APPRAISE + MEASURE, [tk.der(cert)])
    for p in files:
        w2.engine.file_release(w2.open(p))
    assert counted["decide"] == 8                 # decided again ...
    assert counted["verify"] == 4                 # ... but no signature verified again
    # a new signature over the same digest (another ECDSA/RSA value, same key) is new
    other = tk.key("rsa", 1)
    other_cert = tk.cert(other)
    w2.ring.add(tk.der(other_cert))
    q = _signed(tmp_path, "s0", other, other_cert, b"content 0\n")
    w2.engine.file_release(w2.open(q))
    assert counted["verify"] == 5


def test_memo_is_per_key(tmp_path, worlds):
    """A memo entry names the key that verified: the same signature bytes presented
    for another key (same key id) are verified by that key, and fail."""
    memo = VerifiedSignatures(None)
    priv = tk.key("ec")
    cert = tk.cert(priv)
    info = Keyring().add(tk.der(cert))
    digest = b"\x11" * 32
    sig = ap.sign_v2(priv, "sha256", digest, info.keyid)
    memo.add(info.fingerprint, "sha256", digest, sig[9:])
    assert memo.known(info.fingerprint, "sha256", digest, sig[9:])
    assert not memo.known(b"\x00" * 32, "sha256", digest, sig[9:])
    assert not memo.known(info.fingerprint, "sha256", b"\x12" * 32, sig[9:])
    assert not memo.known(info.fingerprint, "sha512", digest, sig[9:])


def test_verdict_survives_a_remount(tmp_path, worlds, counted):
    """Verdicts are cached by inode version in LMDB: after a remount an open like one
    decided before (same version, kind of open, policy, keys and options) is decided
    without matching, reading the xattr or appraising; anything else is decided."""
    priv = tk.key("ec")
    cert = tk.cert(priv)
    p = _signed(tmp_path, "s", priv, cert)
    q = tmp_path / "plain"
    q.write_bytes(b"plain")
    w = worlds("state", APPRAISE + MEASURE, [tk.der(cert)])
    w.engine.file_release(w.open(p))
    assert counted["decide"] == 1
    n = w.root.mlist.count
    w.close()
    w2 = worlds("state", APPRAISE + MEASURE, [tk.der(cert)])
    w2.engine.file_release(w2.open(p))
    assert counted["decide"] == 1                 # from the verdict cache: nothing matched
    assert w2.root.mlist.count == n               # measured before, not again
    w2.engine.file_release(w2.open(p, Subject(os.getpid(), 1000, 1000)))
    assert counted["decide"] == 2                 # another caller: decided
    w2.close()
    # another policy, or another keyring: decided again (and still right)
    w3 = worlds("state", MEASURE + APPRAISE, [tk.der(cert)])
    w3.engine.file_release(w3.open(p))
    assert counted["decide"] == 3
    w3.close()
    other = tk.key("ec", 1)
    w4 = worlds("state", APPRAISE + MEASURE, [tk.der(tk.cert(other))])
    with pytest.raises(AccessDenied):
        w4.open(p)
    assert counted["decide"] == 4


def test_verdict_is_dropped_when_a_read_fails(tmp_path, worlds):
    from imafs.ima.engine import ReadVerifyError
    priv = tk.key("ec")
    cert = tk.cert(priv)
    p = _signed(tmp_path, "s", priv, cert, b"x" * 9000)
    w = worlds("state", APPRAISE, [tk.der(cert)], verify=True)
    st = w.open(p)
    fd = w.fds[-1]
    with w.cache.env.begin(db=w.engine.verdicts.db) as txn:
        assert txn.stat()["entries"] == 1
    st_before = os.stat(p)
    with open(p, "r+b") as f:            # changed behind, times put back
        f.write(b"Y")
    os.utime(p, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    with pytest.raises(ReadVerifyError):
        settle(w.engine.file_read(st, fd, 0, 4096))
    with w.cache.env.begin(db=w.engine.verdicts.db) as txn:
        assert txn.stat()["entries"] == 0
