"""Pid namespaces bound to integrity namespaces: the binding of a container.

A container is its pid namespace: its init, everything it forks, every pid namespace
nested in it, and whatever enters it later (``runc exec``, ``nsenter -p``: setns() to
a pid namespace moves only the children made afterwards, and only into a descendant
of the caller's own) are in it, and no process ever leaves its pid namespace. So a
pid namespace bound to an integrity namespace binds all of that, and nothing a
process in it can do -- fork twice, ``setsid``, be reparented, reuse a pid, break out
of a chroot, write a file -- takes it out (kernel/pid_namespace.c).

A process's pid namespace is ``/proc/PID/ns/pid`` (an nsfs inode, named by its
``(st_dev, st_ino)``). Its integrity namespace is the one bound to that pid
namespace or, walking up with the ``NS_GET_PARENT`` ioctl, to the nearest ancestor
pid namespace; none up to the daemon's own: the root (0).

**Inode numbers are reused.** nsfs numbers come from a small allocator, and a freed
pid namespace's number goes to the next one made. So:

- the daemon holds an open descriptor of every bound pid namespace
  (:class:`Bound`.fd): the namespace cannot be freed while it is bound, and its
  number cannot be given to another;
- a binding is dropped (its descriptor closed) only once the namespace can never
  hold a process again: when its init has exited. The kernel then kills every other
  process of it (and of the pid namespaces nested in it) and refuses to fork into it
  (zap_pid_ns_processes, disable_pid_allocation), so nothing is left to bind;
- across a remount, a binding is kept in the state (LMDB db ``pidns``) with what
  identifies its namespace for good: the boot (``/proc/sys/kernel/random/boot_id``)
  and its **init process** -- its pid, its pidfd's inode number (pidfs, Linux 6.9:
  never reused within a boot) and its start time. A mount restores a binding only
  when a process with that pid, pidfd inode and start time is alive, is the init
  (pid 1) of a pid namespace, and that namespace has the recorded inode: an init
  identifies its pid namespace (a process never changes pid namespace, and a pid
  namespace lives exactly as long as its init), so a namespace made later under a
  reused inode number is never taken for it. Otherwise the binding is dropped.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass

log = logging.getLogger("imafs.binding")

NS_GET_PARENT = 0xB702      # _IO(0xb7, 0x2), linux/nsfs.h
MAX_LEVELS = 33             # the kernel's MAX_PID_NS_LEVEL (32) below the initial one
DB = "pidns"                # the state's bindings: ns id (>I) -> JSON


class PidnsError(Exception):
    pass


def ns_key(path_or_fd) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of a namespace file (a path, following the link, or a
    descriptor)."""
    st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return (st.st_dev, st.st_ino)


def own_key() -> tuple[int, int]:
    """The daemon's own pid namespace."""
    return ns_key("/proc/self/ns/pid")


def top_key(pid: int) -> tuple[int, int] | None:
    """The pid namespace just below the daemon's that process ``pid`` is in (its own
    or an ancestor of it: the container it belongs to); the daemon's own when it is
    there; None when it cannot be read (gone, or above the daemon's)."""
    own = own_key()
    try:
        fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        key = ns_key(fd)
        for _ in range(MAX_LEVELS):
            if key == own:
                return own
            try:
                parent = fcntl.ioctl(fd, NS_GET_PARENT)
            except OSError:
                return None
            pkey = ns_key(parent)
            os.close(fd)
            fd = parent
            if pkey == own:
                return key
            key = pkey
        return None
    finally:
        os.close(fd)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def status_fields(pid: int, *names: str) -> dict[str, list[str]]:
    """Lines of /proc/PID/status (``NSpid``, ``Tgid``, ``PPid``, ...), split."""
    out: dict[str, list[str]] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in names:
                    out[k] = v.split()
    except OSError:
        pass
    return out


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started (clock ticks since boot)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2:].split()[0].decode()
    except (OSError, IndexError):
        return None


def _pidfd_alive(fd: int) -> bool:
    import signal
    try:
        signal.pidfd_send_signal(fd, 0)
    except OSError:
        return False
    return True


@dataclass
class Init:
    """The init (pid 1) of a bound pid namespace: it lives exactly as long as the
    namespace can hold processes. ``pid`` in the daemon's pid namespace, held by
    ``pidfd``; ``ino`` (the pidfd's inode: unique within a boot on pidfs) and
    ``start`` identify it across a remount."""
    pid: int
    pidfd: int
    ino: int
    start: int

    def alive(self) -> bool:
        """The init runs (a zombie init means an empty, dead namespace)."""
        if not _pidfd_alive(self.pidfd):
            return False
        st = proc_state(self.pid)
        return st is not None and st not in "ZXx" and _pidfd_alive(self.pidfd)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


