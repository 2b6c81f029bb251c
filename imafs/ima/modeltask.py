"""Who acts, for behaviour models: the pid a FUSE request carries -> the model's
:class:`~imafs.ima.model.Actor` (TSEM's task context: tsem_task), read from /proc.

* **key**: ``(tgid, start time)``, the start time being field 22 of
  ``/proc/TGID/stat`` (clock ticks since boot). FUSE gives the calling thread's id;
  the threads of a process share its key, and a pid the kernel gives again to another
  process is another key.
* **parent**: ``(PPid, its start time)``; when a model does not know it, the further
  ancestors up the PPid chain (``Actor.lineage``, read only then, at most
  :data:`MAX_LINEAGE` levels): a process that forked without acting through the mount
  -- a subshell, ``xargs``'s fork before its exec -- is skipped, and the task
  inherits the identity of the nearest ancestor the model has seen.
* **COE**: ``Uid:``, ``Gid:`` (real, effective, saved, fs) and ``CapEff:`` of
  ``/proc/TID/status``.

Reading /proc costs tens of microseconds, so actors are cached per request pid. How
the cache still notices a change of credentials:

1. every FUSE request carries the caller's fsuid and fsgid: an entry whose COE has
   others is read again at once (each setuid()/setgid()-family call moves the fs ids
   with the effective ones);
2. an exec open drops the task's entry (a set-id program, file capabilities, a new
   ``comm``): its next event reads /proc again, after the exec committed;
3. an entry is read again at the latest :attr:`TaskCache.ttl` seconds after it was
   read (capset(), a change of the real or saved ids alone): ``pid_max / 10**6``
   seconds, between 10 ms and 1 s. That also covers pid reuse: the kernel gives a
   pid again only after going round all ``pid_max`` of them, which no machine does a
   million times a second.

:func:`alive` says whether a key's process still exists (the model reaps the
records of those that do not).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Hashable, Iterator

from imafs.ima.model import Actor
from imafs.ima.modelmap import Coe

MAX_LINEAGE = 32            # ancestors read above an unknown parent
CACHE_MAX = 4096            # cached actors (request pids)
_STATUS_MAX = 8192


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read(_STATUS_MAX)
    except OSError:
        return None


def stat_fields(pid: int, proc: str = "/proc") -> tuple[int, int] | None:
    """(ppid, start time) of ``pid`` from /proc/PID/stat, or None (no such task)."""
    raw = _read(f"{proc}/{pid}/stat")
    if raw is None:
        return None
    try:
        rest = raw[raw.rindex(b")") + 2:].split()     # comm may hold spaces and ")"
        return int(rest[1]), int(rest[19])
    except (ValueError, IndexError):
        return None


def start_time(pid: int, proc: str = "/proc") -> int | None:
    f = stat_fields(pid, proc)
    return None if f is None else f[1]


def alive(key: Hashable, proc: str = "/proc") -> bool:
    """Does the process of ``key`` (tgid, start time) still exist?"""
    try:
        tgid, start = key
    except (TypeError, ValueError):
        return False
    return start_time(tgid, proc) == start


def parse_status(raw: bytes) -> tuple[str, int, int, Coe] | None:
    """(name, tgid, ppid, COE) from /proc/TID/status, or None when malformed."""
    name, tgid, ppid, uids, gids, cap = "", None, None, None, None, None
    try:
        for line in raw.split(b"\n"):
            key, _, val = line.partition(b":")
            if key == b"Name":
                name = val.strip().decode("utf-8", "replace")
            elif key == b"Tgid":
                tgid = int(val)
            elif key == b"PPid":
                ppid = int(val)
            elif key == b"Uid":
                uids = [int(v) for v in val.split()[:4]]
            elif key == b"Gid":
                gids = [int(v) for v in val.split()[:4]]
            elif key == b"CapEff":
                cap = int(val, 16)
                break
    except ValueError:
        return None
    if tgid is None or ppid is None or cap is None or len(uids or ()) != 4 \
            or len(gids or ()) != 4:
        return None
    return name, tgid, ppid, Coe(uids[0], uids[1], uids[2], gids[0], gids[1], gids[2],
                                 uids[3], gids[3], cap)


def _ttl(proc: str) -> float:
    try:
        with open(f"{proc}/sys/kernel/pid_max", "rb") as f:
            pid_max = int(f.read())
    except (OSError, ValueError):
        pid_max = 32768
    return min(1.0, max(0.01, pid_max / 1e6))


class TaskCache:
    """Actors by request pid (see the module's docstring for when an entry is read
    again). ``peek`` never reads /proc (for the event loop); ``actor`` does."""

    def __init__(self, proc: str = "/proc", *, ttl: float | None = None,
                 size: int = CACHE_MAX, clock=time.monotonic):
        self.proc = proc
        self.ttl = _ttl(proc) if ttl is None else ttl
        self.size = size
        self.clock = clock
        self._cache: OrderedDict[int, tuple[Actor, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0          # /proc reads of an actor (statistics, tests)

    def peek(self, pid: int, fsuid: int, fsgid: int) -> Actor | None:
        """The cached actor of ``pid`` if it is still good for a request with these
        fs ids; None when /proc must be read."""
        hit = self._cache.get(pid)
        if hit is None:
            return None
        a, expires = hit
        if a.coe.fsuid != fsuid or a.coe.fsgid != fsgid or self.clock() >= expires:
            return None
        return a

    def known(self, pid: int, fsuid: int, fsgid: int) -> Actor | None:
        """The actor of a pid the cache has an entry for, read again when that entry
        is stale (a few /proc reads, no more: the engine does it on the event loop);
        None for a pid never seen (its first sight may walk its lineage: a worker
        thread's)."""
        hit = self._cache.get(pid)
        if hit is None:
            return None
        a, expires = hit
        if a.coe.fsuid != fsuid or a.coe.fsgid != fsgid or self.clock() >= expires:
            a = self.actor(pid, fsuid, fsgid)
        return a

    def actor(self, pid: int, fsuid: int, fsgid: int) -> Actor | None:
        """The actor of ``pid``, read from /proc when the cache has no good one; None
        when the task cannot be read (it has gone)."""
        a = self.peek(pid, fsuid, fsgid)
        if a is not None:
            return a
        a = self.read(pid)
        if a is None:
            return None
        with self._lock:
            self._cache[pid] = (a, self.clock() + self.ttl)
            self._cache.move_to_end(pid)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return a

    def exec_seen(self, pid: int) -> None:
        """An exec open of ``pid``: its next event reads /proc again."""
        with self._lock:
            self._cache.pop(pid, None)

    def read(self, pid: int) -> Actor | None:
        """The actor of ``pid`` from /proc (no cache)."""
        self.reads += 1
        raw = _read(f"{self.proc}/{pid}/status")
        st = parse_status(raw) if raw is not None else None
        if st is None:
            return None
        name, tgid, ppid, coe = st
        start = start_time(tgid, self.proc)
        if start is None:
            return None
        parent = None
        if ppid > 0:
            pstart = start_time(ppid, self.proc)
            if pstart is not None:
                parent = (ppid, pstart)
        return Actor((tgid, start), parent, coe, pid, name,
                     (lambda: self.lineage(ppid)) if ppid > 0 else None)

    def lineage(self, ppid: int) -> Iterator[Hashable]:
        """The keys of the ancestors above the process ``ppid`` (its parent first),
        read as they are asked for."""
        pid = ppid
        for _ in range(MAX_LINEAGE):
            f = stat_fields(pid, self.proc)
            if f is None or f[0] <= 0:
                return
            pid = f[0]
            start = start_time(pid, self.proc)
            if start is None:
                return
            yield (pid, start)
