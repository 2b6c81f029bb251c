"""Containers cannot leave their integrity namespace, write the host's control files,
or crowd out their siblings (issue 15 items 1, 2, 4, 6; issue 14 item 5), through a
real mount. Each test performs the attack:

- processes of a container's pid namespace stay in its namespace whatever they do
  (double fork, setsid, a nested pid namespace), and a process that enters the pid
  namespace later (``nsenter -p``, as ``runc exec``) lands in it;
- a signed static helper breaks out of its chroot (chroot() without chdir(), as perl
  can) and looks for the binding's cgroup hierarchy -- in its mountinfo, under
  /run/imafs/cg, by mounting it by name -- then writes the host's keys and policy;
- a container without a namespace of its own (the root namespace, another pid
  namespace, every capability) writes the host's policy and removes the host's key,
  and a root of a user namespace does the same;
- a container changes the policy the host gave its namespace;
- a container's pid namespace inode is reused once it exited;
- a container fills the namespace quota;
- a child appraises an image signed with a key the host does not know.

"Containers" are ``unshare --pid --fork --mount-proc=MNT/proc chroot MNT`` (or plain
``unshare --pid --fork`` shells where host tools are needed). Run time: about a
minute and a half on 2 cores.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from helpers.escape import build_escape
from helpers.mounts import IMAFS, REPO, wait_for
from helpers.containers import (buf_id, cg_key, host_sh, keygen, keyid, lines, names,
                                   ns_bufs, sign)

pytestmark = pytest.mark.mount

BUSYBOX = "/bin/busybox"
APPLETS = "sh cat ls echo sleep setsid printf mkdir test true id kill".split()
MEASURE_READS = "measure func=FILE_CHECK mask=MAY_READ\n"
HOST_POLICY = MEASURE_READS + "appraise func=BPRM_CHECK appraise_type=imasig\n"


def _rootfs(b: Path, key: Path) -> None:
    for d in ("bin", "opt", "proc", "dev", "tmp", "keys", "data", "old"):
        (b / d).mkdir()
    os.chmod(b / "tmp", 0o1777)
    shutil.copy(BUSYBOX, b / "bin" / "busybox")
    for a in APPLETS:
        os.symlink("busybox", b / "bin" / a)
    os.mknod(b / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for n in ("escaped", "f1", "f2", "f3", "f4", "f5", "reuse", "x", "y"):
        (b / "data" / n).write_text(n + "\n")
    sign(key, b / "bin" / "busybox")


@pytest.fixture
def bm(make_mount, world_tmp):
    """A busybox rootfs signed with the host's key, under a policy that measures reads
    and appraises every exec; the host's key in --key."""
    key = keygen(world_tmp / "hostkey")
    b = world_tmp / "rootfs"
    b.mkdir()
    _rootfs(b, key)
    pol = world_tmp / "host.policy"
    pol.write_text(HOST_POLICY)
    m = make_mount(["--policy", str(pol), "--key", str(key / "signing_cert.der"),
                    "--template", "ima-ns"], backing=b)
    m.key = key
    return m


def _ns_of_reads(m, path: bytes) -> list[int]:
    """Which namespace each of the host's (ima-ns) entries of path was read from."""
    from imafs.ima.templates import parse_ascii
    return [int.from_bytes(e.get("ns"), "little")
            for e in parse_ascii(m.ctl("ascii_runtime_measurements").read_bytes())
            if e.name == path]


def _ns_id(m, path: str) -> int:
    for buf in ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create"):
        if f" name={path} " in buf:
            return buf_id(buf)
    raise KeyError(path)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _init_of(p: subprocess.Popen) -> int:
    """The init (pid 1) of the pid namespace ``unshare --pid --fork`` made."""
    assert wait_for(lambda: _children(p.pid), 10)
    return _children(p.pid)[0]


def _pidns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/pid").st_ino


