"""Integrity namespaces without a mount: the namespace tree (create, refuse, remove,
persist) and the cgroup binder with real processes (double fork, setsid, dead pids)."""
from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest
import trio

from imafs.ima.binding import Binder
from imafs.ima.engine import AccessDenied, Engine, Subject
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import Namespace, NamespaceError, NamespaceTree
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import parse_policy
from imafs.ima.quota import Quota
from imafs.ima.templates import parse_ascii
from imafs.store import Store

from conftest import wait_for


def make_tree(store=None, resolver=None, binder=None) -> NamespaceTree:
    def mlist(nsid, template="ima-ng", algo="sha256"):
        if store is None:
            return _NoList()
        return MeasurementList(store, nsid, template=template, hash_algo=algo)

    root = Namespace(id=0, name="", parent=None, policy=Policy([]), mlist=mlist(0),
                     keyring=Keyring(store, 0))

    def factory(nsid, name, parent, o, policy_text):
        template = o.get("template") or parent.template
        algo = o.get("hash") or parent.hash_algo
        return Namespace(quota=Quota.parse(o["quota"], Quota.default()) if o.get("quota")
                         else Quota.default(), quota_spec=o.get("quota") or "",
                         id=nsid, name=name, parent=parent,
                         policy=Policy(parse_policy(policy_text)),
                         mlist=mlist(nsid, template, algo), keyring=Keyring(store, nsid),
                         appraise_mode=o.get("appraise") or parent.appraise_mode,
                         template=template, hash_algo=algo)

    return NamespaceTree(root, resolver, store=store, factory=factory, binder=binder)


class _NoList:
    def add(self, entry):
        return True


# ------------------------------------------------------------------ the tree
def test_create_nested_and_paths():
    t = make_tree()
    a = t.create(t.root, *t.parse_create("a"))
    b = t.create(a, *t.parse_create("b template=ima-ns hash=sha512 appraise=log"))
    c = t.create(b, *t.parse_create("c"))
    assert (a.id, b.id, c.id) == (1, 2, 3)
    assert c.path == "/a/b/c" and [n.id for n in c.chain()] == [3, 2, 1, 0]
    assert (b.template, b.hash_algo, b.appraise_mode) == ("ima-ns", "sha512", "log")
    # options are inherited from the parent unless given
    assert (c.template, c.hash_algo, c.appraise_mode) == ("ima-ns", "sha512", "log")
    assert c.xattr_name == "security.imafs.ns3.ima" and t.root.xattr_name == "security.ima"
    assert len({a.uuid, b.uuid, c.uuid}) == 3 and uuid.UUID(a.uuid)
    # the same name under another parent is another namespace
    a2 = t.create(t.root, *t.parse_create("b"))
    assert a2.id == 4 and a2.parent is t.root


def test_duplicate_name_is_eexist():
    t = make_tree()
    t.create(t.root, *t.parse_create("web"))
    with pytest.raises(NamespaceError) as e:
        t.create(t.root, *t.parse_create("web"))
    assert e.value.errno == errno.EEXIST and "exists" in str(e.value)


@pytest.mark.parametrize("text", [
    "", "   ", "-x", ".hidden", "a/b", "..", "x" * 65, "na\u00efve", "a b=",
    "a bogus=1", "a template", "a template=nope", "a hash=md6", "a appraise=maybe",
    "a appraise=log appraise=off",
])
def test_bad_names_and_options_are_einval(text):
    t = make_tree()
    with pytest.raises(NamespaceError) as e:
        t.parse_create(text)
    assert e.value.errno == errno.EINVAL and str(e.value)


def test_remove_and_ids_never_reused():
    t = make_tree()
    a = t.create(t.root, *t.parse_create("a"))
    b = t.create(a, *t.parse_create("b"))
    with pytest.raises(NamespaceError) as e:
        t.remove(t.root, "a")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(NamespaceError) as e:
        t.remove(t.root, "zzz")
    assert e.value.errno == errno.ENOENT
    assert t.remove(a, "b") is b and b.id not in t.by_id and "b" not in a.children
    # the highest id was removed: a new namespace still gets a fresh id
    b2 = t.create(a, *t.parse_create("b"))
    assert b2.id == 3


