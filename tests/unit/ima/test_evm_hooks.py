"""imafs.ima.evm_hooks without a mount: a namespace's EVM state and its flags, and
metadata changes through Engine.inode_setattr / inode_setxattr (appraise_hooks.py)
on real files -- which namespaces check a change, which get a new HMAC (a child's
writes never reach the host's security.evm), log mode, signatures never rewritten;
a child's EVM options in ns-create and in its stored record. The views of
security.ima/security.evm: tests/unit/ima/test_nsxattr.py."""
from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from imafs.assemble import namespace_tree
from imafs.fs.adapter import fd_file_ref
from imafs.ima import appraise as ap
from imafs.ima import evm
from imafs.ima.audit import AuditLog
from imafs.ima.engine import AccessDenied, Change, Engine, Subject
from imafs.ima.evm_hooks import EvmState
from imafs.ima.evm_secfs import EvmStateError
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import NamespaceError
from imafs.ima.policy_parse import parse_policy
from imafs.store import Store

from helpers.namespaces import Binder

HOST_PID, CHILD_PID, GRANDCHILD_PID = 1001, 1002, 1003
IMA = ap.hash_xattr("sha256", bytes(range(32)))
CAPS = bytes.fromhex("0100000200200000000000000000000000000000")


def key_file(d, name, data=None):
    p = d / name
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data or os.urandom(48))
    return p


class World:
    """A root namespace with EVM (``root_evm``) and the children tests make, a file
    ``f`` in ``tmp`` to change, an engine over them."""

    def __init__(self, tmp, root_mode="enforce", root_key=True):
        self.tmp = tmp
        self.store = Store(str(tmp / "lmdb"), sync=False)
        self.audit_path = tmp / "audit.log"
        self.audit = AuditLog(str(self.audit_path))
        self.binder = Binder(default=None)
        self.binder.bind(HOST_PID, 0)
        self.root_key = key_file(tmp, "root.key") if root_key else None
        root_evm = EvmState(root_mode, evm.HmacKey.from_file(str(self.root_key))
                            if root_key else None)
        self.tree = namespace_tree(self.store, parse_policy(""),
                                   keyring=Keyring(self.store, 0),
                                   mlist=MeasurementList(self.store, 0), binder=self.binder,
                                   audit=self.audit, evm=root_evm, backing=str(tmp / "tree"))
        self.engine = Engine(self.tree, store=self.store, audit=self.audit)
        (tmp / "tree").mkdir()
        self.path = tmp / "tree" / "f"
        self.path.write_bytes(b"content\n")
        os.chmod(self.path, 0o755)

    def child(self, name, pid, parent=None, **opts):
        ns = self.tree.create(parent or self.tree.root, name, opts)
        self.binder.bind(pid, ns.id)
        return ns

    def ref(self, fd):
        return fd_file_ref(fd, os.fstat(fd), b"/f")

    def check(self, ns):
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return self.engine.evm.check(ns, self.ref(fd))
        finally:
            os.close(fd)

    def label(self, ns, ima=IMA):
        """``ns``'s own security.ima and a valid HMAC of it (as the daemon writes)."""
        os.setxattr(self.path, ns.xattr_name, ima)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            f = self.ref(fd)
            os.setxattr(self.path, ns.evm_xattr_name,
                        evm.hmac_xattr(ns.evm.key, self.engine.evm.metadata(ns, f),
                                       ns.evm.config))
        finally:
            os.close(fd)
        assert self.check(ns).status == ap.PASS

    def _file(self, opened):
        def file():
            fd = os.open(self.path, os.O_RDONLY)
            opened.append(fd)
            return self.ref(fd)
        return file

    def setattr(self, pid, *, uid=None, gid=None, mode=None):
        def apply():
            if mode is not None:
                os.chmod(self.path, mode)
            if uid is not None or gid is not None:
                os.chown(self.path, -1 if uid is None else uid, -1 if gid is None else gid)
            return os.stat(self.path)
        opened = []
        try:
            return self.engine.inode_setattr(
                Subject(pid, 0, 0), self.key, Change(uid=uid, gid=gid, mode=mode), apply,
                self._file(opened))
        finally:
            for fd in opened:
                os.close(fd)

    def setxattr(self, pid, name, value, uid=0):
        def apply(stored):
            if value is None:
                os.removexattr(self.path, stored)
            else:
                os.setxattr(self.path, stored, value)
        opened = []
        try:
            self.engine.inode_setxattr(Subject(pid, uid, uid), self.key, b"/f",
                                       name.encode(), value, apply, self._file(opened))
        finally:
            for fd in opened:
                os.close(fd)

    @property
    def key(self):
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino)

    def xattr(self, name):
        try:
            return os.getxattr(self.path, name)
        except OSError:
            return None

    def records(self, kind):
        return [r for r in (json.loads(ln) for ln in self.audit_path.read_text().splitlines())
                if r["type"] == kind]

    def close(self):
        self.audit.close()
        self.store.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def refused(err, fn, *args, **kw):
    with pytest.raises(AccessDenied) as e:
        fn(*args, **kw)
    assert e.value.errno == err, e.value.reason
    return e.value.reason