# ------------------------------------------------------------------ leaving
def test_a_pid_namespace_keeps_its_processes_and_takes_in_newcomers(bm):
    """A container made with ``unshare --pid`` binds its pid namespace at ns-create.
    Its background jobs started before, a double fork with setsid (reparented to its
    init), a nested pid namespace: all in its namespace. A process that enters the
    container's pid namespace afterwards (``nsenter -p``, what ``runc exec`` does) is
    in it too -- with the cgroup binding it stayed in the host's (issue 15 item 4)."""
    m, mnt = bm, bm.mnt
    ready = m.backing / "tmp" / "ready"
    p = subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid", "--mount-proc",
                          "bash", "-c", f"""
        (while [ ! -e {ready} ]; do sleep 0.05; done; cat {mnt}/data/f1 > /dev/null; sleep 60) &
        echo box > {mnt}/.imafs/ns-create || exit 9
        echo '{MEASURE_READS.strip()}' > {mnt}/.imafs/policy || exit 8
        setsid sh -c '(sh -c "sleep 0.3; cat {mnt}/data/f2 > /dev/null" &) &'
        unshare --pid --fork --mount-proc sh -c 'cat {mnt}/data/f3 > /dev/null'
        touch {ready}; exec sleep 60"""])
    try:
        assert wait_for(ready.exists, 20), "the container did not start"
        init = _init_of(p)
        r = subprocess.run(["nsenter", "-t", str(init), "-p", "--", "sh", "-c",
                            f"cat {mnt}/data/f4 > /dev/null; cat {mnt}/.imafs/policy"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == MEASURE_READS.strip(), r
        box = _ns_id(m, "/box")
        assert wait_for(lambda: all(_ns_of_reads(m, f"/data/f{i}".encode()) == [box]
                                    for i in (1, 2, 3, 4)), 10), \
            {i: _ns_of_reads(m, f"/data/f{i}".encode()) for i in (1, 2, 3, 4)}
        assert re.search(r"pid namespace \d+:%d \(init pid %d\) bound to namespace %d"
                         % (_pidns(init), init, box), m.log_text())
        # busy while its pid namespace lives
        r = host_sh(f"echo box > {mnt}/.imafs/ns-remove", pidns=False)
        assert "Device or resource busy" in r.stderr
    finally:
        p.kill()
        p.wait()
    # the kernel tears a pid namespace down after its init's parent is gone, not with
    # it: --kill-child's SIGKILL and the reaping of the namespace's orphans take a
    # moment, during which the namespace is still busy (the OCI hook's poststop waits
    # the same way)
    removed = []

    def remove():
        removed.append(host_sh(f"echo box > {mnt}/.imafs/ns-remove", pidns=False))
        return removed[-1].returncode == 0
    assert wait_for(remove, 15, 0.2), removed[-1].stderr


def _build_escape(m, world_tmp) -> str:
    (m.backing / "opt" / "esc").mkdir()
    out = m.backing / "opt" / "esc" / "escape"
    build_escape(out, world_tmp)
    sign(m.key, out)
    return "/opt/esc/escape"


def test_chroot_break_finds_no_binding(bm, world_tmp):
    """issue 15 item 6, performed: in ``unshare --pid --mount-proc ... chroot MNT`` with
    CAP_SYS_ADMIN dropped, after ns-create, a signed static helper breaks out of the
    chroot (chroot() without chdir()) and reaches the host's mounts. The binding's
    hierarchy is nowhere it can look (its mountinfo, /run/imafs/cg, a mount by name:
    EPERM); it is still in its namespace, so the mount's .imafs is its own, whose keys
    and policy refuse it (no CAP_SYS_ADMIN); what it reads is measured in its
    namespace, and the host's keyring and policy are as they were. Before: it found /run/imafs/cg/KEY, moved itself to the root cgroup, and
    added its key to the host's keyring."""
    m, mnt = bm, bm.mnt
    helper = _build_escape(m, world_tmp)
    attacker = keygen(world_tmp / "attacker")
    shutil.copy(attacker / "signing_cert.der", m.backing / "keys" / "attacker.der")
    host_keys, host_policy = m.ctl("keys").read_text(), m.ctl("policy").read_text()
    r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={mnt}/proc",
                        "bash", "-c", f"""
        echo esc > {mnt}/.imafs/ns-create || exit 9
        echo '{MEASURE_READS.strip()}' > {mnt}/.imafs/policy || exit 8
        exec setpriv --bounding-set -sys_admin --inh-caps -sys_admin \\
          chroot {mnt} {helper} {mnt} /keys/attacker.der imafs.{cg_key(m)}"""],
                       capture_output=True, text=True, timeout=60)
    out = lines(r)
    assert r.returncode == 0 and out.get("escaped") == "1", r       # it did get out
    assert out["tried"] == "0" and out["moved"] == "0", r.stdout    # found no hierarchy
    assert out["mount"] == f"errno{errno.EPERM}" and "mounted" not in out, r.stdout
    assert out["keys"] == out["policy"] == f"errno{errno.EACCES}", r.stdout
    assert out["read"] == "1"
    assert m.ctl("keys").read_text() == host_keys and keyid(attacker) not in host_keys
    assert m.ctl("policy").read_text() == host_policy
    esc = _ns_id(m, "/esc")
    assert _ns_of_reads(m, b"/data/escaped") == [esc]
    assert b"/data/escaped" in names(m.ctl("namespaces/esc/ascii_runtime_measurements")
                                     .read_bytes())
    # out of the chroot it is still in its namespace: the mount's .imafs is its own,
    # whose keys and policy it may not write without CAP_SYS_ADMIN (logged, audited)
    assert "may not write keys of namespace /esc: it takes CAP_SYS_ADMIN" in m.log_text()


