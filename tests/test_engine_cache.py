"""What the engine remembers between opens, without a mount: the per-version verdict
that lets a repeated read-only open skip policy matching (the kernel's
IMA_DONE_MASK), and the memo of verified signatures that spares a remount the
public-key operations. Each test checks both that the shortcut is taken and that it
is not taken when the answer could differ."""
from __future__ import annotations

import os

import _ima_testkeys as tk
import pytest

from imafs.ima import appraise as ap
from imafs.ima.engine import AccessDenied, Engine, FileRef, OpenMode, Subject, settle
from imafs.ima.keys import Keyring, VerifiedSignatures, keyid_of
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import Namespace, NamespaceTree
from imafs.ima.policy import Policy, parse_policy
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

    def open(self, path, subject=ROOT, *, write=False):
        fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
        self.fds.append(fd)
        f = FileRef(fd=fd, st=os.fstat(fd), path=b"/" + os.path.basename(path).encode(),
                    readable=True, reopen=lambda: os.open(path, os.O_RDONLY),
                    getxattr=lambda n: _getxattr(path, n),
                    setxattr=lambda n, v: os.setxattr(path, n, v))
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
    import hashlib
    os.setxattr(p, "security.ima",
                ap.sign_v2(priv, "sha256", hashlib.sha256(data).digest(), keyid_of(cert)))
    return p


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
