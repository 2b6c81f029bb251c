"""ns-create and ns-join through a real mount: the process moved is the one that
opened the file, held by a pidfd; one move per open; a write is refused when that
process has exited (or is exiting), its pid now belongs to another, or it left the
namespace it was in at open. Also: the cgroup hierarchy's key belongs to the state
(a moved state directory finds its processes again), and a creation whose opener
cannot be moved is undone in the parent's list."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers.mounts import wait_for
from helpers.containers import (MEASURE_READS, buf_id, cg_key, container, entries,
                                   host_sh, lines, names, ns_bufs, rootfs)
from helpers.namespaces import spawn_with_pid

# A process that opens ns-create (or ns-join), forks a child that keeps the
# descriptor, and exits at once; the child writes NAME when told to (file "go") and
# reports the errno (0: written) in "result".
OPENER = r"""
import os, sys, time
ctl, name, tmp = sys.argv[1:4]
fd = os.open(ctl, os.O_WRONLY)
if os.fork() == 0:
    with open(tmp + "/ready.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp + "/ready.tmp", tmp + "/ready")
    deadline = time.monotonic() + 60
    while not os.path.exists(tmp + "/go") and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        os.write(fd, name.encode())
        res = 0
    except OSError as e:
        res = e.errno
    try:
        os.close(fd)
    except OSError:
        pass
    with open(tmp + "/result.tmp", "w") as f:
        f.write(str(res))
    os.rename(tmp + "/result.tmp", tmp + "/result")
    os._exit(0)
os._exit(0)
"""


@pytest.fixture
def nsm(make_mount, world_tmp):
    b = world_tmp / "rootfs"
    b.mkdir()
    rootfs(b)
    for n in ("f", "g", "h"):
        (b / n).write_text(n + "\n")
    pol = world_tmp / "host.policy"
    pol.write_text(MEASURE_READS)
    return make_mount(["--policy", str(pol), "--template", "ima-ns"], backing=b)


def cgroup_of(pid: int, key: str) -> str | None:
    """The path of process pid in the hierarchy name=imafs.KEY."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _, ctrl, path = line.split(":", 2)
        if ctrl == f"name=imafs.{key}":
            return path
    return None


def read_by(m, path: bytes) -> list[int]:
    """The namespace ids of the host's ima-ns entries of path (who read it)."""
    return [int.from_bytes(e.get("ns"), "little")
            for e in entries(m.ctl("ascii_runtime_measurements")) if e.name == path]


def ns_id(m, path: str) -> int:
    """The id of the namespace the host's list records as created under path."""
    for buf in ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create"):
        if f" name={path} " in buf:
            return buf_id(buf)
    raise KeyError(path)


class Orphan:
    """OPENER run for one scenario; always cleaned up."""

    def __init__(self, m, name: str, ctl: str = "ns-create"):
        self.tmp = Path(tempfile.mkdtemp(prefix="imafs-opener-"))
        self.p = subprocess.Popen([sys.executable, "-c", OPENER, str(m.ctl(ctl)), name,
                                   str(self.tmp)])
        assert wait_for(lambda: (self.tmp / "ready").exists(), 10)
        self.child = int((self.tmp / "ready").read_text())
        self.pid = self.p.pid

    def go(self) -> int:
        (self.tmp / "go").touch()
        assert wait_for(lambda: (self.tmp / "result").exists(), 20)
        return int((self.tmp / "result").read_text())

    def close(self) -> None:
        (self.tmp / "go").touch()
        wait_for(lambda: (self.tmp / "result").exists(), 10)
        try:
            os.kill(self.child, 9)
        except ProcessLookupError:
            pass
        self.p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------ (a) a kept descriptor
def test_second_write_through_one_open_moves_nobody(nsm):
    """``exec 3> ns-create; echo esca >&3; echo escb >&3`` made escb a sibling of
    esca under the host and moved the shell out of esca. Now one namespace per open
    (EINVAL after), and a second descriptor opened on the host is refused once its
    opener has left the host's namespace (EPERM): the shell stays in esca."""
    m, mnt = nsm, nsm.mnt
    r = host_sh(f"""
    exec 3> {mnt}/.imafs/ns-create
    exec 4> {mnt}/.imafs/ns-create
    echo esca >&3; echo a=$?
    echo escb >&3; echo b=$?
    echo escc >&4; echo c=$?
    exec 3>&- 4>&-
    echo view=$(ls {mnt}/.imafs/namespaces)
    cat {mnt}/f > /dev/null
    """, pidns=False)
    out = lines(r)
    assert (out["a"], out["b"], out["c"]) == ("0", "1", "1"), r
    assert "Invalid argument" in r.stderr and "Operation not permitted" in r.stderr
    assert out["view"] == ""                          # the shell's own view: esca's
    assert os.listdir(m.ctl("namespaces")) == ["esca"]
    assert os.listdir(m.ctl("namespaces/esca/namespaces")) == []
    assert read_by(m, b"/f") == [ns_id(m, "/esca")]
    assert len(ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create")) == 1
    log = m.log_text()
    assert "has already moved its opener" in log and "has left namespace /" in log


# ------------------------------------------------------------------ (b) a child writes
def test_child_writing_an_inherited_descriptor_moves_the_opener(nsm):
    """A subshell writes on the descriptor its parent opened: the parent (the opener)
    is moved, as documented; the subshell, forked before, stays where it was."""
    m, mnt = nsm, nsm.mnt
    r = host_sh(f"""
    exec 3> {mnt}/.imafs/ns-create
    ( echo kid >&3; echo child_rc=$?; echo child_view=$(ls {mnt}/.imafs/namespaces) )
    exec 3>&-
    echo parent_view=$(ls {mnt}/.imafs/namespaces)
    sh -c 'cat {mnt}/g > /dev/null'
    """, pidns=False)
    out = lines(r)
    assert out["child_rc"] == "0", r
    assert out["child_view"] == "kid"                 # the subshell: still the host
    assert out["parent_view"] == ""                   # the opener: in kid
    assert read_by(m, b"/g") == [ns_id(m, "/kid")]


# ------------------------------------------------------------------ (c) the opener exited
def test_opener_exited_or_exiting(nsm):
    """The opener exits; its child writes on the inherited descriptor: refused (EPERM,
    logged), no namespace created and no ns-create in the host's list -- both while
    the opener is a zombie (not reaped: moving it would silently do nothing) and once
    it is reaped."""
    m = nsm
    for reap in (False, True):
        o = Orphan(m, f"orphan{int(reap)}")
        try:
            assert wait_for(lambda: open(f"/proc/{o.pid}/stat").read().rsplit(")", 1)[1]
                            .split()[0] == "Z", 10)
            if reap:
                o.p.wait()
            assert o.go() == errno.EPERM, reap
        finally:
            o.close()
    assert os.listdir(m.ctl("namespaces")) == []
    assert ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create") == []
    assert m.log_text().count("refused: the process that opened ns-create (pid") == 2


# ------------------------------------------------------------------ (d) pid reuse
def test_reused_pid_of_the_opener_is_not_moved(nsm):
    """The opener exits and is reaped; a new process gets its pid (ns_last_pid); the
    opener's child writes: refused, and the new process stays on the host."""
    m = nsm
    key = cg_key(m)
    procs: list = []
    o = Orphan(m, "reuse")
    try:
        o.p.wait()
        r = spawn_with_pid(o.pid, procs)
        if r is None:
            pytest.skip(f"pid {o.pid} was taken by another process each time")
        assert cgroup_of(r.pid, key) == "/"
        assert o.go() == errno.EPERM
        assert cgroup_of(r.pid, key) == "/"          # not moved
        assert os.listdir(m.ctl("namespaces")) == []
        assert ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create") == []
    finally:
        o.close()
        for p in procs:
            p.kill()
            p.wait()


def test_failed_move_is_undone_in_the_parent_list(tmp_path):
    """No mount: a binder that cannot move the opener. The namespace was created and
    recorded (ns-create, then ns-init in its own list) before the move; it is
    removed again, and the parent's list records that (ns-remove): no namespace that
    never got a process is left in it."""
    from imafs.ima.binding import BindingError
    from imafs.ima.capability import OWN_PIDNS, OWN_USERNS, Creds
    from imafs.ima.securityfs import FILES, Securityfs, SecurityfsError
    from imafs.ima.engine import Engine
    from imafs.store import Store
    from helpers.namespaces import make_tree

    class Binder:
        removed = []

        def read_ns(self, pid):
            return 0

        def bind(self, pid, ns_id, **kw):
            raise BindingError(f"pid {pid} did not move into namespace {ns_id}")

        def members(self, ns_id):
            return []

        def remove(self, ns_id):
            self.removed.append(ns_id)

    class Opener:
        pid = 4321

        def alive(self):
            return True

    class Ctx:
        pid, uid, gid = 4321, 0, 0

    store = Store(str(tmp_path / "lmdb"))
    try:
        t = make_tree(store, binder=Binder())
        eng = Engine(t, store=store)
        node = next(n for n in FILES if n.name == "ns-create")
        fs = Securityfs(eng)
        fs.creds_of = lambda pid: Creds(pid, 1 << 21, OWN_USERNS, OWN_PIDNS)   # the host
        h = fs.open(node, t.root, Ctx, os.O_WRONLY)
        h.close()
        h.opener = Opener()
        with pytest.raises(SecurityfsError) as e:
            h.write(b"kid")
        assert e.value.errno == errno.EPERM
        assert "kid" not in t.root.children and Binder.removed == [1]
        ents = [x for x in t.root.mlist.entries() if x.name in (b"ns-create", b"ns-remove")]
        assert [x.name for x in ents] == [b"ns-create", b"ns-remove"]
        assert b"name=/kid id=1 " in ents[1].get("buf")
        assert h.moved is False
    finally:
        store.close()


# ------------------------------------------------------------------ item 6: the key
def _drop_hierarchy(key: str) -> None:
    """Destroy a hierarchy of ours left with empty namespace cgroups (a failing run)."""
    d = tempfile.mkdtemp(prefix="imafs-cg-")
    try:
        if subprocess.run(["mount", "-t", "cgroup", "-o", f"none,name=imafs.{key}", "cgroup",
                           d], capture_output=True).returncode != 0:
            return
        for n in os.listdir(d):
            if n.startswith("ns"):
                for sub, dirs, _ in os.walk(os.path.join(d, n), topdown=False):
                    for x in dirs:
                        os.rmdir(os.path.join(sub, x))
                os.rmdir(os.path.join(d, n))
        subprocess.run(["umount", d], capture_output=True)
    finally:
        os.rmdir(d)


def test_moved_state_directory_keeps_its_processes(nsm, world_tmp):
    """A process left in a namespace across `imafs umount`, `mv state state2` and a
    mount of state2: it is still in its namespace (its own policy, its reads in its
    list) -- with a key derived from the state's path it was read as the host."""
    from imafs.ima.binding import path_key
    m, mnt = nsm, nsm.mnt
    old_key = cg_key(m)
    assert old_key != path_key(m.state), "the hierarchy key still comes from the path"
    p = subprocess.Popen(["sh", "-c", f"""
        echo a > {mnt}/.imafs/ns-create && echo 'audit func=BPRM_CHECK' > {mnt}/.imafs/policy &&
        echo ok > {world_tmp}/ready || exit 1
        while [ ! -e {world_tmp}/go ]; do sleep 0.05; done
        cat {mnt}/.imafs/policy > {world_tmp}/policy; cat {mnt}/h > /dev/null
        echo done > {world_tmp}/done
    """], cwd="/")
    try:
        assert wait_for(lambda: (world_tmp / "ready").exists(), 10)
        m.stop()
        moved = world_tmp / "moved-state"
        os.rename(m.state, moved)
        m.state, m.log = moved, moved / "imafs.log"
        m.start()
        assert cg_key(m) == old_key
        (world_tmp / "go").touch()
        assert p.wait(timeout=20) == 0
    finally:
        (world_tmp / "go").touch()
        p.kill()
        p.wait()
    assert (world_tmp / "policy").read_text().split() == ["audit", "func=BPRM_CHECK"]
    assert read_by(m, b"/h") == [ns_id(m, "/a")]      # the host's list: read from a


@pytest.fixture(autouse=True)
def _no_stray_hierarchy(request, world_tmp):
    """A failing key test leaves a hierarchy under the key of the state's old path."""
    yield
    from imafs.ima.binding import path_key
    for name in ("state1", "state2"):
        key = path_key(str(world_tmp / name))
        if f"name=imafs.{key}:" in Path("/proc/self/cgroup").read_text():
            _drop_hierarchy(key)


# ------------------------------------------------------------------ item 9: ns-join
def test_ns_join_moves_the_opener_deeper_only(nsm):
    m, mnt = nsm, nsm.mnt
    r = host_sh(f"""
    echo web > {mnt}/.imafs/ns-create && echo db > {mnt}/.imafs/ns-create || exit 9
    sh -c 'echo other > {mnt}/.imafs/ns-create' || exit 8
    """, pidns=False)
    assert r.returncode == 0, r.stderr
    web = "namespaces/web/"
    db = web + "namespaces/db/"
    assert os.listdir(m.ctl("namespaces")) == ["web"]
    assert os.listdir(m.ctl(db + "namespaces")) == ["other"]
    r = host_sh(f"echo sib > {mnt}/.imafs/ns-create", pidns=False)
    assert r.returncode == 0
    for ns in (web, db):
        (m.ctl(ns + "policy")).write_text(MEASURE_READS)
    # the docker-exec case: a process of the host enters /web/db, and what it reads
    # is measured there (and in /web's and the host's lists)
    r = host_sh(f"""
    echo web/db > {mnt}/.imafs/ns-join; echo join=$?
    echo policy=$(cat {mnt}/.imafs/policy)
    cat {mnt}/f > /dev/null
    """, pidns=False)
    out = lines(r)
    assert out["join"] == "0", r
    assert out["policy"] == MEASURE_READS.strip()
    assert b"/f" in names(m.ctl(db + "ascii_runtime_measurements").read_bytes())
    joins = ns_bufs(m.ctl(web + "ascii_runtime_measurements"), b"ns-join")
    db_id = buf_id(ns_bufs(m.ctl(web + "ascii_runtime_measurements"), b"ns-create")[0])
    assert len(joins) == 1 and joins[0].startswith(f"ns-join name=/web/db id={db_id} uuid=")
    assert joins[0].endswith(" from=/")
    # a container (pid namespace, chroot) entering /web by its absolute path
    r = container(m, "echo /web > /.imafs/ns-join && cat /g > /dev/null && "
                     "echo view=$(ls /.imafs/namespaces)")
    assert r.returncode == 0, r.stderr
    assert lines(r)["view"] == "db"
    assert b"/g" in names(m.ctl(web + "ascii_runtime_measurements").read_bytes())
    assert b"/g" not in names(m.ctl(db + "ascii_runtime_measurements").read_bytes())
    # from inside /web: only deeper. Up, sideways, itself: EPERM; unknown: ENOENT;
    # a second write through the same open: EINVAL
    r = host_sh(f"""
    echo web > {mnt}/.imafs/ns-join || exit 9
    for t in ../sib /sib /web / .. db/../../sib; do
      echo "$t" > {mnt}/.imafs/ns-join; echo "r=$t:$?"
    done
    echo nope > {mnt}/.imafs/ns-join; echo nope=$?
    echo 'bad name' > {mnt}/.imafs/ns-join; echo bad=$?
    exec 3> {mnt}/.imafs/ns-join
    echo db >&3; echo db=$?
    echo other >&3; echo again=$?
    exec 3>&-
    echo view=$(ls {mnt}/.imafs/namespaces)
    setpriv --reuid=1000 --regid=1000 --clear-groups sh -c 'echo other > {mnt}/.imafs/ns-join'; echo nonroot=$?
    """, pidns=False)
    res = [x.split("=", 1)[1] for x in r.stdout.split() if x.startswith("r=")]
    assert [x.rsplit(":", 1)[1] for x in res] == ["1"] * 6, r
    assert r.stderr.count("Operation not permitted") == 6, r.stderr
    out = lines(r)
    assert (out["nope"], out["bad"], out["db"], out["again"]) == ("1", "1", "0", "1"), r
    assert out["nonroot"] != "0"
    assert "No such file or directory" in r.stderr and "Invalid argument" in r.stderr
    assert out["view"] == "other"                     # it is in /web/db now
    assert os.listdir(m.ctl(db + "namespaces")) == ["other"]   # nothing new anywhere
    assert sorted(os.listdir(m.ctl("namespaces"))) == ["sib", "web"]
    # ns-join is only in one's own view
    assert not os.path.exists(m.ctl(web + "ns-join"))
    assert "ns-join" not in os.listdir(m.ctl(web))
    assert "ns-join" in os.listdir(m.ctl(""))


def test_ns_join_opener_checks(nsm):
    """ns-join refuses as ns-create does: an opener that exited (EPERM), a reused pid
    (nobody moved)."""
    m, mnt = nsm, nsm.mnt
    assert host_sh(f"echo box > {mnt}/.imafs/ns-create", pidns=False).returncode == 0
    key = cg_key(m)
    procs: list = []
    o = Orphan(m, "box", ctl="ns-join")
    try:
        o.p.wait()
        r = spawn_with_pid(o.pid, procs)
        assert o.go() == errno.EPERM
        if r is not None:
            assert cgroup_of(r.pid, key) == "/"
    finally:
        o.close()
        for p in procs:
            p.kill()
            p.wait()
    assert ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-join") == []
    assert "has exited: nobody to move" in m.log_text()