# ------------------------------------------------------------------ state and flags
def test_state_flags_as_the_kernels():
    assert EvmState().flags == 0 and not EvmState().on
    s = EvmState("enforce")
    assert s.flags == 0x2 and s.on and s.hmac_key is None
    k = evm.HmacKey(b"k" * 32)
    s = EvmState("log", k)
    assert s.flags == 0x80000003 and s.hmac_key is k
    with pytest.raises(EvmStateError) as e:
        s.write(b"4")
    assert e.value.errno == errno.EPERM          # setup complete
    s = EvmState("enforce")
    with pytest.raises(EvmStateError) as e:
        s.write(b"1")
    assert e.value.errno == errno.ENOENT         # no HMAC key to load
    epoch = s.epoch
    assert s.write(b"4") == 0x6 and s.hmac_disabled and s.epoch == epoch + 1
    with pytest.raises(EvmStateError) as e:
        EvmState().write(b"2")
    assert e.value.errno == errno.EPERM and "off" in str(e.value)
    with pytest.raises(ValueError, match="needs EVM on"):
        EvmState("off", k)
    with pytest.raises(ValueError, match="one of"):
        EvmState("fix")


def test_fingerprint_says_mode_flags_key_and_config():
    assert EvmState().fingerprint() == b""        # verdict keys without EVM unchanged
    k1, k2 = evm.HmacKey(b"1" * 32), evm.HmacKey(b"2" * 32)
    fps = {EvmState("enforce").fingerprint(), EvmState("log").fingerprint(),
           EvmState("enforce", k1).fingerprint(), EvmState("enforce", k2).fingerprint(),
           EvmState("enforce", config=evm.EvmConfig(fsuuid=False)).fingerprint()}
    assert len(fps) == 5
    s = EvmState("enforce")
    fp = s.fingerprint()
    s.write(b"4")
    assert s.fingerprint() != fp
    assert k1.fingerprint.hex() in EvmState("enforce", k1).fingerprint().decode()
    assert b"1" * 32 not in EvmState("enforce", k1).fingerprint()


def test_namespace_epoch_and_fingerprint_follow_evm(world):
    root = world.tree.root
    ep, fp = root.epoch(), root.fingerprint()
    c = world.child("c", CHILD_PID, evm="enforce")
    c_fp = c.fingerprint()
    c.evm.write(b"4")
    assert c.fingerprint() != c_fp
    assert root.epoch() == ep and root.fingerprint() == fp