def test_persistence_across_reload(tmp_path):
    store = Store(str(tmp_path / "lmdb"))
    t = make_tree(store)
    a = t.create(t.root, *t.parse_create("a template=ima-ns appraise=log"))
    b = t.create(a, *t.parse_create("b hash=sha512"))
    gone = t.create(t.root, *t.parse_create("gone"))
    a.set_policy(Policy(parse_policy(b"measure func=FILE_CHECK mask=MAY_READ\n")))
    t.save_policy(a)
    t.remove(t.root, "gone")
    uuids = (a.uuid, b.uuid)
    store.close()

    store = Store(str(tmp_path / "lmdb"))
    try:
        t2 = make_tree(store)
        assert sorted(t2.by_id) == [0, 1, 2]
        a2, b2 = t2.root.children["a"], t2.root.children["a"].children["b"]
        assert "gone" not in t2.root.children
        assert (a2.id, b2.id) == (a.id, b.id) and (a2.uuid, b2.uuid) == uuids
        assert (a2.template, a2.appraise_mode, b2.hash_algo) == ("ima-ns", "log", "sha512")
        assert b2.template == "ima-ns"            # inherited, and kept
        assert a2.policy.text() == a.policy.text() and len(a2.policy) == 1
        # the removed namespace's id is never given again
        new = t2.create(t2.root, *t2.parse_create("gone"))
        assert new.id == gone.id + 1
    finally:
        store.close()


def test_unknown_namespace_is_refused_never_host():
    """A resolver that cannot place a process (None) or places it in a namespace the
    tree does not know: the engine refuses, the control directory shows nothing."""
    from pyfuse3 import FUSEError
    from imafs.fs.control import ControlDir
    from imafs.ima.securityfs import Securityfs

    for answer in (None, 99):
        t = make_tree(resolver=lambda pid, a=answer: a)
        eng = Engine(t)
        with pytest.raises(AccessDenied) as e:
            eng.namespace_of(Subject(pid=1234, uid=0, gid=0))
        assert e.value.errno == errno.EACCES and "unknown" in e.value.reason
        ctl = ControlDir(Securityfs(eng))

        class Ctx:
            pid, uid, gid, umask = os.getpid(), 0, 0, 0o22  # the host (a real process)

        for call in (lambda: ctl.getattr(ctl.nodeid(0, 3), Ctx),          # policy
                     lambda: ctl.open(ctl.nodeid(0, 3), os.O_RDONLY, Ctx),
                     lambda: ctl.lookup(ctl.nodeid(0, 0), b"policy", Ctx),
                     lambda: ctl.opendir(ctl.nodeid(0, 1), Ctx)):
            with pytest.raises(FUSEError) as e:
                trio.run(call)
            assert e.value.errno == errno.EACCES
    # the same calls succeed for a host process
    t = make_tree(resolver=lambda pid: 0)
    ctl = ControlDir(Securityfs(Engine(t)))
    assert trio.run(lambda: ctl.getattr(ctl.nodeid(0, 3), Ctx)).st_ino == ctl.nodeid(0, 3)


def test_descendant_views_have_no_ns_create():
    """Under namespaces/NAME/ an ancestor sees the child's files, but ns-create there
    would move the ancestor's own process into a descendant: it is not offered."""
    from pyfuse3 import FUSEError
    from imafs.fs.control import ControlDir
    from imafs.ima.securityfs import Securityfs

    t = make_tree(resolver=lambda pid: 0)
    c = t.create(t.root, *t.parse_create("c"))
    ctl = ControlDir(Securityfs(Engine(t)))

    class Ctx:
        pid, uid, gid, umask = os.getpid(), 0, 0, 0o22   # the host (a real process)

    slot = c.id + 1
    with pytest.raises(FUSEError) as e:
        trio.run(lambda: ctl.lookup(ctl.nodeid(slot, 0), b"ns-create", Ctx))
    assert e.value.errno == errno.ENOENT
    trio.run(lambda: ctl.lookup(ctl.nodeid(slot, 0), b"ns-remove", Ctx))
    trio.run(lambda: ctl.lookup(ctl.nodeid(0, 0), b"ns-create", Ctx))


