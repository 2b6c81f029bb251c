"""Changes behind the mount, as they happen: the backing inodes of files that
verified handles hold open are watched, so the kernel's page cache of such a file is
dropped as soon as another process changes it; until then a reader may be served
pages of the version it opened -- measured bytes, never changed ones; afterwards its
reads reach the daemon and fail verification (EIO, a violation).

Two ways, the second catching what the first misses:

- **inotify** (IN_MODIFY: write, truncate; IN_ATTRIB: chmod, xattrs, times), for
  every change made through the VFS, by any process, in any mount namespace, within
  milliseconds. It misses writes through a shared mapping of the backing file, and
  anything when its queue overflowed (IN_Q_OVERFLOW: then every file is taken as
  changed) or when a watch could not be added (the per-user watch limit);
- **a stat pass** every ``RESCAN`` seconds over the files verified handles hold open:
  a changed mtime, ctime or size (a mapping's write changes mtime at its first fault;
  putting mtime back changes ctime) is a change.

What neither sees -- writes to the block device underneath -- is caught when a read
reaches the daemon. One thread reads the events, one makes the passes; watches are
added and handles released from any thread.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
from collections import OrderedDict

log = logging.getLogger("imafs.fs.inotify")

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_IGNORED = 0x00008000
IN_Q_OVERFLOW = 0x00004000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")   # wd, mask, cookie, len (then len bytes of name)

_libc = ctypes.CDLL(None, use_errno=True)


def _signature(st: os.stat_result) -> tuple:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class Inotify:
    """``watch(key, fd)`` by a caller's key (a FUSE nodeid), once per verified handle
    opened; ``release(key)`` once per such handle released. While a key has handles,
    its file is in the stat pass; its inotify watch stays until ``MAX`` others were
    watched since (least recently watched and idle first: a watch pins its inode in
    memory; adding one costs a path walk, so a file opened again and again is watched
    once). ``changed(key)`` is called, in the reading or the passing thread, for every
    change seen (for every key when inotify events were lost)."""

    MAX = 4096
    RESCAN = 1.0        # seconds between two stat passes

    def __init__(self, changed, *, rescan: float | None = None):
        self._changed = changed
        self._lock = threading.Lock()
        self._by_key: OrderedDict = OrderedDict()   # key -> wd, least recent first
        self._by_wd: dict[int, set] = {}            # wd -> keys (hard links: one inode)
        # key -> [handles, fd, (st_dev, st_ino), signature]: the stat pass's files
        self._live: dict = {}
        self._stop = threading.Event()
        self.rescan = self.RESCAN if rescan is None else rescan
        self._fd = _libc.inotify_init1(IN_CLOEXEC)
        if self._fd < 0:
            e = ctypes.get_errno()
            log.warning("inotify unavailable (%s): changes behind the mount are seen by "
                        "a stat pass every %g s", os.strerror(e), self.rescan)
            self._fd = None
        else:
            threading.Thread(target=self._run, name="imafs-inotify", daemon=True).start()
        threading.Thread(target=self._pass, name="imafs-rescan", daemon=True).start()

    @property
    def available(self) -> bool:
        return self._fd is not None

    def watch(self, key, fd: int) -> None:
        """A verified handle of the file behind ``fd`` (its inode's O_PATH descriptor,
        valid while the handle is open) was opened."""
        try:
            st = os.fstat(fd)
        except OSError:
            return
        with self._lock:
            rec = self._live.get(key)
            if rec is None:
                self._live[key] = [1, fd, (st.st_dev, st.st_ino), _signature(st)]
            else:
                rec[0] += 1
            if self._fd is None:
                return
            if key in self._by_key:
                self._by_key.move_to_end(key)
                return
            wd = _libc.inotify_add_watch(self._fd, f"/proc/self/fd/{fd}".encode(),
                                         IN_MODIFY | IN_ATTRIB)
            if wd < 0:
                # ENOSPC: the user's watch limit; the stat pass still sees the file
                log.debug("inotify_add_watch: %s", os.strerror(ctypes.get_errno()))
                return
            self._by_key[key] = wd
            self._by_wd.setdefault(wd, set()).add(key)
            while len(self._by_key) > self.MAX:
                idle = next((k for k in self._by_key if k not in self._live),
                            next(iter(self._by_key)))
                self._drop(idle)

    def release(self, key) -> None:
        """A verified handle of the file was released."""
        with self._lock:
            rec = self._live.get(key)
            if rec is not None:
                rec[0] -= 1
                if rec[0] <= 0:
                    del self._live[key]

    def unwatch(self, key) -> None:
        if self._fd is None:
            return
        with self._lock:
            if key in self._by_key:
                self._drop(key)

    def _drop(self, key) -> None:
        wd = self._by_key.pop(key)
        keys = self._by_wd.get(wd, set())
        keys.discard(key)
        if not keys:
            self._by_wd.pop(wd, None)
            _libc.inotify_rm_watch(self._fd, wd)

    def watching(self, key) -> bool:
        with self._lock:
            return key in self._by_key

    def live(self, key) -> bool:
        """Is the file in the stat pass (a verified handle holds it open)?"""
        with self._lock:
            return key in self._live

    def close(self) -> None:
        self._stop.set()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)      # the reading thread's read fails: it ends

    # ------------------------------------------------------------------ threads
    def _run(self) -> None:
        fd = self._fd
        while True:
            try:
                buf = os.read(fd, 64 * 1024)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                return
            if not buf:
                return
            self.dispatch(buf)

    def dispatch(self, buf: bytes) -> None:
        """The events read from the inotify descriptor: ``changed`` for each watched
        key they concern; for every key when the queue overflowed."""
        keys: set = set()
        lost = False
        off = 0
        while off + _EVENT.size <= len(buf):
            wd, mask, _cookie, n = _EVENT.unpack_from(buf, off)
            off += _EVENT.size + n
            if mask & IN_Q_OVERFLOW:
                lost = True
                continue
            if mask & IN_IGNORED:
                with self._lock:
                    for k in self._by_wd.pop(wd, ()):
                        self._by_key.pop(k, None)
                continue
            with self._lock:
                keys |= self._by_wd.get(wd, set())
        if lost:
            log.warning("inotify: events lost (queue overflow): every watched file is "
                        "taken as changed")
            with self._lock:
                keys = set(self._by_key) | set(self._live)
        self._notify(keys)

    def _pass(self) -> None:
        while not self._stop.wait(self.rescan):
            self.scan()

    def scan(self) -> None:
        """One stat pass over the files verified handles hold open."""
        with self._lock:
            items = [(k, rec[1], rec[2], rec[3]) for k, rec in self._live.items()]
        changed = []
        for key, fd, ident, sig in items:
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != ident:
                continue        # the descriptor is another file's now: released
            new = _signature(st)
            if new != sig:
                with self._lock:
                    rec = self._live.get(key)
                    if rec is not None and rec[2] == ident:
                        rec[3] = new
                changed.append(key)
        self._notify(changed)

    def _notify(self, keys) -> None:
        for k in keys:
            try:
                self._changed(k)
            except Exception as e:  # noqa: BLE001 - never let the thread die
                log.warning("inotify: %s", e)
