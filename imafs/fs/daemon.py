"""Mounting: argument checks, the daemon's life (background or foreground), clean
unmount on SIGTERM/SIGINT, and ``imafs umount``.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import math
import os
import signal
import subprocess
from stat import S_ISDIR as stat_isdir
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("imafs")

DEFAULT_STATE_ROOT = "/var/lib/imafs"


class MountError(Exception):
    """A refusal before anything was mounted; the message is one line for the user."""


@dataclass
class MountOptions:
    backing: str
    mountpoint: str
    state: str | None = None
    foreground: bool = False
    log_file: str | None = None
    log_level: str = "info"
    allow_other: bool = True
    read_only: bool = False            # -o ro: MS_RDONLY, every change EROFS
    policy: str | None = None          # file path, "tcb", "appraise_tcb" or None
    control_name: str = ".imafs"
    integrity: bool = True             # False: plain passthrough (benchmarks)
    attr_timeout: float = 1.0
    extra: dict = field(default_factory=dict)  # options of later layers (engine)


def _unescape(p: bytes) -> str:
    return os.fsdecode(p.replace(b"\\040", b" ").replace(b"\\011", b"\t")
                       .replace(b"\\012", b"\n").replace(b"\\134", b"\\"))


def _mountinfo() -> list[dict]:
    """/proc/self/mountinfo: mount point, device (major:minor), fs type, source."""
    out = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                parts = line.rstrip(b"\n").split(b" ")
                sep = parts.index(b"-")
                out.append({"mnt": _unescape(parts[4]), "dev": parts[2].decode(),
                            "fstype": parts[sep + 1].decode(),
                            "source": _unescape(parts[sep + 2])})
    except (OSError, ValueError, IndexError):
        pass
    return out


def mountinfo_points() -> set[str]:
    return {m["mnt"] for m in _mountinfo()}


def resolve_mountpoint(path: str) -> str:
    """The absolute, symlink-free path of a (would-be) mount point, found without
    stat()ing the mount point itself: on a hung or dead FUSE mount that blocks or
    fails (ENOTCONN)."""
    parent, name = os.path.split(os.path.abspath(path))
    if name in ("", ".", ".."):
        return os.path.realpath(path)
    candidate = os.path.join(os.path.realpath(parent), name)
    if candidate in mountinfo_points():
        return candidate
    return os.path.realpath(candidate)


def default_state_dir(backing: str) -> str:
    h = hashlib.sha256(os.fsencode(os.path.realpath(backing))).hexdigest()[:16]
    return os.path.join(DEFAULT_STATE_ROOT, h)


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _inside_by_inode(child: str, parent: str) -> bool:
    """Whether child (an absolute, symlink-free path) or one of its ancestors is the
    directory parent itself, by (st_dev, st_ino): a bind mount shows one directory
    at several paths, so comparing paths misses that MNT lies inside BACKING."""
    try:
        st = os.stat(parent)
    except OSError:
        return False
    want = (st.st_dev, st.st_ino)
    p = child
    while True:
        try:
            st = os.stat(p)
            if (st.st_dev, st.st_ino) == want:
                return True
        except OSError:
            pass
        up = os.path.dirname(p)
        if up == p:
            return False
        p = up


def check_mount_args(opts: MountOptions) -> None:
    """Refuse, with one clear line, anything that cannot or must not be mounted."""
    # first, without touching it: a dead FUSE mount fails every stat (ENOTCONN)
    if resolve_mountpoint(opts.mountpoint) in mountinfo_points():
        raise MountError(f"mount point {opts.mountpoint!r} is already a mount point "
                         f"(imafs umount {opts.mountpoint} first)")
    for what, path in (("backing directory", opts.backing), ("mount point", opts.mountpoint)):
        if not os.path.lexists(path):
            raise MountError(f"{what} {path!r} does not exist")
        if not os.path.isdir(path):
            raise MountError(f"{what} {path!r} is not a directory")
    backing = os.path.realpath(opts.backing)
    mnt = os.path.realpath(opts.mountpoint)
    if mnt in mountinfo_points() or os.path.ismount(mnt):
        raise MountError(f"mount point {opts.mountpoint!r} is already a mount point "
                         f"(imafs umount {opts.mountpoint} first)")
    if _inside(backing, mnt):
        raise MountError(f"backing directory {opts.backing!r} is inside the mount point "
                         f"{opts.mountpoint!r}")
    if _inside(mnt, backing):
        raise MountError(f"mount point {opts.mountpoint!r} is inside the backing directory "
                         f"{opts.backing!r}")
    # the same through bind mounts: the daemon would serve its own mount (and wait on
    # itself at the first lookup that crosses it)
    if _inside_by_inode(backing, mnt):
        raise MountError(f"backing directory {opts.backing!r} is inside the mount point "
                         f"{opts.mountpoint!r} (the same directory, through a bind mount)")
    if _inside_by_inode(mnt, backing):
        raise MountError(f"mount point {opts.mountpoint!r} is inside the backing directory "
                         f"{opts.backing!r} (the same directory, through a bind mount)")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing (load the fuse module or run with --device /dev/fuse)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        raise MountError(f"cannot open /dev/fuse: {e.strerror}")
    if opts.state is not None and os.path.exists(opts.state) and not os.path.isdir(opts.state):
        raise MountError(f"state {opts.state!r} is not a directory")
    if "/" in opts.control_name or opts.control_name in ("", ".", ".."):
        raise MountError(f"control name {opts.control_name!r} must be a single file name")
    if opts.integrity and os.path.lexists(os.path.join(backing, opts.control_name)):
        raise MountError(f"the backing directory has a {opts.control_name!r} of its own, which "
                         f"the control directory would hide; choose another --control-name")
    t = opts.attr_timeout
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise MountError(f"--attr-timeout {t!r}: must be a number of seconds >= 0")


def check_log_file(path: str) -> None:
    """Refuse a log file that cannot be opened for appending (before the daemon
    detaches: afterwards nobody would see why it failed)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as e:
        raise MountError(f"cannot open log file {path!r}: {e.strerror}")


