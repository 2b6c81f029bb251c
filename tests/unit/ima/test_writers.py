"""The engine and files that have writers, without a mount: the write marks and what a
mount that finds one drops (cache.WriteMarks, purge_unfinished), the new-file
allowance across attribute changes and its end at the last writer's close
(lastwriter.py), the open that waits for a last writer's close, the refusal of code
opened while writers are open (violations.writers_check), and the library
approximation's roles (hooks.load_role, may_load)."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from imafs.ima import hooks
from imafs.ima.cache import DigestCache, TreeCache, VerdictCache, WriteMarks, purge_unfinished
from imafs.ima.engine import AccessDenied, Engine, FileRef, OpenMode, Pending, Subject, settle
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import Namespace, NamespaceTree
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import parse_policy
from imafs.store import Store


class World:
    def __init__(self, tmp, policy: str, **opts):
        self.tmp = tmp
        self.store = Store(str(tmp / "lmdb"))
        self.cache = Store(str(tmp / "cache"), sync=False)
        self.root = Namespace(id=0, name="", parent=None,
                              policy=Policy(parse_policy(policy)),
                              mlist=MeasurementList(self.store, 0), keyring=Keyring())
        self.engine = Engine(NamespaceTree(self.root), store=self.store,
                             cache_store=self.cache, **opts)
        self.fds = []

    def ref(self, path, flags=os.O_RDONLY, **kw) -> FileRef:
        fd = os.open(path, flags)
        self.fds.append(fd)
        return FileRef(fd=fd, st=os.fstat(fd), path=b"/" + path.name.encode(),
                       readable=(flags & os.O_ACCMODE) != os.O_WRONLY,
                       reopen=lambda: os.open(path, os.O_RDONLY),
                       getxattr=lambda n: _getxattr(path, n),
                       setxattr=lambda n, v: os.setxattr(path, n, v), **kw)

    def open(self, path, flags=os.O_RDONLY, *, created=False, exec_=False, pid=None, **kw):
        f = self.ref(path, flags, **kw)
        mode = OpenMode.from_flags(flags, created=created, exec_=exec_)
        return settle(self.engine.file_open(Subject(pid or os.getpid(), 0, 0), f, mode))

    def release(self, state):
        settle(self.engine.file_release(state))

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.store.close()
        self.cache.close()


def _getxattr(path, name):
    try:
        return os.getxattr(path, name)
    except OSError:
        return None


@pytest.fixture
def world(tmp_path):
    made = []

    def make(policy, **opts):
        w = World(tmp_path, policy, **opts)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


def test_a_mark_left_by_a_crash_drops_the_files_cache_entries(tmp_path):
    cache = Store(str(tmp_path / "cache"), sync=False)
    try:
        digests, trees, verdicts = DigestCache(cache), TreeCache(cache), VerdictCache(cache)
        marks = WriteMarks(cache)
        key, other = (1, 2), (1, 3)
        for k in (key, other):
            digests.put(k, (1, 2, 3, 0), {"sha256": b"\0" * 32})
            verdicts.put(VerdictCache.record_key(k, (1, 2, 3, 0), ("v",), ("fp",)), [0], [])
        marks.add(key)
        assert purge_unfinished(marks, digests, trees, verdicts) == 1
        assert digests.get(key, (1, 2, 3, 0)) is None
        assert verdicts.get(VerdictCache.record_key(key, (1, 2, 3, 0), ("v",), ("fp",))) is None
        assert digests.get(other, (1, 2, 3, 0)) is not None
        assert purge_unfinished(marks, digests, trees, verdicts) == 0   # marks taken
    finally:
        cache.close()


def test_writable_opens_mark_until_the_last_writer_closes(world, tmp_path):
    w = world("appraise func=FILE_CHECK\n", verify_reads=False)
    p = tmp_path / "f"
    p.write_bytes(b"")
    a = w.open(p, os.O_RDWR | os.O_CREAT, created=True)
    b = w.open(p, os.O_RDWR)
    marks = WriteMarks(w.cache)
    with w.cache.env.begin(db=marks.db) as txn:
        assert txn.stat(marks.db)["entries"] == 1
    w.release(a)
    with w.cache.env.begin(db=marks.db) as txn:
        assert txn.stat(marks.db)["entries"] == 1      # b still writes
    w.release(b)
    with w.cache.env.begin(db=marks.db) as txn:
        assert txn.stat(marks.db)["entries"] == 0


def test_new_file_allowance_across_attribute_changes(world, tmp_path):
    w = world("appraise func=FILE_CHECK mask=^MAY_READ\n", verify_reads=False)
    p = tmp_path / "new"
    p.write_bytes(b"")
    s = w.open(p, os.O_RDONLY | os.O_CREAT, created=True)
    w.release(s)
    key = (os.stat(p).st_dev, os.stat(p).st_ino)
    for _ in range(2):
        os.chmod(p, 0o600)
        w.engine.file_changed(key, 0)     # what the adapter says after a setattr
        w.release(w.open(p))              # passes: the allowance stayed
    # the last writer's close (not written) ends it; the masked rule did not cover
    # the O_WRONLY open, so no hash was asked for: refused
    w.release(w.open(p, os.O_WRONLY))
    with pytest.raises(AccessDenied) as e:
        w.open(p)
    assert e.value.errno == errno.EACCES and "missing-hash" in e.value.reason


def test_an_open_during_the_last_writers_close_waits_for_it(world, tmp_path):
    w = world("appraise func=FILE_CHECK\n", verify_reads=False)
    p = tmp_path / "f"
    p.write_bytes(b"")
    s = w.open(p, os.O_RDWR | os.O_CREAT, created=True)
    os.write(s.file.fd, b"old content")
    w.engine.file_written(s)
    settle(w.engine.file_release(s))      # labelled; no longer a new file
    s = w.open(p, os.O_RDWR)
    os.pwrite(s.file.fd, b"new", 0)
    w.engine.file_written(s)
    closing = w.engine.file_release(s)
    assert type(closing) is Pending
    pending = w.engine.file_open(Subject(os.getpid(), 0, 0), w.ref(p), OpenMode())
    assert type(pending) is Pending
    out = {}

    def opener():
        try:
            out["state"] = pending.finish()
        except AccessDenied as e:
            out["denied"] = e
    t = threading.Thread(target=opener)
    t.start()
    t.join(0.5)
    # not decided against the old label (it would be invalid-hash): it waits
    assert t.is_alive() and not out
    closing.finish()
    t.join()
    assert out.get("state") is not None, out
    assert _getxattr(p, "security.ima")[:2] == b"\x04\x04"


def test_code_opened_while_writers_are_open_is_refused(world, tmp_path):
    w = world("appraise func=MMAP_CHECK\n", verify_reads=False)
    elf = tmp_path / "lib.so"
    elf.write_bytes(b"\x7fELF" + bytes(60))
    plain = tmp_path / "data"
    plain.write_bytes(b"XXXX" + bytes(60))
    for p in (elf, plain):
        writer = w.open(p, os.O_RDWR)
        with pytest.raises(AccessDenied) as e:
            w.open(p)
        assert e.value.errno == errno.ETXTBSY, p    # ELF or not: it could become one
        w.release(writer)
    # log mode: audited, allowed
    w.root.appraise_mode = "log"
    writer = w.open(plain, os.O_RDWR)
    w.release(w.open(plain))
    w.release(writer)


def test_library_roles_of_the_settings():
    here = Subject(1, 0, 0, program_here=lambda pid: True)
    elsewhere = Subject(1, 0, 0, program_here=lambda pid: False)
    assert hooks.load_role("all-elf", elsewhere, False) is None
    assert hooks.load_role("mount-programs", here, False) is None
    assert hooks.load_role("mount-programs", elsewhere, False) == hooks.NO_LOAD
    assert hooks.load_role("off", here, False) == hooks.NO_LOAD
    assert hooks.load_role("off", here, True) is None        # exec opens: ExecRoles
    with pytest.raises(ValueError):
        Engine(NamespaceTree(Namespace(id=0, name="", parent=None,
                                       policy=Policy([]), mlist=None,
                                       keyring=Keyring())), mmap_check="some")