# ------------------------------------------------------------------ the host's files
def test_a_container_in_the_root_namespace_is_not_the_host(bm, world_tmp):
    """issue 15 item 1, performed: a container started without a namespace of its own
    (its own pid namespace, chrooted, every capability) writes the root's policy and
    removes the host's key: EACCES, logged and audited -- it is in the root namespace
    but not the host. So does root of a user namespace in the host's pid namespace.
    Without CAP_SYS_ADMIN (runc's default set) such a container does not read its
    siblings' lists either. The host's policy and keys stay; the host still writes
    them."""
    m, mnt = bm, bm.mnt
    kid = keyid(m.key)
    host_keys, host_policy = m.ctl("keys").read_text(), m.ctl("policy").read_text()
    assert kid in host_keys
    host_sh(f"echo sib > {mnt}/.imafs/ns-create", pidns=False)
    script = f"""
    echo 'measure func=BPRM_CHECK uid=4242' > /.imafs/policy; echo policy=$?
    echo 'remove {kid}' > /.imafs/keys; echo keys=$?
    echo sib > /.imafs/ns-remove; echo remove=$?
    cat /.imafs/namespaces/sib/ascii_runtime_measurements > /dev/null; echo sibling=$?
    """
    r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={mnt}/proc",
                        "chroot", str(mnt), "/bin/sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    out = lines(r)
    assert (out["policy"], out["keys"], out["remove"]) == ("1", "1", "1"), r
    assert r.stderr.count("Permission denied") >= 3, r.stderr
    assert out["sibling"] == "0"        # every capability of the initial user namespace
    r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={mnt}/proc",
                        "setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                        "chroot", str(mnt), "/bin/sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    out = lines(r)
    assert (out["policy"], out["keys"], out["sibling"]) == ("1", "1", "1"), r
    r = subprocess.run(["unshare", "--user", "--map-root-user", "bash", "-c", f"""
        echo 'measure func=BPRM_CHECK uid=4242' > {mnt}/.imafs/policy; echo policy=$?
        echo 'remove {kid}' > {mnt}/.imafs/keys; echo keys=$?"""],
                       capture_output=True, text=True, timeout=60)
    out = lines(r)
    assert (out["policy"], out["keys"]) == ("1", "1"), r
    assert m.ctl("policy").read_text() == host_policy
    assert m.ctl("keys").read_text() == host_keys
    assert os.listdir(m.ctl("namespaces")) == ["sib"]
    log = m.log_text()
    assert "only the host does (a process of the root namespace in the daemon's pid and " \
           "user namespaces, with CAP_SYS_ADMIN)" in log
    assert "is in the root namespace but not the host" in log
    recs = [json.loads(x) for x in (m.state / "audit.log").read_text().splitlines()]
    kinds = {x["type"] for x in recs if x.get("ns") == "/" and "not" in x.get("error", "")}
    assert {"policy_rejected", "key_rejected", "ns_remove_rejected"} <= kinds, kinds
    # the host itself
    m.ctl("policy").write_text("measure func=BPRM_CHECK\n")
    assert "measure func=BPRM_CHECK" in m.ctl("policy").read_text()


