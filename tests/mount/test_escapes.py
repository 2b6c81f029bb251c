"""Escape attempts: a process in a child integrity namespace tries to get past its own
and its ancestors' policy. Every attempt must fail, and be recorded where the kernel
records it (appraisal failures in the audit log, violations in the lists).

The host's policy measures execs and reads and appraises every exec
(``appraise func=BPRM_CHECK appraise_type=imasig``); /bin/busybox and the copies
/opt/NAME/busybox are signed with the host's key but /opt/evil*/busybox and
/opt/bad/busybox, unsigned (busybox runs the applet named by argv[1] when it is
called busybox). "Containers" are pid
namespaces chrooted into the mount (their busybox is the mount's); where host tools
are needed (python, setfattr, setpriv, unshare), a host shell joins the namespace.

Run time: about 25-40 s on 2 cores.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO, wait_for
from helpers.containers import (buf_id, cg_key, container, host_sh, keygen,
                                   lines, names, ns_bufs, sign)

pytestmark = pytest.mark.mount

BUSYBOX = "/bin/busybox"
APPLETS = ("sh cat ls echo sleep setsid printf mkdir test ln mv cp rm sha256sum truncate "
           "kill true id readlink mount unshare grep rmdir tr").split()
HOST_POLICY = ("measure func=BPRM_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ\n"
               "appraise func=BPRM_CHECK appraise_type=imasig\n")
SH = 60

# Handles and /proc/PID/fd: the two ways to reach an inode without its path.
FH_TOOL = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class FH(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]
def err():
    e = ctypes.get_errno(); return OSError(e, os.strerror(e))
if sys.argv[1] == "get":
    fh = FH(); fh.handle_bytes = 128; mid = ctypes.c_int()
    if libc.name_to_handle_at(-100, sys.argv[2].encode(), ctypes.byref(fh), ctypes.byref(mid), 0):
        raise err()
    print(fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes]).hex())
else:
    mnt, htype, data = sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
    fh = FH(); fh.handle_bytes = len(data); fh.handle_type = htype
    ctypes.memmove(fh.f_handle, data, len(data))
    mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    for what, flags in (("read", os.O_RDONLY), ("write", os.O_WRONLY)):
        fd = libc.open_by_handle_at(mfd, ctypes.byref(fh), flags)
        if fd < 0:
            print(f"handle_{what}=errno{ctypes.get_errno()}")
            continue
        try:
            if what == "read":
                print(f"handle_{what}=got{len(os.read(fd, 4096))}")
            else:
                os.write(fd, b"measure func=MMAP_CHECK\n"); os.close(fd); fd = -1
                print(f"handle_{what}=wrote")
        except OSError as e:
            print(f"handle_{what}=errno{e.errno}")
        finally:
            if fd >= 0:
                try: os.close(fd)
                except OSError as e: print(f"handle_{what}_close=errno{e.errno}")
'''


def rootfs(b: Path, key: Path) -> None:
    for d in ("bin", "opt", "proc", "dev", "tmp", "keys", "data"):
        (b / d).mkdir()
    os.chmod(b / "tmp", 0o1777)
    shutil.copy(BUSYBOX, b / "bin" / "busybox")
    for a in APPLETS:
        os.symlink("busybox", b / "bin" / a)
    os.mknod(b / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    blob = Path(BUSYBOX).read_bytes()
    signed = ("signed", "signed2", "signed3", "signed4", "good", "sleeper")
    for n in signed:
        (b / "opt" / n).mkdir()
        shutil.copy(BUSYBOX, b / "opt" / n / "busybox")
    for n in ("evil", "evil2", "evil3", "bad"):       # runs like busybox, different digest
        (b / "opt" / n).mkdir()
        (b / "opt" / n / "busybox").write_bytes(blob + b"\0unsigned " + n.encode())
        os.chmod(b / "opt" / n / "busybox", 0o755)
    sign(key, b / "bin" / "busybox", *[b / "opt" / n / "busybox" for n in signed])
    (b / "data" / "secret").write_text("host data\n")
    (b / "data" / "a").write_text("a\n")


@pytest.fixture
def esc(make_mount, world_tmp):
    """A mount of a signed busybox rootfs under the host policy above."""
    key = keygen(world_tmp / "hostkey")
    b = world_tmp / "rootfs"
    b.mkdir()
    rootfs(b, key)
    pol = world_tmp / "host.policy"
    pol.write_text(HOST_POLICY)
    m = make_mount(["--policy", str(pol), "--key", str(key / "signing_cert.der"),
                    "--template", "ima-ns"], backing=b)
    m.key = key
    (world_tmp / "fh.py").write_text(FH_TOOL)
    m.fh = world_tmp / "fh.py"
    return m


def audit(m) -> list[dict]:
    return [json.loads(line) for line in (m.state / "audit.log").read_text().splitlines()]


def refused_appraisals(m, path: str) -> list[dict]:
    return [r for r in audit(m) if r["type"] == "appraise" and r["path"] == path
            and r["result"] != "pass"]


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------ control files

def test_child_cannot_read_or_write_host_control_files(esc):
    """By path (namespaces/.., its own view), through a descriptor a host process
    holds (/proc/PID/fd/N), by file handle (open_by_handle_at): the host's policy and
    list are out of reach; a query shows no host rule; stats is the host's."""
    m, mnt = esc, esc.mnt
    host_policy = m.ctl("policy").read_text()
    hold = subprocess.Popen(["bash", "-c", f"exec 5<>{m.ctl('policy')} 6<{m.ctl('ascii_runtime_measurements')}; exec sleep 60"])
    try:
        assert wait_for(lambda: os.path.exists(f"/proc/{hold.pid}/fd/6"), 10)
        handle = subprocess.run([sys.executable, str(m.fh), "get", str(m.ctl("policy"))],
                                capture_output=True, text=True, check=True).stdout.split()
        r = host_sh(f"""
        echo esc > {mnt}/.imafs/ns-create || exit 9
        cat /proc/{hold.pid}/fd/5 > /dev/null; echo fdread=$?
        echo 'measure func=MMAP_CHECK' > /proc/{hold.pid}/fd/5; echo fdwrite=$?
        cat /proc/{hold.pid}/fd/6 > /dev/null; echo fdlist=$?
        python3 {m.fh} open {mnt} {handle[0]} {handle[1]}
        echo own=$(cat {mnt}/.imafs/namespaces/../policy | wc -c)
        cat {mnt}/.imafs/stats; echo stats=$?
        echo /bin/busybox > {mnt}/.imafs/query; cat {mnt}/.imafs/query > {mnt}/tmp/q.json
        echo 'measure func=MMAP_CHECK' > {mnt}/.imafs/namespaces/../policy; echo ownwrite=$?
        """, pidns=False)
    finally:
        hold.kill()
        hold.wait()
    out = lines(r)
    assert out["fdread"] != "0" and out["fdwrite"] != "0" and out["fdlist"] != "0", r
    assert out["handle_read"] == f"errno{errno.EACCES}", r.stdout
    assert out["handle_write"] == f"errno{errno.EACCES}", r.stdout
    assert out["own"] == "0" and out["ownwrite"] == "0"      # its own (empty) policy
    assert out["stats"] != "0"
    assert r.stderr.count("Permission denied") >= 4, r.stderr
    q = json.loads((m.backing / "tmp" / "q.json").read_text())
    host = [n for n in q["namespaces"] if n["namespace"] == "/"]
    assert host == [{"namespace": "/", "ancestor": True, "allowed": True}]
    assert "rule" not in (m.backing / "tmp" / "q.json").read_text().replace("rules", "")
    assert m.ctl("policy").read_text() == host_policy
    assert m.ctl("namespaces/esc/policy").read_text().split() == ["measure", "func=MMAP_CHECK"]


