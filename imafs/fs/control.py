"""The FUSE face of the control directory (``MNT/.imafs/``); what its files are and do
is ima/securityfs.py's.

Every process sees its own integrity namespace's files at the top; an ancestor sees
each descendant under ``namespaces/NAME/``. Node ids encode (namespace slot, index in
``securityfs.FILES``, entry key): slot 0 is "the caller's own namespace" (resolved at
open from the caller's pid), slot ``id + 1`` a named namespace (checked at open: the
caller must be that namespace or an ancestor); the key (0 for a file of its own name)
tells apart the files of an ``entries`` row (``digest_lists_loaded/LABEL``). Entries
are never cached by the kernel (timeout 0), so two processes of different namespaces
never share a resolved name.

Every other file of one's own view is the namespace's own inode (slot id + 1, the same
inode as the ancestors' namespaces/NAME/FILE): the kernel keeps file pages per inode,
and splice/sendfile (busybox cat) read through the page cache even with direct_io, so
two namespaces must never share a file inode. Each lookup and getattr reports a new
mtime, so the kernel drops the pages it cached before (auto_inval_data): what a reader
sees is never older than its open.

An open becomes a securityfs session; its reads, writes and release run in a worker
thread; a ``SecurityfsError`` is answered with its errno. The mount answers no FLUSH
(fs/overlay.py): what a close does happens at release, and the routes (fs/routes.py)
make every later open wait for it. A stream (a session
whose ``waits`` is set: a model's ``events``) is read on the event loop instead: a
read with nothing to give waits there, holding no thread, for the session's wake-up
(at most MAX_WAITING reads at a time, EAGAIN beyond); FUSE cannot interrupt a request,
so every WAIT_SLICE seconds the wait asks the session whether its reader was
signalled or has gone, and answers EINTR then.
"""
from __future__ import annotations

import errno
import os
import stat
import time

import pyfuse3
import trio
from pyfuse3 import FUSEError

from imafs.fs.routes import CONTROL_BASE
from imafs.ima.iint import Subject
from imafs.ima.model_secfs import MAX_WAITING, WAIT_SLICE
from imafs.ima.securityfs import FILES, Securityfs, SecurityfsError, children, entries_row

SLOT = 1024
KEY_SHIFT = 40      # node id = CONTROL_BASE + key << KEY_SHIFT + slot * SLOT + index
CHILDREN: dict[int, dict[bytes, int]] = {
    i: {name.encode(): j for name, j in children(i).items()}
    for i, node in enumerate(FILES) if node.is_dir}
ENTRIES: dict[int, int] = {i: e for i, node in enumerate(FILES)
                           if node.is_dir and (e := entries_row(i)) is not None}


class _Dir:
    """An open directory of the control tree."""
    __slots__ = ("slot", "idx", "ns")

    def __init__(self, slot: int, idx: int, ns):
        self.slot, self.idx, self.ns = slot, idx, ns


async def _in_thread(fn, *args, lock=None):
    """``fn(*args)`` in a worker thread, holding ``lock`` (a session's: requests on one
    handle may come concurrently, its calls are made one at a time); a refusal
    becomes the FUSE error."""
    def call():
        if lock is None:
            return fn(*args)
        with lock:
            return fn(*args)
    try:
        return await trio.to_thread.run_sync(call)
    except SecurityfsError as e:
        raise FUSEError(e.errno) from None


