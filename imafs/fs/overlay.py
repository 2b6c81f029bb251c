"""Passthrough of a backing directory, as the calling process.

Every inode the kernel knows is a node, found again through fs/nodefd.py (a file
handle, or its parent and name; a bounded cache of O_PATH descriptors): names are
resolved relative to the parent's descriptor with O_NOFOLLOW, never from the backing
root, so a symlink in the tree (``/etc -> /host/etc``) is shown as a symlink and never
followed by the daemon, and ``..`` at the mount root stays there.
Inode numbers are the backing ones (the backing root shows as FUSE's root, 1); inodes
of other devices below the backing root get numbers from a private range.

Integrity never lives here: ``hooks`` (an object with the methods of
:class:`Hooks`) is told about opens, reads, releases, writes and attribute changes,
and may refuse an open with an errno; what it cannot answer on the event loop it
returns as a ``Pending``, which the overlay finishes in a worker thread. The virtual
control directory is served by another object, attached with ``attach_control``:
``fs/routes.py`` is the one place that sends its nodes and handles there.

The request handlers are split as fs/fuse splits them: directories and attributes
in ``dir.py``, files in ``file.py``, extended attributes in ``xattr.py`` (mixins of
``Overlay``), the nodes and handles in ``inode.py``; this module keeps the node
table, lookup, the helpers the handlers share and the ``Hooks`` interface.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import threading

import pyfuse3
import trio
from pyfuse3 import FUSEError

from imafs.fs import sysio
from imafs.fs.dir import DirOps
from imafs.fs.file import FileOps
from imafs.fs.inode import (OTHER_DEV_BASE, Caller, DirHandle, Inode, OpenFile, _fuse_error,
                            _sup_groups)
from imafs.fs.lanes import Lanes
from imafs.fs.nodefd import NodeFds, cache_size
from imafs.fs.routes import ControlRoutes
from imafs.fs.xattr import XattrOps
from imafs.ima.iint import Pending

log = logging.getLogger("imafs.fs")


class Hooks:
    """What the overlay tells integrity, and asks it (integrity off: every method is
    a no-op; the engine's adapter, fs/adapter.py, overrides them).

    ``open``, ``read`` and ``release`` run on the event loop and must not block: each
    answers at once, or returns a :class:`Pending`, whose ``finish()`` the overlay
    calls in a worker thread for the answer. ``opened``, ``wrote`` and the listing
    and size questions run on the event loop too; ``setattr`` and ``setxattr`` in a
    worker thread, each around the change itself (``apply``). Refusals raise
    :data:`Denied`.
    """
    active = False         # open/release/read/write hooks wanted
    xattr_hooks = False    # setxattr/getxattr/listxattr/removexattr hooks wanted
    attr_hooks = False     # setattr hooks wanted (owner, group, mode, size)
    modelled = False       # inode_event wanted (behaviour models)

    def open(self, caller: Caller, inode: "Inode", fd: int, flags: int, exec_: bool,
             created: bool = False):
        """After the backing file is opened (``created``: by this request): a token
        kept with the handle (or a Pending that finishes to one), or raise Denied."""
        return None

    def release(self, token):
        """As soon as the handle is released, before any later request: None, or the
        slow part as a Pending."""
        return None

    def read(self, token, fd: int, off: int, size: int):
        """The bytes to serve (or a Pending that finishes to them, or raises Denied),
        or None to let the overlay read them itself."""
        return None

    def wrote(self, token) -> None:
        """The handle wrote or truncated the file."""

    def setattr(self, caller: Caller, inode: "Inode", uid: int | None, gid: int | None,
                mode: int | None, apply):
        """A change of owner, group, mode (None: not set) or size through the mount:
        ``apply()`` makes it and returns the stat after it; return that, or raise
        Denied to refuse (before calling ``apply``)."""
        return apply()

    def inode_event(self, caller: Caller, hook: str, **objects):
        """Before a namespace operation is done (``hook``: inode_create, inode_mkdir,
        inode_unlink, inode_rmdir, inode_rename, inode_link, inode_symlink,
        inode_setattr; ``objects``: the overlay's inodes and names, the new mode or
        attributes): None to go on, a Pending, or raise Denied to refuse."""
        return None

    def setxattr(self, caller: Caller, inode: "Inode", name: bytes, value: bytes | None,
                 apply) -> None:
        """An xattr write (value None: removal): ``apply(name)`` stores it under
        ``name`` (the hook may give another); raise Denied to refuse."""
        apply(name)

    def getxattr(self, caller: Caller, inode: "Inode", name: bytes):
        """Return a name to read instead of ``name``, a tuple of names of which the
        first the file has is read, or None."""
        return None

    def listxattr(self, caller: Caller, inode: "Inode", names: list[bytes]) -> list[bytes]:
        """Cheap: the attribute names the caller is shown."""
        return names

    def shown_size(self, st: os.stat_result) -> int | None:
        """Cheap: a size to report instead of ``st.st_size``."""
        return None

    def opened(self, inode: "Inode", token, unchanged: bool) -> bool:
        """An open of ``inode`` succeeded with ``token``: whether it may keep the
        kernel's cached pages (``unchanged``: the file is as the last open saw it)."""
        return unchanged


class Overlay(DirOps, FileOps, XattrOps, pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    # POSIX ACLs: the kernel reads system.posix_acl_access through getxattr and
    # enforces it (default_permissions), caches it with the attributes, and leaves
    # inheritance of default ACLs to us: the backing file system does it when we
    # create (the kernel has applied the caller's umask to the mode already:
    # pyfuse3 does not negotiate FUSE_DONT_MASK)
    enable_acl = True

    def __init__(self, backing: str, *, hooks: Hooks | None = None,
                 control_name: bytes = b".imafs", attr_timeout: float = 1.0,
                 entry_timeout: float = 1.0, max_threads: int = 8,
                 fd_cache: int | None = None, read_only: bool = False):
        super().__init__()
        #: ``-o ro``: the kernel refuses every change through the mount (MS_RDONLY);
        #: the daemon refuses them too (EROFS), should the mount be made writable
        self.read_only = read_only
        self.backing = os.path.realpath(backing)
        self.hooks = hooks or Hooks()
        self.control = None
        self.control_name = control_name
        self._hidden = None     # the name readdir of the root does not list
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.lanes = Lanes(max_threads)     # worker threads (fs/lanes.py)
        # the slow part of releases (the last writer's close) has threads of its own:
        # opens of the file wait for it in theirs
        self.release_limiter = trio.CapacityLimiter(max(2, max_threads // 2))
        rootfd = os.open(self.backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(rootfd)
        self.root_dev, self.root_ino = st.st_dev, st.st_ino
        self.root = Inode(pyfuse3.ROOT_INODE, None, st, None, b"")
        self.root.nlookup = 1
        #: the backing root's O_PATH descriptor, held for the mount's life
        self.root_fd = rootfd
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if fd_cache is None:
            fd_cache = cache_size(soft)
        self.fds = self.root.fds = NodeFds(self.root, rootfd, self.backing, fd_cache)
        # every open handle holds a backing descriptor: one user (root aside) may hold
        # a quarter of what the node cache and a reserve leave, so that no user can
        # take the daemon's last descriptors from the others
        self.handle_share = max(64, (soft - fd_cache - 64) // 4)
        self._handles_of: dict[int, int] = {}
        self._share_warned: set[int] = set()
        self.inodes: dict[int, Inode] = {pyfuse3.ROOT_INODE: self.root}
        self.by_key: dict[tuple[int, int], Inode] = {(st.st_dev, st.st_ino): self.root}
        self.other_dev: dict[tuple[int, int], int] = {}
        self.handles: dict[int, object] = {}
        self._next_fh = 1
        self._fh_lock = threading.Lock()
        # releases whose work every later open must see (a control file's close: what
        # was written through it takes effect there), and the event they set
        self._settling = 0
        self._settled: trio.Event | None = None

    def attach_control(self, control) -> None:
        """Serve the control directory with ``control`` (fs/control.py) at
        ``control_name`` in the root: see fs/routes.py."""
        self.control = control
        self._hidden = self.control_name
        ControlRoutes(self, control).install()

    # ------------------------------------------------------------------ helpers
    def settle_begin(self) -> None:
        """A release whose work later opens must see has started (on the event loop,
        before its first await: FUSE RELEASE is queued before close(2) returns, so any
        open that follows the close is read after this)."""
        self._settling += 1
        if self._settled is None:
            self._settled = trio.Event()

    def settle_end(self) -> None:
        self._settling -= 1
        if not self._settling:
            ev, self._settled = self._settled, None
            ev.set()

    def _writable(self) -> None:
        """EROFS on a read-only mount (the kernel refuses first; this is the daemon's
        own check, in case the mount was made writable behind it)."""
        if self.read_only:
            raise FUSEError(errno.EROFS)

    async def settled(self) -> None:
        """Wait until no such release is in progress (an open's first step)."""
        while self._settled is not None:
            await self._settled.wait()

    def _nodeid_for(self, dev: int, ino: int) -> int:
        if dev == self.root_dev:
            if ino == self.root_ino:
                return pyfuse3.ROOT_INODE
            if ino != pyfuse3.ROOT_INODE and ino < OTHER_DEV_BASE:
                return ino
        key = (dev, ino)
        n = self.other_dev.get(key)
        if n is None:
            n = OTHER_DEV_BASE + len(self.other_dev) + 1
            self.other_dev[key] = n
        return n

    def inode(self, nodeid: int) -> Inode:
        node = self.inodes.get(nodeid)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def _pinned(self, node: Inode):
        """``with self._pinned(node) as fd`` (fs/nodefd.py), for a request handler."""
        return self.fds.pinned(node)

    def _attr(self, st: os.stat_result, nodeid: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = nodeid
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        if self.hooks.active:
            shown = self.hooks.shown_size(st)
            if shown is not None:
                a.st_size = shown
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _remember(self, parent: Inode, name: bytes, fd: int, st: os.stat_result) -> Inode:
        """Register one more kernel reference to the inode behind fd (consumes fd: it
        goes into the descriptor cache)."""
        key = (st.st_dev, st.st_ino)
        node = self.by_key.get(key)
        if node is None:
            node = Inode(self._nodeid_for(*key), self.fds, st, parent, name)
            try:
                self.fds.identify(node, fd)
            except BaseException:
                os.close(fd)
                raise
            self.by_key[key] = node
            self.inodes[node.nodeid] = node
        self.fds.adopt(node, fd)
        if node is not self.root:
            node.parent, node.name = parent, name
        node.nlookup += 1
        return node

    def _entry(self, parent: Inode, name: bytes) -> pyfuse3.EntryAttributes:
        if b"/" in name:  # O_NOFOLLOW guards the last component only
            raise FUSEError(errno.EINVAL)
        try:
            with self._pinned(parent) as pfd:
                fd = self.fds.call(os.open, name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   dir_fd=pfd)
        except FileNotFoundError:
            # a negative entry the kernel may cache for entry_timeout (PATH and library
            # searches look up many missing names); creating the name through the
            # mount replaces it at once
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = self.entry_timeout
            return a
        except OSError as e:
            raise _fuse_error(e)
        try:
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise _fuse_error(e)
        node = self._remember(parent, name, fd, st)
        return self._attr(st, node.nodeid)

    def _new_fh(self, obj) -> int:
        with self._fh_lock:
            fh = self._next_fh
            self._next_fh += 1
        self.handles[fh] = obj
        uid = getattr(obj, "uid", None)
        if uid:
            self._handles_of[uid] = self._handles_of.get(uid, 0) + 1
        return fh

    def _share(self, uid: int) -> None:
        """Refuse (EMFILE) a new handle to a user (root aside) who holds its share of
        the daemon's descriptors already (logged once per user until it drops)."""
        if uid and self._handles_of.get(uid, 0) >= self.handle_share:
            if uid not in self._share_warned:
                self._share_warned.add(uid)
                log.warning("uid %d holds %d open handles, its share of the daemon's "
                            "descriptors: its further opens fail with EMFILE", uid,
                            self.handle_share)
            raise FUSEError(errno.EMFILE)

    def _unshare(self, h) -> None:
        """A handle of ``h.uid`` closed."""
        if h.uid:
            n = self._handles_of.get(h.uid, 0) - 1
            if n > 0:
                self._handles_of[h.uid] = n
            else:
                self._handles_of.pop(h.uid, None)
            if n < self.handle_share // 2:
                self._share_warned.discard(h.uid)

    async def _in_thread(self, fn, *args):
        return await self.lanes.run(fn, *args)

    async def _finish(self, pending: Pending):
        """A Pending of the hooks, finished in the worker thread of its lane."""
        return await self.lanes.run(pending.finish, cost=pending.cost, owner=pending.owner)

    def _own_new(self, fd_or_node_fd: int, caller: Caller, parent: Inode, mode: int,
                 is_dir: bool, *, path_fd: bool = True) -> None:
        """Give a newly created inode to the caller, as the kernel would have:
        owner = caller's fsuid; group = parent's group when the parent is set-gid,
        else the caller's fsgid. chown by root clears S_ISUID/S_ISGID, so restore the
        requested special bits after it (S_ISGID only if the caller may have it)."""
        with self._pinned(parent) as pfd:
            pst = os.fstat(pfd)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else caller.gid
        sysio.fchown_empty(fd_or_node_fd, caller.uid, gid)
        special = mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
        if is_dir and pst.st_mode & stat.S_ISGID:
            special |= stat.S_ISGID
        if special and not stat.S_ISLNK(os.fstat(fd_or_node_fd).st_mode):
            if (special & stat.S_ISGID and not is_dir and caller.uid != 0
                    and gid != caller.gid and gid not in _sup_groups(caller.pid)):
                special &= ~stat.S_ISGID
            os.chmod(sysio.proc_path(fd_or_node_fd), (mode & 0o777) | special)

    # ------------------------------------------------------------------ lookup
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.inode(parent_inode)
        if parent is self.root and name == b"..":
            name = b"."
        try:
            if name == b".":
                with self._pinned(parent) as fd:
                    st = os.fstat(fd)
                parent.nlookup += 1
                return self._attr(st, parent.nodeid)
            if name == b"..":
                up = parent.parent or self.root
                with self._pinned(up) as fd:
                    st = os.fstat(fd)
                up.nlookup += 1
                return self._attr(st, up.nodeid)
        except OSError as e:
            raise _fuse_error(e)
        return self._entry(parent, name)

    async def forget(self, inode_list):
        for nodeid, n in inode_list:
            node = self.inodes.get(nodeid)
            if node is None:
                continue
            node.nlookup -= n
            if node.nlookup <= 0 and node is not self.root:
                del self.inodes[nodeid]
                if self.by_key.get((node.dev, node.ino)) is node:
                    del self.by_key[(node.dev, node.ino)]
                self.fds.forget(node)

    async def getattr(self, inode, ctx=None):
        node = self.inode(inode)
        try:
            with self._pinned(node) as fd:
                st = os.fstat(fd)
        except OSError as e:
            raise _fuse_error(e)
        return self._attr(st, node.nodeid)

    async def statfs(self, ctx):
        st = os.statvfs(self.backing)
        s = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(s, attr, getattr(st, attr))
        return s

    async def access(self, inode, mode, ctx):
        return True  # default_permissions: the kernel checks

    def close_all(self) -> None:
        for h in list(self.handles.values()):
            if isinstance(h, (OpenFile, DirHandle)):
                try:
                    os.close(h.fd)
                except OSError:
                    pass
        self.handles.clear()
        self.inodes.clear()
        self.by_key.clear()
        self.fds.close()
