"""imafs.ima.digest_cache and the digest-list control files (securityfs_digest.py)
without a mount: digest_list_add measured and appraised as DIGEST_LIST_CHECK (an
unsigned or changed list refused), ``appraise ... digest_cache=content`` passing a
listed file and nothing else, ``measure ... digest_cache=content`` leaving out a
listed file, verdicts that do not outlive a list, per-namespace lists, removal,
digest_query, digests_count and digest_lists_loaded/, paths read with the writer's
credentials."""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import subprocess
import sys

import pytest

from helpers import testkeys as tk
from imafs.assemble import namespace_tree
from imafs.fs.adapter import fd_file_ref, open_as_writer, open_in_mount
from imafs.ima import appraise as ap
from imafs.ima import digest_lists as dl
from imafs.ima.audit import AuditLog
from imafs.ima.capability import OWN_PIDNS, OWN_USERNS, Creds
from imafs.ima.engine import Engine
from imafs.ima.hooks import OpenMode
from imafs.ima.iint import AccessDenied, Subject, settle
from imafs.ima.keys import Keyring, keyid_of
from imafs.ima.measurelog import MeasurementList
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import parse_policy
from imafs.ima.securityfs import FILES, Securityfs, SecurityfsError
from imafs.store import Store

ME = os.getpid()
POLICY = """\
measure func=DIGEST_LIST_CHECK
appraise func=DIGEST_LIST_CHECK appraise_type=imasig
measure func=BPRM_CHECK digest_cache=content pcr=10
appraise func=BPRM_CHECK digest_cache=content
"""


class World:
    def __init__(self, tmp, rules=POLICY):
        self.dir = tmp / "files"
        self.dir.mkdir()
        self.store = Store(str(tmp / "lmdb"), sync=False)
        self.audit = AuditLog(str(tmp / "audit.log"))
        self.priv = tk.key("ec")
        self.cert = tk.cert(self.priv)
        ring = Keyring(self.store, 0)
        ring.add(tk.der(self.cert))
        self.tree = namespace_tree(self.store, parse_policy(rules), keyring=ring,
                                   mlist=MeasurementList(self.store, 0))
        self.root = self.tree.root
        self.engine = Engine(self.tree, store=self.store, audit=self.audit)
        self.rootfd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY)
        self.fs = Securityfs(self.engine,
                             open_file=functools.partial(open_in_mount, self.rootfd),
                             open_as=functools.partial(open_as_writer, backing_of=None))

    def file(self, name, data: bytes, mode=0o755) -> str:
        p = self.dir / name
        p.write_bytes(data)
        p.chmod(mode)
        return str(p)

    def sign(self, path, data=None, ns=None):
        data = data if data is not None else open(path, "rb").read()
        sig = ap.sign_v2(self.priv, "sha256", hashlib.sha256(data).digest(),
                         keyid_of(self.cert))
        os.setxattr(path, (ns or self.root).xattr_name, sig)

    def make_list(self, name, files: dict[str, bytes], *, sign=True, pkg="bash",
                  ns=None) -> str:
        digests = sorted({hashlib.sha256(d).digest() for d in files.values()})
        prov = dl.Provenance("debian", packages=(dl.Package(pkg, "5.2.15-2+b7", 0, "amd64",
                                                            len(files)),))
        lst = dl.DigestList((dl.Block.of("file", "sha256", digests),), prov)
        path = self.file(name, lst.to_bytes(), 0o644)
        if sign:
            self.sign(path, ns=ns)
        return path

    def session(self, name, ns=None, uid=0, flags=os.O_WRONLY, key=0):
        node = next(n for n in FILES if n.name == name)
        return self.fs.open(node, ns or self.root, Subject(ME, uid, uid), flags, key)

    def write(self, name, text, ns=None):
        h = self.session(name, ns, flags=os.O_RDWR if name == "digest_query" else os.O_WRONLY)
        try:
            h.write(text.encode() + b"\n")
            if name == "digest_query":
                return h.read(0, 1 << 20).decode()
        finally:
            h.close()

    def read(self, name, ns=None, key=0):
        node = next(n for n in FILES if n.name == name and n.entries == bool(key))
        h = self.fs.open(node, ns or self.root, Subject(ME, 0, 0), os.O_RDONLY, key)
        return h.read(0, 1 << 20).decode()

    def exec_(self, path, ns=None):
        """An exec open of ``path`` (BPRM_CHECK), settled and released."""
        fd = os.open(path, os.O_RDONLY)
        try:
            f = fd_file_ref(fd, os.fstat(fd), path.encode(), generation=0)
            st = settle(self.engine.file_open(Subject(ME, 0, 0), f,
                                              OpenMode(exec_=True),
                                              funcs=[("BPRM_CHECK", 1)]))
            if st is not None:
                self.engine.file_release(st)
        finally:
            os.close(fd)

    def entries(self, ns=None):
        return (ns or self.root).mlist.count

    def close(self):
        os.close(self.rootfd)
        self.audit.close()
        self.store.close()


