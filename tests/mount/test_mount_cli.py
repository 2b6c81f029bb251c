"""`imafs mount` / `imafs umount`: every refusal (one clear line, non-zero exit,
nothing mounted), signals, a killed daemon, foreground mode."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO, is_mounted, force_unmount, wait_for

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
    assert is_mounted(str(m))


# --------------------------------------------------------------------------- refusals
def test_missing_backing(dirs):
    b, m, s = dirs
    refused(imafs("mount", b / "nope", m, "--state", s), "does not exist", "nope")
    assert not is_mounted(str(m))


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


def test_control_name_taken_in_the_backing_tree(dirs):
    """The control directory would hide a backing entry of the same name."""
    b, m, s = dirs
    (b / ".imafs").mkdir()
    refused(imafs("mount", b, m, "--state", s), ".imafs", "--control-name")
    refused(imafs("mount", b, m, "--state", s, "--control-name", "hello"), "hello")
    p = imafs("mount", b, m, "--state", s, "--control-name", "ctl")
    assert p.returncode == 0, p.stderr
    try:
        assert os.path.isdir(m / ".imafs") and (m / "ctl" / "policy").exists()
    finally:
        imafs("umount", m)


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
    assert not is_mounted(str(m))


def test_state_dir_in_use(dirs, world_tmp):
    b, m, s = dirs
    mount(b, m, s)
    try:
        m2 = world_tmp / "mnt2"
        m2.mkdir()
        b2 = world_tmp / "backing2"
        b2.mkdir()
        refused(imafs("mount", b2, m2, "--state", s, "--no-integrity"), "in use")
        assert not is_mounted(str(m2))
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
        assert is_mounted(str(m))
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
        assert wait_for(lambda: not is_mounted(str(m)), 10), "still mounted"
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
    assert not is_mounted(str(m))


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
    assert not is_mounted(str(m))
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
        assert not is_mounted(str(m))
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
        assert wait_for(lambda: is_mounted(str(m)) or proc.poll() is not None, 30)
        assert proc.poll() is None, proc.communicate()
        assert (m / "hello").read_text() == "hello"
        (m / "new").write_text("x")
        assert (b / "new").read_text() == "x"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert not is_mounted(str(m))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # SIGINT (Ctrl-C) too
    proc = subprocess.Popen(IMAFS + ["mount", "-f", str(b), str(m), "--state", str(s),
                                     "--no-integrity"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: is_mounted(str(m)) or proc.poll() is not None, 30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert not is_mounted(str(m))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_foreground_refusal_is_one_line(dirs):
    b, m, s = dirs
    refused(imafs("mount", "-f", b / "nope", m, "--state", s), "does not exist")


# --------------------------------------------------------------------------- more refusals
def test_state_uncreatable(dirs, world_tmp):
    """A --state that cannot be made is one line naming it, exit 2, no traceback."""
    b, m, s = dirs
    f = world_tmp / "afile"
    f.write_text("")
    for state in ("/proc/imafs-no-such-dir", f / "sub", "/proc/imafs-no/such/dir"):
        line = refused(imafs("mount", b, m, "--state", state, "--no-integrity"), str(state),
                       "state")
        assert imafs("mount", b, m, "--state", state, "--no-integrity").returncode == 2, line
        assert not is_mounted(str(m))
    # in the foreground too
    refused(imafs("mount", "-f", b, m, "--state", f / "sub", "--no-integrity"), "state")


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan", "inf"])
def test_attr_timeout_refused(dirs, value):
    b, m, s = dirs
    p = imafs("mount", b, m, "--state", s, "--no-integrity", "--attr-timeout", value)
    refused(p, "--attr-timeout", value)
    assert p.returncode == 2
    assert not is_mounted(str(m))


def test_attr_timeout_zero_accepted(dirs):
    b, m, s = dirs
    mount(b, m, s, "--attr-timeout", "0")
    try:
        assert (m / "hello").read_text() == "hello"
    finally:
        assert imafs("umount", m).returncode == 0


def test_log_file_unwritable(dirs, world_tmp):
    """An unwritable --log-file is refused before the daemon detaches (it would have
    no way left to say why it failed): one line, exit 2, nothing mounted."""
    b, m, s = dirs
    f = world_tmp / "afile"
    f.write_text("")
    for log in ("/proc/imafs-no-such-dir/log", f / "x", world_tmp):   # a directory too
        for fg in ([], ["-f"]):
            p = imafs("mount", *fg, b, m, "--state", s, "--no-integrity", "--log-file", log)
            refused(p, str(log), "log file")
            assert p.returncode == 2
            assert not is_mounted(str(m))
    # the state lock was given back: the same --state mounts at once
    mount(b, m, s)
    assert imafs("umount", m).returncode == 0


def _shared_bind_script(t: Path, s: Path, runs) -> str:
    """A shell script for a private mount namespace: a shared tmpfs at t holding
    b/sub, with t/alias a bind mount of t/b; then `imafs mount -f` per run (each
    killed after 10 s: a mount that was accepted serves, or hangs on itself)."""
    lines = [
        "set -e",
        f"mount -t tmpfs none {t}",
        f"mount --make-shared {t}",
        f"mkdir -p {t}/b/sub {t}/alias",
        f"mount --bind {t}/b {t}/alias",
        "set +e",
    ]
    for backing, mnt in runs:
        lines.append(f"timeout -s KILL 10 {sys.executable} -m imafs mount -f {backing} {mnt} "
                     f"--state {s} --no-integrity; echo \"rc=$?\"")
    return "\n".join(lines) + "\n"


def test_nesting_through_a_bind_mount(world_tmp):
    """MNT inside BACKING (or BACKING inside MNT) by another path, through a bind
    mount: compared by inode, refused. Accepted, the daemon would serve its own
    mount (a lookup of its root's "sub" lands on itself, and waits for ever). In a
    mount namespace of its own (`unshare -m`): nothing leaks."""
    t, s = world_tmp / "t", world_tmp / "state"
    t.mkdir()
    runs = [(t / "b", t / "alias/sub"),       # MNT inside BACKING
            (t / "alias/sub", t / "b"),       # BACKING inside MNT
            (t / "alias", t / "b/sub")]
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        _shared_bind_script(t, s, runs)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["rc=2"] * 3, (p.stdout, p.stderr)
    errs = p.stderr.strip().splitlines()
    assert len(errs) == 3, p.stderr
    assert "mount point" in errs[0] and "inside the backing directory" in errs[0]
    assert "backing directory" in errs[1] and "inside the mount point" in errs[1]
    assert "inside the backing directory" in errs[2]
    assert all("bind mount" in e and "Traceback" not in e for e in errs)
    assert not any(str(t) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_default_state_location(dirs):
    """Without --state, the state lives in /var/lib/imafs/<first 16 hex digits of
    the sha256 of BACKING's real path>: the lock, the log, the LMDB."""
    import hashlib
    import shutil
    b, m, s = dirs
    root = Path("/var/lib/imafs")
    existed = root.exists()
    state = root / hashlib.sha256(os.fsencode(os.path.realpath(b))).hexdigest()[:16]
    assert not state.exists()
    try:
        p = imafs("mount", b, m)
        assert p.returncode == 0, p.stderr
        assert (m / "hello").read_text() == "hello"
        assert (state / "daemon.lock").is_file()
        assert (state / "imafs.log").is_file() and "mounted" in (state / "imafs.log").read_text()
        assert (state / "lmdb").is_dir()
        assert int((state / "daemon.lock").read_text()) == daemon_pid(m)
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        # a second mount of the same backing finds the same state in use
        m2 = b.parent / "mnt2"
        m2.mkdir()
        refused(imafs("mount", b, m2), "in use", str(state))
    finally:
        if is_mounted(str(m)):
            imafs("umount", m)
        force_unmount(str(m))
        shutil.rmtree(state, ignore_errors=True)
        if not existed:
            with contextlib.suppress(OSError):
                root.rmdir()


def test_noallow_other(dirs):
    """-o noallow_other: only the mounting user (root here) may use the mount; any
    other uid gets EACCES, even where the modes allow. The default lets them in."""
    b, m, s = dirs
    (b / "hello").chmod(0o644)
    os.chmod(b, 0o755)
    code = ("import os, sys\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n        os.stat(p); print(open(p).read() if os.path.isfile(p) else 'dir')\n"
            "    except OSError as e:\n        print(errno.errorcode[e.errno])\n")
    as_user = ["setpriv", "--reuid", "4001", "--regid", "4001", "--clear-groups",
               sys.executable, "-c", "import errno\n" + code, str(m / "hello"), str(m)]
    mount(b, m, s, "-o", "noallow_other")
    try:
        assert (m / "hello").read_text() == "hello"          # the mounting user: yes
        p = subprocess.run(as_user, capture_output=True, text=True)
        assert p.stdout.split() == ["EACCES", "EACCES"], p
    finally:
        assert imafs("umount", m).returncode == 0
    mount(b, m, s)
    try:
        p = subprocess.run(as_user, capture_output=True, text=True)
        assert p.stdout.split() == ["hello", "dir"], p
    finally:
        assert imafs("umount", m).returncode == 0
