"""imafs.ima.securityfs (with securityfs_read.py and securityfs_write.py): the control
files without a mount -- who may open what, policy writes staged and loaded at close
(all or nothing), keys transactions undone on a store failure, ns-create/ns-join/
ns-remove moving their opener once, the query answer and what a child sees of its
ancestors. Paths resolve in a small tree through the mount's own path opener."""
from __future__ import annotations

import errno
import functools
import json
import logging
import os

import pytest
from cryptography.hazmat.primitives import serialization

from helpers import testkeys as tk
from helpers.namespaces import Binder
from imafs.assemble import namespace_tree
from imafs.fs.adapter import open_in_mount
from imafs.ima import securityfs_write
from imafs.ima.audit import AuditLog
from imafs.ima.capability import OWN_PIDNS, OWN_USERNS, Creds
from imafs.ima.engine import Engine
from imafs.ima.iint import Subject
from imafs.ima.keys import Keyring, keyid_of
from imafs.ima.measurelog import MeasurementList
from imafs.ima.policy import MAX_POLICY_BYTES
from imafs.ima.policy_parse import parse_policy
from imafs.ima.securityfs import FILES, MODEL, Securityfs, SecurityfsError, children
from imafs.ima.securityfs_write import SIGNED_POLICY_REQUIRED
from imafs.store import Store

ME = os.getpid()
CAP_ALL, SYS_ADMIN, DAC_OVERRIDE = (1 << 41) - 1, 1 << 21, 1 << 1


class World:
    def __init__(self, tmp, rules=""):
        self.tree_dir = tmp / "tree"
        (self.tree_dir / "dir").mkdir(parents=True)
        (self.tree_dir / "a").write_text("a file\n")
        os.mkfifo(self.tree_dir / "fifo")
        self.store = Store(str(tmp / "lmdb"), sync=False)
        self.audit_path = tmp / "audit.log"
        self.audit = AuditLog(str(self.audit_path))
        self.binder = Binder()
        self.tree = namespace_tree(self.store, parse_policy(rules),
                                   keyring=Keyring(self.store, 0),
                                   mlist=MeasurementList(self.store, 0),
                                   binder=self.binder, audit=self.audit)
        self.root = self.tree.root
        self.engine = Engine(self.tree, store=self.store, audit=self.audit)
        self.rootfd = os.open(self.tree_dir, os.O_PATH | os.O_DIRECTORY)
        self.fs = Securityfs(self.engine,
                             open_file=functools.partial(open_in_mount, self.rootfd))
        # every pid is the host unless a test says otherwise (pids here are made up)
        self.fs.creds_of = lambda p: Creds(p, CAP_ALL, OWN_USERNS, OWN_PIDNS)

    def open(self, name, ns=None, *, uid=0, pid=ME, flags=os.O_WRONLY):
        node = next(n for n in FILES if n.name == name)
        return self.fs.open(node, ns or self.root, Subject(pid, uid, uid), flags)

    def write_all(self, name, *parts, ns=None):
        """Writes through one open, then close(2) (flush) and release (close)."""
        h = self.open(name, ns)
        try:
            for p in parts:
                assert h.write(p) == len(p)
            h.flush()
        finally:
            h.close()

    def records(self, kind=None):
        lines = self.audit_path.read_text().splitlines()
        recs = [json.loads(ln) for ln in lines]
        return [r for r in recs if kind is None or r["type"] == kind]

    def close(self):
        os.close(self.rootfd)
        self.audit.close()
        self.store.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def refused(err, fn, *args, **kw):
    with pytest.raises(SecurityfsError) as e:
        fn(*args, **kw)
    assert e.value.errno == err, (e.value.errno, str(e.value))
    assert str(e.value)
    return str(e.value)


