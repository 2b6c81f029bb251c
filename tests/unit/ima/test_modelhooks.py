"""imafs.ima.modelhooks through the engine, without a mount: the test process is
placed in a child namespace with a behaviour model and opens, runs and creates files
of a small tree; who acts is read from the real /proc (this process).

- the first open of a file waits for a worker thread (who acts, the digest), the next
  one is decided on the event loop; the CELL's digest is the file's sha256, from the
  collect step or computed for the model when the policy measures nothing;
- an exec open is bprm_check and changes the task's identity only for a program, and
  drops the cached actor; a read-only open of an ELF file is also mmap_file;
- enforce: an open outside the model is EPERM before the handle is counted; a
  namespace operation outside it is EPERM; a learning child of an enforcing namespace
  is refused too;
- a created file is known to the models from its creating open (zero digest, named by
  instance) until its last link goes; setxattr is an event;
- the engine's stats count the model's events, refusals and time."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import pytest

from imafs.assemble import namespace_tree
from imafs.ima.engine import AccessDenied, Engine, FileRef, OpenMode, Pending, settle
from imafs.ima.iint import Subject
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.modelstore import ModelStore
from imafs.ima.policy_parse import parse_policy
from imafs.store import Store

from helpers.namespaces import Binder

ME = Subject(os.getpid(), os.getuid(), os.getgid())


class World:
    def __init__(self, tmp, rules=""):
        self.dir = tmp / "tree"
        self.dir.mkdir()
        (self.dir / "a").write_text("a file\n")
        (self.dir / "b").write_text("b file\n")
        shutil.copy("/bin/true", self.dir / "prog")
        self.store = Store(str(tmp / "lmdb"), sync=False)
        self.binder = Binder()
        self.models = ModelStore(self.store)
        self.tree = namespace_tree(self.store, parse_policy(rules),
                                   keyring=Keyring(self.store, 0),
                                   mlist=MeasurementList(self.store, 0),
                                   binder=self.binder, models=self.models)
        self.engine = Engine(self.tree, store=self.store)
        self.fds: list[int] = []

    def namespace(self, name="c", parent=None, option="learn"):
        ns = self.tree.create(parent or self.tree.root,
                              *self.tree.parse_create(f"{name} model={option}"))
        self.binder.bind(ME.pid, ns.id)
        return ns

    def ref(self, name, write=False) -> FileRef:
        p = str(self.dir / name)
        fd = os.open(p, os.O_RDWR if write else os.O_RDONLY)
        self.fds.append(fd)
        return FileRef(fd=fd, st=os.fstat(fd), path=b"/" + name.encode(), readable=True,
                       reopen=lambda: os.open(p, os.O_RDONLY),
                       getxattr=lambda n: None, setxattr=lambda n, v: None)

    def open(self, name, mode=OpenMode(), *, inline=None):
        r = self.engine.file_open(ME, self.ref(name, mode.writable), mode)
        if inline is not None:
            assert (type(r) is not Pending) == inline, r
        return settle(r)

    def records(self, ns, kind="trajectory"):
        lines = ns.model.trajectory() if kind == "trajectory" else ns.model.forensics()
        return [json.loads(x) for x in lines]

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.store.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def test_first_open_in_a_thread_then_inline_digest_is_sha256(world):
    ns = world.namespace()
    st = world.open("a", inline=False)        # who acts and the digest: a worker thread
    world.engine.file_release(st)
    st = world.open("a", inline=True)         # both at hand now
    world.engine.file_release(st)
    recs = world.records(ns)
    assert len(recs) == 1 and recs[0]["count"] == 2
    r = recs[0]
    assert r["event"]["type"] == "file_open" and r["event"]["pid"] == ME.pid
    assert r["file_open"]["path"] == {"pathname": "/a"}
    assert r["file_open"]["access"] == 4
    assert r["file_open"]["digest"] == hashlib.sha256(b"a file\n").hexdigest()
    with open(f"/proc/{ME.pid}/status") as f:
        uid = next(int(ln.split()[2]) for ln in f if ln.startswith("Uid:"))
    assert r["COE"]["euid"] == uid
    s = world.engine.stats()
    assert s["model_events"] == 2 and s["model_refused"] == 0 and s["model_us"] >= 0


def test_digest_taken_from_the_collect_step(tmp_path):
    w = World(tmp_path, "measure func=FILE_CHECK mask=MAY_READ\n")
    try:
        ns = w.namespace()
        w.engine.file_release(w.open("b"))
        assert w.engine.stats()["hashed_files"] == 1      # one pass for IMA and model
        assert w.records(ns)[0]["file_open"]["digest"] == \
            hashlib.sha256(b"b file\n").hexdigest()
    finally:
        w.close()


def test_exec_changes_identity_and_drops_the_cached_actor(world):
    ns = world.namespace()
    world.engine.file_release(world.open("a"))
    assert world.engine.modelling.tasks.peek(ME.pid, ME.uid, ME.gid) is not None
    world.engine.file_release(world.open("prog", OpenMode(exec_=True)))
    assert world.engine.modelling.tasks.peek(ME.pid, ME.uid, ME.gid) is None
    world.engine.file_release(world.open("a"))
    world.engine.file_release(world.open("prog"))     # an ELF read: file_open + mmap_file
    recs = world.records(ns)
    kinds = [r["event"]["type"] for r in recs]
    assert kinds == ["file_open", "bprm_check", "file_open", "file_open", "mmap_file"]
    exe = recs[1]
    assert exe["bprm_check"]["access"] == 1 and "new_task_id" in exe["event"]
    assert recs[2]["event"]["task_id"] == exe["event"]["new_task_id"]   # after the exec
    assert recs[2]["coefficient"] != recs[0]["coefficient"]             # another identity


def test_enforce_refuses_before_the_handle_is_counted(world):
    ns = world.namespace()
    world.engine.file_release(world.open("a"))
    ns.model.enforce()
    world.engine.file_release(world.open("a", inline=True))     # in the model
    with pytest.raises(AccessDenied) as e:
        world.open("b")
    assert e.value.errno == errno.EPERM and "out-of-model" in e.value.reason
    ii = world.engine.iints.find(world.ref("b").key)
    assert ii.readers == 0 and ii.writers == 0
    with pytest.raises(AccessDenied):                           # untrusted now
        world.open("a")
    reasons = [r["reason"] for r in world.records(ns, "forensics")]
    assert reasons == ["out-of-model", "untrusted"]
    assert world.engine.stats()["model_refused"] == 2


def test_learning_child_of_an_enforcing_namespace_is_refused(world):
    parent = world.namespace("p")
    world.engine.file_release(world.open("a"))
    parent.model.enforce()
    child = world.namespace("kid", parent)
    world.engine.file_release(world.open("a"))          # in the parent's model: learned
    with pytest.raises(AccessDenied):
        world.open("b")
    assert [r["file_open"]["path"]["pathname"] for r in world.records(child)] == ["/a"]


def _facts(world, name, **kw):
    return dict(dir=os.stat(world.dir), path=b"/" + name.encode(), **kw)


def test_created_file_known_by_instance_until_its_last_link_goes(world):
    ns = world.namespace()
    eng = world.engine
    settle(eng.inode_event(ME, "inode_create", _facts(world, "new", mode=0o100644)))
    (world.dir / "new").write_text("written\n")
    st = world.open("new", OpenMode(writable=True, created=True))
    settle(eng.file_release(st))      # the last writer's close, finished
    world.engine.file_release(world.open("new"))
    key = world.ref("new").key
    assert key in ns.model.created
    recs = world.records(ns)
    assert [r["event"]["type"] for r in recs] == ["inode_create", "file_open", "file_open"]
    for r in recs:
        assert r[r["event"]["type"]]["path"]["instance"] == 1
    assert recs[2]["file_open"]["digest"] == "00" * 32
    settle(eng.inode_event(ME, "inode_unlink",
                           _facts(world, "new", st=os.stat(world.dir / "new"))))
    assert key not in ns.model.created
    assert "instance" in world.records(ns)[-1]["inode_unlink"]["path"]


def test_namespace_operations_and_xattrs_refused_under_enforce(world):
    ns = world.namespace()
    eng = world.engine
    settle(eng.inode_event(ME, "inode_mkdir", _facts(world, "d", mode=0o40755)))
    ns.model.enforce()
    settle(eng.inode_event(ME, "inode_mkdir", _facts(world, "d", mode=0o40755)))
    with pytest.raises(AccessDenied) as e:
        settle(eng.inode_event(ME, "inode_setattr",
                               {"st": os.stat(world.dir / "a"), "path": b"/a", "mode": 0o600}))
    assert e.value.errno == errno.EPERM and "inode_setattr of /a" in e.value.reason


def test_setxattr_is_an_event(world):
    ns = world.namespace()
    st = os.stat(world.dir / "a")
    stored = []
    world.engine.inode_setxattr(ME, (st.st_dev, st.st_ino), b"/a", b"user.k", b"v",
                                stored.append, st=st)
    world.engine.inode_setxattr(ME, (st.st_dev, st.st_ino), b"/a", b"user.k", None,
                                stored.append, st=st)
    assert stored == [b"user.k", b"user.k"]
    recs = world.records(ns)
    assert [r["event"]["type"] for r in recs] == ["inode_setxattr", "inode_removexattr"]
    assert recs[0]["inode_setxattr"]["value"] == b"v".hex()


def test_no_model_no_events(world):
    world.binder.bind(ME.pid, 0)
    assert not world.engine.modelled()
    assert world.engine.inode_event(ME, "inode_mkdir", _facts(world, "d", mode=0)) is None
    world.engine.file_release(settle(world.engine.file_open(ME, world.ref("a"), OpenMode())))
    assert world.engine.stats()["model_events"] == 0
