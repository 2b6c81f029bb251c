"""Mounting and unmounting: an imafs mount and a mount by libfuse's C passthrough_ll,
each always unmounted and its daemon always waited for (or ended), and the last
resorts for a mount whose daemon hangs or died. ``prefix`` is an argv the daemon's
command runs under (``taskset -c 0`` for a pinned mode): the daemon and every thread
it starts inherit it.

``is_mounted``, ``mounts_under`` and ``force_unmount`` are the tests' too
(tests/helpers/mounts.py imports them from here, so that the bench needs nothing from
tests/ and runs on its own)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from benchlib import IMAFS, REPO, env
from benchlib.passthrough_c import command as passthrough_ll_command


class MountFailed(Exception):
    pass


def is_mounted(path) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def mounts_under(under, *, fuse_only: bool = False) -> list[str]:
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive (the daemon's parent, our mount command, is gone: init reaps)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def end_process(pid: int | None) -> None:
    """Wait for a daemon this run started to end after its unmount; one that outlives
    its mount is ended by its pid (TERM, then KILL)."""
    if not pid:
        return
    for sig, wait in ((None, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.02)
        if not _alive(pid):
            return


def daemon_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system, every thread) the daemon ``pid`` used so far: read
    around a timed run, less sensitive to other load than its wall time."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon_pid(state: Path) -> int | None:
    try:
        return int((state / "daemon.lock").read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


class ImafsMount:
    """One imafs mount of ``backing`` at ``mnt``; always unmounted by stop()."""

    def __init__(self, backing: Path, mnt: Path, state: Path, log: Path, args: list[str],
                 prefix: list[str] = ()):
        self.backing, self.mnt, self.state, self.log, self.args = backing, mnt, state, log, args
        self.prefix = list(prefix)
        self.pid: int | None = None

    def start(self) -> None:
        cmd = self.prefix + IMAFS + ["mount", str(self.backing), str(self.mnt), "--state", str(self.state),
                       "--log-file", str(self.log)] + self.args
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO,
                               env=env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            self.pid = _daemon_pid(self.state)
            self.stop()
            raise MountFailed("imafs mount timed out after 60 s")
        self.pid = _daemon_pid(self.state)
        if p.returncode != 0 or not is_mounted(self.mnt):
            self.stop()
            why = (p.stderr or p.stdout).strip().splitlines()
            reason = why[-1] if why else f"exit status {p.returncode}"
            raise MountFailed(reason.removeprefix("imafs mount: ").strip())

    def daemon_pid(self) -> int | None:
        return self.pid

    def stop(self) -> None:
        try:
            if is_mounted(self.mnt):
                subprocess.run(IMAFS + ["umount", str(self.mnt)], capture_output=True,
                               timeout=60, cwd=REPO, env=env())
        except subprocess.TimeoutExpired:
            pass
        finally:
            force_unmount(str(self.mnt))
        # the daemon holds the state lock a warm remount needs
        end_process(self.pid)
        self.pid = None


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class CPassthroughMount:
    """One mount of ``backing`` at ``mnt`` by libfuse's passthrough_ll (``binary``),
    run in the foreground as this process's child; always unmounted by stop()."""

    def __init__(self, binary: Path, backing: Path, mnt: Path, log: Path,
                 prefix: list[str] = ()):
        self.cmd = list(prefix) + passthrough_ll_command(binary, backing, mnt)
        self.mnt, self.log = mnt, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mnt):
            rc = self.proc.poll()
            if rc is not None or time.monotonic() > deadline:
                self.stop()
                why = f"exit status {rc}" if rc is not None else f"not mounted after {timeout:g} s"
                raise MountFailed(f"passthrough_ll: {why}: {_tail(self.log)}")
            time.sleep(0.005)

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        try:
            if is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True,
                               timeout=30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            force_unmount(str(self.mnt))
        if self.proc is not None:
            end_process(self.proc.pid)   # it leaves its loop once unmounted
            self.proc.wait()
            self.proc = None