@dataclass
class Bound:
    ns_id: int
    key: tuple[int, int]
    fd: int            # a descriptor of the pid namespace: it cannot be freed, nor its
    init: Init         # inode number reused, while the daemon holds it

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.init.close()


def _is_init_of(pid: int, key: tuple[int, int]) -> bool:
    try:
        if ns_key(f"/proc/{pid}/ns/pid") != key:
            return False
    except OSError:
        return False
    nspid = status_fields(pid, "NSpid").get("NSpid")
    return bool(nspid) and nspid[-1] == "1"


def find_init(pid: int, key: tuple[int, int]) -> Init:
    """The init of pid namespace ``key``, in which process ``pid`` is: ``pid`` itself
    (its thread group), an ancestor in the same namespace, or else any process of
    the machine (a process that entered the namespace with setns has its parent
    outside it). Held by a pidfd, checked again once held."""
    tgid = status_fields(pid, "Tgid").get("Tgid")
    cand = int(tgid[0]) if tgid else pid
    found = None
    for _ in range(64):
        if _is_init_of(cand, key):
            found = cand
            break
        ppid = status_fields(cand, "PPid").get("PPid")
        if not ppid or int(ppid[0]) <= 0:
            break
        cand = int(ppid[0])
        try:
            if ns_key(f"/proc/{cand}/ns/pid") != key:
                break
        except OSError:
            break
    if found is None:
        for name in os.listdir("/proc"):
            if name.isdigit() and _is_init_of(int(name), key):
                found = int(name)
                break
    if found is None:
        raise PidnsError(f"pid namespace of pid {pid} has no init (it is exiting)")
    try:
        pidfd = os.pidfd_open(found, 0)
    except OSError as e:
        raise PidnsError(f"the init of pid {pid}'s pid namespace: {e.strerror}") from None
    start = start_time(found)
    if start is None or not _is_init_of(found, key) or not _pidfd_alive(pidfd):
        os.close(pidfd)
        raise PidnsError(f"the init of pid {pid}'s pid namespace exited")
    return Init(found, pidfd, os.fstat(pidfd).st_ino, start)