def test_a_host_made_namespace_is_never_changed_from_within(bm, world_tmp):
    """A namespace the host made for a container (imafs ns create --pid, over the
    control socket) keeps its host-given policy and keys: the container's root, with
    every capability, cannot write them; what enters its pid namespace later
    (nsenter -p) is in it and sees that policy."""
    m, mnt = bm, bm.mnt
    (world_tmp / "web.policy").write_text(MEASURE_READS)
    p = subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid", "sleep", "60"])
    try:
        init = _init_of(p)
        r = subprocess.run(IMAFS + ["ns", "create", str(mnt), "web", "--pid", str(init),
                                    "--policy", str(world_tmp / "web.policy")],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["nsenter", "-t", str(init), "-p", "--", "bash", "-c", f"""
            cat {mnt}/data/x > /dev/null
            echo own=$(cat {mnt}/.imafs/policy)
            echo 'measure func=BPRM_CHECK' > {mnt}/.imafs/policy; echo policy=$?
            echo '/keys/none' > {mnt}/.imafs/keys; echo keys=$?"""],
                           capture_output=True, text=True, timeout=30)
        out = lines(r)
        assert out["own"] == MEASURE_READS.strip(), r
        assert (out["policy"], out["keys"]) == ("1", "1"), r
        assert "Permission denied" in r.stderr
        assert m.ctl("namespaces/web/policy").read_text().strip() == MEASURE_READS.strip()
        assert _ns_of_reads(m, b"/data/x") == [_ns_id(m, "/web")]
        assert "it was made from the host, and is never changed from within" in m.log_text()
    finally:
        p.kill()
        p.wait()


# ------------------------------------------------------------------ inode reuse
def test_a_reused_pid_namespace_inode_is_not_bound(bm):
    """A container's pid namespace is bound; the container exits. While its binding is
    held, no new pid namespace gets its inode number (the daemon keeps a descriptor of
    it); once the daemon drops the binding (the next binding finds its init gone),
    a new pid namespace that gets the same number is the host's, not the container's
    -- a binding by inode number alone would have given it the dead container's."""
    m, mnt = bm, bm.mnt
    p = subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid", "--mount-proc",
                          "bash", "-c", f"echo gone > {mnt}/.imafs/ns-create && exec sleep 60"])
    init = _init_of(p)
    assert wait_for(lambda: "gone" in os.listdir(m.ctl("namespaces")), 10)
    ino = _pidns(init)
    gone = _ns_id(m, "/gone")
    p.kill()
    p.wait()
    spawned: list[subprocess.Popen] = []

    def spawn(n):
        """n new pid namespaces; the inits of those that got the container's number."""
        hits = []
        for _ in range(n):
            q = subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid", "sleep", "60"])
            spawned.append(q)
            i = _init_of(q)
            if _pidns(i) == ino:
                hits.append(i)
        return hits

    try:
        assert spawn(20) == []                  # held by the daemon: never reused
        # another container's ns-create binds again: the dead binding is dropped
        r = host_sh(f"echo next > {mnt}/.imafs/ns-create; sleep 0.1", pidns=True)
        assert r.returncode == 0, r.stderr
        assert "of namespace %d: its init exited, binding dropped" % gone in m.log_text()
        for q in spawned:
            q.kill()
            q.wait()
        spawned.clear()
        hits = []
        for _ in range(10):
            hits = spawn(20)
            if hits:
                break
        if not hits:
            pytest.skip(f"no new pid namespace got inode {ino} again (other namespaces "
                        f"of the machine took it)")
        r = subprocess.run(["nsenter", "-t", str(hits[0]), "-p", "--", "cat",
                            f"{mnt}/data/reuse"], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert _ns_of_reads(m, b"/data/reuse") == [0]          # the host's
    finally:
        for q in spawned:
            q.kill()
            q.wait()


def test_pid_namespace_bindings_across_a_remount(bm, world_tmp):
    """A container (its own pid namespace, outside the mount so that it does not pin
    it) stays bound across ``imafs umount`` and a mount of the same state: its reads
    and a newcomer's (nsenter -p) land in its namespace. One whose init exited while
    no daemon ran is not bound again (its record is dropped)."""
    m, mnt = bm, bm.mnt
    go = world_tmp / "go"
    # no mount namespace of their own: a copy of the mount there would keep it alive
    p = subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid",
                          "bash", "-c", f"""
        echo live > {mnt}/.imafs/ns-create && echo ok > {world_tmp}/ready || exit 1
        while [ ! -e {go} ]; do sleep 0.05; done
        cat {mnt}/data/y > /dev/null; exec sleep 60"""], cwd="/")
    q = subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid",
                          "bash", "-c", f"echo dead > {mnt}/.imafs/ns-create && exec sleep 60"],
                         cwd="/")
    try:
        assert wait_for(lambda: (world_tmp / "ready").exists(), 10)
        init = _init_of(p)
        assert wait_for(lambda: "dead" in os.listdir(m.ctl("namespaces")), 10)
        dead_init = _init_of(q)
        m.stop()
        q.kill()
        q.wait()
        m.start()
        live, dead = _ns_id(m, "/live"), _ns_id(m, "/dead")
        log = m.log_text()
        assert f"namespace {live}: pid namespace {os.stat(f'/proc/{init}/ns/pid').st_dev}:" \
               f"{_pidns(init)} (init pid {init}) bound again" in log
        # its init exited (or, killed a moment before, is not that namespace's any more)
        assert re.search(rf"namespace {dead}: pid namespace binding not restored: (its init "
                         rf"\(pid {dead_init}\) exited|pid {dead_init} is no longer the init)",
                         log), log[-3000:]
        go.touch()
        r = subprocess.run(["nsenter", "-t", str(init), "-p", "--", "cat",
                            f"{mnt}/data/x"], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: _ns_of_reads(m, b"/data/y") == [live], 10)
        assert _ns_of_reads(m, b"/data/x") == [live]
    finally:
        go.touch()
        for x in (p, q):
            x.kill()
            x.wait()