# ------------------------------------------------------------------ the table
def test_table_rows_keep_their_index():
    """A row's index is part of its node id: rows are appended, never moved."""
    first = ["", "namespaces", "pcrs", "policy", "ascii_runtime_measurements",
             "ascii_runtime_measurements_sha1", "ascii_runtime_measurements_sha256",
             "binary_runtime_measurements", "binary_runtime_measurements_sha1",
             "binary_runtime_measurements_sha256", "runtime_measurements_count",
             "violations", "sha1", "sha256", "keys", "query", "ns-create", "ns-remove",
             "stats", "ns-join"]
    assert [n.name for n in FILES[:len(first)]] == first
    assert set(children(2)) == {"sha1", "sha256"}
    by = {n.name: n for n in FILES}
    assert {n for n, x in by.items() if x.writers == "admin"} == {
        "policy", "keys", "ns-remove", "ns-join", "digest_list_add", "digest_list_del", "evm",
        "control"}
    assert {n for n, x in by.items() if x.writers == "self"} == {
        "query", "ns-create", "digest_query"}
    assert {n for n, x in by.items() if x.root_host} == {
        "policy", "keys", "ns-remove", "digest_list_add", "digest_list_del", "evm", "control"}
    assert {n for n, x in by.items() if x.host_given} == {
        "policy", "keys", "digest_list_add", "digest_list_del", "evm", "control"}
    # the behaviour model's directory and files (model_secfs.py), appended after them
    assert set(children(MODEL)) == {"state", "measurement", "trajectory", "forensics",
                                    "events", "control", "export", "stats"}
    assert by["control"].writers == "admin" and by["control"].rejected == "model_rejected"
    assert {n for n, x in by.items() if x.own_only} == {"ns-create", "ns-join"}
    assert {n for n, x in by.items() if x.moves_opener} == {"ns-create", "ns-join"}
    modes = {n: x.mode for n, x in by.items()}
    assert (modes["policy"], modes["keys"], modes["query"], modes["ns-create"]) == (0o600,) * 4
    assert (modes["ns-remove"], modes["ns-join"], modes["violations"]) == (0o200, 0o200, 0o440)
    assert modes["evm"] == 0o660        # as the kernel's securityfs evm file


def test_target_is_own_namespace_or_a_descendant(world):
    t = world.tree
    a = t.create(t.root, *t.parse_create("a"))
    b = t.create(t.root, *t.parse_create("b"))
    world.binder.where[7] = a.id
    assert world.fs.target(7) is a
    assert world.fs.target(ME, a.id) is a               # the root sees its children
    refused(errno.EACCES, world.fs.target, 7, b.id)     # a sibling
    refused(errno.EACCES, world.fs.target, 7, 0)        # an ancestor
    refused(errno.ENOENT, world.fs.target, 7, 99)
    world.binder.where[8] = 42                          # a namespace nobody knows
    refused(errno.EACCES, world.fs.target, 8)


# ------------------------------------------------------------------ who may open what
OTHER_PIDNS, OTHER_USERNS = (OWN_PIDNS[0], 1), (OWN_USERNS[0], 2)
WHO = {
    # the host: root namespace, the daemon's pid and user namespaces, CAP_SYS_ADMIN
    "host": (CAP_ALL, OWN_USERNS, OWN_PIDNS),
    "host_nocap": (CAP_ALL & ~SYS_ADMIN, OWN_USERNS, OWN_PIDNS),     # uid 0 alone
    "dac": (DAC_OVERRIDE, OWN_USERNS, OWN_PIDNS),                    # uid 1000
    # a container's root with every capability of the initial user namespace
    "container_admin": (CAP_ALL, OWN_USERNS, OTHER_PIDNS),
    # runc's default set: no CAP_SYS_ADMIN
    "container": (CAP_ALL & ~SYS_ADMIN, OWN_USERNS, OTHER_PIDNS),
    # root of a user namespace of its own (every capability, over it only)
    "userns_root": (CAP_ALL, OTHER_USERNS, OTHER_PIDNS),
}
ADMIN_FILES = ("policy", "keys", "ns-remove", "ns-join", "digest_list_add",
               "digest_list_del")


def as_(world, who, pid=ME):
    cap, userns, pidns = WHO[who]
    world.fs.creds_of = lambda p: Creds(p, cap, userns, pidns)


def may(world, who, name, ns=None, pid=ME):
    as_(world, who, pid)
    try:
        world.open(name, ns, pid=pid, uid=0 if who != "dac" else 1000).close()
        return True
    except SecurityfsError as e:
        assert e.errno == errno.EACCES and str(e)
        return False


