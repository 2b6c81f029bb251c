"""imafs.ima.binding without a mount: which namespace a process belongs to (host,
children, dead processes, double forks, the per-process cache, threads, foreign
cgroups)."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from imafs.ima.binding import Binder

from helpers.mounts import wait_for
from helpers.namespaces import sleeper, spawn_with_pid


# ------------------------------------------------------------------ the binder
@pytest.fixture
def binder():
    b = Binder(f"ut{os.getpid()}{uuid.uuid4().hex[:6]}")
    procs: list = []            # Popen (our children) or pids (reparented grandchildren)
    yield b, procs
    pids = [p.pid if isinstance(p, subprocess.Popen) else p for p in procs]
    for nsid in (1, 2):
        pids += b.members(nsid)
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    # reap: a zombie still holds its cgroup, and a hierarchy unmounted while it does
    # outlives the unmount
    for p in procs:
        if isinstance(p, subprocess.Popen):
            p.wait()
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), 5.0)
    h = b.cgroups
    assert b.close(wait=2.0) == []
    assert wait_for(lambda: not h.exists(), 2.0), "hierarchy outlived close()"


def test_binder_host_child_dead(binder):
    b, procs = binder
    assert b.ns_of(os.getpid()) == 0
    p = sleeper(procs)
    assert b.ns_of(p.pid) == 0
    b.bind(p.pid, 1)
    assert b.ns_of(p.pid) == 1 and b.members(1) == [p.pid]
    assert b.ns_of(os.getpid()) == 0            # binding a child never moves the parent
    p.kill()
    p.wait()
    assert b.ns_of(p.pid) is None                # dead: unknown, never the host
    assert b.members(1) == []
    b.remove(1)
    assert "ns1" not in b.cgroups.names()


def test_binder_double_fork_setsid_grandchild(binder):
    """A process bound to a namespace double-forks a daemon (setsid, reparented to
    init): the daemon is still in the namespace; so is a thread's tid."""
    b, procs = binder
    p = sleeper(procs, "read go; setsid sh -c 'sleep 30 & echo $!' ; exec sleep 30")
    b.bind(p.pid, 2)
    p.stdin.write("go\n")
    p.stdin.flush()
    gpid = int(p.stdout.readline())
    procs.append(gpid)
    with open(f"/proc/{gpid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    assert ppid != p.pid                         # reparented away from its creator
    assert os.getsid(gpid) not in (os.getsid(0), os.getsid(p.pid))   # a new session
    assert b.ns_of(gpid) == 2
    # the intermediate shell exits: the creator and the daemon remain
    assert wait_for(lambda: sorted(b.members(2)) == sorted([p.pid, gpid]))


def test_binder_cache_per_process(binder):
    """ns_of caches per process (a pidfd): a bind is seen at once; the cache answers
    for the process it was read for even when it is moved behind the binder's back;
    another process that gets the same pid never gets the cached answer."""
    b, procs = binder
    p = sleeper(procs)
    assert b.ns_of(p.pid) == 0
    b.bind(p.pid, 1)
    assert b.ns_of(p.pid) == 1 and b.ns_of(p.pid) == 1      # second answer from the cache
    # move it behind the binder's back: the cache still answers for this process ...
    b.cgroups.move_to_root(p.pid)
    assert b.read_ns(p.pid) == 0 and b.ns_of(p.pid) == 1
    # ... but a new process under its pid, once it is reaped, is read afresh
    b.bind(p.pid, 1)
    assert b.ns_of(p.pid) == 1
    pid = p.pid
    p.kill()
    p.wait()
    assert b.ns_of(pid) is None                  # dead: unknown, never the host
    assert b.ns_of(pid) is None
    q = spawn_with_pid(pid, procs)
    if q is None:
        pytest.skip(f"pid {pid} was taken by another process each time")
    assert b.ns_of(pid) == 0                     # the new process is at the root
    # and a cached answer is dropped when its process exits and the pid comes back
    b.bind(q.pid, 1)
    assert b.ns_of(pid) == 1
    q.kill()
    q.wait()
    r = spawn_with_pid(pid, procs)
    if r is None:
        pytest.skip(f"pid {pid} was taken by another process each time")
    assert b.ns_of(pid) == 0


def test_binder_cache_threads(binder):
    """FUSE reports a thread id: a thread of a bound process is in its namespace, and
    is cached (PIDFD_THREAD) without confusing it with its process."""
    import threading
    b, procs = binder
    me = os.getpid()
    assert b.ns_of(me) == 0
    box = {}
    go = threading.Event()

    def run():
        box["tid"] = threading.get_native_id()
        go.wait(10)
    t = threading.Thread(target=run)
    t.start()
    try:
        while "tid" not in box:
            pass
        tid = box["tid"]
        assert tid != me
        assert b.ns_of(tid) == 0 and b.ns_of(tid) == 0
    finally:
        go.set()
        t.join()
    # join() returns before the kernel has reaped the thread
    assert wait_for(lambda: not os.path.exists(f"/proc/self/task/{tid}"), 5.0)
    assert b.ns_of(tid) is None                  # the thread is gone


def test_binder_foreign_cgroup_is_unknown(binder):
    """A process in a cgroup of the hierarchy that is no namespace's is unknown."""
    b, procs = binder
    p = sleeper(procs)
    os.mkdir("intruder", dir_fd=b.cgroups.fd)
    try:
        fd = os.open("intruder/cgroup.procs", os.O_WRONLY, dir_fd=b.cgroups.fd)
        os.write(fd, str(p.pid).encode())
        os.close(fd)
        assert b.ns_of(p.pid) is None
        p.kill()
        p.wait()
    finally:
        os.rmdir("intruder", dir_fd=b.cgroups.fd)
