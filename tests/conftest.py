"""Shared fixtures. Mount tests mount real FUSE filesystems in temporary directories
and always unmount them, even when the test fails."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAFS = [sys.executable, "-m", "imafs"]


def _is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def force_unmount(mnt: str) -> None:
    """Unmount whatever is at mnt, even when the daemon hangs or died."""
    for cmd in (["fusermount3", "-u", mnt], ["umount", mnt], ["umount", "-l", mnt]):
        if not _is_mounted(mnt):
            return
        subprocess.run(cmd, capture_output=True)
    if _is_mounted(mnt):
        # a wedged daemon: abort its FUSE connection, then detach
        try:
            dev = os.stat(mnt).st_dev
        except OSError:
            dev = None
        if dev is not None:
            ctl = "/sys/fs/fuse/connections"
            if not os.path.exists(os.path.join(ctl, str(os.minor(dev)))):
                subprocess.run(["mount", "-t", "fusectl", "none", ctl], capture_output=True)
            with contextlib.suppress(OSError):
                Path(ctl, str(os.minor(dev)), "abort").write_text("1")
        subprocess.run(["umount", "-l", mnt], capture_output=True)


class Mount:
    """One imafs mount: ``backing``, ``mnt``, ``state``, plus helpers."""

    def __init__(self, backing: Path, mnt: Path, state: Path, args: list[str]):
        self.backing, self.mnt, self.state, self.args = backing, mnt, state, args
        self.log = state / "imafs.log"
        self.wrap: list[str] = []     # a command the mount runs under (prlimit ...)

    def start(self) -> "Mount":
        cmd = self.wrap + IMAFS + ["mount", str(self.backing), str(self.mnt), "--state", str(self.state),
                       "--log-file", str(self.log), "--log-level", "debug"] + self.args
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
        if p.returncode != 0:
            raise RuntimeError(f"mount failed ({p.returncode}): {p.stderr}\n{self.log_text()}")
        assert _is_mounted(str(self.mnt))
        return self

    def stop(self) -> None:
        if _is_mounted(str(self.mnt)):
            subprocess.run(IMAFS + ["umount", str(self.mnt)], capture_output=True, timeout=60,
                           cwd=REPO)
        force_unmount(str(self.mnt))

    def restart(self, extra: list[str] | None = None) -> "Mount":
        self.stop()
        if extra is not None:
            self.args = extra
        return self.start()

    def pid(self) -> int:
        """The daemon's pid."""
        return int((self.state / "daemon.lock").read_text().strip())

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def ctl(self, name: str = "") -> Path:
        return self.mnt / ".imafs" / name

    def query(self, path: str) -> dict:
        """Write ``path`` to the control file ``query`` and read back its JSON answer
        through the same descriptor, as the interface asks."""
        fd = os.open(self.ctl("query"), os.O_RDWR)
        try:
            os.write(fd, path.encode() + b"\n")
            data = b""
            while chunk := os.pread(fd, 65536, len(data)):
                data += chunk
        finally:
            os.close(fd)
        return json.loads(data)

    def audit(self) -> list[dict]:
        """The records of the mount's audit log (none yet: [])."""
        try:
            text = (self.state / "audit.log").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines()]


def readable(path) -> bool:
    """Can the file be read whole (False: EACCES, e.g. refused by appraisal)?"""
    try:
        with open(path, "rb") as f:
            f.read()
        return True
    except PermissionError:
        return False