@pytest.fixture
def w(tmp_path):
    world = World(tmp_path)
    yield world
    world.close()


def refused(err, fn, *a, **kw):
    with pytest.raises(SecurityfsError) as e:
        fn(*a, **kw)
    assert e.value.errno == err, (e.value.errno, str(e.value))
    return str(e.value)


def denied(fn, *a):
    with pytest.raises(AccessDenied) as e:
        fn(*a)
    return str(e.value)


def test_listed_file_passes_and_is_not_measured(w):
    good = w.file("good", b"#!/bin/sh\necho good\n")
    other = w.file("other", b"#!/bin/sh\necho other\n")
    lst = w.make_list("debian.list", {"good": b"#!/bin/sh\necho good\n"})
    w.write("digest_list_add", lst)
    assert w.entries() == 2        # boot aggregate, the list
    w.exec_(good)
    assert w.entries() == 2        # the list's entry stands for the file
    assert "other" in denied(w.exec_, other)
    assert w.entries() == 3        # an unknown file is measured (then refused)
    assert w.read("digests_count") == ("Parser digests: 0\nFile digests: 1\n"
                                       "Metadata digests: 0\nDigest list digests: 1\n")
    ans = w.write("digest_query", "sha256:" + hashlib.sha256(b"#!/bin/sh\necho good\n")
                  .hexdigest())
    assert ans.startswith("debian.list (actions: 7): version: 1, algo: sha256, type: 1")
    assert ans.rstrip().endswith("-- bash 5.2.15-2+b7")
    ans = w.write("digest_query", "sha256:" + hashlib.sha256(open(lst, "rb").read())
                  .hexdigest())
    assert "type: 3" in ans and "the list itself" in ans
    assert "in no loaded digest list" in w.write("digest_query", "sha256:" + "00" * 32)


def test_unsigned_or_changed_list_is_refused(w):
    lst = w.make_list("unsigned.list", {"a": b"a"}, sign=False)
    msg = refused(errno.EACCES, w.write, "digest_list_add", lst)
    assert "unsigned.list" in msg
    lst = w.make_list("changed.list", {"a": b"a"})
    data = bytearray(open(lst, "rb").read())
    data[-1] ^= 1
    with open(lst, "r+b") as f:         # keeps the signature of the old bytes
        f.write(data)
    refused(errno.EACCES, w.write, "digest_list_add", lst)
    assert w.read("digests_count") == ("Parser digests: 0\nFile digests: 0\n"
                                       "Metadata digests: 0\nDigest list digests: 0\n")
    assert w.root.digest_lists.lists() == []
    assert any(r["type"] == "digest_list_rejected"
               for r in map(json.loads, open(w.audit.path).read().splitlines()))


