"""``imafs mount -o ro`` through real mounts: the FUSE mount is read-only (MS_RDONLY),
so every change through it -- writes, creates, setattr, setxattr, control files
included -- is EROFS, while opens and execs are measured and appraised as on a
writable mount, and the host drives the daemon through the control socket."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess

import pytest

from helpers.mounts import IMAFS, REPO
from imafs.ima.templates import parse_ascii

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

OWNER = 4321
MS_REMOUNT = 32
POLICY = ("measure func=FILE_CHECK mask=MAY_READ\nmeasure func=BPRM_CHECK\n"
          f"appraise func=FILE_CHECK fowner={OWNER}\n")


def imafs(*args, ok=True) -> subprocess.CompletedProcess:
    r = subprocess.run(IMAFS + [str(a) for a in args], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    if ok:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


@pytest.fixture
def m(make_mount, world_tmp):
    b = world_tmp / "backing-ro"
    (b / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", b / "bin" / "busybox")
    (b / "etc").mkdir()
    (b / "etc" / "motd").write_text("hello\n")
    (b / "etc" / "unsigned").write_text("no hash\n")
    for f in ("motd", "unsigned"):
        os.chown(b / "etc" / f, OWNER, OWNER)
    imafs("sign", "--hash-only", b / "etc" / "motd")
    (world_tmp / "ro.policy").write_text(POLICY)
    return make_mount(["-o", "ro", "--policy", str(world_tmp / "ro.policy")], backing=b)


def erofs(fn, *args, **kw) -> None:
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    assert e.value.errno == errno.EROFS, (fn, args, e.value)


def test_the_mount_is_read_only(m):
    with open("/proc/self/mountinfo") as f:
        line = next(ln for ln in f if ln.split(" ")[4] == str(m.mnt))
    assert "ro" in line.split(" ")[5].split(",")
    motd = m.mnt / "etc" / "motd"
    before = (m.backing / "etc" / "motd").read_bytes()
    erofs(os.open, motd, os.O_WRONLY)
    erofs(os.open, motd, os.O_RDWR)
    erofs(os.open, motd, os.O_RDONLY | os.O_TRUNC)
    erofs(os.open, m.mnt / "etc" / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    erofs(os.truncate, motd, 0)
    erofs(os.chmod, motd, 0o600)
    erofs(os.chown, motd, 0, 0)
    erofs(os.utime, motd, (1, 1))
    erofs(os.setxattr, motd, "user.x", b"1")
    erofs(os.setxattr, motd, "security.ima", b"\x04\x04" + b"\0" * 32)
    erofs(os.removexattr, motd, "security.ima")
    erofs(os.unlink, motd)
    erofs(os.mkdir, m.mnt / "d")
    erofs(os.symlink, "motd", m.mnt / "etc" / "link")
    erofs(os.link, motd, m.mnt / "etc" / "hard")
    erofs(os.rename, motd, m.mnt / "etc" / "moved")
    # the control files too: the mount, not the file, is read-only
    erofs(os.open, m.ctl("policy"), os.O_WRONLY)
    erofs(os.open, m.ctl("ns-create"), os.O_WRONLY)
    assert (m.backing / "etc" / "motd").read_bytes() == before
    assert os.getxattr(m.backing / "etc" / "motd", "security.ima")[:2] == b"\x04\x04"
    assert sorted(os.listdir(m.backing / "etc")) == ["motd", "unsigned"]


def test_reads_and_execs_measured_and_appraised(m):
    assert (m.mnt / "etc" / "motd").read_text() == "hello\n"        # hash verifies
    with pytest.raises(PermissionError):                             # no security.ima
        (m.mnt / "etc" / "unsigned").read_bytes()
    r = subprocess.run([str(m.mnt / "bin" / "busybox"), "echo", "ran"], capture_output=True,
                       text=True, timeout=30)
    assert r.stdout == "ran\n"
    names = [e.name for e in parse_ascii(m.ctl("ascii_runtime_measurements").read_bytes())]
    assert b"/etc/motd" in names and b"/bin/busybox" in names
    assert m.ctl("policy").read_text().split() == POLICY.split()
    refused = [(r["result"], r["cause"]) for r in m.audit()
               if r["type"] == "appraise" and r["path"] == "/etc/unsigned"]
    assert refused and refused[0][1] == "missing-hash", refused


def test_the_host_uses_the_control_socket(m, world_tmp):
    """Nothing can be written under .imafs/: namespaces are made from the host."""
    (world_tmp / "web.policy").write_text("measure func=FILE_CHECK mask=MAY_READ\n")
    p = subprocess.Popen(["bash", "-c", 'while read -r f; do cat "$f" >/dev/null; '
                          'echo done; done'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    name = "ab" * 32
    try:
        r = imafs("ns", "create", m.mnt, name, "--pid", p.pid, "--policy",
                  world_tmp / "web.policy")
        assert f"namespace /{name} (id 1" in r.stdout
        p.stdin.write(f"{m.mnt}/etc/motd\n")
        p.stdin.flush()
        assert p.stdout.readline() == "done\n"
        web = m.ctl(f"namespaces/{name}/ascii_runtime_measurements")
        names = [e.name for e in parse_ascii(web.read_bytes())]
        assert names == [b"boot_aggregate", b"ns-init", b"/etc/motd"]
        ls = imafs("ns", "list", m.mnt).stdout.splitlines()
        assert ls[1].split()[:3] == [f"/{name}", "1", "1"]
    finally:
        p.kill()
        p.wait()
    r = imafs("ns", "remove", m.mnt, name)
    assert "removed: 3 entries" in r.stdout


def test_the_daemon_refuses_changes_if_the_mount_is_made_writable(m):
    """root may remount it read-write behind imafs: the daemon still says EROFS."""
    libc = ctypes.CDLL(None, use_errno=True)
    # mount(2) MS_REMOUNT without MS_RDONLY (mount(8) would run the fuse.imafs helper)
    assert libc.mount(None, os.fsencode(m.mnt), None, MS_REMOUNT, None) == 0, \
        os.strerror(ctypes.get_errno())
    with open("/proc/self/mountinfo") as f:
        line = next(ln for ln in f if ln.split(" ")[4] == str(m.mnt))
    assert "rw" in line.split(" ")[5].split(",")
    motd = m.mnt / "etc" / "motd"
    erofs(os.open, motd, os.O_WRONLY)
    erofs(os.open, m.mnt / "etc" / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    erofs(os.chmod, motd, 0o600)
    erofs(os.setxattr, motd, "user.x", b"1")
    erofs(os.unlink, motd)
    erofs(os.rename, motd, m.mnt / "etc" / "moved")
    assert sorted(os.listdir(m.backing / "etc")) == ["motd", "unsigned"]
    assert (m.mnt / "etc" / "motd").read_text() == "hello\n"


def test_fix_mode_leaves_the_backing_directory_alone(make_mount, world_tmp):
    """``--appraise fix`` on a read-only mount: a file without a hash still opens
    (fix mode never refuses), but no ``security.ima`` is written to the backing
    directory; the daemon logs why."""
    b = world_tmp / "backing-ro-fix"
    b.mkdir()
    (b / "unlabelled").write_text("no hash\n")
    (world_tmp / "fix.policy").write_text("appraise func=FILE_CHECK mask=MAY_READ\n")
    mt = make_mount(["-o", "ro", "--appraise", "fix",
                     "--policy", str(world_tmp / "fix.policy")], backing=b)
    assert (mt.mnt / "unlabelled").read_text() == "no hash\n"
    assert "security.ima" not in os.listxattr(b / "unlabelled")
    log = mt.log.read_text()
    assert "fix: cannot write security.ima" in log and "read-only" in log, log[-2000:]
