"""imafs.ima.modeltask: who acts, from /proc -- the real one for this process, a fake
/proc tree for pid reuse, threads, odd names and lineage -- and the cache's rules:
another fsuid/fsgid, an exec, and the time to live read /proc again."""
from __future__ import annotations

import os
import threading

from hypothesis import given, strategies as st

from imafs.ima.model import Model, Actor
from imafs.ima import modelmap as mm
from imafs.ima.modeltask import TaskCache, alive, parse_status, stat_fields

STATUS = """Name:\t{name}
Umask:\t0022
State:\tS (sleeping)
Tgid:\t{tgid}
Ngid:\t0
Pid:\t{pid}
PPid:\t{ppid}
TracerPid:\t0
Uid:\t{uid}\t{euid}\t5\t6
Gid:\t7\t8\t9\t10
FDSize:\t64
CapInh:\t0000000000000000
CapPrm:\t000001ffffffffff
CapEff:\t{cap}
"""


def fake_proc(root, pid, *, tgid=None, ppid=1, start=100, name="sh", uid=1, euid=2,
              cap="0000000000000400", comm=None):
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "status").write_text(STATUS.format(name=name, tgid=tgid or pid, pid=pid, ppid=ppid,
                                            uid=uid, euid=euid, cap=cap))
    fields = ["S", str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} ({comm or name}) " + " ".join(fields) + "\n")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_this_process_from_the_real_proc():
    c = TaskCache()
    a = c.actor(os.getpid(), os.getuid(), os.getgid())
    assert a.key == (os.getpid(), stat_fields(os.getpid())[1])
    assert a.parent == (os.getppid(), stat_fields(os.getppid())[1])
    assert a.coe.euid == os.geteuid() and a.coe.fsgid == os.getgid()
    assert alive(a.key) and not alive((a.key[0], a.key[1] + 1))
    assert 0.01 <= c.ttl <= 1.0


def test_a_thread_acts_as_its_process():
    out = {}

    def run():
        out["tid"] = threading.get_native_id()
    t = threading.Thread(target=run)
    t.start()
    t.join()
    me = TaskCache().actor(os.getpid(), os.getuid(), os.getgid())
    tid = threading.get_native_id()
    assert TaskCache().read(tid).key == me.key


def test_status_and_stat_parsing(tmp_path):
    fake_proc(tmp_path, 50, name="a b", comm="we) ird (x", start=777, ppid=40)
    assert stat_fields(50, str(tmp_path)) == (40, 777)
    name, tgid, ppid, coe = parse_status((tmp_path / "50/status").read_bytes())
    assert (name, tgid, ppid) == ("a b", 50, 40)
    assert coe == mm.Coe(1, 2, 5, 7, 8, 9, 6, 10, 0x400)
    assert parse_status(b"Name:\tx\nTgid:\t1\n") is None
    assert parse_status(b"Tgid:\tone\n") is None


@given(st.binary(max_size=400))
def test_parse_status_never_crashes(raw):
    r = parse_status(raw)
    assert r is None or isinstance(r[3], mm.Coe)


def test_cache_rules(tmp_path):
    clock = Clock()
    fake_proc(tmp_path, 1, ppid=0, start=1, name="init")
    fake_proc(tmp_path, 50, ppid=1, start=100)
    c = TaskCache(str(tmp_path), ttl=0.5, clock=clock)
    a = c.actor(50, 6, 10)
    assert a.key == (50, 100) and a.parent == (1, 1) and c.reads == 1
    assert c.actor(50, 6, 10) is a and c.reads == 1             # cached
    assert c.peek(50, 0, 10) is None                             # another fsuid: read again
    assert c.actor(50, 6, 10) is a
    c.exec_seen(50)                                              # an exec: read again
    assert c.peek(50, 6, 10) is None
    b = c.actor(50, 6, 10)
    assert c.reads == 2 and b.key == a.key
    fake_proc(tmp_path, 50, ppid=1, start=200, cap="0")          # the pid given again
    assert c.actor(50, 6, 10) is b                               # ... within the TTL
    clock.t = 0.6
    n = c.actor(50, 6, 10)
    assert n.key == (50, 200) and n.coe.capeff == 0 and c.reads == 3
    assert not alive((50, 100), str(tmp_path)) and alive((50, 200), str(tmp_path))
    assert c.actor(999, 0, 0) is None                            # gone


def test_thread_key_and_lineage(tmp_path):
    fake_proc(tmp_path, 1, ppid=0, start=1)
    fake_proc(tmp_path, 10, ppid=1, start=10)       # the workload's shell
    fake_proc(tmp_path, 20, ppid=10, start=20)      # a subshell, never seen
    fake_proc(tmp_path, 30, ppid=20, start=30)      # the task
    fake_proc(tmp_path, 31, tgid=30, ppid=20, start=31)  # one of its threads
    c = TaskCache(str(tmp_path))
    assert c.read(31).key == (30, 30)
    a = c.read(30)
    assert a.parent == (20, 20) and list(a.lineage()) == [(10, 10), (1, 1)]
    # a model that knows the shell: the task inherits its identity
    m = Model()
    shell = Actor((10, 10), None, mm.Coe())
    m.decide(shell, mm.bprm_check("/bin/sh", mm.Inode(0, 0, 0o100755), bytes(32)))
    sid = m.tasks[(10, 10)].task_id
    m.decide(a, mm.file_open("/etc/x", mm.Inode(0, 0, 0o100644), bytes(32), 4))
    assert m.tasks[(30, 30)].parent_id == sid == m.tasks[(30, 30)].task_id
