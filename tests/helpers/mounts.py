"""What tests share to mount, run and wait: the Mount of one imafs daemon,
unmounting whatever is left, running as another user, polling (the fixtures
that use them: tests/conftest.py)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

IMAFS = [sys.executable, "-m", "imafs"]


def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def mounts_under(under: str | Path, *, fuse_only: bool = False) -> list[str]:
    """The mount points at or under ``under`` (``fuse_only``: of FUSE file systems --
    ``fuse``, ``fuse.*``, ``fuseblk``, not fusectl's /sys/fs/fuse/connections), from
    /proc/self/mountinfo (octal escapes decoded)."""
    root = os.path.realpath(under).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            fstype = parts[parts.index("-") + 1]
            mp = os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda x: bytes([int(x.group(1), 8)]),
                                    os.fsencode(parts[4])))
            fuse = fstype in ("fuse", "fuseblk") or fstype.startswith("fuse.")
            if (mp + "/").startswith(root) and (fuse or not fuse_only):
                out.append(mp)
    return out


def force_unmount(mnt: str) -> None:
    """Unmount whatever is at mnt, even when the daemon hangs or died."""
    for cmd in (["fusermount3", "-u", mnt], ["umount", mnt], ["umount", "-l", mnt]):
        if not is_mounted(mnt):
            return
        subprocess.run(cmd, capture_output=True)
    if is_mounted(mnt):
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
        assert is_mounted(str(self.mnt))
        return self

    def stop(self) -> None:
        if is_mounted(str(self.mnt)):
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
        if is_mounted(str(merged)):
            subprocess.run(["umount", "-l", str(merged)], capture_output=True)

