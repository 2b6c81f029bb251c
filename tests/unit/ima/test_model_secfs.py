"""imafs.ima.model_secfs: the model's control files without a mount -- contents taken
at open, the events stream (take, wake-up, interruption), control written as policy
is (root only, refusals audited, whole-write parsing), model files loaded as policy
files (POLICY_CHECK appraisal), and ns-create's model=PATH."""
from __future__ import annotations

import errno
import functools
import json
import os
import signal
import subprocess

import pytest

from imafs.assemble import namespace_tree
from imafs.fs.adapter import open_in_mount
from imafs.ima import model as M
from imafs.ima import modelmap as mm
from imafs.ima.audit import AuditLog
from imafs.ima.capability import OWN_PIDNS, OWN_USERNS, Creds
from imafs.ima.engine import Engine
from imafs.ima.iint import Subject
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.modelfile import format_model, parse_model
from imafs.ima.modelstore import ModelStore
from imafs.ima.policy_parse import parse_policy
from imafs.ima.securityfs import FILES, MODEL, Securityfs, SecurityfsError
from imafs.store import Store

from helpers.namespaces import Binder

ME = os.getpid()
A = M.Actor((1, 1), None, mm.Coe())


class World:
    def __init__(self, tmp, rules=""):
        self.dir = tmp / "tree"
        self.dir.mkdir()
        self.store = Store(str(tmp / "lmdb"), sync=False)
        self.audit_path = tmp / "audit.log"
        self.audit = AuditLog(str(self.audit_path))
        self.models = ModelStore(self.store)
        self.tree = namespace_tree(self.store, parse_policy(rules),
                                   keyring=Keyring(self.store, 0),
                                   mlist=MeasurementList(self.store, 0), binder=Binder(),
                                   audit=self.audit, models=self.models)
        self.engine = Engine(self.tree, store=self.store, audit=self.audit)
        self.rootfd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY)
        self.fs = Securityfs(self.engine,
                             open_file=functools.partial(open_in_mount, self.rootfd))
        self.ns = self.tree.create(self.tree.root, *self.tree.parse_create("c model=learn"))

    def open(self, name, ns=None, *, uid=0, pid=ME, flags=os.O_RDONLY):
        node = next(n for n in FILES if n.name == name and n.parent == MODEL)
        return self.fs.open(node, ns or self.ns, Subject(pid, uid, uid), flags)

    def read(self, name, ns=None):
        h = self.open(name, ns)
        try:
            return h.read(0, 1 << 24)
        finally:
            h.close()

    def control(self, text, **kw):
        h = self.open("control", flags=os.O_WRONLY, **kw)
        try:
            return h.write(text.encode())
        finally:
            h.close()

    def audit_types(self):
        return [json.loads(x)["type"] for x in self.audit_path.read_text().splitlines()]

    def close(self):
        os.close(self.rootfd)
        self.audit.close()
        self.store.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def learn(model, names=("/a", "/b")):
    for n in names:
        model.decide(A, mm.file_open(n, mm.Inode(0, 0, 0o100644), bytes(32), 4))


def test_files_show_the_model(world):
    learn(world.ns.model)
    m = world.ns.model
    assert world.read("state") == m.state().hex().encode() + b"\n"
    assert world.read("measurement") == m.measurement.hex().encode() + b"\n"
    assert len(world.read("trajectory").splitlines()) == 2
    assert world.read("forensics") == b""
    assert parse_model(world.read("export")).coefficients == tuple(sorted(m.points))
    assert json.loads(world.read("stats"))["points"] == 2
    with pytest.raises(SecurityfsError) as e:       # a namespace without a model
        world.open("state", world.tree.root)
    assert e.value.errno == errno.ENOENT


