"""What tests share to mount, run and wait: the Mount of one imafs daemon,
unmounting whatever is left, running as another user, polling (the fixtures
that use them: tests/conftest.py)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

IMAFS = [sys.executable, "-m", "imafs"]

# finding and unmounting mounts, one implementation with the bench's (which must run
# without tests/): scripts/benchlib/mounts.py
if str(REPO / "scripts") not in sys.path:
    sys.path.append(str(REPO / "scripts"))
from benchlib.mounts import force_unmount, is_mounted, mounts_under  # noqa: E402,F401


def _is_daemon(pid: int) -> bool:
    """Whether ``pid`` is still a live imafs daemon (a zombie reads an empty cmdline)."""
    try:
        return b"imafs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


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
        try:
            pid = self.pid()
        except (OSError, ValueError):
            pid = None
        if is_mounted(str(self.mnt)):
            subprocess.run(IMAFS + ["umount", str(self.mnt)], capture_output=True, timeout=60,
                           cwd=REPO)
        force_unmount(str(self.mnt))
        if pid is not None:
            # `imafs umount` waits for the daemon 10 s at most; a restart on the same
            # --state before it has exited would find the state in use
            wait_for(lambda: not _is_daemon(pid), 30, 0.05)

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
        """Write ``path`` (or a request such as ``exec PATH``) to the control file
        ``query`` and read back its JSON answer through the same descriptor, as the
        interface asks."""
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


def wait_for(pred, timeout=30.0, interval=0.02):
    """Poll ``pred`` until it is true or ``timeout`` has passed; its last value. Only
    for waiting on something expected to happen (the time costs nothing then): a
    loaded two-CPU CI machine needs the generous default."""
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