@pytest.fixture
def world_tmp():
    """A temporary directory that unprivileged test users can traverse (pytest's
    tmp_path lives under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="imafs-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    for sub in d.iterdir():
        if _is_mounted(str(sub)):
            force_unmount(str(sub))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mkfile(tmp_path):
    """Factory: mkfile(data) -> the path of a new file in tmp_path holding data."""
    n = [0]

    def make(data: bytes) -> Path:
        n[0] += 1
        p = tmp_path / f"f{n[0]}"
        p.write_bytes(data)
        return p
    return make


@pytest.fixture
def make_mount(world_tmp):
    """Factory: make_mount(args=[...], backing=None) -> started Mount; all are
    unmounted at teardown."""
    tmp_path = world_tmp
    mounts: list[Mount] = []
    n = [0]

    def factory(args=None, backing: Path | None = None, start: bool = True) -> Mount:
        n[0] += 1
        b = backing or tmp_path / f"backing{n[0]}"
        b.mkdir(exist_ok=True)
        m = tmp_path / f"mnt{n[0]}"
        m.mkdir()
        s = tmp_path / f"state{n[0]}"
        mt = Mount(b, m, s, list(args or []))
        mounts.append(mt)
        return mt.start() if start else mt

    yield factory
    for mt in mounts:
        mt.stop()
    # a daemon that failed leaves its log: show it for the failing test
    for mt in mounts:
        assert not _is_mounted(str(mt.mnt)), f"{mt.mnt} still mounted"


@pytest.fixture
def plain_mount(make_mount):
    """A passthrough mount with integrity off."""
    return make_mount(["--no-integrity"])


def run_as(uid: int, gid: int, argv: list[str], **kw):
    """Run argv as uid/gid (no supplementary groups)."""
    def demote():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return subprocess.run(argv, preexec_fn=demote, **kw)


def wait_for(pred, timeout=5.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


ROOTFS_CACHE = Path(os.environ.get("IMAFS_ROOTFS_CACHE",
                                   "/var/cache/imafs/rootfs-bookworm-minbase"))


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    """The suite's Debian rootfs (scripts/rootfs.sh's cache), shared by the session:
    read it, never change it (overlay or copy it). Skipped when it is not built, unless
    IMAFS_BUILD_ROOTFS=1 (then it is built here)."""
    if not (Path(str(ROOTFS_CACHE) + ".complete").is_file() and ROOTFS_CACHE.is_dir()):
        if os.environ.get("IMAFS_BUILD_ROOTFS", "") in ("", "0"):
            pytest.skip(f"no cached Debian rootfs at {ROOTFS_CACHE} (build it with "
                        f"scripts/rootfs.sh, or set IMAFS_BUILD_ROOTFS=1)")
        p = subprocess.run([str(REPO / "scripts" / "rootfs.sh"), str(ROOTFS_CACHE)],
                           capture_output=True, text=True, timeout=840)
        assert p.returncode == 0, p.stderr
    return ROOTFS_CACHE


@pytest.fixture(scope="session")
def debian_digest_list(debian_rootfs, tmp_path_factory):
    """``imafs digest-list from-dpkg`` of the suite's rootfs, from the .debs and
    archive index files scripts/rootfs.sh keeps beside it (ROOTFS.archive), built once
    per session and signed (security.ima) with a test key: an object with ``list``,
    ``keys`` (the key directory: signing_key.pem, signing_cert.der) and ``unsigned``
    (the same list, no signature)."""
    archive = Path(str(debian_rootfs) + ".archive")
    if not archive.is_dir():
        pytest.skip(f"no {archive} (scripts/rootfs.sh keeps the .debs there)")
    d = tmp_path_factory.mktemp("debian-list")
    out = d / "debian.list"
    p = subprocess.run(IMAFS + ["digest-list", "from-dpkg", str(debian_rootfs), "--debs",
                                str(archive), "-o", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    keys = d / "keys"
    subprocess.run(IMAFS + ["keygen", "--out", str(keys), "--type", "ec"], check=True,
                   capture_output=True, cwd=REPO)
    unsigned = d / "unsigned.list"
    shutil.copyfile(out, unsigned)
    subprocess.run(IMAFS + ["sign", "-q", "--key", str(keys / "signing_key.pem"),
                            "--cert", str(keys / "signing_cert.der"), str(out)],
                   check=True, capture_output=True, cwd=REPO)
    return type("DebianList", (), {"list": out, "keys": keys, "unsigned": unsigned})


@contextlib.contextmanager
def overlay_of(lower: Path, work: Path):
    """A writable view of ``lower`` that never changes it: an overlayfs mount (upper
    and work directories in ``work``), or a copy where overlayfs cannot be mounted.
    Yields the merged directory; unmounted on exit."""
    merged = work / "merged"
    for sub in ("upper", "work", "merged"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}",
                        str(merged)], capture_output=True, text=True)
    if p.returncode != 0:
        merged.rmdir()
        subprocess.run(["cp", "-a", str(lower), str(merged)], check=True)
        yield merged
        return
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], capture_output=True)
        if _is_mounted(str(merged)):
            subprocess.run(["umount", "-l", str(merged)], capture_output=True)
