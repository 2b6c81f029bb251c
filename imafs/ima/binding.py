"""Which integrity namespace a process belongs to.

A process is placed in a namespace by moving it into a cgroup of a **private, named
cgroup v1 hierarchy** that the daemon mounts for its state (``name=imafs.<key>``, no
controllers, at ``/run/imafs/cg/<key>``): one cgroup per namespace. Why a cgroup:

- the kernel copies cgroup membership to every child at fork, so double-forking,
  reparenting to init, ``setsid`` and new pid/mount/user namespaces all keep it;
- membership belongs to the process, not to its pid: a reused pid is a new process
  in whatever cgroup its own parent was in;
- a private named hierarchy has no controllers, so no container manager or systemd
  ever moves processes in it (they would in the unified cgroup v2 tree), and each
  mount's hierarchy is its own, so joining a namespace of another mount never takes
  a process out of this one.

Leaving is possible only by writing to this hierarchy's ``cgroup.procs`` (or
``tasks``). Cgroup v1 lets uid 0 of the initial user namespace do that without any
capability (it checks for euid 0; the files are root's), so root that reaches the
daemon's mount of it (``/run/imafs/cg/<key>``, in the host's mount namespace) can leave;
mounting the hierarchy elsewhere takes CAP_SYS_ADMIN in the initial user namespace (or,
for a user namespace with its own cgroup namespace, a mount rooted at its own cgroup,
below which a process is unknown). A container with its own mount namespace and no
CAP_SYS_ADMIN cannot. Where named v1 hierarchies are
not available, the unified cgroup v2 tree is used under ``imafs.<key>/``.

A process whose ``/proc/PID/cgroup`` cannot be read, or that sits anywhere in the
hierarchy but its root (the host) or a namespace cgroup ``nsN``, is **unknown**
(None): the engine refuses it rather than treat it as the host.

Cost: reading ``/proc/PID/cgroup`` costs about 10 us on a system with a dozen cgroup
hierarchies, and grows with their number (the kernel prints one line per mounted v1
hierarchy and takes the css_set lock): 15-80 us with 60. So ``ns_of`` caches the answer
per pid, together with a **pidfd** of the process it was read for (``pidfd_open``; with
``PIDFD_THREAD``, since FUSE reports the caller's thread id). A hit is served only while
that pidfd's process still exists -- ``pidfd_send_signal(fd, 0)``, one system call,
about 0.5 us where reading ``/proc/PID/stat`` for a start time cost 6 us. A pid is
reused only after its process has exited and been reaped, and then the pidfd answers
ESRCH: a new process under a cached pid never gets the old answer. Where pidfds are
unavailable (kernels before 5.3; a thread id before 6.9) nothing is cached. Only
:meth:`bind` moves processes in this hierarchy; it starts a new cache generation
before and after the move, and an answer read in an older generation is never served
(a read racing with the move cannot be cached as current).

At unmount (:meth:`close`) the empty namespace cgroups are removed and the hierarchy
is unmounted; the kernel then destroys it, unless some namespace still has processes:
then it lives on unmounted and the next mount of the same state joins it again, so
those processes stay in their namespaces across a daemon restart.

The key is a property of the **state**, not of its path (:meth:`CgroupBinder.for_store`):
drawn at random at the first mount and kept in the state's LMDB (``meta``
``cgroup_key``), so a state directory that is moved or renamed finds its hierarchy
again. Were it derived from the path, a remount after ``mv state state2`` would mount
a new, empty hierarchy, at whose root every process -- those still in namespaces of
the old one included -- reads as the host. A state written before the key was stored
(it has namespaces but no key) keeps the key its path gave it then.

Who a control-file write moves (:class:`Opener`): FUSE gives a write request no
caller, so ``ns-create`` and ``ns-join`` move the process that *opened* the file, held
by a pidfd taken at open. A write is refused when that process no longer exists (a
reused pid is another process: its pidfd says so), is exiting, or has left the
namespace it was in at open; :meth:`CgroupBinder.bind` checks that the process really
moved (the kernel skips an exiting task without an error).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import signal
import ctypes
import threading
import time

log = logging.getLogger("imafs.binding")

RUN_CG = "/run/imafs/cg"
CACHE_MAX = 4096           # cached answers (each holds a pidfd); cleared when full
PIDFD_THREAD = os.O_EXCL   # pidfd_open(2) flag (Linux 6.9): a pidfd of one thread
KEY_META = b"cgroup_key"   # the state's hierarchy key, in the store's meta database


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


class CgroupBinder:
    @classmethod
    def for_store(cls, store, state_dir: str | None = None) -> "CgroupBinder":
        """The binder of a state: its hierarchy is named by the key kept in the state
        (state_key), wherever the state directory is."""
        return cls(state_key(store, state_dir))

    def __init__(self, key: str):
        self.key = key[:24]
        self.name = f"imafs.{self.key}"
        self.mode = None        # "v1" or "v2"
        self.root = None        # directory whose subdirs are namespace cgroups
        self._mounted = False   # this binder mounted the v1 hierarchy (close unmounts)
        self._cache: dict[int, tuple[int, int, int]] = {}  # pid -> (generation, ns, pidfd)
        self._gen = 0
        self._lock = threading.Lock()
        self._setup()
        log.info("namespace binding: %s hierarchy name=%s at %s", self.mode, self.name,
                 self.root)
        # the line of /proc/PID/cgroup that names this mount's hierarchy
        self._needle = (f":name={self.name}:" if self.mode == "v1" else "0::").encode()

    def _setup(self) -> None:
        mnt = os.path.join(RUN_CG, self.key)
        if self._mounted_named(mnt):
            # left mounted by a daemon of this state that died (SIGKILL): the hierarchy
            # is named after the state, whose lock this daemon holds, so it is this
            # daemon's to clean up at unmount (it stayed mounted forever otherwise)
            self.mode, self.root, self._mounted = "v1", mnt, True
            return
        # each level made 0755 (the daemon runs with umask 0, and makedirs would make
        # the parents 0777: /run/imafs holds the daemons' records, root's alone)
        for d in (os.path.dirname(RUN_CG), RUN_CG, mnt):
            try:
                os.mkdir(d, 0o755)
            except FileExistsError:
                if d != mnt:
                    st = os.lstat(d)
                    if st.st_uid == 0 and st.st_mode & 0o022:
                        os.chmod(d, 0o755)      # left 0777 by an older imafs
        if _mount_named(self.name, mnt):
            self.mode, self.root, self._mounted = "v1", mnt, True
            return
        v2 = _cgroup2_mount()
        if v2 is None:
            raise BindingError("no cgroup hierarchy available to bind processes to namespaces")
        self.mode = "v2"
        self.root = os.path.join(v2, self.name)
        os.makedirs(self.root, exist_ok=True)

    def _mounted_named(self, mnt: str) -> bool:
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    parts = line.split()
                    if parts[4] == mnt and f"name={self.name}" in line:
                        return True
        except OSError:
            pass
        return False

    def _dir(self, ns_id: int) -> str:
        return os.path.join(self.root, f"ns{ns_id}")

    def _new_generation(self) -> None:
        with self._lock:
            self._gen += 1
            self._clear()

    def _clear(self) -> None:
        """Forget every cached answer (with self._lock held)."""
        for _gen, _ns, pidfd in self._cache.values():
            os.close(pidfd)
        self._cache.clear()

    def bind(self, pid: int, ns_id: int) -> None:
        """Move the process (its whole thread group) into namespace ns_id, and check
        that it is there: the kernel silently skips a task that is exiting (a write
        of a zombie's pid to cgroup.procs succeeds and moves nothing)."""
        d = self._dir(ns_id)
        os.makedirs(d, exist_ok=True)
        self._new_generation()
        try:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(f"{pid}\n")
        except OSError as e:
            raise BindingError(f"cannot move pid {pid} into namespace {ns_id}: {e.strerror}")
        finally:
            self._new_generation()
        if self.read_ns(pid) != ns_id:
            raise BindingError(f"pid {pid} did not move into namespace {ns_id} (it is "
                               f"exiting or gone)")

    def ns_of(self, pid: int) -> int | None:
        """The namespace id of a process: 0 (root) when it is at the root of this
        mount's hierarchy (v2: outside its subtree), N in cgroup ``nsN``, and None when
        it cannot be determined (no such process, no line for the hierarchy, or any
        other cgroup of it). Cached per pid while the process lives (its pidfd)."""
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

    def read_ns(self, pid: int) -> int | None:
        """ns_of without the cache: read /proc/PID/cgroup."""
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
        # the needle must start the line's second field (v1: "ID:name=imafs.KEY:PATH")
        # or the line (v2: "0::PATH"); a path of another hierarchy may contain it too
        needle, v1 = self._needle, self.mode == "v1"
        i = text.find(needle)
        while i >= 0:
            head = text[text.rfind(b"\n", 0, i) + 1:i]
            if head.isdigit() if v1 else head == b"":
                break
            i = text.find(needle, i + 1)
        if i < 0:
            return None
        end = text.find(b"\n", i)
        path = text[i + len(needle):end if end >= 0 else len(text)]
        if self.mode == "v2":
            prefix = b"/" + self.name.encode()
            if path != prefix and not path.startswith(prefix + b"/"):
                return 0
            path = path[len(prefix):] or b"/"
        if path == b"/":
            return 0
        if path.startswith(b"/ns") and path[3:].isdigit() and path[3:4] != b"0":
            return int(path[3:])
        return None

    def members(self, ns_id: int) -> list[int]:
        try:
            with open(os.path.join(self._dir(ns_id), "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def remove(self, ns_id: int) -> None:
        self._new_generation()
        try:
            os.rmdir(self._dir(ns_id))
        except OSError as e:
            if e.errno not in (errno.ENOENT,):
                raise BindingError(f"namespace {ns_id} still has processes")

    def close(self, wait: float = 0.0) -> list[int]:
        """At unmount: remove the empty namespace cgroups (waiting up to ``wait``
        seconds for exiting processes) and unmount the hierarchy; returns the ids of
        namespaces that still have processes (their cgroups, and so the hierarchy,
        stay until the next mount of the same state joins them again)."""
        if self.root is None:
            return []
        self._new_generation()
        deadline = time.monotonic() + wait
        busy: list[int] = []
        while True:
            busy = []
            try:
                names = os.listdir(self.root)
            except OSError:
                names = []
            for n in names:
                if not (n.startswith("ns") and n[2:].isdigit()):
                    continue
                try:
                    os.rmdir(os.path.join(self.root, n))
                except FileNotFoundError:
                    pass
                except OSError:
                    busy.append(int(n[2:]))
            if not busy or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if self.mode == "v1" and self._mounted:
            _umount(self.root)
            # A removed cgroup is released after an RCU grace period; a hierarchy
            # unmounted before that is never destroyed. Mounting it again once the
            # removed cgroups are gone, then unmounting, destroys it. A grace period
            # can take a while on a loaded machine: try for up to 2 s (250 ms left
            # an empty hierarchy behind now and then, for good).
            deadline = time.monotonic() + 2.0
            pause = 0.02
            while not busy:
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
                if self.read_ns(os.getpid()) is None or time.monotonic() > deadline:
                    break
                if _mount_named(self.name, self.root):
                    _umount(self.root)
            try:
                os.rmdir(self.root)
            except OSError:
                pass
            self._mounted = False
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


_libc = ctypes.CDLL(None, use_errno=True)


def _mount_named(name: str, where: str) -> bool:
    """mount -t cgroup -o none,name=NAME cgroup WHERE (mount(2) itself: no process)."""
    return _libc.mount(b"cgroup", os.fsencode(where), b"cgroup", 0,
                       f"none,name={name}".encode()) == 0


def _umount(where: str) -> None:
    _libc.umount2(os.fsencode(where), 0)


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


def _cgroup2_mount() -> str | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                if parts[sep + 1] == "cgroup2":
                    return parts[4]
    except (OSError, ValueError):
        pass
    return None