def test_root_files_are_the_hosts(world, caplog):
    """The root namespace's policy, keys and ns-remove: the host with CAP_SYS_ADMIN
    only -- not uid 0 without it, not CAP_DAC_OVERRIDE (which passes the kernel's mode
    check), not a container's root in the root namespace, whatever its capabilities
    (issue 15 item 1). ns-join (it moves only the writer, deeper): CAP_SYS_ADMIN in the
    initial user namespace. ns-create, query and digest_query: CAP_SYS_ADMIN in one's
    own user namespace. The digest lists as policy. Each refusal logged and audited."""
    caplog.set_level(logging.WARNING, "imafs.control")
    allowed = {name: {w for w in WHO if may(world, w, name)}
               for name in ADMIN_FILES + ("ns-create", "query", "digest_query")}
    for name in ("policy", "keys", "ns-remove", "digest_list_add", "digest_list_del"):
        assert allowed[name] == {"host"}, name
    assert allowed["ns-join"] == {"host", "container_admin"}
    assert allowed["ns-create"] == allowed["query"] == allowed["digest_query"] == {
        "host", "container_admin", "userns_root"}
    assert len(world.records("digest_list_rejected")) == 2 * (len(WHO) - 1)
    assert "only the host does" in caplog.text
    recs = world.records("policy_rejected")
    assert len(recs) == len(WHO) - 1 and all(r["ns"] == "/" for r in recs)
    assert [r for r in world.records("key_rejected") if r["uid"] == 1000]
    assert len(world.records("query_rejected")) == 6
    # reading is the file mode's (the kernel checks it)
    as_(world, "container")
    world.open("policy", flags=os.O_RDONLY).close()
    # checked at open: a descriptor the host opened still writes afterwards
    as_(world, "host")
    h = world.open("policy")
    as_(world, "container")
    h.write(b"measure func=BPRM_CHECK\n")
    h.flush()
    h.close()
    assert len(world.root.policy) == 1


def test_child_files(world):
    """A namespace made from inside (ns-create): CAP_SYS_ADMIN in the initial user
    namespace, or in one's own while inside it (and from an ancestor inside too). A
    namespace made from the host: its policy and keys never from within; its
    ns-remove and ns-join with CAP_SYS_ADMIN in the initial user namespace."""
    t = world.tree
    c = t.create(t.root, *t.parse_create("c"))
    d = t.create(c, *t.parse_create("d"))
    h = t.create(t.root, *t.parse_create("h"), origin="host")
    e = t.create(h, *t.parse_create("e"))
    world.binder.where.update({11: c.id, 12: h.id, 13: e.id})
    inside = {name: {w for w in WHO if may(world, w, name, c, pid=11)} for name in ADMIN_FILES}
    for name in ADMIN_FILES:
        assert inside[name] == {"host", "container_admin", "userns_root"}, name
    # from c, the files of its descendant d (made from inside too)
    assert {w for w in WHO if may(world, w, "policy", d, pid=11)} == \
        {"host", "container_admin", "userns_root"}
    hostmade = {name: {w for w in WHO if may(world, w, name, h, pid=12)}
                for name in ADMIN_FILES}
    for name in ("policy", "keys", "digest_list_add", "digest_list_del"):
        assert hostmade[name] == set(), name
    assert hostmade["ns-remove"] == hostmade["ns-join"] == {"host", "container_admin"}
    recs = [r for r in world.records("policy_rejected") if r["ns"] == "/h"]
    assert recs and all("made from the host" in r["error"] for r in recs)
    # e (made from inside h): its own files from inside; from h, not by h's user
    # namespace root (h was made from the host)
    assert may(world, "userns_root", "policy", e, pid=13)
    assert not may(world, "userns_root", "policy", e, pid=12)
    # the host writes every child's files from the root
    assert all(may(world, "host", n, ns) for n in ("policy", "keys") for ns in (c, h, e))
    # a container root of the root namespace in a user namespace of its own: no
    # child's files (it is not inside them)
    assert not may(world, "userns_root", "policy", c)