def test_ns_remove_records_final_state(tmp_path):
    """ns-remove is measured in the parent with the child's final entry count and
    PCR 10, so the parent's list pins what the child's list ended as."""
    store = Store(str(tmp_path / "lmdb"))
    try:
        t = make_tree(store)
        c = t.ns_create(t.root, "c", pid=1, uid=0)
        t.ns_remove(t.root, "c", pid=1, uid=0)
        entries = [e for e in t.root.mlist.entries() if e.name in (b"ns-create", b"ns-remove")]
        assert [e.name for e in entries] == [b"ns-create", b"ns-remove"]
        buf = entries[1].get("buf").decode()
        assert f"id={c.id}" in buf and f"uuid={c.uuid}" in buf
        assert f"entries={c.mlist.count}" in buf
        assert "pcr10=sha256:" + c.mlist.pcr("sha256", 10).hex() in buf
        # the removed namespace's list stays readable in the store
        assert [e.name for e in MeasurementList(store, c.id).entries()][-1] == b"ns-init"
    finally:
        store.close()


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


def _sleeper(procs, cmd="exec sleep 30"):
    p = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    procs.append(p)
    return p


def test_binder_host_child_dead(binder):
    b, procs = binder
    assert b.ns_of(os.getpid()) == 0
    p = _sleeper(procs)
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
    p = _sleeper(procs, "read go; setsid sh -c 'sleep 30 & echo $!' ; exec sleep 30")
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


def _spawn_with_pid(pid: int, procs, tries: int = 200):
    """A sleeper that gets exactly ``pid`` (free again: its process was reaped), by
    writing ns_last_pid just before forking, as CRIU restores pids; None when other
    processes of the machine keep taking it first."""
    for _ in range(tries):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = _sleeper(procs)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def test_binder_cache_per_process(binder):
    """ns_of caches per process (a pidfd): a bind is seen at once; the cache answers
    for the process it was read for even when it is moved behind the binder's back;
    another process that gets the same pid never gets the cached answer."""
    b, procs = binder
    p = _sleeper(procs)
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
    q = _spawn_with_pid(pid, procs)
    if q is None:
        pytest.skip(f"pid {pid} was taken by another process each time")
    assert b.ns_of(pid) == 0                     # the new process is at the root
    # and a cached answer is dropped when its process exits and the pid comes back
    b.bind(q.pid, 1)
    assert b.ns_of(pid) == 1
    q.kill()
    q.wait()
    r = _spawn_with_pid(pid, procs)
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
    p = _sleeper(procs)
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


# ------------------------------------------------------------------ subtree quotas
def test_subtree_quota(tmp_path):
    """Namespaces count per subtree (a namespace and its descendants): a child's quota
    (quota=namespaces:N, default DEFAULT_SUBTREE_NAMESPACES) bounds its subtree, every
    ancestor's applies too, a sibling is never refused for another's; a removal frees
    a place; the counts are the same after a reload."""
    from imafs.ima.namespaces import DEFAULT_SUBTREE_NAMESPACES
    store = Store(str(tmp_path / "lmdb"))
    try:
        t = make_tree(store)
        a = t.create(t.root, *t.parse_create("a quota=namespaces:3"))
        b = t.create(t.root, *t.parse_create("b"))
        a1 = t.create(a, *t.parse_create("a1 quota=namespaces:50"))   # a's still holds
        t.create(a1, *t.parse_create("a2"))
        with pytest.raises(NamespaceError) as e:
            t.create(a1, *t.parse_create("a3"))
        assert e.value.errno == errno.ENOSPC
        assert "namespace /a and its descendants hold 3 namespaces, its quota " \
               "(namespaces:3)" in str(e.value)
        assert (a.subtree, a1.subtree, t.root.subtree) == (3, 2, 5)
        # the sibling: its own default quota, untouched by a's
        for i in range(DEFAULT_SUBTREE_NAMESPACES - 1):
            t.create(b, *t.parse_create(f"b{i}"))
        with pytest.raises(NamespaceError) as e:
            t.create(b, *t.parse_create("one-more"))
        assert e.value.errno == errno.ENOSPC and "/b and its descendants" in str(e.value)
        t.create(t.root, *t.parse_create("c"))                # the host: its own limit
        t.remove(a1, "a2")
        assert a.subtree == 2
        t.create(a, *t.parse_create("again"))
        counts = {ns.path: ns.subtree for ns in t.by_id.values()}
        t2 = make_tree(store)
        assert {ns.path: ns.subtree for ns in t2.by_id.values()} == counts
        assert t2.by_id[a.id].quota_spec == "namespaces:3"
    finally:
        store.close()