# ------------------------------------------------------------------ changes
def test_child_writes_never_reach_the_hosts_evm(world):
    """A child with its own key changes the mode: its own HMAC follows, the host's
    security.evm stays, and the host's view of the file fails from then on; the host
    may no longer change it either (EPERM, as the kernel for a failing file)."""
    root = world.tree.root
    c = world.child("c", CHILD_PID, evm="enforce",
                    evm_key=str(key_file(world.tmp, "child.key")))
    world.label(root)
    world.label(c)
    host_evm, child_evm = world.xattr("security.evm"), world.xattr(c.evm_xattr_name)
    world.setattr(CHILD_PID, mode=0o700)
    assert stat.S_IMODE(os.stat(world.path).st_mode) == 0o700
    assert world.xattr("security.evm") == host_evm
    assert world.xattr(c.evm_xattr_name) not in (None, child_evm)
    assert world.check(c).status == ap.PASS
    r = world.check(root)
    assert (r.status, r.cause) == (ap.FAIL, "invalid-HMAC")
    refused(errno.EPERM, world.setattr, HOST_PID, mode=0o755)
    rec = world.records("appraise_metadata")[-1]
    assert (rec["ns"], rec["status"], rec["error"]) == ("/", "INTEGRITY_FAIL", "EPERM")
    # the child's own security.evm: written under its private name, checked in its view
    refused(errno.EPERM, world.setxattr, CHILD_PID, "security.evm", b"\x02" + bytes(20))
    assert world.xattr("security.evm") == host_evm


def test_host_changes_refresh_descendants_that_passed(world):
    root = world.tree.root
    a = world.child("a", CHILD_PID, evm="enforce",
                    evm_key=str(key_file(world.tmp, "a.key")))
    b = world.child("b", GRANDCHILD_PID, parent=a, evm="log",
                    evm_key=str(key_file(world.tmp, "b.key")))
    world.label(root)
    world.label(a)
    world.label(b)
    os.setxattr(world.path, b.evm_xattr_name, b"\x02" + bytes(20))   # b's view fails
    b_evm = world.xattr(b.evm_xattr_name)
    world.setxattr(HOST_PID, "security.capability", CAPS)
    assert world.check(root).status == ap.PASS
    assert world.check(a).status == ap.PASS
    assert world.xattr(b.evm_xattr_name) == b_evm        # not laundered
    assert world.check(b).status == ap.FAIL
    # a change by the grandchild (log mode): its failure is recorded, not refused, and
    # its view is not re-protected; the ancestors check it as their own
    world.setattr(GRANDCHILD_PID, mode=0o750)
    rec = world.records("appraise_metadata")[-1]
    assert (rec["ns"], rec["mode"], rec["status"]) == ("/a/b", "log", "INTEGRITY_FAIL")
    assert world.check(root).cause == "invalid-HMAC" and world.check(a).cause == "invalid-HMAC"


def test_set_id_bits_dropped_by_a_write_keep_the_hmac(world):
    """A truncate or write by another user drops the set-id bits (the overlay does it
    inside the change): no check, but the HMAC follows the new mode."""
    root = world.tree.root
    os.chmod(world.path, 0o4755)
    world.label(root)

    def apply():
        os.chmod(world.path, 0o755)
        return os.stat(world.path)
    opened = []
    try:
        world.engine.inode_setattr(Subject(HOST_PID, 1000, 1000), world.key, Change(), apply,
                                   world._file(opened))
    finally:
        for fd in opened:
            os.close(fd)
    assert world.check(root).status == ap.PASS


def test_signatures_are_never_rewritten(world):
    """A type-3 signature that verifies lets a change through (INTEGRITY_PASS); the
    kernel would replace it by an HMAC, imafs keeps it -- it fails from then on."""
    from helpers.testkeys import cert, der, key
    root = world.tree.root
    priv = key("ec", 3)
    info = root.keyring.add(der(cert(priv)))
    os.setxattr(world.path, "security.ima", IMA)
    fd = os.open(world.path, os.O_RDONLY)
    try:
        meta = world.engine.evm.metadata(root, world.ref(fd))
    finally:
        os.close(fd)
    sig = evm.sign_evm(priv, info.keyid, meta, portable=False)
    os.setxattr(world.path, "security.evm", sig)
    assert world.check(root).status == ap.PASS
    world.setattr(HOST_PID, mode=0o700)
    assert world.xattr("security.evm") == sig
    assert world.check(root).cause == "invalid-signature"