def test_only_the_host_reads_children_from_the_root(world):
    """A process of the root namespace that is not the host (a container without a
    namespace of its own) reads no descendant's files, unless it has CAP_SYS_ADMIN in
    the initial user namespace; a child's process reads its own and its
    descendants'."""
    t = world.tree
    c = t.create(t.root, *t.parse_create("c"))
    d = t.create(c, *t.parse_create("d"))
    world.binder.where[11] = c.id
    for who, ok in (("host", True), ("container_admin", True), ("container", False),
                    ("userns_root", False), ("dac", True), ("host_nocap", True)):
        as_(world, who)
        if ok:
            assert world.fs.target(ME, c.id) is c
        else:
            msg = refused(errno.EACCES, world.fs.target, ME, c.id)
            assert "not the host" in msg
        assert world.fs.target(ME, 0) is world.root           # its own: always
    as_(world, "container")
    assert world.fs.target(11, d.id) is d
    assert world.records("control_rejected")


def test_read_only_files_refuse_writers_and_stats_is_the_roots(world, caplog):
    caplog.set_level(logging.WARNING, "imafs.control")
    refused(errno.EACCES, world.open, "violations")
    assert f"open of violations of namespace / by pid {ME} refused: violations is " \
        f"read-only" in caplog.text
    assert [r["file"] for r in world.records()] == ["violations"]
    h = world.open("stats", flags=os.O_RDONLY)
    assert set(json.loads(h.read(0, 1 << 16))) == set(world.engine.stats())
    c = world.tree.create(world.root, *world.tree.parse_create("c"))
    refused(errno.EACCES, world.open, "stats", c, flags=os.O_RDONLY)


def test_contents_are_taken_at_open(world):
    h = world.open("policy", flags=os.O_RDONLY)
    world.write_all("policy", b"measure func=BPRM_CHECK\n")
    assert h.read(0, 4096) == b""                 # as it was at open
    h2 = world.open("policy", flags=os.O_RDONLY)
    text = world.root.policy.text().encode()
    assert text.startswith(b"measure func=BPRM_CHECK") and h2.read(0, 4096) == text
    assert h2.read(8, 4) == b"func"
    node = next(n for n in FILES if n.name == "policy")
    assert world.fs.size(node, world.root, 0) == len(text)
    usage = world.open("ns-create", flags=os.O_RDONLY).read(0, 1 << 16)
    assert usage.startswith(b'Write "NAME [template=T]')
    refused(errno.EBADF, world.open("policy").read, 0, 10)      # write-only


def test_lists_are_read_by_range(world):
    world.write_all("policy", b"measure func=FILE_CHECK\n")
    h = world.open("ascii_runtime_measurements", flags=os.O_RDONLY)
    whole = world.root.mlist.read("ascii", 0, 1 << 20)
    assert h.read(0, 1 << 20) == whole and whole
    assert h.read(5, 7) == whole[5:12]
    node = next(n for n in FILES if n.name == "binary_runtime_measurements_sha256")
    assert world.fs.size(node, world.root, 0) == world.root.mlist.size("binary_sha256")
    pcrs = world.open("sha256", flags=os.O_RDONLY).read(0, 1 << 16).decode()
    assert pcrs.splitlines()[0].startswith("PCR-00: ") and len(pcrs.splitlines()) == 24


# ------------------------------------------------------------------ policy
def test_policy_is_parsed_as_written_and_loaded_at_close(world):
    h = world.open("policy")
    h.write(b"measure func=BPRM_CHECK\nau")
    h.write(b"dit func=FILE_CHECK\nappraise func=MODULE_CHECK")     # no final newline
    assert len(world.root.policy) == 0
    h.flush()
    assert [r.func for r in world.root.policy.rules] == ["BPRM_CHECK", "FILE_CHECK",
                                                         "MODULE_CHECK"]
    h.close()
    assert world.records("policy_update")[0]["rules"] == 3
    h = world.open("policy")                    # appended, not replaced
    h.write(b"measure func=MMAP_CHECK\n")
    h.close()                                   # a release without a flush loads too
    assert len(world.root.policy) == 4


def test_a_bad_line_loads_nothing_of_the_open(world, caplog):
    caplog.set_level(logging.WARNING, "imafs.control")
    h = world.open("policy")
    h.write(b"measure func=BPRM_CHECK\n")
    msg = refused(errno.EINVAL, h.write, b"\nmeasure func=NOPE\n")
    assert msg.startswith("line 3, column 9: unknown func")   # counted from the open
    msg = refused(errno.EINVAL, h.write, b"audit func=BPRM_CHECK\n")
    assert "earlier write through this open was refused (line 3" in msg
    h.flush()                                   # close(2) succeeds, loads nothing
    h.close()
    assert len(world.root.policy) == 0
    rej = world.records("policy_rejected")
    assert "line 3" in rej[0]["error"] and rej[1]["cause"] == "earlier refusal"
    assert f"policy write to namespace / rejected (pid {ME}): line 3" in caplog.text