class PidnsBindings:
    """The bound pid namespaces of one mount: (dev, ino) -> :class:`Bound`, kept in
    the state's LMDB (``store``, db ``pidns``) when one is given."""

    def __init__(self, store=None):
        self.store = store
        self.own = own_key()
        self._by_key: dict[tuple[int, int], Bound] = {}
        self._by_ns: dict[int, Bound] = {}
        self._lock = threading.Lock()
        if store is not None:
            self._restore()

    # --- lookups
    def bound_key(self, key: tuple[int, int]) -> int | None:
        with self._lock:
            b = self._by_key.get(key)
            return None if b is None else b.ns_id

    def ns_of_pid(self, pid: int) -> int | None:
        """The integrity namespace process ``pid``'s pid namespace is bound to (its
        own, else the nearest bound ancestor's; 0 when none up to the daemon's), or
        None when it cannot be read."""
        path = f"/proc/{pid}/ns/pid"
        try:
            key = ns_key(path)
        except OSError:
            return None
        if key == self.own:
            return 0
        with self._lock:
            if not self._by_key:
                return 0
            b = self._by_key.get(key)
            if b is not None:
                return b.ns_id
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if ns_key(fd) != key:       # another process got the pid meanwhile
                return None
            for _ in range(MAX_LEVELS):
                try:
                    parent = fcntl.ioctl(fd, NS_GET_PARENT)
                except OSError:
                    return None         # above the daemon's own: not ours to place
                os.close(fd)
                fd = parent
                key = ns_key(fd)
                if key == self.own:
                    return 0
                with self._lock:
                    b = self._by_key.get(key)
                    if b is not None:
                        return b.ns_id
            return None
        finally:
            os.close(fd)

    def own_pidns(self, pid: int) -> tuple[int, int] | None:
        """The key of ``pid``'s pid namespace if it is one a binding may take: not the
        daemon's, not bound already; else None."""
        try:
            key = ns_key(f"/proc/{pid}/ns/pid")
        except OSError:
            return None
        if key == self.own:
            return None
        with self._lock:
            if key in self._by_key:
                return None
        return key

    def has(self, ns_id: int) -> bool:
        with self._lock:
            return ns_id in self._by_ns

    def members(self, ns_id: int) -> list[int]:
        """[the init's pid] while the pid namespace bound to ``ns_id`` has processes."""
        with self._lock:
            b = self._by_ns.get(ns_id)
        if b is None or not b.init.alive():
            return []
        return [b.init.pid]

    # --- changes
    def bind(self, pid: int, key: tuple[int, int], ns_id: int) -> None:
        """Bind the pid namespace ``key`` of process ``pid`` to ``ns_id``."""
        try:
            fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise PidnsError(f"pid {pid}: {e.strerror}") from None
        try:
            if ns_key(fd) != key:
                raise PidnsError(f"pid {pid} exited")
            init = find_init(pid, key)
        except BaseException:
            os.close(fd)
            raise
        b = Bound(ns_id, key, fd, init)
        with self._lock:
            if key in self._by_key or ns_id in self._by_ns:
                b.close()
                raise PidnsError(f"pid {pid}'s pid namespace or namespace {ns_id} is "
                                 f"bound already")
            self._by_key[key] = b
            self._by_ns[ns_id] = b
        try:
            self._save(b)
        except BaseException:
            self.unbind(ns_id)
            raise
        log.info("pid namespace %d:%d (init pid %d) bound to namespace %d", key[0], key[1],
                 init.pid, ns_id)

    def unbind(self, ns_id: int) -> None:
        with self._lock:
            b = self._by_ns.pop(ns_id, None)
            if b is not None:
                self._by_key.pop(b.key, None)
        if b is not None:
            b.close()
        self._delete(ns_id)

    def sweep(self) -> list[int]:
        """Drop the bindings whose pid namespace can hold no process any more (its
        init exited); their namespace ids."""
        with self._lock:
            dead = [b for b in self._by_ns.values() if not b.init.alive()]
        for b in dead:
            self.unbind(b.ns_id)
            log.info("pid namespace %d:%d of namespace %d: its init exited, binding "
                     "dropped", b.key[0], b.key[1], b.ns_id)
        return [b.ns_id for b in dead]

    def close(self) -> None:
        """At unmount: drop dead bindings, close every descriptor (the live bindings
        stay in the state for the next mount)."""
        self.sweep()
        with self._lock:
            for b in self._by_ns.values():
                b.close()
            self._by_ns.clear()
            self._by_key.clear()

    # --- persistence
    def _save(self, b: Bound) -> None:
        if self.store is None:
            return
        rec = {"dev": b.key[0], "ino": b.key[1], "boot": boot_id(), "init": b.init.pid,
               "init_ino": b.init.ino, "init_start": b.init.start}
        with self.store.env.begin(write=True, db=self.store.db(DB)) as t:
            t.put(struct.pack(">I", b.ns_id), json.dumps(rec).encode())

    def _delete(self, ns_id: int) -> None:
        if self.store is None:
            return
        with self.store.env.begin(write=True, db=self.store.db(DB)) as t:
            t.delete(struct.pack(">I", ns_id))

    def _restore(self) -> None:
        db = self.store.db(DB)
        with self.store.env.begin(db=db) as t:
            recs = [(struct.unpack(">I", bytes(k))[0], bytes(v)) for k, v in t.cursor()]
        boot = boot_id()
        for ns_id, raw in recs:
            why = None
            try:
                rec = json.loads(raw)
                key = (int(rec["dev"]), int(rec["ino"]))
                b = self._reopen(ns_id, key, rec, boot)
            except (ValueError, KeyError, TypeError) as e:
                b, why = None, f"malformed record ({e})"
            except PidnsError as e:
                b, why = None, str(e)
            if b is None:
                log.info("namespace %d: pid namespace binding not restored: %s", ns_id, why)
                self._delete(ns_id)
                continue
            self._by_key[b.key] = b
            self._by_ns[ns_id] = b
            log.info("namespace %d: pid namespace %d:%d (init pid %d) bound again",
                     ns_id, key[0], key[1], b.init.pid)

    @staticmethod
    def _reopen(ns_id: int, key, rec: dict, boot: str) -> Bound:
        if not boot or rec.get("boot") != boot:
            raise PidnsError("recorded before the machine booted again")
        pid = int(rec["init"])
        try:
            pidfd = os.pidfd_open(pid, 0)
        except OSError:
            raise PidnsError(f"its init (pid {pid}) exited") from None
        init = Init(pid, pidfd, os.fstat(pidfd).st_ino, start_time(pid) or -1)
        try:
            if (init.ino, init.start) != (int(rec["init_ino"]), int(rec["init_start"])):
                raise PidnsError(f"its init (pid {pid}) exited; the pid is another's")
            fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            init.close()
            raise PidnsError(f"its init (pid {pid}) exited") from None
        except BaseException:
            init.close()
            raise
        b = Bound(ns_id, key, fd, init)
        if ns_key(fd) != key or not _is_init_of(pid, key) or not init.alive():
            b.close()
            raise PidnsError(f"pid {pid} is no longer the init of that pid namespace")
        return b