# Tries to write each root-only control file: "NAME=ERRNO" (the open's errno), or
# "NAME=ok" (opened and written). "passdown": uid 0 opens first, then becomes uid 1000
# (every capability gone) and writes through the descriptor it kept.
WRITE_TOOL = r'''
import os, sys
mnt, mode = sys.argv[1], sys.argv[2]
tries = [("policy", b"measure func=MMAP_CHECK\n"), ("keys", b"/keys/k.der\n"),
         ("create", b"sub\n"), ("remove", b"victim\n"), ("query", b"/data/a\n")]
if mode == "passdown":
    tries = tries[:1]
print("uid=%d" % os.getuid())
print("caps=" + open("/proc/self/status").read().split("CapEff:")[1].split()[0])
fds = {}
for what, data in tries:
    name = {"create": "ns-create", "remove": "ns-remove"}.get(what, what)
    try:
        fds[what] = os.open(f"{mnt}/.imafs/{name}", os.O_WRONLY)
    except OSError as e:
        print(f"{what}={e.errno}")
if mode == "passdown":
    os.setgroups([]); os.setresgid(1000, 1000, 1000); os.setresuid(1000, 1000, 1000)
    print("after=%d" % os.getuid())
for what, data in tries:
    if what in fds:
        try:
            os.write(fds[what], data)
            os.close(fds[what])
            print(f"{what}=ok")
        except OSError as e:
            print(f"{what}=write{e.errno}")
'''