def test_policy_size_limits(world, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, "imafs.control")
    h = world.open("policy")
    h.write(b"\n" * MAX_POLICY_BYTES)
    refused(errno.EFBIG, h.write, b"\n")
    refused(errno.EFBIG, h.flush)
    refused(errno.EFBIG, h.flush)                   # every close says it; logged once
    assert caplog.text.count("closed with nothing loaded") == 1
    h.close()
    monkeypatch.setattr(securityfs_write, "MAX_POLICY_RULES", 2)
    h = world.open("policy")
    h.write(b"measure func=BPRM_CHECK\naudit func=BPRM_CHECK\n")
    msg = refused(errno.EFBIG, h.write, b"measure func=FILE_CHECK\n")
    assert msg == "a policy holds at most 2 rules"
    h.close()
    assert len(world.root.policy) == 0


def test_policy_that_cannot_be_stored_is_not_in_force(world, monkeypatch):
    def full(ns):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(world.tree, "save_policy", full)
    h = world.open("policy")
    h.write(b"measure func=BPRM_CHECK\n")
    refused(errno.EIO, h.flush)
    assert len(world.root.policy) == 0
    assert "cannot store the policy" in world.records("policy_rejected")[0]["error"]


def test_policy_by_path_is_measured_as_policy_check(world):
    world.write_all("policy", b"measure func=POLICY_CHECK\n")
    (world.tree_dir / "pol").write_text("audit func=BPRM_CHECK\n")
    world.write_all("policy", b"/pol\n")
    assert [r.action for r in world.root.policy.rules] == ["measure", "audit"]
    names = [e.get("n-ng") for e in world.root.mlist.entries()]
    assert names[-1] == b"/pol\0", names
    h = world.open("policy")
    assert "not a regular file (a FIFO)" in refused(errno.EINVAL, h.write, b"/fifo\n")
    h = world.open("policy")
    assert "No such file" in refused(errno.EINVAL, h.write, b"/nothing\n")


def test_signed_policy_required_once_policy_check_is_appraised(world):
    world.write_all("policy", b"appraise func=POLICY_CHECK\n")
    h = world.open("policy")
    assert refused(errno.EACCES, h.write, b"measure func=BPRM_CHECK\n") == \
        SIGNED_POLICY_REQUIRED
    (world.tree_dir / "pol").write_text("audit func=BPRM_CHECK\n")
    h = world.open("policy")                # an unsigned policy file: its appraisal
    assert refused(errno.EACCES, h.write, b"/pol\n").startswith("/pol: ")
    assert len(world.root.policy) == 1
    causes = [r.get("cause") for r in world.records("policy_rejected")]
    assert causes == ["signed policy required", "policy file refused"]


# ------------------------------------------------------------------ keys
def _cert(n, kind="ec"):
    return tk.der(tk.cert(tk.key(kind, n), cn=f"key {n}"))


def _ids(ring):
    return sorted(k.keyid for k in ring)


def test_keys_are_applied_at_close(world):
    a, b = _cert(1), _cert(2, "rsa")
    h = world.open("keys")
    h.write(a[:100])                            # a certificate cut across writes
    h.write(a[100:] + b)
    assert len(world.root.keyring) == 0
    h.flush()
    h.close()
    assert _ids(world.root.keyring) == sorted([keyid_of(a), keyid_of(b)])
    assert {r["keyid"] for r in world.records("key_added")} == {
        f"{keyid_of(a):08x}", f"{keyid_of(b):08x}"}
    world.write_all("keys", f"remove {keyid_of(a):08x}\n".encode())
    assert _ids(world.root.keyring) == [keyid_of(b)]


