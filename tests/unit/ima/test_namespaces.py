"""Integrity namespaces without a mount: the namespace tree (create, refuse, remove,
persist); the cgroup binder: tests/unit/ima/test_binding.py."""
from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest
import trio

from imafs.ima.engine import AccessDenied, Engine, Subject
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import NamespaceError
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import parse_policy
from imafs.ima.quota import Quota
from imafs.store import Store

from helpers.mounts import wait_for
from helpers.namespaces import make_tree, sleeper


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