def test_control_as_policy_is(world):
    # who may: as policy (capabilities, not uid: securityfs.py); uid 1000 has none
    real = world.fs.creds_of
    world.fs.creds_of = lambda p: Creds(p, 0, OWN_USERNS, OWN_PIDNS)
    with pytest.raises(SecurityfsError) as e:
        world.control("seal\n", uid=1000)
    assert e.value.errno == errno.EACCES
    world.fs.creds_of = real
    with pytest.raises(SecurityfsError) as e:
        world.control("seal\nfrobnicate\n")         # parsed whole: nothing applied
    assert e.value.errno == errno.EINVAL and world.ns.model.mode == "learn"
    assert world.control("seal\nenforce\n") == len("seal\nenforce\n")
    assert world.ns.model.mode == "enforce"
    with pytest.raises(SecurityfsError) as e:
        world.control("seal")                       # never back
    assert e.value.errno == errno.EINVAL
    types = world.audit_types()
    assert types.count("model_rejected") == 3 and "model_control" in types
    # stored for the next mounts
    assert world.models.make(world.ns.id, "learn").mode == "enforce"


def test_load_a_model_file_appraised_as_a_policy(tmp_path):
    w = World(tmp_path, "appraise func=POLICY_CHECK appraise_type=imasig\n")
    try:
        other = M.Model()
        learn(other, ("/x",))
        (w.dir / "m.model").write_bytes(format_model(other.export()))
        with pytest.raises(SecurityfsError) as e:
            w.control("load /m.model\n")            # unsigned
        assert e.value.errno == errno.EACCES and not w.ns.model.points
    finally:
        w.close()


def test_load_and_refusals(world):
    other = M.Model()
    learn(other, ("/x", "/y"))
    (world.dir / "m.model").write_bytes(format_model(other.export()))
    (world.dir / "bad.model").write_bytes(b"aggregate 00\nend\n")
    with pytest.raises(SecurityfsError) as e:
        world.control("load /bad.model\n")
    assert e.value.errno == errno.EINVAL and "model file line 1" in str(e.value)
    with pytest.raises(SecurityfsError) as e:
        world.control("load /missing\n")
    assert e.value.errno == errno.EINVAL
    world.control("load /m.model\n")
    assert world.ns.model.points == other.points and world.ns.model.mode == "sealed"
    assert world.read("state") == other.state().hex().encode() + b"\n"


def test_ns_create_with_a_model_file(world):
    other = M.Model()
    learn(other, ("/x",))
    (world.dir / "m.model").write_bytes(format_model(other.export()))
    node = next(n for n in FILES if n.name == "ns-create")
    h = world.fs.open(node, world.tree.root, Subject(ME, 0, 0), os.O_WRONLY)
    try:
        h.write(b"d model=/m.model")
    finally:
        h.close()
    d = world.tree.root.children["d"]
    assert d.model.points == other.points and d.model.mode == "sealed"
    h = world.fs.open(node, world.tree.root, Subject(ME, 0, 0), os.O_WRONLY)
    try:
        with pytest.raises(SecurityfsError) as e:
            h.write(b"e model=/nothing")
        assert e.value.errno == errno.EINVAL
    finally:
        h.close()
    assert "e" not in world.tree.root.children


def test_events_stream(world):
    h = world.open("events")
    try:
        assert h.waits and h.take(4096) == b""
        woken = []
        h.wake_on_data(lambda: woken.append(1))
        learn(world.ns.model, ("/a",))
        assert woken == [1]                         # once
        learn(world.ns.model, ("/b",))
        assert woken == [1]
        data = h.take(10)                           # cut anywhere, the rest kept
        data += h.take(1 << 20)
        lines = [json.loads(x) for x in data.splitlines()]
        assert [x["file_open"]["path"]["pathname"] for x in lines] == ["/a", "/b"]
        assert not h.interrupted()
    finally:
        h.close()
    learn(world.ns.model, ("/c",))                  # nobody reads: dropped, counted
    assert json.loads(world.read("stats"))["stream_dropped"] >= 1


def test_interrupted_sees_a_pending_signal():
    p = subprocess.Popen(["sh", "-c", "trap '' USR1; kill -STOP $$; sleep 30"])
    try:
        for _ in range(100):
            with open(f"/proc/{p.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
        from imafs.ima.model_secfs import ModelEvents
        ev = ModelEvents.__new__(ModelEvents)
        ev.pid = p.pid
        assert not ev.interrupted()
        os.kill(p.pid, signal.SIGTERM)              # pending while stopped
        assert ev.interrupted()
    finally:
        p.kill()
        p.wait()
    assert ev.interrupted()                         # gone