def test_pem_after_text_and_paths(world):
    c = tk.cert(tk.key("ec", 3), cn="pem")
    pem = c.public_bytes(serialization.Encoding.PEM)
    (world.tree_dir / "k.der").write_bytes(_cert(4))
    world.write_all("keys", b"Certificate:\n    Data: ...\n" + pem, b"/k.der\n")
    assert _ids(world.root.keyring) == sorted([keyid_of(c), keyid_of(_cert(4))])
    h = world.open("keys")
    assert refused(errno.EINVAL, h.write, b"/dir\n") == "/dir: not a regular file (a directory)"


def test_one_bad_item_applies_nothing_of_the_open(world):
    h = world.open("keys")
    h.write(_cert(5))
    msg = refused(errno.EINVAL, h.write, b"remove 0badc0de\n")
    assert msg == ("remove 0badc0de: no such key in namespace /; nothing written through "
                   "this open is applied")
    refused(errno.EINVAL, h.write, _cert(6))            # the open stays refused
    h.flush()
    h.close()
    assert len(world.root.keyring) == 0
    h = world.open("keys")
    assert "expected a DER or PEM certificate" in refused(errno.EINVAL, h.write, b"hello\n")


def test_items_are_checked_against_the_keyring_as_the_open_leaves_it(world):
    a = _cert(10)
    kid = f"{keyid_of(a):08x}".encode()
    h = world.open("keys")
    h.write(a)
    h.write(b"remove " + kid + b"\n")         # the key this open added: fine
    refused(errno.EINVAL, h.write, b"remove " + kid + b"\n")     # removed already
    world.root.keyring.add(a)
    h = world.open("keys")
    h.write(b"remove " + kid + b"\n")
    world.write_all("keys", b"remove " + kid + b"\n")      # another open, meanwhile
    msg = refused(errno.EINVAL, h.flush)                    # checked again at close
    assert msg == f"remove {kid.decode()}: no such key in namespace /"


def test_a_store_failure_undoes_the_transaction(world, monkeypatch):
    ring = world.root.keyring
    old = _cert(7)
    ring.add(old)
    add, calls = ring.add, []

    def failing_add(data, **kw):            # the second add of the open fails
        calls.append(data)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "MDB_MAP_FULL")
        return add(data, **kw)
    monkeypatch.setattr(ring, "add", failing_add)
    h = world.open("keys")
    h.write(f"remove {keyid_of(old):08x}\n".encode() + _cert(8) + _cert(9))
    msg = refused(errno.EIO, h.flush)
    assert msg.startswith("keys not changed: cannot store them:")
    assert _ids(ring) == [keyid_of(old)]            # the removal and the add undone
    monkeypatch.undo()
    again = Keyring(world.store, 0)                 # and so is the store
    assert _ids(again) == [keyid_of(old)]
    assert world.records("key_added") == [] and world.records("key_removed") == []


def test_keys_byte_limit(world):
    h = world.open("keys")
    h.write(b"\n" * securityfs_write.MAX_KEYS_WRITE)
    refused(errno.EFBIG, h.write, b"\n")
    refused(errno.EFBIG, h.flush)


# ------------------------------------------------------------------ namespaces
def test_ns_create_moves_its_opener_once(world):
    h = world.open("ns-create")
    assert h.write(b"kid template=ima-ns") == len(b"kid template=ima-ns")
    kid = world.root.children["kid"]
    assert world.binder.where[ME] == kid.id and kid.template == "ima-ns"
    msg = refused(errno.EINVAL, h.write, b"kid2")
    assert "already moved its opener" in msg and "kid2" not in world.root.children
    h.close()
    assert h.opener is None
    assert [r["type"] for r in world.records()] == ["ns_create", "ns_create_rejected"]


def test_ns_create_refused_when_the_opener_left(world):
    h = world.open("ns-create")
    world.binder.where[ME] = 99
    assert "has left namespace /" in refused(errno.EPERM, h.write, b"kid")
    assert "kid" not in world.root.children
    h.close()


def test_a_failed_move_removes_the_child_again(world):
    world.binder.fail = True
    h = world.open("ns-create")
    refused(errno.EPERM, h.write, b"kid")
    assert "kid" not in world.root.children and h.moved is False
    names = [e.name for e in world.root.mlist.entries()]
    assert names[-2:] == [b"ns-create", b"ns-remove"]


