"""The overlay's way back to backing inodes, with a bounded number of descriptors.

Every node the kernel remembers needs its backing inode for the next request about
it. Holding one O_PATH descriptor per node made the daemon's descriptor use grow
with the kernel's inode cache: ``ls -f`` of a big directory ran it out of
descriptors, and then every request failed (issue 14). Now a node keeps what finds
its inode again, and this module keeps descriptors of the recently used nodes only:

- **a file handle** (``name_to_handle_at``) where the backing file system exports
  them (ext4, xfs, btrfs, tmpfs; not overlayfs without ``nfs_export=on``, nor a
  mount below the backing root): ``open_by_handle_at`` opens that very inode, and
  fails with ESTALE once it is gone -- never another file that reused its number
  (a handle carries the inode's generation);
- **else its parent node and name**: reopened relative to the parent's descriptor
  with ``O_NOFOLLOW`` (the parent reopened the same way, up to the backing root,
  whose descriptor is held for the mount's life) -- never a walk from the backing
  root, never through a symlink; the inode found must have the node's identity
  (``st_dev``, ``st_ino`` and, where the file system records it, the birth time),
  else the node is stale (ESTALE): a file replaced behind the mount is never taken
  for the one the kernel knows.

Descriptors live in a least-recently-used cache of ``limit`` entries. A descriptor
is used only while pinned (``with fds.pinned(node) as fd``): a pinned one is never
closed under its user, by eviction or by forget, in any thread. An open file or
directory handle pins its node for its life (a file unlinked while open has no name
to be found by). When the process is short of descriptors (EMFILE, ENFILE),
:meth:`NodeFds.call` closes every unpinned cached descriptor and tries again -- the
daemon serves on, slower -- and says so once per episode in the log.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict

from imafs.fs import sysio

log = logging.getLogger("imafs.fs")

_SHORT = (errno.EMFILE, errno.ENFILE)
EPISODE_QUIET = 60.0        # seconds without a shortage that end an episode


def cache_size(soft_limit: int) -> int:
    """How many descriptors the cache keeps, for a process limit of ``soft_limit``:
    an eighth of it (the rest is for open handles, LMDB, the log...), 64 to 4096."""
    return max(64, min(4096, soft_limit // 8))


class _Slot:
    __slots__ = ("fd", "pins", "node")

    def __init__(self, node, fd: int, pins: int):
        self.node, self.fd, self.pins = node, fd, pins


class NodeFds:
    """Descriptors of the nodes of one overlay (see the module docstring). Nodes
    have ``nodeid``, ``dev``, ``ino``, ``parent``, ``name``, ``handle`` and
    ``btime``; the root node is given here and its descriptor is never closed."""

    def __init__(self, root, root_fd: int, backing: str, limit: int):
        self.limit = max(8, limit)
        self.root = root
        self._lock = threading.Lock()
        self._slots: OrderedDict[int, _Slot] = OrderedDict()   # nodeid -> slot, LRU first
        self._root_slot = _Slot(root, root_fd, 1 << 30)
        # open_by_handle_at needs a descriptor on the mount that is not O_PATH
        self._mount_fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._mount_id, _ = sysio.name_to_handle(root_fd)
            self.handles = True
        except OSError as e:
            log.info("backing file system exports no file handles (%s): nodes are found "
                     "again by parent and name", e.strerror)
            self._mount_id, self.handles = None, False
        self._short_since = None    # monotonic time of the last shortage of an episode
        self.stats = {"reopened": 0, "evicted": 0, "shortages": 0, "stale": 0}

    # ------------------------------------------------------------------ nodes
    def identify(self, node, fd: int) -> None:
        """Fill ``node.handle`` (or ``node.btime`` when it has no handle) from a
        fresh descriptor of its inode: what finds it again once its descriptor is
        gone."""
        node.handle = None
        if self.handles and node.dev == self.root.dev:
            try:
                mount_id, handle = sysio.name_to_handle(fd)
                if mount_id == self._mount_id:
                    node.handle = handle
                    return
            except OSError:
                pass
        node.btime = sysio.birth_time(fd)

    def adopt(self, node, fd: int) -> None:
        """Cache ``fd``, a fresh O_PATH descriptor of ``node``'s inode (consumed: kept,
        or closed when the node has one already)."""
        close = None
        with self._lock:
            slot = self._slots.get(node.nodeid)
            if slot is not None and slot.node is node:
                self._slots.move_to_end(node.nodeid)
                close = fd
            elif node is self.root:
                close = fd
            else:
                if slot is not None:           # a forgotten node's slot: drop it
                    self._drop(slot)
                self._slots[node.nodeid] = _Slot(node, fd, 0)
                self._evict()
        if close is not None:
            os.close(close)

    def forget(self, node) -> None:
        """The kernel forgot ``node``: its descriptor goes (once unpinned)."""
        with self._lock:
            slot = self._slots.get(node.nodeid)
            if slot is not None and slot.node is node:
                self._drop(slot)

    # ------------------------------------------------------------------ pins
    @contextlib.contextmanager
    def pinned(self, node):
        """``with fds.pinned(node) as fd``: an O_PATH descriptor of the node's inode,
        valid in the block (reopened when it was evicted; ESTALE when the inode
        is gone or replaced)."""
        slot = self.pin(node)
        try:
            yield slot.fd
        finally:
            self.unpin(slot)

    def pin(self, node) -> _Slot:
        """Pin ``node``'s descriptor until :meth:`unpin` (for handles that live longer
        than a block); returns the slot (``.fd``)."""
        if node is self.root:
            return self._root_slot
        with self._lock:
            slot = self._slots.get(node.nodeid)
            if slot is not None and slot.node is node:
                slot.pins += 1
                self._slots.move_to_end(node.nodeid)
                return slot
        fd = self.call(self._reopen, node)
        with self._lock:
            slot = self._slots.get(node.nodeid)
            if slot is not None and slot.node is node:    # another thread was quicker
                slot.pins += 1
                self._slots.move_to_end(node.nodeid)
            else:
                if slot is not None:
                    self._drop(slot)
                slot = self._slots[node.nodeid] = _Slot(node, fd, 1)
                fd = None
                self._evict()
        if fd is not None:
            os.close(fd)
        return slot

    def unpin(self, slot: _Slot) -> None:
        if slot is self._root_slot:
            return
        with self._lock:
            slot.pins -= 1
            if slot.pins == 0:
                if self._slots.get(slot.node.nodeid) is not slot:   # forgotten meanwhile
                    self._close(slot)
                elif len(self._slots) > self.limit:
                    self._evict()

    # ------------------------------------------------------------------ internals
    def _drop(self, slot: _Slot) -> None:
        """Out of the cache; closed now, or by the last unpin (lock held)."""
        del self._slots[slot.node.nodeid]
        if slot.pins == 0:
            self._close(slot)

    @staticmethod
    def _close(slot: _Slot) -> None:
        if slot.fd >= 0:
            try:
                os.close(slot.fd)
            except OSError:
                pass
            slot.fd = -1

    def _evict(self, keep: int | None = None) -> int:
        """Close unpinned descriptors, least recently used first, until at most
        ``keep`` (default: the limit) are cached (lock held). Returns how many."""
        keep = self.limit if keep is None else keep
        n = 0
        if len(self._slots) <= keep:
            return 0
        for nodeid in list(self._slots):
            if len(self._slots) <= keep:
                break
            slot = self._slots[nodeid]
            if slot.pins == 0:
                del self._slots[nodeid]
                self._close(slot)
                n += 1
        self.stats["evicted"] += n
        return n

    def _reopen(self, node) -> int:
        """A new O_PATH descriptor of ``node``'s inode, by handle or by parent and
        name; ESTALE unless it is the node's inode."""
        self.stats["reopened"] += 1
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        if node.handle is not None:
            try:
                fd = sysio.open_by_handle(self._mount_fd, node.handle, flags)
            except OSError as e:
                if e.errno in (errno.ESTALE, errno.ENOENT):
                    self.stats["stale"] += 1
                    raise OSError(errno.ESTALE, os.strerror(errno.ESTALE)) from None
                raise
            btime = None
        else:
            parent = node.parent
            if parent is None:
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
            with self.pinned(parent) as pfd:
                try:
                    fd = os.open(node.name, flags, dir_fd=pfd)
                except FileNotFoundError:
                    self.stats["stale"] += 1
                    raise OSError(errno.ESTALE, os.strerror(errno.ESTALE)) from None
            btime = node.btime
        try:
            st = os.fstat(fd)
            same = (st.st_dev, st.st_ino) == (node.dev, node.ino) and (
                not btime or sysio.birth_time(fd) == btime)
        except OSError:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            self.stats["stale"] += 1
            raise OSError(errno.ESTALE, f"{os.fsdecode(node.name)}: another file now")
        return fd

    # ------------------------------------------------------------------ shortage
    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` -- something that opens a descriptor -- and, when
        the process is out of descriptors, again after closing every unpinned cached
        one (logged once per episode)."""
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            if e.errno not in _SHORT:
                raise
        self.shortage()
        return fn(*args, **kwargs)

    def shortage(self) -> int:
        """Out of descriptors: close every cached one nobody uses now. Returns how
        many were closed."""
        with self._lock:
            cached = len(self._slots)
            n = self._evict(0)
        self.stats["shortages"] += 1
        now = time.monotonic()
        if self._short_since is None or now - self._short_since > EPISODE_QUIET:
            log.warning("short of file descriptors (%d in use): closed %d of %d cached "
                        "node descriptors and serving on (more are reopened as needed; "
                        "see docs/security.md)", _open_count(), n, cached)
        self._short_since = now
        return n

    def count(self) -> int:
        with self._lock:
            return len(self._slots)

    def close(self) -> None:
        with self._lock:
            for slot in self._slots.values():
                self._close(slot)
            self._slots.clear()
        for fd in (self._mount_fd, self._root_slot.fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _open_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1