class ControlDir:
    def __init__(self, secfs: Securityfs):
        self.fs = secfs
        self.started = time.time_ns()
        self.waiting = 0        # stream reads waiting for data

    # ------------------------------------------------------------------ nodes
    @staticmethod
    def nodeid(slot: int, idx: int, key: int = 0) -> int:
        return CONTROL_BASE + (key << KEY_SHIFT) + slot * SLOT + idx

    @staticmethod
    def split(nodeid: int) -> tuple[int, int]:
        """(slot, index) of a node id (its entry key: :meth:`key`)."""
        return divmod((nodeid - CONTROL_BASE) & ((1 << KEY_SHIFT) - 1), SLOT)

    @staticmethod
    def key(nodeid: int) -> int:
        return (nodeid - CONTROL_BASE) >> KEY_SHIFT

    def _entries(self, idx: int, ns) -> dict[str, int]:
        """The files of the ``entries`` row ``idx`` in ``ns`` (name -> key)."""
        try:
            return self.fs.entries(FILES[idx], ns)
        except SecurityfsError as e:
            raise FUSEError(e.errno) from None

    def _target(self, slot: int, pid: int):
        """The namespace a node of ``slot`` shows to process ``pid``."""
        try:
            return self.fs.target(pid, slot - 1 if slot else None)
        except SecurityfsError as e:
            raise FUSEError(e.errno) from None

    def _attr(self, nodeid: int, ns=None, uid: int = 0) -> pyfuse3.EntryAttributes:
        slot, idx = self.split(nodeid)
        node = FILES[idx]
        key = self.key(nodeid)
        a = pyfuse3.EntryAttributes()
        a.st_ino = nodeid
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = (stat.S_IFDIR if node.is_dir else stat.S_IFREG) | node.mode
        a.st_nlink = 2 if node.is_dir else 1
        a.st_uid = 0
        a.st_gid = 0
        try:
            a.st_size = (0 if ns is None else self.fs.size(node, ns, uid, key) if key
                         else self.fs.size(node, ns, uid))
        except SecurityfsError as e:       # an entry gone meanwhile
            raise FUSEError(e.errno) from None
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started
        if not node.is_dir:
            a.st_mtime_ns = a.st_ctime_ns = max(time.time_ns(), self.started)
        return a

    @staticmethod
    def _file_slot(slot: int, idx: int, ns) -> int:
        """The slot of a node of a directory of ``slot``: a file of one's own view is
        the namespace's own (except the own_only files)."""
        node = FILES[idx]
        if slot == 0 and not node.is_dir and not node.own_only:
            return ns.id + 1
        return slot

    @staticmethod
    def _hidden(slot: int, idx: int) -> bool:
        """A file that only a process's own view has, asked for under namespaces/NAME/."""
        return bool(slot) and FILES[idx].own_only

    async def lookup_root(self, ctx):
        return self._attr(self.nodeid(0, 0))

    async def lookup(self, parent_nodeid, name, ctx):
        slot, idx = self.split(parent_nodeid)
        ns = self._target(slot, ctx.pid)
        if name == b".":
            return self._attr(parent_nodeid)
        if FILES[idx].namespaces:  # the children of ns
            if name == b"..":
                return self._attr(self.nodeid(slot, 0))
            child = ns.children.get(os.fsdecode(name))
            if child is None:
                raise FUSEError(errno.ENOENT)
            return self._attr(self.nodeid(child.id + 1, 0))
        if name == b"..":
            parent = FILES[idx].parent
            if parent is None:
                raise FUSEError(errno.ENOENT)  # handled by the overlay for the mount root
            return self._attr(self.nodeid(slot, parent))
        child_idx = CHILDREN.get(idx, {}).get(name)
        key = 0
        if child_idx is None and idx in ENTRIES:
            key = self._entries(ENTRIES[idx], ns).get(os.fsdecode(name), 0)
            child_idx = ENTRIES[idx] if key else None
        if child_idx is None or self._hidden(slot, child_idx):
            raise FUSEError(errno.ENOENT)
        return self._attr(self.nodeid(self._file_slot(slot, child_idx, ns), child_idx, key),
                          ns, ctx.uid)

    def forget(self, nodeid, n) -> None:
        pass

    async def getattr(self, nodeid, ctx):
        slot, idx = self.split(nodeid)
        if not 0 <= idx < len(FILES) or self._hidden(slot, idx) \
                or bool(self.key(nodeid)) != FILES[idx].entries:
            raise FUSEError(errno.ENOENT)
        ns = self._target(slot, ctx.pid)
        return self._attr(nodeid, ns, ctx.uid)

    async def setattr(self, nodeid, attr, fields, fh, ctx):
        # truncation of a control file (O_TRUNC from a shell redirect) is a no-op
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise FUSEError(errno.EPERM)
        return await self.getattr(nodeid, ctx)

    # ------------------------------------------------------------------ files
    async def open(self, nodeid, flags, ctx):
        slot, idx = self.split(nodeid)
        if not 0 <= idx < len(FILES) or FILES[idx].is_dir:
            raise FUSEError(errno.EISDIR)
        key = self.key(nodeid)
        if self._hidden(slot, idx) or bool(key) != FILES[idx].entries:
            raise FUSEError(errno.ENOENT)
        ns = self._target(slot, ctx.pid)
        if key:
            return await _in_thread(self.fs.open, FILES[idx], ns,
                                    Subject(ctx.pid, ctx.uid, ctx.gid), flags, key)
        return await _in_thread(self.fs.open, FILES[idx], ns,
                                Subject(ctx.pid, ctx.uid, ctx.gid), flags)

    async def read(self, h, off: int, size: int):
        if isinstance(h, _Dir):
            raise FUSEError(errno.EISDIR)
        if getattr(h, "waits", False):    # a session may be any object with read()
            return await self._read_stream(h, size)
        return await _in_thread(h.read, off, size, lock=h.lock)

    async def _read_stream(self, h, size: int) -> bytes:
        """A stream's read: what is there, else wait for it on the event loop."""
        data = h.take(size)
        if data:
            return data
        if h.nonblocking or self.waiting >= MAX_WAITING:
            raise FUSEError(errno.EAGAIN)
        token = trio.lowlevel.current_trio_token()
        self.waiting += 1
        try:
            while True:
                woken = trio.Event()

                def wake(ev=woken):
                    try:
                        token.run_sync_soon(ev.set)
                    except trio.RunFinishedError:
                        pass
                h.wake_on_data(wake)
                data = h.take(size)     # lines that came before the wake-up was set
                if data:
                    return data
                with trio.move_on_after(WAIT_SLICE):
                    await woken.wait()
                data = h.take(size)
                if data:
                    return data
                if h.interrupted():
                    raise FUSEError(errno.EINTR)
        finally:
            h.wake_on_data(None)
            self.waiting -= 1

    async def write(self, h, off: int, buf: bytes) -> int:
        if isinstance(h, _Dir):
            raise FUSEError(errno.EISDIR)
        return await _in_thread(h.write, bytes(buf), lock=h.lock)

    async def release(self, h) -> None:
        if not isinstance(h, _Dir):
            await _in_thread(h.close, lock=h.lock)

    # ------------------------------------------------------------------ directories
    async def opendir(self, nodeid, ctx):
        slot, idx = self.split(nodeid)
        if not 0 <= idx < len(FILES) or not FILES[idx].is_dir:
            raise FUSEError(errno.ENOTDIR)
        return _Dir(slot, idx, self._target(slot, ctx.pid))

    async def readdir(self, h: _Dir, start_id: int, token) -> None:
        if FILES[h.idx].namespaces:
            names = [(n.encode(), self.nodeid(c.id + 1, 0))
                     for n, c in sorted(h.ns.children.items())]
        else:
            names = [(n, self.nodeid(self._file_slot(h.slot, i, h.ns), i))
                     for n, i in CHILDREN.get(h.idx, {}).items()
                     if not self._hidden(h.slot, i)]
            e = ENTRIES.get(h.idx)
            if e is not None:
                slot = self._file_slot(h.slot, e, h.ns)
                names += [(os.fsencode(n), self.nodeid(slot, e, k))
                          for n, k in sorted(self._entries(e, h.ns).items())]
        for i in range(start_id, len(names)):
            name, nodeid = names[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(nodeid), i + 1):
                return

