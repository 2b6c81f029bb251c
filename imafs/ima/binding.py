"""Which integrity namespace a process is in, and how it is bound there.

Two bindings, each out of the reach of the processes it binds (docs/namespaces.md,
"How a process is bound"):

- **its pid namespace** (imafs/ima/pidns.py): a container's integrity namespace follows
  its pid namespace -- its init, everything forked in it, pid namespaces nested in it,
  and whatever enters it later (``runc exec``, ``nsenter -p``). No process leaves its
  pid namespace. Used wherever the process to bind has a pid namespace of its own: not
  the daemon's, not bound already (a container's init bound by the host; ``ns-create``
  by a process of ``unshare --pid``);
- **a cgroup** of a private named hierarchy mounted nowhere (imafs/ima/cgroup.py): for a
  process without a pid namespace of its own (a host shell, a plain chroot, a second
  ``ns-create`` inside a bound container) and for ``ns-join``, which moves only its
  opener. Membership is copied at fork; moving out takes a descriptor only the daemon
  holds.

A process's namespace is the deeper of the two answers: the namespace bound to its pid
namespace (or the nearest bound ancestor pid namespace; else the root, 0) and the one of
its cgroup (the hierarchy's root: 0). One is always an ancestor of the other for a
process bound only as above (a cgroup move goes below the process's namespace; a pid
namespace is bound below the namespace of the process that binds it); when they are not
-- something moved a process sideways -- the process is unknown (None), and the engine
refuses it rather than take it for the host. A binding is only ever made **below** the
process's current namespace (:meth:`Binder.bind`).

Cost: reading a process's binding costs a stat of ``/proc/PID/ns/pid`` (the daemon's
own: no walk), and ``/proc/PID/cgroup`` -- about 10 us with a dozen cgroup hierarchies,
15-80 us with 60 (the kernel prints one line per v1 hierarchy under the css_set lock).
So ``ns_of`` caches the answer per pid, together with a **pidfd** of the process it was
read for (``pidfd_open``; with ``PIDFD_THREAD``, since FUSE reports the caller's thread
id). A hit is served only while that pidfd's process still exists --
``pidfd_send_signal(fd, 0)``, one system call, about 0.5 us. A pid is reused only after
its process has exited and been reaped, and then the pidfd answers ESRCH: a new process
under a cached pid never gets the old answer. Where pidfds are unavailable (kernels
before 5.3; a thread id before 6.9) nothing is cached. Only :meth:`Binder.bind` and
:meth:`Binder.remove` change bindings; each starts a new cache generation before and
after the change, and an answer read in an older generation is never served.

The cgroup hierarchy's key is a property of the **state**, not of its path
(:meth:`Binder.for_store`): drawn at random at the first mount and kept in the state's
LMDB (``meta`` ``cgroup_key``), so a state directory that is moved or renamed finds its
hierarchy again (processes still in its namespaces stay in them across a remount). A
state written before the key was stored keeps the key its path gave it then. Bound pid
namespaces are kept in the state too (pidns.py says how a remount never takes a new
namespace with a reused inode number for a bound one).

Who a control-file write moves (:class:`Opener`): FUSE gives a write request no caller,
so ``ns-create`` and ``ns-join`` move the process that *opened* the file, held by a
pidfd taken at open. A write is refused when that process no longer exists (a reused
pid is another process: its pidfd says so), is exiting, or has left the namespace it
was in at open; :meth:`Binder.bind` checks that the process really is in the namespace
afterwards (the kernel skips an exiting task without an error).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import signal
import threading

from imafs.ima.cgroup import open_hierarchy, protect_daemon
from imafs.ima.pidns import PidnsBindings, PidnsError

log = logging.getLogger("imafs.binding")

CACHE_MAX = 4096           # cached answers (each holds a pidfd); cleared when full
PIDFD_THREAD = os.O_EXCL   # pidfd_open(2) flag (Linux 6.9): a pidfd of one thread
KEY_META = b"cgroup_key"   # the state's hierarchy key, in the store's meta database

__all__ = ["Binder", "BindingError", "Opener", "path_key", "protect_daemon", "state_key"]


class BindingError(Exception):
    pass


def path_key(state_dir: str) -> str:
    """The key older imafs derived from the state directory's path (kept by the states
    that were first mounted with it, see state_key)."""
    real = os.path.realpath(state_dir)
    return os.path.basename(real)[:12] + hashlib.sha256(os.fsencode(real)).hexdigest()[:8]


def state_key(store, state_dir: str | None = None) -> str:
    """The cgroup hierarchy key of a state: read from its LMDB ``meta`` (``cgroup_key``);
    at the first mount of a state, a random key is drawn and stored -- or, for a state
    that already has namespaces (written before the key was stored), the key its path
    gave it, so the processes still in its hierarchy are found again."""
    meta, nsdb = store.db("meta"), store.db("ns")      # handles first (see Keyring._dbs)
    with store.env.begin(write=True) as txn:
        raw = txn.get(KEY_META, db=meta)
        if raw is not None:
            key = bytes(raw).decode("ascii", "replace")
            if key and len(key) <= 24 and all(c.isalnum() for c in key):
                return key
            raise BindingError(f"the state's cgroup key {bytes(raw)!r} is malformed")
        legacy = state_dir is not None and (
            txn.get(b"ns_next", db=meta) is not None or txn.cursor(db=nsdb).first())
        key = path_key(state_dir) if legacy else secrets.token_hex(10)
        txn.put(KEY_META, key.encode(), db=meta)
    log.info("state %s: cgroup hierarchy key %s (%s)", state_dir or "", key,
             "from its path, as before" if legacy else "new")
    return key


class Binder:
    """The bindings of one mount's state: its bound pid namespaces and its cgroup
    hierarchy (None where the kernel has no named v1 hierarchies)."""

    @classmethod
    def for_store(cls, store, state_dir: str | None = None) -> "Binder":
        """The binder of a state: its hierarchy is named by the key kept in the state
        (state_key), wherever the state directory is; its pid namespace bindings are
        restored from the state."""
        return cls(state_key(store, state_dir), store=store)

    def __init__(self, key: str, *, store=None):
        self.key = key[:24]
        self.name = f"imafs.{self.key}"
        self.cgroups = open_hierarchy(self.name)
        self.pidns = PidnsBindings(store)
        self.parent_of = None   # ns id -> its parent's id (NamespaceTree.attach)
        self._cache: dict[int, tuple[int, int, int]] = {}  # pid -> (generation, ns, pidfd)
        self._gen = 0
        self._lock = threading.Lock()
        self._bind_lock = threading.Lock()
        log.info("namespace binding: pid namespaces; cgroup hierarchy name=%s %s",
                 self.name, "mounted nowhere" if self.cgroups is not None
                 else "unavailable")

    def attach(self, parent_of) -> None:
        """``parent_of(ns_id) -> parent id | None``: how namespaces nest (the tree)."""
        self.parent_of = parent_of

    # ------------------------------------------------------------------ reading
    def _below(self, x: int, y: int) -> bool:
        """Namespace ``x`` is ``y`` or a descendant of it."""
        if x == y or y == 0:
            return True
        if self.parent_of is None:
            return False
        for _ in range(64):
            x = self.parent_of(x)
            if x is None:
                return False
            if x == y:
                return True
        return False

    def _deeper(self, a: int, c: int) -> int | None:
        if self._below(c, a):
            return c
        if self._below(a, c):
            return a
        return None

    def read_ns(self, pid: int) -> int | None:
        """ns_of without the cache: the deeper of the pid namespace's and the cgroup's
        namespace; None when the process cannot be read or they are unrelated."""
        c = self.cgroups.read(pid) if self.cgroups is not None else 0
        if c is None:
            return None
        a = self.pidns.ns_of_pid(pid)
        if a is None:
            return None
        return self._deeper(a, c)

    def ns_of(self, pid: int) -> int | None:
        """The namespace id of a process (0: the root), None when it cannot be
        determined. Cached per pid while the process lives (its pidfd)."""
        with self._lock:
            hit = self._cache.get(pid)
            if hit is not None:
                if hit[0] == self._gen and _alive(hit[2]):
                    return hit[1]
                del self._cache[pid]        # exited: the pid may belong to another now
                os.close(hit[2])
            gen = self._gen
        pidfd = _pidfd_open(pid)
        nsid = self.read_ns(pid)
        if pidfd is None:
            return nsid
        with self._lock:
            # cached only if read in the current generation, for the process the pidfd
            # holds (still alive after the read: the pid was not reused meanwhile)
            if nsid is not None and gen == self._gen and _alive(pidfd) \
                    and pid not in self._cache:
                if len(self._cache) >= CACHE_MAX:
                    self._clear()
                self._cache[pid] = (gen, nsid, pidfd)
                pidfd = None
        if pidfd is not None:
            os.close(pidfd)
        return nsid

    def members(self, ns_id: int) -> list[int]:
        """Processes that keep namespace ``ns_id`` in use: those of its cgroup, and the
        init of the pid namespace bound to it while that one lives."""
        out = self.cgroups.members(ns_id) if self.cgroups is not None else []
        return out + [p for p in self.pidns.members(ns_id) if p not in out]

    def how(self, ns_id: int) -> str:
        return "pid namespace" if self.pidns.has(ns_id) else "cgroup"

    # ------------------------------------------------------------------ changing
    def _new_generation(self) -> None:
        with self._lock:
            self._gen += 1
            self._clear()

    def _clear(self) -> None:
        """Forget every cached answer (with self._lock held)."""
        for _gen, _ns, pidfd in self._cache.values():
            os.close(pidfd)
        self._cache.clear()

    def bind(self, pid: int, ns_id: int, *, whole_pidns: bool = True) -> str:
        """Bind process ``pid`` to namespace ``ns_id``, which must be its namespace or
        below it: its pid namespace when it has one of its own and ``whole_pidns``
        (every process of it, now and later), else its thread group's cgroup. Checks
        that it is there afterwards (the kernel silently skips an exiting task).
        Returns which binding was made ("pid namespace" or "cgroup")."""
        with self._bind_lock:
            self.pidns.sweep()
            cur = self.read_ns(pid)
            if cur is None:
                raise BindingError(f"pid {pid} is in no known integrity namespace (or "
                                   f"has exited)")
            if not self._below(ns_id, cur):
                raise BindingError(f"pid {pid} is in integrity namespace id {cur}: it can "
                                   f"only be bound to that namespace or one below it")
            key = self.pidns.own_pidns(pid) if whole_pidns else None
            if key is None and self.cgroups is None:
                raise BindingError(
                    f"pid {pid} has no pid namespace of its own (it shares the daemon's or "
                    f"a bound one) and this kernel has no named cgroup v1 hierarchy to "
                    f"bind it alone: start it in a pid namespace of its own (unshare "
                    f"--pid --fork)")
            how = "pid namespace" if key is not None else "cgroup"
            self._new_generation()
            try:
                if key is not None:
                    self.pidns.bind(pid, key, ns_id)
                else:
                    self.cgroups.move(pid, ns_id)
            except PidnsError as e:
                raise BindingError(f"cannot bind pid {pid} to namespace {ns_id}: {e}") \
                    from None
            except OSError as e:
                raise BindingError(f"cannot move pid {pid} into namespace {ns_id}: "
                                   f"{e.strerror}") from None
            finally:
                self._new_generation()
            if self.read_ns(pid) != ns_id:
                if key is not None:
                    self.pidns.unbind(ns_id)
                    self._new_generation()
                raise BindingError(f"pid {pid} did not move into namespace {ns_id} (it is "
                                   f"exiting or gone)")
            return how

    def remove(self, ns_id: int) -> None:
        """Namespace ``ns_id`` is removed: its cgroup and its pid namespace binding go
        (BindingError while it has processes)."""
        with self._bind_lock:
            self._new_generation()
            if self.pidns.members(ns_id):
                raise BindingError(f"namespace {ns_id} still has processes")
            if self.cgroups is not None:
                try:
                    self.cgroups.remove(ns_id)
                except OSError:
                    raise BindingError(f"namespace {ns_id} still has processes") from None
            self.pidns.unbind(ns_id)
            self._new_generation()

    def close(self, wait: float = 0.0) -> list[int]:
        """At unmount: the cached pidfds and the pid namespace descriptors are closed
        (live bindings stay in the state for the next mount), the empty namespace
        cgroups removed and the hierarchy dropped; returns the ids of namespaces whose
        cgroups still have processes."""
        self._new_generation()
        self.pidns.close()
        busy = self.cgroups.close(wait) if self.cgroups is not None else []
        self.cgroups = None
        if busy:
            log.info("namespaces %s still have processes: their cgroups stay",
                     ", ".join(map(str, sorted(busy))))
        return busy


class Opener:
    """The process that opened a control file that moves processes (``ns-create``,
    ``ns-join``), held by a pidfd taken at open (a thread's with PIDFD_THREAD: FUSE
    reports thread ids). FUSE write requests carry no caller, so the opener is the
    process a write moves; :meth:`alive` tells whether it still exists -- its pid may
    since belong to another process, which its pidfd never confuses with it."""

    __slots__ = ("pid", "pidfd")

    def __init__(self, pid: int):
        self.pid = pid
        self.pidfd = _pidfd_open(pid)
        if self.pidfd is None:
            self.pidfd = _pidfd_of_thread_group(pid)

    def alive(self) -> bool:
        """The opener exists and is not exiting (a zombie cannot be moved)."""
        if self.pidfd is None or not _alive(self.pidfd):
            return False
        state = _proc_state(self.pid)
        # read after the pidfd said alive, and alive again after: the state read was
        # this process's (its pid cannot be reused while the pidfd's process exists)
        return state is not None and state not in "ZXx" and _alive(self.pidfd)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, Z, ...), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 1:].split()
    return rest[0].decode() if rest else None


def _pidfd_of_thread_group(tid: int) -> int | None:
    """Kernels before 6.9 have no PIDFD_THREAD: a pidfd of the thread group that holds
    thread ``tid``, checked to still hold it after the pidfd was taken."""
    try:
        with open(f"/proc/{tid}/status") as f:
            tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
        fd = os.pidfd_open(tgid, 0)
    except (OSError, StopIteration, ValueError, AttributeError):
        return None
    if not os.path.exists(f"/proc/{tgid}/task/{tid}"):
        os.close(fd)
        return None
    return fd


def _pidfd_open(pid: int) -> int | None:
    """A pidfd of the thread (or process) ``pid``, or None (no such task, or no pidfd
    support for it on this kernel)."""
    for flags in (PIDFD_THREAD, 0):
        try:
            return os.pidfd_open(pid, flags)
        except OSError as e:
            if e.errno != errno.EINVAL:    # EINVAL: no PIDFD_THREAD, or not a leader
                return None
        except AttributeError:             # Python built without pidfd_open
            return None
    return None


def _alive(pidfd: int) -> bool:
    """Whether the task of ``pidfd`` still exists (a zombie does: its pid is not free)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except OSError:
        return False
    return True