def test_non_root_cannot_write_its_namespace_policy(esc, world_tmp):
    """In child namespace /nr: uid 1000, and uid 1000 as "root" of a new user
    namespace, cannot open policy, keys, ns-create, ns-remove (naming /nr/victim,
    which exists) or query for writing: EACCES from the kernel (default_permissions:
    the files are root's, 0600/0200). uid 1000 with CAP_DAC_OVERRIDE passes the
    kernel's check and reaches imafs's own, which refuses every one of them (EACCES)
    because the opener has no CAP_SYS_ADMIN -- logged and audited (issue 14: query
    was writable so; it shows the namespace's rules and the digest of any file, as
    the kernel's policy file does only to CAP_SYS_ADMIN). That check is made at open,
    as securityfs makes it: a descriptor root opened and kept across setuid(1000)
    writes as root opened it (the kernel's ima_open_policy checks at open only).
    Nothing of the refused attempts changed anything: root then removes
    /nr/victim."""
    m, mnt = esc, esc.mnt
    shutil.copy(m.key / "signing_cert.der", m.backing / "keys" / "k.der")
    tool = world_tmp / "write_tool.py"
    tool.write_text(WRITE_TOOL)
    drop = "setpriv --reuid=1000 --regid=1000 --clear-groups"
    py = "/usr/bin/python3"         # the system's: uid 1000 can run it (not root's pyenv)
    r = host_sh(f"""
    echo nr > {mnt}/.imafs/ns-create || exit 9
    echo 'measure func=BPRM_CHECK' > {mnt}/.imafs/policy || exit 8
    (echo victim > {mnt}/.imafs/ns-create) || exit 7
    {drop} {py} {tool} {mnt} try | sed s/^/u_/
    {drop} unshare --user --map-root-user {py} {tool} {mnt} try | sed s/^/ns_/
    {drop} --inh-caps=+dac_override --ambient-caps=+dac_override \
      {py} {tool} {mnt} try | sed s/^/cap_/
    cp {mnt}/.imafs/policy {world_tmp}/policy.before
    {py} {tool} {mnt} passdown | sed s/^/fd_/
    ls {mnt}/.imafs/namespaces | tr '\\n' ' ' | sed 's/^/children=/'; echo
    echo victim > {mnt}/.imafs/ns-remove; echo root_remove=$?
    """, pidns=False)
    out = lines(r)
    assert out.get("ns_uid") == "0" and out.get("u_uid") == out.get("cap_uid") == "1000", \
        (r.stdout, r.stderr)
    assert int(out["cap_caps"], 16) == 1 << 1 and int(out["u_caps"], 16) == 0, r
    for who in ("u_", "ns_", "cap_"):
        for what in ("policy", "keys", "create", "remove", "query"):
            assert out[who + what] == str(errno.EACCES), (who, what, r.stdout)
    # the kernel refused u_ and ns_; imafs refused cap_, each of the five once
    refusals = re.findall(r"open of (\S+) of namespace /nr by pid \d+ refused: pid \d+ "
                          r"\(uid 1000; no CAP_SYS_ADMIN in the initial user namespace, in "
                          r"the host's pid namespace\) may not write \1", m.log_text())
    assert sorted(refusals) == ["keys", "ns-create", "ns-remove", "policy", "query"], \
        refusals
    recs = [x for x in audit(m) if x.get("uid") == 1000 and x["type"].endswith("_rejected")]
    assert sorted(x["type"] for x in recs) == ["key_rejected", "ns_create_rejected",
                                               "ns_remove_rejected", "policy_rejected",
                                               "query_rejected"]
    # checked at open: the descriptor root opened writes after setuid(1000)
    assert out["fd_after"] == "1000" and out["fd_policy"] == "ok", r.stdout
    assert (world_tmp / "policy.before").read_text().split() == ["measure", "func=BPRM_CHECK"]
    assert m.ctl("namespaces/nr/policy").read_text().split() == \
        ["measure", "func=BPRM_CHECK", "measure", "func=MMAP_CHECK"]
    update = [x for x in audit(m) if x["type"] == "policy_update" and x["ns"] == "/nr"]
    assert update[-1]["uid"] == 0                     # the opener's
    assert m.ctl("namespaces/nr/keys").read_text() == ""
    assert out["children"].split() == ["victim"] and out["root_remove"] == "0", r
    assert os.listdir(m.ctl("namespaces/nr/namespaces")) == []