def setup_logging(level: str, log_file: str | None) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise MountError(f"unknown log level {level!r} (debug, info, warning, error)")
    from imafs.logutil import PrintableLogFilter
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(name)s %(levelname)s: %(message)s"))
    # file names and what processes write to control files are quoted in log lines:
    # escaped, so that none can forge a line (a newline in a name) or be unwritable
    handler.addFilter(PrintableLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


class StateLock:
    """An exclusive lock on the state directory, held for the daemon's life."""

    def __init__(self, state: str):
        try:
            os.makedirs(state, mode=0o700, exist_ok=True)
            self.path = os.path.join(state, "daemon.lock")
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise MountError(f"cannot use state directory {state!r}: {e.strerror}")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(self.fd, 32, 0).decode().strip()
            except OSError:
                pid = "?"
            os.close(self.fd)
            raise MountError(f"state directory {state!r} is in use by imafs daemon pid {pid}")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def update_pid(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)


def fuse_options(opts: MountOptions) -> set[str]:
    o = {"fsname=imafs", "subtype=imafs", "default_permissions"}
    if opts.allow_other:
        o.add("allow_other")
    if opts.read_only:
        # libfuse's fuse_mount turns "ro" into MS_RDONLY: the VFS refuses every change
        # (mnt_want_write), control files included, and FUSE no longer drops the
        # cached attributes after each read (fuse_invalidate_atime: not on IS_RDONLY)
        o.add("ro")
    if os.geteuid() == 0:
        # a container rootfs has set-uid programs and device nodes
        o.update({"suid", "dev"})
    return o


def mount(opts: MountOptions) -> int:
    """Mount; in the background unless ``foreground``. Returns an exit status once
    the mount is ready (background) or unmounted (foreground)."""
    check_mount_args(opts)
    if opts.state is None:
        opts.state = default_state_dir(opts.backing)
    if not opts.foreground and opts.log_file is None:
        opts.log_file = os.path.join(opts.state, "imafs.log")
    lock = StateLock(opts.state)
    if opts.log_file is not None:
        try:
            check_log_file(opts.log_file)
        except MountError:
            os.close(lock.fd)
            raise
    if opts.foreground:
        return _serve(opts, lock, None)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        os.setsid()
        code = 1
        try:
            lock.update_pid()
            code = _serve(opts, lock, w)
        except BaseException as e:  # report, never raise into the forked copy of main
            _report(w, f"error: {e}")
        finally:
            os._exit(code)
    os.close(w)
    msg = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        msg += chunk
    os.close(r)
    os.close(lock.fd)  # the daemon keeps its own copy of the locked descriptor
    text = msg.decode(errors="replace").strip()
    if text == "ok":
        return 0
    print(f"imafs mount: {text.removeprefix('error: ') or 'the daemon exited before mounting'}",
          file=sys.stderr)
    return 1


def _report(fd, text: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, text.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def _serve(opts: MountOptions, lock: StateLock, ready_fd) -> int:
    import pyfuse3
    import trio

    from imafs import assemble
    from imafs.fs import sysio

    setup_logging(opts.log_level, opts.log_file)
    os.umask(0)  # modes of new files come from the caller's request, not from us
    sysio.raise_nofile_limit()
    try:
        fs = assemble.build(opts)
    except Exception as e:
        log.error("cannot start: %s", e)
        if ready_fd is None:
            print(f"imafs mount: {e}", file=sys.stderr)
        _report(ready_fd, f"error: {e}")
        return 1
    # resolve before mounting: afterwards a lookup would wait on this very daemon
    mnt_real = os.path.realpath(opts.mountpoint)
    # the control socket (imafs/ctl/server.py): listening before the mount is
    # reported ready, so a runtime's hook right after `imafs mount` finds it
    ctl = None
    if fs.host is not None:
        from imafs.ctl import server as ctl_server
        try:
            ctl = ctl_server.listen(opts.state)
        except OSError as e:
            log.error("no control socket in %s: %s (imafs ns and imafs oci-hook will not "
                      "reach this mount)", opts.state, e.strerror or e)
    try:
        pyfuse3.init(fs.ops, mnt_real, fuse_options(opts))
    except Exception as e:
        if ctl is not None:
            _close_socket(ctl, opts.state)
        fs.close()
        msg = f"cannot mount {opts.mountpoint}: {e}"
        log.error(msg)
        if ready_fd is None:
            print(f"imafs mount: {msg}", file=sys.stderr)
        _report(ready_fd, f"error: {msg}")
        return 1
    info = {"mountpoint": mnt_real, "dev": _mount_dev(mnt_real), "pid": os.getpid(),
            "state": os.path.realpath(opts.state)}
    if ctl is not None:
        info["socket"] = os.path.join(info["state"], "control.sock")
    _register_daemon(mnt_real, info)
    log.info("mounted %s on %s (state %s, integrity %s)", opts.backing, opts.mountpoint,
             opts.state, "on" if opts.integrity else "off")
    if ready_fd is not None:
        _report(ready_fd, "ok")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    async def main():
        async with trio.open_nursery() as nursery:
            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGHUP) as sigs:
                    async for sig in sigs:
                        log.info("signal %d: unmounting", sig)
                        pyfuse3.terminate()
                        return
            nursery.start_soon(on_signal)
            if ctl is not None:
                from imafs.ctl import server as ctl_server
                srv = ctl_server.Server(ctl, ctl_server.Handlers(
                    fs.host, info, getattr(fs, "lists", None)))
                nursery.start_soon(srv.serve)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()

    code = 0
    try:
        trio.run(main)
    except BaseException as e:  # noqa: BLE001 - a crash must still unmount
        log.exception("daemon failed: %s", e)
        code = 1
    finally:
        try:
            pyfuse3.close(unmount=True)
        except Exception as e:
            log.warning("unmount at exit: %s", e)
        if ctl is not None:
            _close_socket(ctl, opts.state)
        fs.close()
        _unregister_daemon(mnt_real)
        log.info("unmounted %s", opts.mountpoint)
    return code


def _close_socket(sock, state: str) -> None:
    """Close the control socket and remove its file (this daemon holds the state's
    lock until it exits: no other daemon made a socket there meanwhile)."""
    try:
        os.unlink(os.path.join(state, "control.sock"))
    except OSError:
        pass
    sock.close()


def _mount_dev(mnt: str) -> str:
    """major:minor of the (topmost) mount at mnt, from mountinfo: what identifies this
    mount to a client of the control socket (stat() of the mount point would wait on
    this daemon before its loop runs)."""
    m = _fuse_mount_of(mnt)
    return m["dev"] if m else ""


def daemon_pid(state: str) -> int | None:
    try:
        with open(os.path.join(state, "daemon.lock")) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _fuse_mount_of(mnt: str) -> dict | None:
    """The /proc/self/mountinfo entry of the (topmost) mount at mnt, if any."""
    found = None
    for m in _mountinfo():
        if m["mnt"] == mnt:
            found = m
    return found


def umount(mountpoint: str, *, timeout: float = 10.0, lazy: bool = False) -> int:
    mnt = resolve_mountpoint(mountpoint)
    info = _fuse_mount_of(mnt)
    if info is None:
        print(f"imafs umount: {mountpoint!r} is not mounted", file=sys.stderr)
        return 1
    if not info["fstype"].startswith("fuse"):
        print(f"imafs umount: {mountpoint!r} is a {info['fstype']} mount, not imafs",
              file=sys.stderr)
        return 1
    # the daemon exits when its mount goes away; find it to wait for it
    pid = _daemon_of(mnt)
    if os.geteuid() == 0:
        err = _umount_as_root(mnt, info, pid, lazy)
    else:
        err = _umount_with_fusermount(mnt, lazy)
    if err is not None:
        print(f"imafs umount: cannot unmount {mountpoint!r}: {err}", file=sys.stderr)
        return 1
    if pid:
        # a stopped daemon exits only once continued: do not wait for it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid) and not _stopped(pid):
            time.sleep(0.01)
    return 0


def _umount_as_root(mnt: str, info: dict, pid: int | None, lazy: bool) -> str | None:
    """umount2() directly: umount(8) and fusermount3 stat the mount point first,
    which blocks for ever on a hung daemon. A stopped daemon's connection is
    aborted first, so that processes blocked in its requests are released (they get
    ENOTCONN) and nothing waits on it. A busy mount is detached lazily."""
    from imafs.fs import sysio
    if pid is not None and _alive(pid) and _stopped(pid):
        _abort_connection(info["dev"])
    try:
        sysio.umount2(mnt, sysio.MNT_DETACH if lazy else 0)
        return None
    except OSError as e:
        if e.errno != errno.EBUSY:
            return e.strerror
    try:
        sysio.umount2(mnt, sysio.MNT_DETACH)   # busy: gone from the tree now, the
        return None                             # daemon ends with its last user
    except OSError as e:
        return e.strerror


def _umount_with_fusermount(mnt: str, lazy: bool) -> str | None:
    last = ""
    for cmd in ([] if lazy else [["fusermount3", "-u", mnt]]) + [["fusermount3", "-u", "-z", mnt]]:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            return "fusermount3 is not installed"
        if p.returncode == 0:
            return None
        last = (p.stderr or p.stdout).strip()
    return last


FUSECTL = "/sys/fs/fuse/connections"


def _abort_connection(dev: str) -> None:
    """Abort the FUSE connection of device "0:minor" through fusectl."""
    minor = dev.split(":")[1]
    if not os.path.isdir(os.path.join(FUSECTL, minor)):
        subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], capture_output=True)
    try:
        with open(os.path.join(FUSECTL, minor, "abort"), "w") as f:
            f.write("1")
    except OSError as e:
        log.warning("cannot abort FUSE connection %s: %s", minor, e)


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