def test_rules_of_evm_protect_xattr(world):
    root = world.tree.root
    # nothing protected yet (INTEGRITY_NOXATTRS): no security.ima may be added
    refused(errno.EPERM, world.setxattr, HOST_PID, "security.ima", IMA)
    assert world.records("update_metadata")[-1]["status"] == "INTEGRITY_NOXATTRS"
    world.setxattr(HOST_PID, "user.other", b"x")          # not protected: no check
    world.label(root)
    # security.evm: only root writes it, never an HMAC, never a malformed one
    refused(errno.EPERM, world.setxattr, HOST_PID, "security.evm", b"\x05\x02", uid=1000)
    refused(errno.EINVAL, world.setxattr, HOST_PID, "security.evm", b"")
    refused(errno.EINVAL, world.setxattr, HOST_PID, "security.evm", b"\x05\x02")
    # a permitted change, then removals: the HMAC follows, and goes with the last
    world.setxattr(HOST_PID, "security.capability", CAPS)
    assert world.check(root).status == ap.PASS
    world.setxattr(HOST_PID, "security.capability", None)
    world.setxattr(HOST_PID, "security.ima", None)
    assert world.xattr("security.evm") is None
    assert world.check(root).status == ap.NOXATTRS


def test_nothing_is_checked_where_evm_is_off(tmp_path):
    w = World(tmp_path, root_mode="off", root_key=False)
    try:
        w.setxattr(HOST_PID, "security.ima", IMA)
        w.setxattr(HOST_PID, "security.evm", b"\x02" + bytes(20))
        w.setattr(HOST_PID, mode=0o700)
        assert w.xattr("security.evm") == b"\x02" + bytes(20)
        # a child with EVM on checks its own view only, and a pid nobody placed is
        # refused once some namespace has EVM on
        c = w.child("c", CHILD_PID, evm="enforce")
        assert w.check(c).status == ap.FAIL                 # HMAC, and no key
        refused(errno.EPERM, w.setattr, CHILD_PID, mode=0o755)
        w.setattr(HOST_PID, mode=0o755)
        refused(errno.EACCES, w.setattr, 4242, mode=0o700)
    finally:
        w.close()


# ------------------------------------------------------------------ options, records
def test_ns_create_options(world):
    t = world.tree
    assert t.parse_create("c evm=log") == ("c", {"evm": "log"})
    with pytest.raises(NamespaceError) as e:
        t.parse_create("c evm=fix")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(NamespaceError) as e:
        t.parse_create(f"c evm=enforce evm_key={world.root_key}")
    assert e.value.errno == errno.EINVAL and "host" in str(e.value)
    inside = key_file(world.tmp / "tree", "k")
    with pytest.raises(ValueError, match="inside the backing tree"):
        t.create(t.root, "bad", {"evm": "enforce", "evm_key": str(inside)})
    with pytest.raises(ValueError, match="needs EVM on"):
        t.create(t.root, "bad2", {"evm_key": str(world.root_key)})


def test_child_evm_kept_across_a_reload(tmp_path):
    w = World(tmp_path)
    k = key_file(tmp_path, "c.key")
    c = w.child("c", CHILD_PID, evm="enforce", evm_key=str(k))
    fp = c.fingerprint()
    w.close()
    store = Store(str(tmp_path / "lmdb"), sync=False)
    try:
        t = namespace_tree(store, [], keyring=Keyring(store, 0),
                           mlist=MeasurementList(store, 0), evm=EvmState("enforce"))
        c2 = t.root.children["c"]
        assert (c2.evm.mode, c2.evm.flags, c2.fingerprint()) == ("enforce", c.evm.flags, fp)
        assert c2.evm.key == c.evm.key
    finally:
        store.close()
    # the key file changed since: not taken (its HMACs fail: closed)
    os.chmod(k, 0o600)
    k.write_bytes(os.urandom(48))
    store = Store(str(tmp_path / "lmdb"), sync=False)
    try:
        t = namespace_tree(store, [], keyring=Keyring(store, 0),
                           mlist=MeasurementList(store, 0), evm=EvmState("enforce"))
        c3 = t.root.children["c"]
        assert c3.evm.mode == "enforce" and c3.evm.key is None and c3.evm.hmac_key is None
    finally:
        store.close()