def test_root_children_count_per_creator(tmp_path):
    """The root namespace has no subtree quota: its children made from inside count
    per creator (a container: the pid namespace below the daemon's), at most
    MAX_ROOT_CHILDREN_PER_CREATOR each; another creator and the host ("") go on; a
    removal frees a place; the creator is kept across a reload. pidns.top_key names
    the pid namespace below the daemon's a process is in."""
    from imafs.ima.namespaces import MAX_ROOT_CHILDREN_PER_CREATOR as N
    from imafs.ima.pidns import own_key, top_key
    store = Store(str(tmp_path / "lmdb"))
    try:
        t = make_tree(store)
        for i in range(N):
            t.create(t.root, *t.parse_create(f"x{i}"), creator="pid namespace 7")
        with pytest.raises(NamespaceError) as e:
            t.create(t.root, *t.parse_create("more"), creator="pid namespace 7")
        assert e.value.errno == errno.ENOSPC
        assert f"pid namespace 7 made {N} of the namespaces under /" in str(e.value)
        t.create(t.root, *t.parse_create("other"), creator="pid namespace 8")
        t.create(t.root, *t.parse_create("host"))
        # below the root, the subtree quota counts, not the creator
        t.create(t.by_id[1], *t.parse_create("deeper"), creator="pid namespace 7")
        t.remove(t.root, "x1")
        t.create(t.root, *t.parse_create("again"), creator="pid namespace 7")
        t2 = make_tree(store)
        assert sum(1 for c in t2.root.children.values()
                   if c.creator == "pid namespace 7") == N
    finally:
        store.close()
    assert top_key(os.getpid()) == own_key()
    p = subprocess.Popen(["unshare", "--pid", "--fork", "unshare", "--pid", "--fork",
                          "sleep", "30"])
    try:
        def leaf(pid):
            kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
            return leaf(int(kids[0])) if kids else pid

        def sleeping():
            try:
                return open(f"/proc/{leaf(p.pid)}/comm").read().strip() == "sleep"
            except OSError:
                return False
        assert wait_for(sleeping, 10)
        sleeper = leaf(p.pid)
        outer = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
        st = os.stat(f"/proc/{outer}/ns/pid")
        assert top_key(sleeper) == (st.st_dev, st.st_ino)
    finally:
        p.kill()
        p.wait()


def test_a_quota_from_inside_never_loosens(tmp_path):
    """quota= given from inside (ns-create) is tightened to the parent's quota (below
    the root: the mount's child quota) in every kind, at creation and after a reload;
    a host-made namespace's quota is taken as given."""
    store = Store(str(tmp_path / "lmdb"))
    try:
        t = make_tree(store)
        a = t.create(t.root, *t.parse_create("a quota=list:0:0,namespaces:0"))
        assert a.quota.limits["list"] == Quota.default().limits["list"]
        assert a.subtree_limit == 64
        h = t.create(t.root, *t.parse_create("h quota=list:0:0,namespaces:200"),
                     origin="host")
        assert h.quota.limits["list"] == (None, None) and h.subtree_limit == 200
        b = t.create(h, *t.parse_create("b quota=namespaces:500,list:10"))
        assert b.subtree_limit == 200 and b.quota.limits["list"] == (10, None)
        t2 = make_tree(store)
        assert t2.by_id[a.id].subtree_limit == 64 and t2.by_id[b.id].subtree_limit == 200
        assert t2.by_id[h.id].quota.limits["list"] == (None, None)
    finally:
        store.close()