# ------------------------------------------------------------------ quotas
def test_one_container_cannot_take_every_namespace(bm):
    """issue 14 item 5, performed: a container makes namespaces in a loop. Its subtree
    holds at most 64 (itself and its descendants); past that, ENOSPC naming its quota,
    logged and audited. Its sibling, given quota=namespaces:3, makes two and no more,
    and neither quota stops the host."""
    m, mnt = bm, bm.mnt
    r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={mnt}/proc",
                        "chroot", str(mnt), "/bin/sh", "-c", """
        echo hog > /.imafs/ns-create || exit 9
        i=0; made=0
        while [ $i -lt 80 ]; do
          i=$((i+1))
          if (echo n$i > /.imafs/ns-create) 2>/dev/null; then made=$((made+1)); fi
        done
        echo made=$made"""], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r
    assert lines(r)["made"] == "63", r.stdout
    assert len(os.listdir(m.ctl("namespaces/hog/namespaces"))) == 63
    r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={mnt}/proc",
                        "chroot", str(mnt), "/bin/sh", "-c", """
        echo 'small quota=namespaces:3' > /.imafs/ns-create || exit 9
        for n in a b c; do (echo $n > /.imafs/ns-create); echo $n=$?; done"""],
                       capture_output=True, text=True, timeout=60)
    out = lines(r)
    assert (out["a"], out["b"], out["c"]) == ("0", "0", "1"), r
    assert "No space left on device" in r.stderr
    r = host_sh(f"echo mine > {mnt}/.imafs/ns-create", pidns=False)
    assert r.returncode == 0, r.stderr
    log = m.log_text()
    assert "namespace /hog and its descendants hold 64 namespaces, its quota " \
           "(namespaces:64)" in log
    assert "namespace /small and its descendants hold 3 namespaces, its quota " \
           "(namespaces:3)" in log
    recs = [json.loads(x) for x in (m.state / "audit.log").read_text().splitlines()]
    assert sum(1 for x in recs if x["type"] == "ns_create_rejected"
               and "its quota" in x.get("error", "")) == 80 - 63 + 1


def test_a_container_in_the_root_namespace_makes_a_bounded_number(bm):
    """issue 15's quota, per caller: a container with no namespace of its own (its
    own pid namespace, no CAP_SYS_ADMIN in the initial user namespace) makes a nested
    user and pid namespace for each ns-create -- each a new child of the root, which
    has no subtree quota. At most 64 are its; past that ENOSPC naming it, while the
    host goes on. Before: it took every namespace of the mount."""
    m, mnt = bm, bm.mnt
    r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={mnt}/proc",
                        "bash", "-c", f"""
        made=0
        for i in $(seq 1 70); do
          if unshare --user --map-root-user --pid --fork \
               sh -c "echo r$i > {mnt}/.imafs/ns-create" 2>/dev/null; then
            made=$((made+1))
          fi
        done
        echo made=$made"""], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r
    assert lines(r)["made"] == "64", r.stdout
    assert len(os.listdir(m.ctl("namespaces"))) == 64
    r = host_sh(f"echo mine > {mnt}/.imafs/ns-create", pidns=False)
    assert r.returncode == 0, r.stderr
    assert re.search(r"pid namespace \d+ made 64 of the namespaces under /, the most one "
                     r"creator may", m.log_text())