# ------------------------------------------------------------------ appraisal

def test_rename_and_hard_link_over_signed_files(esc):
    """Unsigned content put under a signed file's name (rename, hard link) is refused
    at exec; signed content under any name runs (appraisal is about the inode, never
    the path); a signed file changed in place after its verdict was cached is
    refused; each refusal is in the audit log under the name that was executed."""
    m = esc
    r = container(m, """
    echo c appraise=off > /.imafs/ns-create || exit 9
    /opt/signed/busybox true; echo before=$?
    mv /opt/evil/busybox /opt/signed/busybox
    /opt/signed/busybox echo RAN-renamed; echo renamed=$?
    ln -f /opt/evil2/busybox /opt/signed2/busybox
    /opt/signed2/busybox echo RAN-linked; echo linked=$?
    mv /opt/signed3/busybox /opt/evil3/busybox
    /opt/evil3/busybox echo signed-ran; echo signed_over=$?
    /opt/signed4/busybox true; echo cached=$?
    truncate -s 100000 /opt/signed4/busybox; echo truncated=$?
    /opt/signed4/busybox echo RAN-truncated; echo after_truncate=$?
    echo x >> /opt/good/busybox; echo write_signed=$?
    /opt/good/busybox echo RAN-written; echo after_write=$?
    """)
    out = lines(r)
    assert out["before"] == "0" and out["cached"] == "0", r
    assert out["renamed"] == out["linked"] == out["after_truncate"] == "126", r
    assert "RAN-" not in r.stdout
    assert out["signed_over"] == "0" and "signed-ran" in r.stdout
    # the policy appraises execs only: as in the kernel, a write open is not appraised
    # (so not refused), but what it wrote never runs
    assert out["write_signed"] == "0" and out["after_write"] == "126"
    assert out["truncated"] == "0"                  # as in the kernel: setattr is allowed
    # FUSE opens an inode, not a name: a file with two links is recorded under the
    # name it was first seen by (the kernel, too, records a file version once)
    for paths in (["/opt/signed/busybox"], ["/opt/signed2/busybox", "/opt/evil2/busybox"],
                  ["/opt/signed4/busybox"], ["/opt/good/busybox"]):
        recs = [r_ for p_ in paths for r_ in refused_appraisals(m, p_)]
        assert recs and recs[0]["func"] == "BPRM_CHECK", (paths, audit(m)[-5:])
        assert recs[0]["ns"] == "/"
    # the refused binaries were measured first (the kernel measures, then appraises)
    host = {e.file_digest[2].hex() for e in _entries(m) if e.file_digest}
    assert digest(m.backing / "opt" / "signed" / "busybox") in host      # evil's content
    assert digest(m.backing / "opt" / "evil2" / "busybox") in host


def _entries(m):
    from imafs.ima.templates import parse_binary
    return list(parse_binary(m.ctl("binary_runtime_measurements").read_bytes()))


def test_exec_through_symlinks_pointing_outside(esc):
    """A container resolves symlinks in its root, the mount: absolute and ../../..
    targets that "leave" land inside it (and an unsigned target is refused); a host
    path does not exist there. The daemon resolves query and policy paths the same
    way: never a host file."""
    m = esc
    for n in ("abs", "rel", "hostenv"):
        (m.backing / "bin" / n).mkdir()
    os.symlink("/../../../../../../../../opt/evil/busybox", m.backing / "bin" / "abs" / "busybox")
    os.symlink("../../../../../../../../opt/evil/busybox", m.backing / "bin" / "rel" / "busybox")
    os.symlink("/usr/bin/env", m.backing / "bin" / "hostenv" / "busybox")
    os.symlink("/etc/shadow", m.backing / "data" / "shadow")
    os.symlink("/etc/passwd", m.backing / "data" / "passwd.policy")
    r = container(m, """
    echo c > /.imafs/ns-create || exit 9
    /bin/abs/busybox echo RAN-abs; echo abs=$?
    /bin/rel/busybox echo RAN-rel; echo rel=$?
    /bin/hostenv/busybox true; echo hostenv=$?
    cat /data/shadow; echo shadow=$?
    echo /data/shadow > /.imafs/query; cat /.imafs/query > /tmp/q.json
    echo /data/passwd.policy > /.imafs/policy; echo policy_by_path=$?
    """)
    out = lines(r)
    assert out["abs"] == out["rel"] == "126" and "RAN-" not in r.stdout, r
    assert out["hostenv"] == "127" and out["shadow"] == "1", r
    q = json.loads((m.backing / "tmp" / "q.json").read_text())
    assert q == {"path": "/data/shadow", "error": "No such file or directory"}
    assert out["policy_by_path"] != "0"
    assert m.ctl("namespaces/c/policy").read_text() == ""
    # audited when appraised (once per file version, as the kernel), each refusal logged
    assert refused_appraisals(m, "/opt/evil/busybox")
    assert m.log_text().count("denied: pid") >= 2
    assert "/data/passwd.policy: No such file or directory" in m.log_text()


