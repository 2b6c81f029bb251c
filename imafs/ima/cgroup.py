"""The binding of a process that has no pid namespace of its own: a cgroup of a
private, named cgroup v1 hierarchy **that is mounted nowhere**.

Where a process is not the whole of a pid namespace -- a shell of the host, a chroot
without ``unshare --pid``, a process that ``ns-join`` moves, a second ``ns-create``
inside a container whose pid namespace is bound already -- it is bound by cgroup
membership, which the kernel copies to every child at fork (double forks,
``setsid``, reparenting, new pid, mount or user namespaces keep it; a reused pid is
a new process in whatever cgroup its parent was).

Leaving takes a write to the hierarchy's ``cgroup.procs``, which cgroup v1 allows
uid 0 without any capability. So the hierarchy (``name=imafs.<key>``, no
controllers: no container manager moves processes in it) is never attached to any
mount namespace: the daemon builds it with the new mount API (fsopen, fsconfig,
fsmount) and keeps the detached mount as a descriptor only. No path of any mount
namespace leads to it -- a container that breaks out of its chroot finds nothing --
and the descriptor is reachable only through ``/proc/DAEMON/fd``, which needs ptrace
access to the daemon: the daemon is not dumpable (``protect_daemon``), so that takes
CAP_SYS_PTRACE in the daemon's user namespace, with which one could also rewrite the
daemon's memory. Mounting the hierarchy again by its name takes CAP_SYS_ADMIN in the
initial user namespace (a user namespace with its own cgroup namespace mounts it
rooted at its own cgroup: below it a process is unknown, never above).

A cgroup path of this hierarchy in ``/proc/PID/cgroup`` is ``/`` (no namespace of
its own: 0), ``/nsN`` (namespace N), or anything else (unknown: None).

Kernels without named v1 hierarchies (``cgroup_no_v1=named``, or no cgroup v1 at
all) have no such binding: :func:`open_hierarchy` returns None, and a process
without a pid namespace of its own cannot be bound (it is refused, with the reason).
"""
from __future__ import annotations

import ctypes
import logging
import os
import time

log = logging.getLogger("imafs.binding")

# the new mount API (linux/mount.h); the syscall numbers are the same on every
# architecture (they were added after the tables were unified)
SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 430, 431, 432
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 1, 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
PR_SET_DUMPABLE = 4

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def fsmount_named(name: str) -> int:
    """A detached mount of the named v1 hierarchy ``name`` (made if it does not exist,
    joined if it does): a descriptor of its root, O_PATH-like."""
    fs = _check(_libc.syscall(SYS_FSOPEN, b"cgroup", FSOPEN_CLOEXEC), "fsopen")
    try:
        _check(_libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_FLAG, b"none", None, 0),
               "fsconfig none")
        _check(_libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, b"name",
                             name.encode(), 0), "fsconfig name")
        _check(_libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0),
               "fsconfig create")
        return _check(_libc.syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, 0), "fsmount")
    finally:
        os.close(fs)


def protect_daemon() -> None:
    """Make this process non-dumpable: /proc/PID/fd, /proc/PID/mem and ptrace of it
    then need CAP_SYS_PTRACE in its user namespace, even for a process of the same
    uid (a container's root). The detached hierarchy and the bound pid namespaces
    are held by descriptors of this process."""
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("cannot make the daemon non-dumpable: %s",
                    os.strerror(ctypes.get_errno()))


