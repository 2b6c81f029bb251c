"""`imafs mount` / `imafs umount`: every refusal (one clear line, non-zero exit,
nothing mounted), signals, a killed daemon, foreground mode."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import IMAFS, REPO, _is_mounted, force_unmount, wait_for

pytestmark = pytest.mark.mount


def imafs(*args, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(IMAFS + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kw)


@pytest.fixture
def dirs(world_tmp):
    b, m, s = world_tmp / "backing", world_tmp / "mnt", world_tmp / "state"
    b.mkdir()
    m.mkdir()
    (b / "hello").write_text("hello")
    yield b, m, s
    force_unmount(str(m))


def refused(p: subprocess.CompletedProcess, *words: str) -> str:
    """A refusal: non-zero exit, exactly one line on stderr naming the problem."""
    assert p.returncode != 0, p
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{p.stderr}"
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    return lines[0]


def daemon_pid(mnt: Path) -> int:
    from imafs.fs import daemon
    with open(daemon._runfile(os.path.realpath(mnt))) as f:
        return int(f.read())


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def mount(b, m, s, *extra) -> None:
    p = imafs("mount", b, m, "--state", s, "--no-integrity", *extra)
    assert p.returncode == 0, p.stderr
    assert _is_mounted(str(m))


# --------------------------------------------------------------------------- refusals
def test_missing_backing(dirs):
    b, m, s = dirs
    refused(imafs("mount", b / "nope", m, "--state", s), "does not exist", "nope")
    assert not _is_mounted(str(m))


def test_backing_is_a_file(dirs):
    b, m, s = dirs
    refused(imafs("mount", b / "hello", m, "--state", s), "not a directory")


def test_missing_mountpoint(dirs):
    b, m, s = dirs
    refused(imafs("mount", b, m / "nope", "--state", s), "does not exist")


def test_mountpoint_is_a_file(dirs, world_tmp):
    b, m, s = dirs
    f = world_tmp / "file"
    f.write_text("")
    refused(imafs("mount", b, f, "--state", s), "not a directory")


def test_mountpoint_already_mounted(dirs):
    b, m, s = dirs
    subprocess.run(["mount", "-t", "tmpfs", "none", str(m)], check=True)
    try:
        refused(imafs("mount", b, m, "--state", s), "already a mount point")
    finally:
        subprocess.run(["umount", str(m)], check=True)
    mount(b, m, s)
    try:
        refused(imafs("mount", b, m, "--state", str(s) + "2"), "already a mount point")
    finally:
        assert imafs("umount", m).returncode == 0


def test_backing_inside_mountpoint(dirs):
    b, m, s = dirs
    (m / "sub").mkdir()
    refused(imafs("mount", m / "sub", m, "--state", s), "inside")
    refused(imafs("mount", m, m, "--state", s), "inside")


def test_mountpoint_inside_backing(dirs):
    b, m, s = dirs
    (b / "m").mkdir()
    refused(imafs("mount", b, b / "m", "--state", s), "inside")
    # also through a symlink
    os.symlink(b / "m", b.parent / "alias")
    refused(imafs("mount", b, b.parent / "alias", "--state", s), "inside")


def test_no_dev_fuse(dirs):
    """A real simulation: a private mount namespace whose /dev has no fuse node."""
    b, m, s = dirs
    script = (f"mount -t tmpfs none /dev && exec {sys.executable} -m imafs mount "
              f"{b} {m} --state {s} --no-integrity")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    refused(p, "/dev/fuse")
    assert not _is_mounted(str(m))


def test_state_dir_in_use(dirs, world_tmp):
    b, m, s = dirs
    mount(b, m, s)
    try:
        m2 = world_tmp / "mnt2"
        m2.mkdir()
        b2 = world_tmp / "backing2"
        b2.mkdir()
        refused(imafs("mount", b2, m2, "--state", s, "--no-integrity"), "in use")
        assert not _is_mounted(str(m2))
        f = world_tmp / "statefile"
        f.write_text("")
        refused(imafs("mount", b2, m2, "--state", f, "--no-integrity"), "not a directory")
    finally:
        assert imafs("umount", m).returncode == 0


def test_umount_refusals(dirs):
    b, m, s = dirs
    refused(imafs("umount", m), "not mounted")
    subprocess.run(["mount", "-t", "tmpfs", "none", str(m)], check=True)
    try:
        refused(imafs("umount", m), "tmpfs", "not imafs")
        assert _is_mounted(str(m))
    finally:
        subprocess.run(["umount", str(m)], check=True)


# --------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_cleanly(dirs, sig):
    b, m, s = dirs
    mount(b, m, s)
    pid = daemon_pid(m)
    assert (m / "hello").read_text() == "hello"
    fd = os.open(m / "hello", os.O_RDONLY)       # a busy mount still goes away
    try:
        os.kill(pid, sig)
        assert wait_for(lambda: not _is_mounted(str(m)), 10), "still mounted"
        assert wait_for(lambda: _gone(pid), 10), "daemon still running"
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # ENOTCONN: the daemon is gone, as after any unmount of a busy mount
    from imafs.fs import daemon
    assert not os.path.exists(daemon._runfile(os.path.realpath(m)))
    log = (s / "imafs.log").read_text()
    assert f"signal {int(sig)}: unmounting" in log and "unmounted" in log
    # the same mount point and state serve again
    mount(b, m, s)
    assert (m / "hello").read_text() == "hello"
    assert imafs("umount", m).returncode == 0
    assert not _is_mounted(str(m))


def test_killed_daemon_then_umount(dirs):
    b, m, s = dirs
    mount(b, m, s)
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: _gone(pid), 10)
    with pytest.raises(OSError):       # the dead mount: ENOTCONN
        os.listdir(m)
    time.sleep(1.2)                    # past the attribute timeout: stat(m) fails too
    with pytest.raises(OSError):
        os.stat(m)
    # mounting again without clearing it is refused with the way out in the message
    refused(imafs("mount", b, m, "--state", s, "--no-integrity"), "already a mount point",
            "imafs umount")
    p = imafs("umount", m, timeout=30)
    assert p.returncode == 0, p.stderr
    assert not _is_mounted(str(m))
    mount(b, m, s)
    assert (m / "hello").read_text() == "hello"
    assert imafs("umount", m).returncode == 0


def test_stopped_daemon_umount_does_not_hang(dirs):
    """A hung daemon (SIGSTOP) with a process blocked in a request: `imafs umount`
    still clears the mount, and the blocked process is released."""
    b, m, s = dirs
    mount(b, m, s, "--attr-timeout", "0")
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGSTOP)
    blocked = subprocess.Popen(["stat", str(m / "hello")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        p = imafs("umount", m, timeout=60)
        assert p.returncode == 0, p.stderr
        assert time.monotonic() - t0 < 20
        assert not _is_mounted(str(m))
        blocked.wait(timeout=20)
    finally:
        os.kill(pid, signal.SIGCONT) if not _gone(pid) else None
        if blocked.poll() is None:
            blocked.kill()
            blocked.wait()
    assert wait_for(lambda: _gone(pid), 10)
    mount(b, m, s)
    assert imafs("umount", m).returncode == 0


# --------------------------------------------------------------------------- the CLI
def test_module_help():
    p = imafs("--help")
    assert p.returncode == 0
    assert "mount" in p.stdout and "umount" in p.stdout
    p = imafs("mount", "--help")
    assert p.returncode == 0 and "BACKING" in p.stdout


def test_foreground(dirs):
    b, m, s = dirs
    proc = subprocess.Popen(IMAFS + ["mount", "--foreground", str(b), str(m), "--state", str(s),
                                     "--no-integrity"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _is_mounted(str(m)) or proc.poll() is not None, 30)
        assert proc.poll() is None, proc.communicate()
        assert (m / "hello").read_text() == "hello"
        (m / "new").write_text("x")
        assert (b / "new").read_text() == "x"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert not _is_mounted(str(m))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # SIGINT (Ctrl-C) too
    proc = subprocess.Popen(IMAFS + ["mount", "-f", str(b), str(m), "--state", str(s),
                                     "--no-integrity"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _is_mounted(str(m)) or proc.poll() is not None, 30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert not _is_mounted(str(m))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_foreground_refusal_is_one_line(dirs):
    b, m, s = dirs
    refused(imafs("mount", "-f", b / "nope", m, "--state", s), "does not exist")