def test_replace_between_appraisal_and_exec(esc):
    """One container execs /bin/target in a loop while another swaps a signed and an
    unsigned binary under that name (rename, atomic). The kernel runs the inode it
    opened, the one appraised: every exec that ran, ran the signed content (the
    running program hashes /proc/self/exe); the unsigned one was refused each time
    it was there, and those refusals are in the audit log."""
    m = esc
    good = digest(m.backing / "opt" / "good" / "busybox")
    (m.backing / "bin" / "t").mkdir()
    os.link(m.backing / "opt" / "good" / "busybox", m.backing / "bin" / "t" / "busybox")
    swapper = container(m, """
    echo swap > /.imafs/ns-create || exit 9
    while [ ! -e /tmp/stop ]; do
      ln -f /opt/bad/busybox /bin/t/new && mv /bin/t/new /bin/t/busybox
      ln -f /opt/good/busybox /bin/t/new && mv /bin/t/new /bin/t/busybox
    done
    """, wait=False)
    try:
        r = container(m, """
        echo run > /.imafs/ns-create || exit 9
        i=0; ok=0; no=0
        while [ $i -lt 150 ]; do
          i=$((i+1))
          if /bin/t/busybox sha256sum /proc/self/exe > /tmp/sum 2>/dev/null; then
            ok=$((ok+1)); cat /tmp/sum
          else no=$((no+1)); fi
        done
        echo ok=$ok no=$no > /tmp/counts
        """, timeout=120)
    finally:
        (m.backing / "tmp" / "stop").write_text("")
        swapper.communicate(timeout=30)
    counts = dict(kv.split("=") for kv in (m.backing / "tmp" / "counts").read_text().split())
    ran = [ln.split()[0] for ln in r.stdout.splitlines() if ln.endswith("/proc/self/exe")]
    assert len(ran) == int(counts["ok"]) > 0, (counts, r.stdout[-500:], r.stderr[-500:])
    assert set(ran) == {good}, "an unsigned binary ran"
    assert int(counts["no"]) > 0, "the race never put the unsigned binary in place"
    assert refused_appraisals(m, "/bin/t/busybox")
    print(f"race: {counts['ok']} signed execs ran, {counts['no']} unsigned refused")