def test_ns_join_records_first(world):
    t = world.tree
    c = t.ns_create(t.root, "c", 1, 0)
    h = world.open("ns-join")
    h.write(b"c\n")
    assert world.binder.where[ME] == c.id
    last = list(world.root.mlist.entries())[-1]
    assert last.name == b"ns-join" and b"ns-join name=/c " in last.get("buf")
    assert world.records("ns_join")[0]["target"] == "/c"
    h = world.open("ns-join")
    refused(errno.EPERM, h.write, b"c")             # it is in /c now, not /
    world.binder.where[ME] = 0
    world.binder.fail = True
    h = world.open("ns-join")
    refused(errno.EPERM, h.write, b"c")
    assert list(world.root.mlist.entries())[-1].name == b"ns-join-failed"
    h = world.open("ns-join")
    refused(errno.ENOENT, h.write, b"nothing")


def test_ns_remove_and_write_limits(world):
    t = world.tree
    c = t.create(t.root, *t.parse_create("c"))
    world.binder.where[12345] = c.id
    refused(errno.EBUSY, world.open("ns-remove").write, b"c")
    del world.binder.where[12345]
    refused(errno.ENOENT, world.open("ns-remove").write, b"d")
    world.open("ns-remove").write(b"c\n")
    assert "c" not in world.root.children
    refused(errno.EINVAL, world.open("ns-remove").write, b"x" * 4097)
    assert "a NUL byte" in refused(errno.EINVAL, world.open("ns-create").write, b"a\0b")
    assert len(world.records("ns_remove_rejected")) == 3


# ------------------------------------------------------------------ query
def test_query_answer(world):
    world.write_all("policy", b"measure func=FILE_CHECK\n")
    h = world.open("query", flags=os.O_RDWR)
    h.write(b"/a\n")
    ans = json.loads(h.read(0, 1 << 20))
    assert ans["path"] == "/a" and ans["namespace"] == "/"
    (entry,) = ans["namespaces"]
    assert entry["digest"].startswith("sha256:") and entry["hooks"][0]["func"] == "FILE_CHECK"
    assert entry["hooks"][0]["decision"]["measure"] is True
    # the last answer stays readable by a later open of the same uid (and only that)
    again = world.open("query", flags=os.O_RDONLY)
    assert json.loads(again.read(0, 1 << 20)) == ans
    assert world.open("query", uid=1000, flags=os.O_RDONLY).read(0, 10) == b""
    node = next(n for n in FILES if n.name == "query")
    assert world.fs.size(node, world.root, 0) == len(again.read(0, 1 << 20))
    h.write(b"exec /a")
    hooks = json.loads(h.read(0, 1 << 20))["namespaces"][0]["hooks"]
    assert "BPRM_CHECK" in [hk["func"] for hk in hooks]
    h.write(b"/missing")
    assert json.loads(h.read(0, 1 << 20)) == {"path": "/missing",
                                              "error": "No such file or directory"}


def test_query_refusals_are_logged(world, caplog):
    caplog.set_level(logging.WARNING, "imafs.control")
    h = world.open("query")
    assert refused(errno.EINVAL, h.write, b"/dir") == "/dir: not a regular file (a directory)"
    assert "one path per write, got 2 lines" in refused(errno.EINVAL, h.write, b"/a\n/a\n")
    assert "expected PATH or 'exec PATH'" in refused(errno.EINVAL, h.write, b"a b c")
    refused(errno.EINVAL, h.write, b"\n")
    refused(errno.EINVAL, h.write, b"/" * 4097)
    assert caplog.text.count("query write to namespace / rejected") == 5
    assert world.records() == []                    # queries are not audited


def test_a_child_sees_only_whether_its_ancestors_allow(world):
    world.write_all("policy", b"measure func=FILE_CHECK\nappraise func=FILE_CHECK\n")
    c = world.tree.ns_create(world.root, "c", 1, 0)
    world.write_all("policy", b"measure func=FILE_CHECK\n", ns=c)
    world.binder.where[77] = c.id
    h = world.open("query", c, pid=77, flags=os.O_RDWR)
    h.write(b"/a")
    ans = json.loads(h.read(0, 1 << 20))
    assert ans["namespace"] == "/c"
    own, root = ans["namespaces"]
    assert root == {"namespace": "/", "ancestor": True, "allowed": False}
    assert own["namespace"] == "/c" and "digest" in own and "hooks" in own
