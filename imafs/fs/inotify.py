"""Changes behind the mount, as they happen: inotify watches on the backing inodes of
files whose reads are verified, so the kernel's page cache of such a file is dropped
as soon as another process writes it (IN_MODIFY: write, truncate) or changes its
attributes (IN_ATTRIB: chmod, xattrs, times). Until then a reader may be served pages
of the version it opened -- measured bytes, never changed ones; afterwards its reads
reach the daemon and fail verification (EIO, a violation).

inotify sees every change made through the VFS, by any process, in any mount
namespace; not writes through a shared mapping, nor to the block device underneath:
those are caught when a read reaches the daemon. One thread reads the events; watches
are added and removed from any thread.
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


class Inotify:
    """``watch(key, fd)`` by a caller's key (a FUSE nodeid): the inode stays watched
    until ``unwatch(key)`` or until ``MAX`` others were watched since (least recently
    watched first: a watch pins its inode in memory). Adding a watch costs a path walk,
    so a file opened again and again is watched once; an event for a file that no
    verified handle holds open any more only drops pages nobody relies on.
    ``changed(key)`` is called, in the reading thread, for every event of a watched
    inode (and for every key when events were lost: the queue overflowed)."""

    MAX = 4096

    def __init__(self, changed):
        self._changed = changed
        self._lock = threading.Lock()
        self._by_key: OrderedDict = OrderedDict()   # key -> wd, least recent first
        self._by_wd: dict[int, set] = {}            # wd -> keys (hard links: one inode)
        self._fd = _libc.inotify_init1(IN_CLOEXEC)
        if self._fd < 0:
            e = ctypes.get_errno()
            log.warning("inotify unavailable (%s): changes behind the mount are seen at "
                        "the next read or open only", os.strerror(e))
            self._fd = None
            return
        self._thread = threading.Thread(target=self._run, name="imafs-inotify", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        return self._fd is not None

    def watch(self, key, fd: int) -> None:
        if self._fd is None:
            return
        with self._lock:
            if key in self._by_key:
                self._by_key.move_to_end(key)
                return
            wd = _libc.inotify_add_watch(self._fd, f"/proc/self/fd/{fd}".encode(),
                                         IN_MODIFY | IN_ATTRIB)
            if wd < 0:
                log.debug("inotify_add_watch: %s", os.strerror(ctypes.get_errno()))
                return
            self._by_key[key] = wd
            self._by_wd.setdefault(wd, set()).add(key)
            while len(self._by_key) > self.MAX:
                self._drop(next(iter(self._by_key)))

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

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)      # the reading thread's read fails: it ends

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
                with self._lock:
                    keys = set(self._by_key)
            for k in keys:
                try:
                    self._changed(k)
                except Exception as e:  # noqa: BLE001 - never let the thread die
                    log.warning("inotify: %s", e)