def test_child_cannot_set_or_remove_host_security_ima(esc):
    """setfattr/removexattr security.ima from a child (even with a valid host
    signature copied over) changes only the child's own attribute; the private names
    cannot be written or read; the host still refuses the unsigned file."""
    m, mnt, b = esc, esc.mnt, esc.backing
    host_sig = os.getxattr(b / "opt" / "good" / "busybox", "security.ima")
    bb_sig = os.getxattr(b / "bin" / "busybox", "security.ima")
    r = host_sh(f"""
    echo x > {mnt}/.imafs/ns-create || exit 9
    E={mnt}/opt/evil/busybox
    setfattr -n security.ima -v 0x{host_sig.hex()} $E; echo set=$?
    setfattr -x security.ima {mnt}/bin/busybox; echo removed_none=$?
    setfattr -n security.ima -v 0x{host_sig.hex()} {mnt}/bin/busybox; echo set_bb=$?
    setfattr -x security.ima {mnt}/bin/busybox; echo removed=$?
    setfattr -n security.imafs.ns0.ima -v 0x{host_sig.hex()} {mnt}/opt/evil2/busybox; echo priv0=$?
    setfattr -n security.imafs.ns1.ima -v 0x{host_sig.hex()} {mnt}/opt/evil2/busybox; echo priv1=$?
    getfattr -n security.imafs.ns1.ima $E; echo getpriv=$?
    setfattr -n security.ima -v 0x04 {mnt}/opt/evil3/busybox; echo malformed=$?
    $E echo RAN-evil; echo exec=$?
    echo seen=$(getfattr --only-values -n security.ima $E | od -An -tx1 | tr -d ' \\n')
    """, pidns=False)
    out = lines(r)
    assert out["set"] == out["set_bb"] == out["removed"] == "0", r   # the child's own
    assert out["removed_none"] != "0"                   # it had none: the host's stays
    assert out["priv0"] != "0" and out["priv1"] != "0" and out["getpriv"] != "0", r
    assert out["malformed"] != "0"
    assert out["exec"] == "126" and "RAN-evil" not in r.stdout
    assert out["seen"] == host_sig.hex()                # the child sees its own value
    nsid = buf_id(ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create")[0])
    with pytest.raises(OSError) as ei:
        os.getxattr(b / "opt" / "evil" / "busybox", "security.ima")
    assert ei.value.errno == errno.ENODATA              # the host's: untouched
    assert os.getxattr(b / "bin" / "busybox", "security.ima") == bb_sig
    assert os.getxattr(b / "opt" / "evil" / "busybox", f"security.imafs.ns{nsid}.ima") == host_sig
    assert not any(n.startswith("security.imafs")
                   for n in os.listxattr(b / "opt" / "evil2" / "busybox"))
    assert refused_appraisals(m, "/opt/evil/busybox")
    assert "refused security.ima" in m.log_text()
    r = subprocess.run([str(mnt / "bin" / "busybox"), "true"])      # host: still signed
    assert r.returncode == 0


# ------------------------------------------------------------------ leaving

def test_cannot_leave_namespace(esc):
    """setsid, a double fork, a new pid namespace, a new user namespace: every
    descendant of a shell bound by its cgroup (no pid namespace of its own) stays in
    the namespace (its reads land in its list, it sees its own policy). It cannot
    remove its own namespace, nor reach the cgroup hierarchy: it is mounted in no
    mount namespace (not under /run/imafs/cg, where it was), and mounted again by
    the root of an unprivileged user namespace with its own cgroup namespace it is
    rooted at its own cgroup and not writable. A container in its own pid namespace
    is bound by it: nothing to reach at all."""
    m, mnt = esc, esc.mnt
    for n in ("f1", "f2", "f3", "f4", "f5"):
        (m.backing / "data" / n).write_text(n)
    key = cg_key(m)
    pol = "measure func=FILE_CHECK mask=MAY_READ"
    r = host_sh(f"""
    echo stay > {mnt}/.imafs/ns-create || exit 9
    echo '{pol}' > {mnt}/.imafs/policy || exit 8
    setsid sh -c 'cat {mnt}/data/f1 > /dev/null; echo p1=$(cat {mnt}/.imafs/policy)'
    sh -c '(sh -c "sleep 0.3; cat {mnt}/data/f2 >/dev/null; echo p2=\\$(cat {mnt}/.imafs/policy) > {mnt}/tmp/p2" &) &'
    unshare --pid --fork --mount-proc sh -c 'cat {mnt}/data/f3 > /dev/null; echo p3=$(cat {mnt}/.imafs/policy)'
    echo mounted=$(grep -c "name=imafs.{key}" /proc/self/mountinfo)
    test -e /run/imafs/cg/{key}; echo seen=$?
    setpriv --reuid=1000 --regid=1000 --clear-groups \
      unshare --user --map-root-user --cgroup --mount sh -c '
      cat {mnt}/data/f4 > /dev/null
      d=$(mktemp -d)
      if mount -t cgroup -o none,name=imafs.{key} cgroup $d; then
        echo $$ > $d/cgroup.procs; echo cgwrite=$?
        mkdir $d/up; echo cgmkdir=$?
      else echo cgwrite=nomount; echo cgmkdir=nomount; fi'
    echo stay > {mnt}/.imafs/ns-remove; echo selfremove=$?
    echo stay > {mnt}/.imafs/namespaces/../ns-remove; echo selfremove2=$?
    sleep 0.8
    """, pidns=False)
    out = lines(r)
    assert out["p1"] == out["p3"] == pol, r
    assert (m.backing / "tmp" / "p2").read_text().strip() == "p2=" + pol
    assert out["mounted"] == "0" and out["seen"] != "0", r
    # not mountable, or (in its own cgroup namespace) rooted at its own cgroup and not
    # writable
    assert out["cgwrite"] != "0" and out["cgmkdir"] != "0", r
    assert out["selfremove"] != "0" and out["selfremove2"] != "0"
    assert "stay" in os.listdir(m.ctl("namespaces"))
    listed = names(m.ctl("namespaces/stay/ascii_runtime_measurements").read_bytes())
    assert {b"/data/f1", b"/data/f2", b"/data/f3", b"/data/f4"} <= set(listed)
    # a container (own mount and pid namespaces, chrooted) does not see the hierarchy;
    # test_container_without_cap_sys_admin_stays tries to reach it
    r = container(m, f"""
    echo box > /.imafs/ns-create || exit 9
    echo '{pol}' > /.imafs/policy || exit 8
    ls /run/imafs; echo seen=$?
    cat /data/f5 > /dev/null
    """)
    assert lines(r)["seen"] != "0"
    assert b"/data/f5" in names(m.ctl("namespaces/box/ascii_runtime_measurements").read_bytes())


# ------------------------------------------------------------------ writes

def test_open_for_write_while_executed_elsewhere(esc):
    """A binary running in one container cannot be opened for write from another,
    by its name or a hard link (ETXTBSY, as the kernel's deny_write_access); a write
    open of a file a measured reader holds open is a ToMToU violation, recorded in
    the host's list (and counted in its violations)."""
    m = esc
    v_before = int(m.ctl("violations").read_text())
    ready = [m.backing / "tmp" / n for n in ("runner.ready", "reader.ready")]
    for f in ready:
        f.unlink(missing_ok=True)
    runner = container(m, """
    echo runner > /.imafs/ns-create || exit 9
    /opt/sleeper/busybox sh -c 'echo > /tmp/runner.ready; exec /opt/sleeper/busybox sleep 30'
    """, wait=False)
    reader = container(m, """
    echo reader > /.imafs/ns-create || exit 9
    exec 3< /data/secret
    echo > /tmp/reader.ready
    sleep 30
    """, wait=False)
    try:
        assert wait_for(lambda: all(f.exists() for f in ready), 30), "containers not ready"
        r = container(m, """
        echo writer > /.imafs/ns-create || exit 9
        echo x >> /opt/sleeper/busybox; echo byname=$?
        ln /opt/sleeper/busybox /opt/alias; echo x >> /opt/alias; echo bylink=$?
        echo tampered >> /data/secret; echo tomtou=$?
        """)
    finally:
        for p in (runner, reader):
            p.kill()
            p.communicate(timeout=30)
    out = lines(r)
    assert out["byname"] != "0" and out["bylink"] != "0", r
    assert r.stderr.count("busy") >= 2, r.stderr
    assert digest(m.backing / "opt" / "sleeper" / "busybox") == \
        digest(m.backing / "opt" / "good" / "busybox")
    assert out["tomtou"] == "0"                          # allowed, as in the kernel...
    assert int(m.ctl("violations").read_text()) > v_before   # ...and recorded
    viol = [e for e in _entries(m) if e.violation and e.name == b"/data/secret"]
    assert viol, "no ToMToU entry"
    assert any(r_["type"] == "violation" and r_["cause"] == "ToMToU" and
               r_["path"] == "/data/secret" for r_ in audit(m))


def _ns_of_reads(m, path: bytes) -> list[int]:
    """Which namespace each of the host's (ima-ns) entries of path was read from."""
    from imafs.ima.templates import parse_ascii
    return [int.from_bytes(e.get("ns"), "little")
            for e in parse_ascii(m.ctl("ascii_runtime_measurements").read_bytes())
            if e.name == path]


def test_container_without_cap_sys_admin_stays(esc):
    """A container root without CAP_SYS_ADMIN (dropped from its bounding set) in its
    own mount and pid namespaces, chrooted, is bound by its pid namespace: it cannot
    mount the cgroup hierarchy (nor make a user namespace: it is in a chroot), sees
    no /run/imafs, and stays; without CAP_SYS_ADMIN it may neither make a namespace
    nor change its own policy. Root of a user namespace (CAP_SYS_ADMIN over that
    namespace only) with its own cgroup namespace may mount the hierarchy, but rooted
    at its own namespace's cgroup: moving into a cgroup below that makes it unknown
    (refused), never the host. (Root with CAP_SYS_ADMIN in the initial user
    namespace can mount the hierarchy where it likes and leave: docs/security.md.)"""
    m, mnt = esc, esc.mnt
    key = cg_key(m)
    for n in ("f6", "f7", "f8"):
        (m.backing / "data" / n).write_text(n + "\n")
    pol = "measure func=FILE_CHECK mask=MAY_READ"
    script = f"""
    echo caps=$(grep CapEff /proc/self/status | tr -d '\\t ')
    echo sub > /.imafs/ns-create; echo create=$?
    echo 'audit func=BPRM_CHECK' > /.imafs/policy; echo policy=$?
    mkdir -p /tmp/cg
    mount -t cgroup -o none,name=imafs.{key} cgroup /tmp/cg; echo mount=$?
    # a user namespace: none is made in a chroot (EPERM)
    unshare -U -r -m sh -c 'mount -t cgroup -o none,name=imafs.{key} cgroup /tmp/cg; echo usermount=$?' \
      || echo usermount=refused
    ls /run/imafs; echo seen=$?
    ls /proc/1/root/run/imafs; echo seen1=$?
    cat /data/f6 > /dev/null; echo read=$?
    """
    (m.backing / "tmp" / "script").write_text(script)
    r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={mnt}/proc",
                        "bash", "-c", f"""
                        echo box > {mnt}/.imafs/ns-create || exit 9
                        echo '{pol}' > {mnt}/.imafs/policy || exit 8
                        exec setpriv --bounding-set -sys_admin --inh-caps -sys_admin \
                          chroot {mnt} /bin/sh /tmp/script"""],
                       capture_output=True, text=True, timeout=SH)
    out = lines(r)
    assert r.returncode == 0 and "usermount" in out, r
    eff = int(out["caps"].split(":")[1], 16)
    assert not eff & (1 << 21) and eff & 1, out["caps"]   # no SYS_ADMIN; CHOWN kept
    assert out["create"] != "0" and out["policy"] != "0", r
    assert out["mount"] != "0" and out["usermount"] != "0", r
    assert out["seen"] != "0" and out["seen1"] != "0", r
    assert out["read"] == "0", r
    box = buf_id(ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create")[-1])
    assert _ns_of_reads(m, b"/data/f6") == [box]
    assert b"/data/f6" in names(m.ctl("namespaces/box/ascii_runtime_measurements").read_bytes())
    assert m.ctl("namespaces/box/policy").read_text().strip() == pol
    assert os.listdir(m.ctl("namespaces/box/namespaces")) == []

    # root of a user namespace (uid 0 mapped to 0) with its own cgroup namespace
    script = f"""
    mkdir -p /tmp/cg2
    mount -t cgroup -o none,name=imafs.{key} cgroup /tmp/cg2; echo mount=$?
    echo root=$(grep imafs.{key} /proc/self/cgroup)
    echo $$ > /tmp/cg2/cgroup.procs; echo stay=$?
    cat /data/f7 > /dev/null; echo read7=$?
    mkdir /tmp/cg2/x; echo mkdir=$?
    echo $$ > /tmp/cg2/x/cgroup.procs; echo moved=$?
    cat /data/f8 > /dev/null; echo read8=$?
    """
    try:
        r = host_sh(f"""
        echo box2 > {mnt}/.imafs/ns-create || exit 9
        echo '{pol}' > {mnt}/.imafs/policy || exit 8
        unshare --user --map-root-user --cgroup --mount --pid --fork --kill-child \\
          --mount-proc={mnt}/proc chroot {mnt} /bin/sh -c '{script}'
        """, pidns=False)
        out = lines(r)
        box2 = buf_id(ns_bufs(m.ctl("ascii_runtime_measurements"), b"ns-create")[-1])
        assert out["mount"] == "0", r                  # its own cgroup namespace's view
        assert out["root"].endswith(f"name=imafs.{key}:/"), r   # rooted at its cgroup
        assert out["stay"] == "0" and out["read7"] == "0", r
        assert _ns_of_reads(m, b"/data/f7") == [box2]
        # below its namespace's cgroup: unknown, refused (or, while the daemon's
        # per-process cache still holds it, its old namespace) -- never the host
        assert out["mkdir"] == "0" and out["moved"] == "0", r
        if out["read8"] == "0":
            assert _ns_of_reads(m, b"/data/f8") == [box2]
        else:
            assert _ns_of_reads(m, b"/data/f8") == []
            assert "integrity namespace unknown" in m.log_text()
    finally:
        # the hierarchy is mounted nowhere: remove x from a mount namespace of our own
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"d=$(mktemp -d) && mount -t cgroup -o none,name=imafs.{key} cgroup "
                        f"$d && rmdir $d/ns*/x; umount $d; rmdir $d"], capture_output=True)