def test_unappraised_list_does_not_vouch(tmp_path):
    """A list loaded while no rule appraised DIGEST_LIST_CHECK cannot pass a file."""
    w = World(tmp_path, "appraise func=BPRM_CHECK digest_cache=content\n")
    try:
        good = w.file("good", b"good")
        w.write("digest_list_add", w.make_list("d.list", {"good": b"good"}, sign=False))
        assert w.root.digest_lists.get("d.list").actions == 0
        denied(w.exec_, good)
    finally:
        w.close()


def test_verdict_does_not_outlive_the_list(w):
    good = w.file("good", b"good program")
    lst = w.make_list("debian.list", {"good": b"good program"})
    w.write("digest_list_add", lst)
    w.exec_(good)
    w.exec_(good)                   # a kept verdict
    fp = w.root.fingerprint()
    w.write("digest_list_del", "debian.list")
    assert w.root.fingerprint() != fp
    assert w.root.digest_lists.count() == 0
    denied(w.exec_, good)           # no list: appraised from its (missing) xattr
    w.write("digest_list_add", lst)             # back: passes again
    w.exec_(good)


def test_two_lists_holding_a_digest(w):
    good = w.file("good", b"shared")
    a = w.make_list("a.list", {"x": b"shared", "y": b"only a"}, pkg="pa")
    b = w.make_list("b.list", {"x": b"shared"}, pkg="pb")
    w.write("digest_list_add", a)
    w.write("digest_list_add", b)
    w.write("digest_list_del", a)           # by path: its content is checked
    w.exec_(good)                           # b still holds it
    assert w.root.digest_lists.count() == 1
    refused(errno.EEXIST, w.write, "digest_list_add", b)
    refused(errno.ENOENT, w.write, "digest_list_del", "a.list")


def test_a_childs_lists_do_not_vouch_for_the_host(w):
    child = w.tree.create(w.root, "c", {})
    child.set_policy(Policy(parse_policy(POLICY)))
    child.keyring.add(tk.der(w.cert))
    good = w.file("good", b"child only")
    lst = w.make_list("c.list", {"good": b"child only"}, ns=child)
    # the host's rules decide the load too (its ancestors'): they want their signature
    refused(errno.EACCES, w.write, "digest_list_add", lst, ns=child)
    w.sign(lst)
    w.write("digest_list_add", lst, ns=child)
    assert child.digest_lists.get("c.list") is not None
    assert w.root.digest_lists.get("c.list") is None
    denied(w.exec_, good)           # the host (this process) is in the root namespace


def test_loaded_lists_directory(w):
    lst = w.make_list("debian.list", {"good": b"x", "b": b"y"})
    w.write("digest_list_add", lst)
    (info,) = w.root.digest_lists.lists()
    assert w.fs.entries(FILES[25], w.root) == {"debian.list": info.id}
    text = w.read("", key=info.id)
    assert "label: debian.list" in text and "actions: measured,appraised,appraised_digsig" \
        in text
    assert "block 0: type file, algo sha256, modifiers 0, count 2 -- bash 5.2.15-2+b7" in text
    assert '"source": "debian"' in text and f'"path": "{lst}"' in text
    w.write("digest_list_del", "debian.list")
    refused(errno.ENOENT, w.read, "", key=info.id)


def test_writer_credentials_and_bad_requests(w, tmp_path):
    lst = w.make_list("private.list", {"a": b"a"})
    os.chmod(lst, 0o600)
    # uid 1000 (no CAP_SYS_ADMIN) opens digest_list_add? refused at open as for
    # policy; as a writer of root's open, a path only root may read is read with
    # root's credentials
    real = w.fs.creds_of
    w.fs.creds_of = lambda p: Creds(p, 0, OWN_USERNS, OWN_PIDNS)
    refused(errno.EACCES, w.session, "digest_list_add", uid=1000)
    w.fs.creds_of = real
    with pytest.raises(PermissionError):
        open_as_writer(ME, 1000, 1000, lst, backing_of=None)
    f = open_as_writer(ME, 0, 0, lst, backing_of=None)
    os.close(f.fd)
    refused(errno.EINVAL, w.write, "digest_list_add", "relative/path")
    refused(errno.EINVAL, w.write, "digest_list_add", str(tmp_path))       # a directory
    refused(errno.ENOENT, w.write, "digest_list_add", str(tmp_path / "none"))
    refused(errno.EINVAL, w.write, "digest_query", "sha256:1234")
    refused(errno.EINVAL, w.write, "digest_query", "nosuch:00")
    h = w.session("digest_list_add")
    try:
        refused(errno.EINVAL, h.write, b"/a\n/b\n")
    finally:
        h.close()