class Hierarchy:
    """The mount's named hierarchy, held by a detached mount (see the module)."""

    def __init__(self, name: str, mnt_fd: int):
        self.name = name
        self._mnt = mnt_fd
        self.fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mnt_fd)
        # the line of /proc/PID/cgroup that names this hierarchy
        self.needle = f":name={name}:".encode()

    @staticmethod
    def _dir(ns_id: int) -> str:
        return f"ns{ns_id}"

    def move(self, pid: int, ns_id: int) -> None:
        """Move process ``pid`` (its thread group) into namespace ``ns_id``'s cgroup."""
        try:
            # 0755 whatever the umask (the daemon's is 0): a namespace's cgroup is
            # nobody's to make sub-cgroups in
            os.mkdir(self._dir(ns_id), 0o755, dir_fd=self.fd)
        except FileExistsError:
            pass
        fd = os.open(f"{self._dir(ns_id)}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC,
                     dir_fd=self.fd)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)

    def move_to_root(self, pid: int) -> None:
        fd = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)

    def read(self, pid: int) -> int | None:
        """0 at the hierarchy's root, N in ``/nsN``, None: unreadable or elsewhere."""
        try:
            fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            text = os.read(fd, 1 << 16)
        except OSError:
            return None
        finally:
            os.close(fd)
        # the needle must start the line's second field ("ID:name=imafs.KEY:PATH");
        # a path of another hierarchy may contain it too
        needle = self.needle
        i = text.find(needle)
        while i >= 0:
            head = text[text.rfind(b"\n", 0, i) + 1:i]
            if head.isdigit():
                break
            i = text.find(needle, i + 1)
        if i < 0:
            return None
        end = text.find(b"\n", i)
        path = text[i + len(needle):end if end >= 0 else len(text)]
        if path == b"/":
            return 0
        if path.startswith(b"/ns") and path[3:].isdigit() and path[3:4] != b"0":
            return int(path[3:])
        return None

    def members(self, ns_id: int) -> list[int]:
        try:
            fd = os.open(f"{self._dir(ns_id)}/cgroup.procs", os.O_RDONLY | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except OSError:
            return []
        try:
            data = b""
            while chunk := os.read(fd, 1 << 16):
                data += chunk
        finally:
            os.close(fd)
        return [int(x) for x in data.split()]

    def remove(self, ns_id: int) -> None:
        """Remove the namespace's cgroup (OSError EBUSY while it has processes)."""
        try:
            os.rmdir(self._dir(ns_id), dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def close(self, wait: float = 0.0) -> list[int]:
        """At unmount: remove the empty namespace cgroups (waiting up to ``wait``
        seconds for exiting processes) and drop the detached mount; returns the ids of
        namespaces that still have processes (their cgroups, and so the hierarchy,
        live on unmounted until the next mount of the same state joins them again)."""
        deadline = time.monotonic() + wait
        while True:
            busy = []
            try:
                names = self.names()
            except OSError:
                names = []
            for n in names:
                if not (n.startswith("ns") and n[2:].isdigit()):
                    continue
                try:
                    os.rmdir(n, dir_fd=self.fd)
                except FileNotFoundError:
                    pass
                except OSError:
                    busy.append(int(n[2:]))
            if not busy or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        os.close(self.fd)
        os.close(self._mnt)
        self.fd = self._mnt = -1
        if not busy:
            # A removed cgroup is released after an RCU grace period; a hierarchy
            # whose last mount goes before that is never destroyed. Mounting it again
            # once the removed cgroups are gone, then dropping that mount, destroys
            # it. A grace period can take a while on a loaded machine: up to 2 s.
            deadline = time.monotonic() + 2.0
            pause = 0.02
            while self.exists() and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
                try:
                    os.close(fsmount_named(self.name))
                except OSError:
                    break
        return busy

    def exists(self) -> bool:
        """Whether the kernel still has this hierarchy (it names it for every process)."""
        try:
            with open("/proc/self/cgroup", "rb") as f:
                return self.needle in f.read()
        except OSError:
            return False


def open_hierarchy(name: str) -> Hierarchy | None:
    """The hierarchy ``name`` as a detached mount, or None where the kernel has no
    named cgroup v1 hierarchies (logged)."""
    try:
        mfd = fsmount_named(name)
    except OSError as e:
        log.warning("no private cgroup hierarchy (%s): only processes with a pid "
                    "namespace of their own can be bound to integrity namespaces", e)
        return None
    try:
        return Hierarchy(name, mfd)
    except OSError as e:
        os.close(mfd)
        log.warning("cgroup hierarchy %s: %s", name, e)
        return None


__all__ = ["Hierarchy", "open_hierarchy", "protect_daemon", "fsmount_named"]
