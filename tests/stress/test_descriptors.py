"""Issue 14 item 2: the daemon's descriptor use is bounded, whatever the kernel caches.

The attack: ``ls -f`` of a directory of FILES files (100,000 in the issue), and an
unprivileged user creating FILES / 5 through the mount, used to leave the daemon one O_PATH
descriptor per inode the kernel remembered -- out of descriptors, after which every
lookup, open and exec on the mount failed. Here the daemon runs under ``prlimit
--nofile=1024``; after each step root's lookups, opens and execs work, and the
daemon holds fewer than FD_BOUND descriptors: its node cache (1024 / 8 = 128,
fs/nodefd.py) plus the fixed ones (LMDB, /dev/fuse, log, audit, inotify, cgroup
files: about 30) and the open handles of the moment.

Run twice: on the test's file system (ext4 here: file handles) and on an overlayfs
without nfs_export (no handles: nodes are found again by parent and name).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers.mounts import run_as

pytestmark = [pytest.mark.mount, pytest.mark.slow]

# the attack's size (the issue: 100,000 and 20,000; IMAFS_DESCRIPTOR_FILES=100000): half
# of it is 50 times the daemon's descriptor limit already, in the suite's time budget
FILES = int(os.environ.get("IMAFS_DESCRIPTOR_FILES", "50000"))
CREATED = FILES // 5
NOFILE = 1024
FD_BOUND = 256
SYSTEM_PYTHON = "/usr/bin/python3"   # the venv's may not be readable by uid 1000
POLICY = "measure func=BPRM_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ uid=0\n"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _populate(root):
    big = root / "big"
    big.mkdir(parents=True)
    for i in range(FILES):
        os.close(os.open(big / f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
    (root / "pub").mkdir()
    os.chmod(root / "pub", 0o1777)
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "small").write_bytes(b"small file\n")


@pytest.fixture(params=["handles", "overlayfs"])
def backing(request, world_tmp):
    if request.param == "handles":
        root = world_tmp / "backing"
        _populate(root)
        yield root
        return
    lower, upper, work, root = (world_tmp / n for n in ("lower", "upper", "work", "ovl"))
    for d in (lower, upper, work, root):
        d.mkdir()
    _populate(lower)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(root)],
                   check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)])


def _root_still_served(m):
    """Root's lookups, opens and exec through the mount."""
    big = m.mnt / "big"
    for i in range(0, FILES, FILES // 500):
        assert os.stat(big / f"f{i:06d}").st_size == 0
    for i in range(1, FILES, FILES // 50):
        with open(big / f"f{i:06d}", "rb") as f:
            assert f.read() == b""
    assert (m.mnt / "small").read_bytes() == b"small file\n"
    p = subprocess.run([str(m.mnt / "bin" / "busybox"), "echo", "exec works"],
                       capture_output=True, text=True, timeout=30)
    assert p.stdout == "exec works\n", p.stderr


def test_descriptors_bounded_under_a_low_limit(make_mount, world_tmp, backing):
    pol = world_tmp / "policy"
    pol.write_text(POLICY)
    m = make_mount(["--policy", str(pol), "--log-level", "info"], backing=backing,
                   start=False)
    m.wrap = ["prlimit", f"--nofile={NOFILE}"]
    m.start()
    pid = m.pid()
    with open(f"/proc/{pid}/limits") as f:
        line = next(li for li in f if li.startswith("Max open files"))
    assert line.split()[3:5] == [str(NOFILE), str(NOFILE)], line
    peak = _fds(pid)

    # 1. ls -f of 100,000 files (readdirplus: the kernel remembers every entry)
    p = subprocess.Popen(["ls", "-f", str(m.mnt / "big")], stdout=subprocess.PIPE)
    n = 0
    for _line in p.stdout:
        n += 1
        if n % 5000 == 0:
            peak = max(peak, _fds(pid))
    assert p.wait() == 0
    assert n == FILES + 2
    peak = max(peak, _fds(pid))
    _root_still_served(m)

    # 2. an unprivileged user creates 20,000 files through the mount
    creator = ("import os, sys\n"
               "d = sys.argv[1]\n"
               f"for i in range({CREATED}):\n"
               "    os.close(os.open(f'{d}/c{i}', os.O_CREAT | os.O_WRONLY, 0o600))\n")
    c = run_as(1000, 1000, [SYSTEM_PYTHON, "-c", creator, str(m.mnt / "pub")],
               capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr
    peak = max(peak, _fds(pid))
    assert len(os.listdir(m.mnt / "pub")) == CREATED
    _root_still_served(m)
    peak = max(peak, _fds(pid))

    print(f"daemon descriptors: at most {peak} (limit {NOFILE}, bound {FD_BOUND})")
    assert peak < FD_BOUND, f"the daemon held {peak} descriptors"
    log = m.log_text()
    assert "Too many open files" not in log and "Traceback" not in log, log[-3000:]


HOLDER = """
import errno, os, sys
held, refused = [], 0
for i in range(int(sys.argv[2])):
    try:
        held.append(os.open(f"{sys.argv[1]}/h{i}", os.O_RDONLY))
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        refused += 1
print(len(held), refused, flush=True)
sys.stdin.read()
"""


def test_one_user_cannot_take_the_last_descriptors(make_mount, world_tmp):
    """uid 1000 opens 600 files through the mount and keeps them open: past its
    share of the daemon's descriptors (a quarter of 1024 - 128 - 64: 208) its opens
    fail with EMFILE, and root's lookups, opens and exec go on."""
    backing = world_tmp / "backing"
    backing.mkdir()
    (backing / "pub").mkdir()
    for i in range(600):
        (backing / "pub" / f"h{i}").write_bytes(b"x")
    (backing / "big").mkdir()
    for i in range(FILES // 100):
        (backing / "big" / f"f{i:06d}").write_bytes(b"")
    (backing / "bin").mkdir()
    shutil.copy("/bin/busybox", backing / "bin" / "busybox")
    (backing / "small").write_bytes(b"small file\n")
    m = make_mount(["--log-level", "info"], backing=backing, start=False)
    m.wrap = ["prlimit", f"--nofile={NOFILE}"]
    m.start()
    pid = m.pid()

    def demote():
        os.setgroups([])
        os.setgid(1000)
        os.setuid(1000)
    p = subprocess.Popen([SYSTEM_PYTHON, "-c", HOLDER, str(m.mnt / "pub"), "600"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         preexec_fn=demote)
    try:
        held, refused = map(int, p.stdout.readline().split())
        assert held == 208 and refused == 600 - 208, (held, refused)
        for i in range(0, FILES // 100, 7):
            with open(m.mnt / "big" / f"f{i:06d}", "rb") as f:
                assert f.read() == b""
        assert (m.mnt / "small").read_bytes() == b"small file\n"
        r = subprocess.run([str(m.mnt / "bin" / "busybox"), "true"], timeout=30)
        assert r.returncode == 0
        assert _fds(pid) < FD_BOUND + 208
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    assert "uid 1000 holds 208 open handles" in m.log_text()