def test_the_writers_root_is_used(w, tmp_path):
    """A path is resolved in the writer's root: a process chrooted into a directory
    names its files as /name (its root), and a symlink never leads out of it."""
    jail = tmp_path / "jail"
    jail.mkdir()
    lst = w.make_list("j.list", {"a": b"a"})
    os.link(lst, jail / "j.list")
    os.symlink("/../../../" + str(lst), jail / "escape.list")
    code = ("import os, sys, time; os.chroot(sys.argv[1]); os.chdir('/'); "
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code, str(jail)], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        f = open_as_writer(p.pid, 0, 0, "/j.list", backing_of=None)
        try:
            assert os.path.samestat(os.fstat(f.fd), os.stat(lst)) and f.path == b"/j.list"
        finally:
            os.close(f.fd)
        with pytest.raises(FileNotFoundError):
            open_as_writer(p.pid, 0, 0, "/escape.list", backing_of=None)
    finally:
        p.kill()
        p.wait()


def test_lookup_ors_the_actions_of_every_list(tmp_path):
    """The first list holding a digest has fewer actions than a later one: the lookup
    (which reads further lists only when the first lacks an action) says both."""
    store = Store(str(tmp_path / "s"), sync=False)
    try:
        from imafs.ima.digest_index import DigestListIndex
        idx = DigestListIndex(store, 0)
        d = hashlib.sha256(b"x").digest()
        one = dl.DigestList((dl.Block.of("file", "sha256", [d]),)).to_bytes()
        two = dl.DigestList((dl.Block.of("file", "sha256", [d, bytes(32)]),)).to_bytes()
        idx.add("m.list", one, actions=dl.ACTION_MEASURED)
        assert idx.lookup("sha256", d).actions == dl.ACTION_MEASURED
        e0, s0 = idx.epoch, idx.state()
        idx.add("a.list", two, actions=dl.ACTION_APPRAISED)
        assert idx.lookup("sha256", d).actions == dl.ACTION_MEASURED | dl.ACTION_APPRAISED
        assert idx.epoch > e0 and idx.state() != s0 and idx.algos() == {"sha256"}
        idx.remove("a.list")
        assert idx.state() == s0      # the same lists: the same state
    finally:
        store.close()


# ------------------------------------------------- without a mount (imafs verify --digest-list)

def _offline_list(*contents: bytes) -> bytes:
    digests = sorted({hashlib.sha256(c).digest() for c in contents})
    prov = dl.Provenance("debian", packages=(dl.Package("bash", "5.2.15-2+b7", 0, "amd64",
                                                        len(digests)),))
    return dl.DigestList((dl.Block.of("file", "sha256", digests),), prov).to_bytes()


def test_scratch_index_is_private_and_goes_away():
    from imafs.ima.digest_index import scratch_index
    with scratch_index() as idx:
        where = idx.store.path
        assert os.path.isdir(where) and idx.count() == 0
    assert not os.path.exists(where)