def _alive(pid: int) -> bool:
    """True while pid runs. A daemon that has exited but is not reaped yet (its
    parent, often a container's init, reaps when it pleases) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


RUN_DIR = "/run/imafs"


def _runfile(mnt: str) -> str:
    return os.path.join(RUN_DIR, hashlib.sha256(os.fsencode(mnt)).hexdigest()[:24] + ".pid")


def _run_dir() -> None:
    """/run/imafs, root's and writable by root alone (clients trust what it holds); a
    directory an older imafs left mode 0777 (made under umask 0) is made 0755."""
    try:
        os.mkdir(RUN_DIR, 0o755)
    except FileExistsError:
        pass
    st = os.lstat(RUN_DIR)
    if not stat_isdir(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{RUN_DIR} is not a directory")
    if st.st_uid == os.geteuid() == 0 and st.st_mode & 0o022:
        os.chmod(RUN_DIR, 0o755)


def _infofile(mnt: str) -> str:
    return _runfile(mnt)[:-len(".pid")] + ".json"


def mount_record(mnt: str) -> dict | None:
    """What the daemon of mount point ``mnt`` (absolute, resolved) recorded under
    /run/imafs: pid, mountpoint, dev, state, socket (None: no record)."""
    import json
    try:
        with open(_infofile(mnt)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _register_daemon(mnt: str, info: dict | None = None) -> None:
    import json
    try:
        _run_dir()
        # explicit modes: the daemon runs with umask 0 (open(..., "w") made them 0666)
        for path, data in ((_runfile(mnt), f"{os.getpid()}\n"),
                           (_infofile(mnt), json.dumps(info) if info is not None else None)):
            if data is None:
                continue
            tmp = f"{path}.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, data.encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot record daemon pid: %s", e)


def _unregister_daemon(mnt: str) -> None:
    # only our own record: a daemon that was stopped, cut off and replaced by a new
    # mount on the same mount point must not remove its successor's
    try:
        with open(_runfile(mnt)) as f:
            if int(f.read().strip()) != os.getpid():
                return
        os.unlink(_runfile(mnt))
        os.unlink(_infofile(mnt))
    except (OSError, ValueError):
        pass


def _daemon_of(mnt: str) -> int | None:
    """pid of the daemon serving mnt, from the file it writes under /run/imafs
    (None when that process is gone or is no imafs daemon: a reused pid)."""
    try:
        with open(_runfile(mnt)) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"imafs" not in f.read():
                return None
        return pid
    except (OSError, ValueError):
        return None


__all__ = ["MountError", "MountOptions", "mount", "umount", "check_mount_args",
           "default_state_dir", "errno"]