# ------------------------------------------------------------------ appraisal in a child
def test_image_signatures_appraise_in_a_child(make_mount, world_tmp):
    """issue 15 item 2, performed: the image's files carry their own security.ima,
    signed with the image's key, which the host does not know. A child that loads
    the image's certificate into its keys and appraises execs runs them; an unsigned
    file and one signed with the host's key only are refused in the child; the host
    (measuring only) runs them all. Before, a child read only its private attribute:
    every exec failed (no label)."""
    host, image = keygen(world_tmp / "host"), keygen(world_tmp / "image")
    b = world_tmp / "rootfs"
    b.mkdir()
    _rootfs(b, image)                                   # busybox: the image's signature
    for n in ("hostsigned", "unsigned"):
        (b / "opt" / n).mkdir()
        shutil.copy(BUSYBOX, b / "opt" / n / "busybox")
        (b / "opt" / n / "busybox").write_bytes(
            (b / "opt" / n / "busybox").read_bytes() + n.encode())
    sign(host, b / "opt" / "hostsigned" / "busybox")
    shutil.copy(image / "signing_cert.der", b / "keys" / "image.der")
    pol = world_tmp / "host.policy"
    pol.write_text("measure func=BPRM_CHECK\n")
    m = make_mount(["--policy", str(pol), "--key", str(host / "signing_cert.der")],
                   backing=b)
    r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={m.mnt}/proc",
                        "chroot", str(m.mnt), "/bin/busybox", "sh", "-c", """
        echo img > /.imafs/ns-create || exit 9
        echo /keys/image.der > /.imafs/keys || exit 8
        echo 'appraise func=BPRM_CHECK appraise_type=imasig' > /.imafs/policy || exit 7
        /bin/busybox true; echo image=$?
        /opt/unsigned/busybox true; echo unsigned=$?
        /opt/hostsigned/busybox true; echo hostsigned=$?"""],
                       capture_output=True, text=True, timeout=60)
    out = lines(r)
    assert out["image"] == "0", r
    assert out["unsigned"] == out["hostsigned"] == "126", r
    recs = [json.loads(x) for x in (m.state / "audit.log").read_text().splitlines()]
    causes = {x["path"]: x["cause"] for x in recs if x["type"] == "appraise"
              and x["ns"] == "/img" and x["result"] != "pass"}
    assert set(causes) == {"/opt/unsigned/busybox", "/opt/hostsigned/busybox"}, causes
    assert os.listxattr(b / "bin" / "busybox") == ["security.ima"]   # nothing written
    for n in ("unsigned", "hostsigned"):                # the host only measures
        assert subprocess.run([str(m.mnt / "opt" / n / "busybox"), "true"]).returncode == 0


def test_security_evm_from_a_child_is_its_own(make_mount, world_tmp):
    """setfattr security.evm from a child goes to the child's private name; the
    file's own (the host's) is untouched, and the child reads back its own."""
    b = world_tmp / "rootfs"
    b.mkdir()
    (b / "f").write_text("f\n")
    os.setxattr(b / "f", "security.evm", b"\x02host")
    pol = world_tmp / "host.policy"
    pol.write_text("measure func=BPRM_CHECK\n")
    m = make_mount(["--policy", str(pol)], backing=b)
    r = host_sh(f"""
    echo e > {m.mnt}/.imafs/ns-create || exit 9
    echo before=$(getfattr --only-values -n security.evm {m.mnt}/f)
    setfattr -n security.evm -v 0x02636869 {m.mnt}/f; echo set=$?
    echo after=$(getfattr --only-values -n security.evm {m.mnt}/f)""", pidns=False)
    out = lines(r)
    # a child reads its own security.evm only (P19's view; the engine's EVM check
    # falls back to the file's: XattrView.value)
    assert out["before"] == "" and out["set"] == "0" and out["after"] == "\x02chi", r
    assert os.getxattr(b / "f", "security.evm") == b"\x02host"
    assert os.getxattr(m.mnt / "f", "security.evm") == b"\x02host"
    assert any(n.endswith(".evm") and n.startswith("security.imafs.ns")
               for n in os.listxattr(b / "f"))