def test_load_offline_keeps_the_actions_done_to_the_list():
    """The actions are those the mount keeps (actions_of, as list_actions): measured,
    appraised, by a signature; a list not appraised vouches for no appraisal
    (listed_pass None) but is found (lookup_in) with its actions."""
    from imafs.ima import digest_cache as dc
    from imafs.ima.digest_index import scratch_index
    sig = ap.AppraiseResult(ap.PASS, None, "sha256", 0x1234, "signed")
    with scratch_index() as idx:
        info = dc.load_offline(idx, "/l/signed.list", _offline_list(b"a"), measured=True,
                               appraisals=[sig])
        assert info.label == "signed.list" and info.actions == (
            dl.ACTION_MEASURED | dl.ACTION_APPRAISED | dl.ACTION_APPRAISED_DIGSIG)
        dc.load_offline(idx, "/l/hash.list", _offline_list(b"b"), measured=False,
                        appraisals=[ap.AppraiseResult(ap.PASS, None, "sha256")])
        dc.load_offline(idx, "/l/none.list", _offline_list(b"c"), measured=True,
                        appraisals=[])

        def digest(content, algo):
            return hashlib.new(algo, content).digest()
        f = dc.lookup_in(idx, functools.partial(digest, b"a"))
        p = dc.listed_pass(f)
        assert dc.is_listed(p) and p.passed and p.detail == \
            "digest in list signed.list (from bash 5.2.15-2+b7)"
        assert dc.lookup_in(idx, functools.partial(digest, b"b")).actions == \
            dl.ACTION_APPRAISED
        f = dc.lookup_in(idx, functools.partial(digest, b"c"))
        assert f.actions == dl.ACTION_MEASURED and dc.listed_pass(f) is None
        assert dc.lookup_in(idx, functools.partial(digest, b"d")) is None
        assert dc.listed_pass(None) is None and dc.lookup_in(None, None) is None


def test_load_offline_refuses_as_the_mount_does():
    """A failed appraisal (EACCES), a malformed list (EINVAL, the byte offset), a name
    or content already loaded (EEXIST), a list too big (EFBIG): refused naming the
    file, and nothing is loaded."""
    from imafs.ima import digest_cache as dc
    from imafs.ima.digest_index import scratch_index

    def refused_(err, *a, **kw):
        with pytest.raises(dc.DigestListRefused) as e:
            dc.load_offline(idx, *a, **kw)
        assert e.value.errno == err, str(e.value)
        return str(e.value)
    good = _offline_list(b"a")
    unsigned = ap.AppraiseResult(ap.FAIL, "IMA-signature-required", None, None,
                                 "no security.ima")
    with scratch_index() as idx:
        why = refused_(errno.EACCES, "/l/u.list", good, measured=True,
                       appraisals=[unsigned])
        assert why.startswith("/l/u.list: ") and "IMA-signature-required" in why
        why = refused_(errno.EINVAL, "/l/bad.list", good[:-1], measured=False, appraisals=[])
        assert "/l/bad.list" in why and "byte " in why
        assert idx.count() == 0
        dc.load_offline(idx, "/l/a.list", good, measured=False, appraisals=[])
        assert "'a.list' is already loaded" in refused_(
            errno.EEXIST, "/m/a.list", _offline_list(b"x"), measured=False, appraisals=[])
        assert "/l/b.list" in refused_(errno.EEXIST, "/l/b.list", good, measured=False,
                                       appraisals=[])
        assert "/l/big.list" in refused_(errno.EFBIG, "/l/big.list",
                                         bytes(dl.MAX_LIST_SIZE + 1), measured=False,
                                         appraisals=[])
        assert [i.label for i in idx.lists()] == ["a.list"]


def test_actions_of():
    from imafs.ima.digest_cache import actions_of
    fail = ap.AppraiseResult(ap.FAIL, "invalid-hash")
    assert actions_of(False, []) == 0
    assert actions_of(True, [fail]) == dl.ACTION_MEASURED
    assert actions_of(False, [fail, ap.AppraiseResult(ap.PASS, None, keyid=7)]) == \
        dl.ACTION_APPRAISED | dl.ACTION_APPRAISED_DIGSIG
