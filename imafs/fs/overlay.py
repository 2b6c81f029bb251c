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
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import threading
from dataclasses import dataclass

import pyfuse3
import trio
from pyfuse3 import FUSEError

from imafs.fs import sysio
from imafs.fs.lanes import Lanes
from imafs.fs.nodefd import NodeFds, cache_size
from imafs.fs.routes import ControlRoutes
from imafs.ima.iint import AccessDenied, Pending

log = logging.getLogger("imafs.fs")

FMODE_EXEC = 0o40  # __FMODE_EXEC: set in the FUSE open flags of an execve()
# O_NOFOLLOW: the kernel resolved the name already (a symlink never reaches OPEN); on
# our /proc/self/fd/N path it would refuse every open with ELOOP (tar opens so).
# O_DIRECT: the kernel already bypasses its FUSE page cache for such a handle; on the
# backing descriptor it would need aligned buffers, offsets and sizes, which a FUSE
# request (and a Python buffer) does not have: EINVAL. The hooks get the flags as
# the kernel sent them, O_DIRECT included (IMA's permit_directio).
_OPEN_PASS_MASK = ~(FMODE_EXEC | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW
                    | getattr(os, "O_PATH", 0) | getattr(os, "O_DIRECT", 0))
OTHER_DEV_BASE = 1 << 56       # inode numbers for files on other devices below the root
SMALL_IO = 1 << 20


def _truncate_opened(fd: int, oflags: int) -> None:
    """The O_TRUNC of an open, done after the hooks allowed it (regular files only,
    as open(2) ignores O_TRUNC on FIFOs and devices)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return
    if oflags & os.O_ACCMODE != os.O_RDONLY:
        os.ftruncate(fd, 0)
    else:                       # O_RDONLY|O_TRUNC truncates too (with write permission)
        os.truncate(sysio.proc_path(fd), 0)


@dataclass(frozen=True)
class Caller:
    """Who made a request (from the FUSE request context)."""
    pid: int
    uid: int
    gid: int
    umask: int = 0o022


#: what hooks raise to refuse an operation (``.errno``, ``.reason``): the engine's
#: refusal itself, so that it crosses from the engine to the overlay unchanged
Denied = AccessDenied


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


class Inode:
    """A node the kernel knows. Its backing inode is reached only through a pinned
    descriptor: ``with node.pinned() as fd`` (fs/nodefd.py; never kept past the
    block), or a new descriptor from ``node.reopen(flags)``."""
    __slots__ = ("nodeid", "fds", "handle", "btime", "dev", "ino", "nlookup", "parent",
                 "name", "kind", "lock", "seen", "generation", "__weakref__")

    def __init__(self, nodeid: int, fds: NodeFds | None, st: os.stat_result, parent,
                 name: bytes):
        self.nodeid = nodeid
        self.fds = fds
        self.handle = None   # file handle (fs/nodefd.py), else found by parent and name
        self.btime = 0       # birth time, checked when found by parent and name
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.kind = stat.S_IFMT(st.st_mode)
        self.nlookup = 0
        self.parent = parent
        self.name = name
        self.lock = None   # created on demand by the integrity adapter
        self.seen = None   # (mtime_ns, ctime_ns, size) at the last open: keep_cache
        # the inode's generation (read once by the integrity adapter; a node is
        # never found again as another inode: fs/nodefd.py)
        self.generation = None

    def pinned(self):
        """``with node.pinned() as fd``: an O_PATH descriptor of the backing inode."""
        return self.fds.pinned(self)

    def reopen(self, flags: int) -> int:
        """A new descriptor of the backing inode (``flags``: O_RDONLY...), the
        caller's to close (through /proc/self/fd: the inode itself, no name)."""
        with self.fds.pinned(self) as fd:
            return self.fds.call(os.open, sysio.proc_path(fd), flags)

    def path(self) -> bytes:
        """Path inside the mount, from the names the kernel last looked up."""
        parts = []
        node = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))


class OpenFile:
    __slots__ = ("fd", "inode", "flags", "token", "writable", "pin", "uid")

    def __init__(self, fd, inode, flags, token):
        self.fd = fd
        self.inode = inode
        self.flags = flags
        self.token = token
        self.writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.pin = None    # the node's descriptor, pinned while the handle is open
        self.uid = None    # whose handle it is (counted against the uid's share)


class DirHandle:
    """An open backing directory. Offsets are the backing file system's own
    (getdents ``d_off``): stable while the directory changes, as the kernel's are."""
    __slots__ = ("inode", "fd", "buf", "i", "at", "entries", "pin", "uid")

    def __init__(self, inode, fd):
        self.inode = inode
        self.fd = fd
        self.pin = None    # the node's descriptor, pinned while the handle is open
        self.uid = None    # whose handle it is (counted against the uid's share)
        self.buf = []      # entries read at offset ``at``; buf[i] is the next to send
        self.i = 0
        self.at = 0
        self.entries = None  # fallback without getdents64: a listing, offsets = indexes


def _caller(ctx) -> Caller:
    return Caller(ctx.pid, ctx.uid, ctx.gid, getattr(ctx, "umask", 0o022))


def _fuse_error(e: OSError) -> FUSEError:
    return FUSEError(e.errno or errno.EIO)


_SETID = stat.S_ISUID | stat.S_ISGID
_ACL_ACCESS = b"system.posix_acl_access"
_ACL_NAMES = (_ACL_ACCESS, b"system.posix_acl_default")


def _in_group(caller: Caller, gid: int) -> bool:
    return gid == caller.gid or gid in _sup_groups(caller.pid)


def _privs_to_drop(st: os.stat_result, caller: Caller) -> int:
    """The set-id bits a write or truncation by caller removes from a regular file,
    as the kernel's setattr_should_drop_suidgid(): S_ISUID always, S_ISGID when
    group-executable or when the caller is not in the file's group; nothing for a
    privileged caller (CAP_FSETID, approximated by fsuid 0)."""
    mode = st.st_mode
    if not mode & _SETID or caller.uid == 0 or not stat.S_ISREG(mode):
        return 0
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not _in_group(caller, st.st_gid)):
        kill |= stat.S_ISGID
    return kill


class Overlay(pyfuse3.Operations):
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

    async def setattr(self, inode, attr, fields, fh, ctx):
        self._writable()
        node = self.inode(inode)
        caller = _caller(ctx)
        meta = (fields.update_size or fields.update_mode or fields.update_uid
                or fields.update_gid)
        # a chown(f, -1, -1) or the set-id check before a write: no field at all (it
        # may drop S_ISGID, see _setattr)
        empty = not (meta or fields.update_atime or fields.update_mtime
                     or fields.update_ctime)
        # the behaviour models' inode_setattr, before anything changes
        if (fields.update_mode or fields.update_uid or fields.update_gid
                or fields.update_size or fields.update_atime or fields.update_mtime):
            await self._lsm(
                ctx, "inode_setattr", node=node,
                mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime=bool(fields.update_atime), mtime=bool(fields.update_mtime))

        def apply():
            return self._setattr(node, attr, fields, fh, caller)
        try:
            if (meta or empty) and self.hooks.attr_hooks:
                st = await self._in_thread(
                    self.hooks.setattr, caller, node,
                    attr.st_uid if fields.update_uid else None,
                    attr.st_gid if fields.update_gid else None,
                    attr.st_mode if fields.update_mode else None, apply)
            else:
                st = apply()
        except Denied as d:
            raise FUSEError(d.errno)
        except OSError as e:
            raise _fuse_error(e)
        return self._attr(st, node.nodeid)

    def _setattr(self, node: Inode, attr, fields, fh, caller: Caller) -> os.stat_result:
        """The change itself (OSError on failure): the stat after it."""
        with self._pinned(node) as nfd:
            return self._setattr_on(node, nfd, attr, fields, fh, caller)

    def _setattr_on(self, node: Inode, nfd: int, attr, fields, fh,
                    caller: Caller) -> os.stat_result:
        """_setattr with the node's descriptor ``nfd`` pinned."""
        path = sysio.proc_path(nfd)
        # a chown, or the set-id check before a write (file_remove_privs), by an
        # unprivileged caller: the kernel decides with setattr_should_drop_sgid() on
        # the inode as it is before the change, but FUSE sends a new mode only for
        # S_ISUID and group-executable S_ISGID; we chown and write as root, so
        # S_ISGID without group-exec is ours to drop. The kernel's decision arrives
        # as a SETATTR without any field (chown(f, -1, -1), a write) or with the new
        # owner only.
        chown_sgid = ((fields.update_uid or fields.update_gid or not (
            fields.update_size or fields.update_mode or fields.update_atime
            or fields.update_mtime or fields.update_ctime))
            and caller.uid != 0 and node.kind != stat.S_IFDIR)
        st0 = os.fstat(nfd) if chown_sgid else None
        if not (fields.update_size or fields.update_mode or fields.update_uid
                or fields.update_gid or fields.update_atime or fields.update_mtime
                or fields.update_ctime):
            # no field at all: chown(f, -1, -1) (or the kernel's set-id decision
            # before a write); ext4 updates ctime for it, as the backing file system
            # does for the same call here
            sysio.fchown_empty(nfd, -1, -1)
        if fields.update_size:
            h = self.handles.get(fh) if fh is not None else None
            if isinstance(h, OpenFile) and h.writable:
                os.ftruncate(h.fd, attr.st_size)
                if h.token is not None:
                    # ftruncate(fd): a change through this handle, as a write (its
                    # last close re-measures and relabels)
                    self.hooks.wrote(h.token)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_uid or fields.update_gid:
            st = os.fstat(nfd)
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            sysio.fchown_empty(nfd, uid, gid)
            # chown clears S_ISUID/S_ISGID on the backing file even for root; the
            # kernel sends a mode with the bits still set only if they must stay
            if not fields.update_mode and stat.S_ISREG(st.st_mode) and \
                    st.st_mode & (stat.S_ISUID | stat.S_ISGID) and caller.uid == 0:
                os.chmod(path, stat.S_IMODE(st.st_mode))
        if fields.update_mode:
            if node.kind != stat.S_IFLNK:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
        if (st0 is not None and st0.st_mode & stat.S_ISGID
                and not _in_group(caller, st0.st_gid)):
            now = os.fstat(nfd)
            if now.st_mode & stat.S_ISGID:
                os.chmod(path, stat.S_IMODE(now.st_mode) & ~stat.S_ISGID)
        if fields.update_atime or fields.update_mtime:
            sysio.utimens_empty(
                nfd,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None)
        st = os.fstat(nfd)
        if fields.update_size and not fields.update_mode and caller.uid != 0:
            # the kernel sends a new mode only for S_ISUID and group-executable
            # S_ISGID; the rest of the rule is ours (we truncate as root)
            kill = _privs_to_drop(st, caller)
            if kill:
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~kill)
                st = os.fstat(nfd)
        return st

    async def readlink(self, inode, ctx):
        node = self.inode(inode)
        try:
            with self._pinned(node) as fd:
                return sysio.readlink_empty(fd)
        except OSError as e:
            raise _fuse_error(e)

    # ------------------------------------------------------------------ namespace ops
    async def _lsm(self, ctx, hook: str, **objects) -> None:
        """The security hook of a namespace operation, before it is done (behaviour
        models: Hooks.inode_event); a refusal is answered with its errno."""
        if not self.hooks.modelled:
            return
        caller = _caller(ctx)
        try:
            r = self.hooks.inode_event(caller, hook, **objects)
            if type(r) is Pending:
                await self._in_thread(r.finish)
        except Denied as d:
            log.warning("denied: pid %d uid %d: %s", caller.pid, caller.uid, d.reason)
            raise FUSEError(d.errno) from None
        except OSError as e:
            raise _fuse_error(e)

    def _make(self, parent_inode, name, ctx, perm, is_dir, make):
        """Create a node with ``make(parent_fd, perm)``, give it to the caller, and
        return its entry (mknod, mkdir, symlink)."""
        parent = self.inode(parent_inode)
        caller = _caller(ctx)
        perm &= ~caller.umask
        try:
            with self._pinned(parent) as pfd:
                make(pfd, perm & 0o777)
                fd = self.fds.call(os.open, name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   dir_fd=pfd)
        except OSError as e:
            raise _fuse_error(e)
        try:
            self._own_new(fd, caller, parent, perm, is_dir)
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise _fuse_error(e)
        return self._attr(st, self._remember(parent, name, fd, st).nodeid)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._writable()
        return self._make(parent_inode, name, ctx, stat.S_IMODE(mode), False,
                          lambda d, p: os.mknod(name, stat.S_IFMT(mode) | p, rdev, dir_fd=d))

    async def mkdir(self, parent_inode, name, mode, ctx):
        self._writable()
        await self._lsm(ctx, "inode_mkdir", parent=self.inode(parent_inode), name=name,
                        mode=stat.S_IFDIR | (stat.S_IMODE(mode) & ~_caller(ctx).umask))
        return self._make(parent_inode, name, ctx, stat.S_IMODE(mode), True,
                          lambda d, p: os.mkdir(name, p, dir_fd=d))

    async def symlink(self, parent_inode, name, target, ctx):
        self._writable()
        # a symlink's mode is always 0777 (make ignores the mode it is given)
        await self._lsm(ctx, "inode_symlink", parent=self.inode(parent_inode), name=name,
                        target=target)
        return self._make(parent_inode, name, ctx, 0o777, False,
                          lambda d, p: os.symlink(target, name, dir_fd=d))

    async def unlink(self, parent_inode, name, ctx):
        self._writable()
        parent = self.inode(parent_inode)
        await self._lsm(ctx, "inode_unlink", parent=parent, name=name)
        try:
            with self._pinned(parent) as pfd:
                os.unlink(name, dir_fd=pfd)
        except OSError as e:
            raise _fuse_error(e)

    async def rmdir(self, parent_inode, name, ctx):
        self._writable()
        parent = self.inode(parent_inode)
        await self._lsm(ctx, "inode_rmdir", parent=parent, name=name)
        try:
            with self._pinned(parent) as pfd:
                os.rmdir(name, dir_fd=pfd)
        except OSError as e:
            raise _fuse_error(e)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._writable()
        old = self.inode(parent_inode_old)
        new = self.inode(parent_inode_new)
        await self._lsm(ctx, "inode_rename", parent=old, name=name_old, new_parent=new,
                        new_name=name_new, exchange=bool(flags & sysio.RENAME_EXCHANGE))
        try:
            with self._pinned(old) as ofd, self._pinned(new) as nfd:
                if flags:
                    sysio.renameat2(ofd, name_old, nfd, name_new, flags)
                else:
                    os.rename(name_old, name_new, src_dir_fd=ofd, dst_dir_fd=nfd)
        except OSError as e:
            raise _fuse_error(e)
        # keep the names we report (measurement paths) in step with the tree
        self._renamed(new, name_new)
        if flags & sysio.RENAME_EXCHANGE:
            self._renamed(old, name_old)

    def _renamed(self, parent: Inode, name: bytes) -> None:
        try:
            with self._pinned(parent) as pfd:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            return
        node = self.by_key.get((st.st_dev, st.st_ino))
        if node is not None and node is not self.root:
            node.parent, node.name = parent, name

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._writable()
        node = self.inode(inode)
        parent = self.inode(new_parent_inode)
        await self._lsm(ctx, "inode_link", node=node, new_parent=parent, new_name=new_name)
        try:
            with self._pinned(node) as fd, self._pinned(parent) as pfd:
                sysio.link_empty(fd, pfd, new_name)
                st = os.fstat(fd)
        except OSError as e:
            raise _fuse_error(e)
        node.nlookup += 1
        return self._attr(st, node.nodeid)

    # ------------------------------------------------------------------ files
    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._writable()
        if self._settled is not None:
            await self.settled()
        node = self.inode(inode)
        self._share(ctx.uid)
        exec_ = bool(flags & FMODE_EXEC)
        oflags = (flags & _OPEN_PASS_MASK) | os.O_CLOEXEC
        # O_TRUNC (FUSE atomic_o_trunc) waits for the hooks: the kernel appraises a
        # file before it truncates it (do_open: ima_file_check, then handle_truncate),
        # so a refused open -- a signed file in enforce mode -- leaves it intact
        active = self.hooks.active     # one answer for the whole open
        trunc = bool(oflags & os.O_TRUNC) and active
        try:
            # the node stays pinned while the handle is open (fs/nodefd.py)
            pin = self.fds.pin(node)
        except OSError as e:
            raise _fuse_error(e)
        try:
            fd = self.fds.call(os.open, sysio.proc_path(pin.fd),
                               oflags & ~os.O_TRUNC if trunc else oflags)
        except OSError as e:
            self.fds.unpin(pin)
            raise _fuse_error(e)
        token = None
        if active:
            try:
                token = await self._hook_open(_caller(ctx), node, fd, flags, exec_)
            except BaseException:
                self.fds.unpin(pin)
                raise
        h = OpenFile(fd, node, oflags, token)
        h.pin, h.uid = pin, ctx.uid
        try:
            if trunc:
                _truncate_opened(fd, oflags)
                if token is not None:
                    self.hooks.wrote(token)
            st = os.fstat(fd)
            if st.st_mode & _SETID and h.writable:
                st = self._open_privs(h, st, _caller(ctx), bool(oflags & os.O_TRUNC))
        except OSError as e:
            os.close(fd)
            self.fds.unpin(pin)
            if token is not None:
                await self._release_token(token)
            raise _fuse_error(e)
        keep = self._keep_cache(node, st)
        if active:
            keep = self.hooks.opened(node, token, keep)
        return pyfuse3.FileInfo(fh=self._new_fh(h), keep_cache=keep)

    @staticmethod
    def _keep_cache(node: Inode, st: os.stat_result) -> bool:
        seen = (st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        keep = node.seen == seen
        node.seen = seen
        return keep

    @staticmethod
    def _open_privs(h: OpenFile, st: os.stat_result, caller: Caller, truncated: bool):
        """Set-id bits on a writable open of a set-id file by an unprivileged caller.
        We open as root, so the backing file system never drops them itself; the
        kernel does on write() and truncate() through its own setattr (S_ISUID and
        group-executable S_ISGID as a new mode; the rest of its decision as a SETATTR
        without fields, which setattr() completes), except for O_TRUNC: the open
        carries it, so the bits go here. A write through a shared mapping never drops
        them, natively as here (writeback WRITEs change nothing). Returns the (new)
        stat."""
        kill = _privs_to_drop(st, caller)
        if kill and truncated:
            os.fchmod(h.fd, stat.S_IMODE(st.st_mode) & ~kill)
            return os.fstat(h.fd)
        return st

    async def create(self, parent_inode, name, mode, flags, ctx):
        self._writable()
        if self._settled is not None:
            await self.settled()
        parent = self.inode(parent_inode)
        caller = _caller(ctx)
        self._share(caller.uid)
        perm = stat.S_IMODE(mode) & ~caller.umask
        base = (flags & _OPEN_PASS_MASK) | os.O_CLOEXEC | os.O_NOFOLLOW
        trunc = False
        await self._lsm(ctx, "inode_create", parent=parent, name=name,
                        mode=stat.S_IFREG | (perm & 0o7777))
        try:
            ppin = self.fds.pin(parent)
        except OSError as e:
            raise _fuse_error(e)
        try:
            return await self._create(parent, ppin.fd, name, caller, perm, base, flags)
        finally:
            self.fds.unpin(ppin)

    async def _create(self, parent: Inode, pdir: int, name: bytes, caller: Caller,
                      perm: int, base: int, flags: int):
        """create() with the parent's descriptor ``pdir`` pinned."""
        trunc = False
        try:
            fd = self.fds.call(os.open, name, base | os.O_CREAT | os.O_EXCL, perm & 0o777,
                               dir_fd=pdir)
            created = True
        except FileExistsError as e:
            if flags & os.O_EXCL:
                raise _fuse_error(e)
            # the name exists after all (the kernel sends CREATE for a negative dentry
            # it cached). FUSE has no way to say "opened, not created", so the kernel
            # marks the file created and skips its own may_open() checks: open it with
            # the caller's ids, for the backing kernel to check modes and ACLs.
            # As in open(): truncate only once the hooks allowed the open.
            trunc = bool(base & os.O_TRUNC) and self.hooks.active
            try:
                fd = await self._in_thread(self._open_existing, caller, pdir, name,
                                           base & ~os.O_TRUNC if trunc else base, trunc)
            except OSError as e2:
                raise _fuse_error(e2)
            created = False
        except OSError as e:
            raise _fuse_error(e)
        try:
            pfd = self.fds.call(os.open, name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=pdir)
        except OSError as e:
            os.close(fd)
            raise _fuse_error(e)
        h = OpenFile(fd, None, base, None)
        h.uid = caller.uid
        try:
            if created:
                self._own_new(pfd, caller, parent, perm, False)
            st = os.fstat(fd)
            # set-id bits of an existing file: now, or after a truncation the hooks
            # must allow first (a refused open changes nothing)
            if not created and not trunc and st.st_mode & _SETID and h.writable:
                st = self._open_privs(h, st, caller, bool(base & os.O_TRUNC))
        except OSError as e:
            os.close(fd)
            os.close(pfd)
            raise _fuse_error(e)
        node = self._remember(parent, name, pfd, st)
        try:
            h.pin = self.fds.pin(node)
        except OSError as e:
            os.close(fd)
            raise _fuse_error(e)
        token = None
        if self.hooks.active:
            try:
                token = await self._hook_open(caller, node, fd, flags, False, created)
            except BaseException:
                self.fds.unpin(h.pin)
                raise
        if trunc:
            try:
                _truncate_opened(fd, base)
                st = os.fstat(fd)
                if st.st_mode & _SETID and h.writable:
                    st = self._open_privs(h, st, caller, True)
            except OSError as e:
                os.close(fd)
                self.fds.unpin(h.pin)
                if token is not None:
                    await self._release_token(token)
                raise _fuse_error(e)
            if token is not None:
                self.hooks.wrote(token)
        node.seen = (st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        h.inode, h.token = node, token
        return pyfuse3.FileInfo(fh=self._new_fh(h)), self._attr(st, node.nodeid)

    @staticmethod
    def _open_existing(caller: Caller, dirfd: int, name: bytes, oflags: int,
                       trunc_later: bool) -> int:
        """Open an existing dirfd/name as the caller would (worker thread): with the
        caller's fsuid, fsgid and supplementary groups on this thread, so the kernel
        checks DAC and ACLs, O_NOATIME ownership, ... as native open() does; plus write
        permission for an O_TRUNC deferred until the hooks allowed the open."""
        if caller.uid == 0:
            return os.open(name, oflags, dir_fd=dirfd)
        groups = _sup_groups(caller.pid) | {caller.gid}
        with sysio.thread_credentials(caller.uid, caller.gid, groups):
            fd = os.open(name, oflags, dir_fd=dirfd)
            try:
                if (trunc_later and oflags & os.O_ACCMODE == os.O_RDONLY
                        and not os.access(sysio.proc_path(fd), os.W_OK, effective_ids=True)):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            except BaseException:
                os.close(fd)
                raise
        return fd

    async def read(self, fh, off, size):
        h = self.handles.get(fh)
        if not isinstance(h, OpenFile):
            raise FUSEError(errno.EBADF)
        if h.token is not None:
            try:
                data = self.hooks.read(h.token, h.fd, off, size)
                if type(data) is Pending:
                    data = await self._in_thread(data.finish)
            except Denied as d:   # read-time verification failed: EIO, no byte served
                raise FUSEError(d.errno)
            if data is not None:
                return data
        try:
            # from the page cache on the event loop; what needs the disk in a worker.
            # Never a short read before EOF: FUSE takes one as the file's end
            data = sysio.pread_nowait(h.fd, size, off)
            if data is not None and (len(data) == size
                                     or off + len(data) >= os.fstat(h.fd).st_size):
                return data
            return await self._in_thread(os.pread, h.fd, size, off)
        except OSError as e:
            raise _fuse_error(e)

    async def write(self, fh, off, buf):
        self._writable()
        h = self.handles.get(fh)
        if not isinstance(h, OpenFile):
            raise FUSEError(errno.EBADF)
        try:
            if len(buf) > SMALL_IO:
                n = await self._in_thread(os.pwrite, h.fd, buf, off)
            else:
                n = os.pwrite(h.fd, buf, off)
        except OSError as e:
            raise _fuse_error(e)
        if h.token is not None:
            self.hooks.wrote(h.token)
        return n

    async def flush(self, fh):
        """Never wanted: ENOSYS makes the kernel stop sending FLUSH for the whole mount
        (``fc->no_flush``; close(2) then returns 0 at once, one round trip fewer per
        close). Nothing depends on it: what a close does happens at RELEASE --
        the last writer's close (engine.file_release, which later opens of the file
        wait for), a control file's close (which every later open waits for:
        ``settle_begin``) -- and control-file writes report their errors from
        write(2), as the kernel's securityfs does; its release never fails either.
        Lost: a backing file system's delayed write error at close(2) (NFS-like
        backends; fsync still reports it)."""
        raise FUSEError(errno.ENOSYS)

    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if not isinstance(h, OpenFile):
            return
        try:
            os.close(h.fd)
        except OSError:
            pass
        if h.pin is not None:
            self.fds.unpin(h.pin)
        self._unshare(h)
        if h.token is not None:
            # inline, before any later request runs: FUSE RELEASE is asynchronous to
            # close(), and the next OPEN must see the open counts without this handle
            await self._release_token(h.token)

    async def _hook_open(self, caller: Caller, node: Inode, fd: int, flags: int, exec_: bool,
                         created: bool = False):
        """The hooks' token for an open of ``fd`` (finished in a worker thread when
        they return a Pending); a refusal closes ``fd`` and answers its errno."""
        try:
            token = self.hooks.open(caller, node, fd, flags, exec_, created)
            if type(token) is Pending:
                token = await self._finish(token)
            return token
        except Denied as d:
            os.close(fd)
            log.warning("denied: pid %d uid %d: %s", caller.pid, caller.uid, d.reason)
            raise FUSEError(d.errno) from None
        except BaseException:
            os.close(fd)
            raise

    async def _release_token(self, token) -> None:
        r = self.hooks.release(token)
        if type(r) is Pending:
            await trio.to_thread.run_sync(r.finish, limiter=self.release_limiter)

    async def fsync(self, fh, datasync):
        h = self.handles.get(fh)
        if not isinstance(h, OpenFile):
            return
        try:
            await self._in_thread(os.fdatasync if datasync else os.fsync, h.fd)
        except OSError as e:
            raise _fuse_error(e)

    # ------------------------------------------------------------------ directories
    async def opendir(self, inode, ctx):
        node = self.inode(inode)
        self._share(ctx.uid)
        try:
            pin = self.fds.pin(node)     # pinned while the handle is open
        except OSError as e:
            raise _fuse_error(e)
        try:
            fd = self.fds.call(os.open, sysio.proc_path(pin.fd),
                               os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            self.fds.unpin(pin)
            raise _fuse_error(e)
        h = DirHandle(node, fd)
        h.pin, h.uid = pin, ctx.uid
        return self._new_fh(h)

    @staticmethod
    def _list(h: DirHandle):
        os.lseek(h.fd, 0, os.SEEK_SET)   # scandir(fd) reads from the shared offset
        with os.scandir(h.fd) as it:
            names = [os.fsencode(e.name) for e in it]
        names.sort()
        return list(zip([b".", b".."] + names, range(1, len(names) + 3)))

    def _fill(self, h: DirHandle, start_id: int) -> None:
        """Make h.buf[h.i] the entry that follows offset start_id (worker thread)."""
        if h.entries is not None or not sysio.HAVE_GETDENTS:
            if h.entries is None or start_id == 0:
                h.entries = self._list(h)
            h.buf, h.i, h.at = h.entries, start_id, start_id
            return
        if h.at != start_id:       # a seekdir(), rewinddir() or a reply cut short
            os.lseek(h.fd, start_id, os.SEEK_SET)
            h.buf, h.i, h.at = [], 0, start_id
        if h.i >= len(h.buf):
            h.buf, h.i = sysio.getdents(h.fd), 0

    async def readdir(self, fh, start_id, token):
        h = self.handles.get(fh)
        if not isinstance(h, DirHandle):
            raise FUSEError(errno.EBADF)
        node = h.inode
        hide = self._hidden if node is self.root else None
        while True:
            if h.at != start_id or h.i >= len(h.buf):
                try:
                    await self._in_thread(self._fill, h, start_id)
                except OSError as e:
                    raise _fuse_error(e)
                if h.i >= len(h.buf):
                    return  # end of the directory
            name, off = h.buf[h.i]
            if name == b"." or name == b"..":
                target = node if name == b"." or node is self.root else (node.parent or self.root)
                try:
                    with self._pinned(target) as tfd:
                        st = os.fstat(tfd)
                except OSError:
                    st = None
                # the kernel takes no reference for "." and ".." (no forget follows)
                if st is not None and not pyfuse3.readdir_reply(
                        token, name, self._attr(st, target.nodeid), off):
                    return
            elif name != hide:
                try:
                    fd = self.fds.call(os.open, name,
                                       os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=h.fd)
                except OSError:
                    fd = -1  # removed since it was read: skip, as getdents would
                if fd >= 0:
                    try:
                        st = os.fstat(fd)
                    except OSError:
                        os.close(fd)
                    else:
                        nodeid = self._nodeid_for(st.st_dev, st.st_ino)
                        if not pyfuse3.readdir_reply(token, name, self._attr(st, nodeid), off):
                            os.close(fd)
                            return
                        self._remember(node, name, fd, st)
            h.i += 1
            h.at = start_id = off

    async def releasedir(self, fh):
        h = self.handles.pop(fh, None)
        if isinstance(h, DirHandle):
            os.close(h.fd)
            if h.pin is not None:
                self.fds.unpin(h.pin)
            self._unshare(h)

    async def fsyncdir(self, fh, datasync):
        h = self.handles.get(fh)
        if isinstance(h, DirHandle):
            try:
                await self._in_thread(os.fdatasync if datasync else os.fsync, h.fd)
            except OSError as e:
                raise _fuse_error(e)

    async def statfs(self, ctx):
        st = os.statvfs(self.backing)
        s = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(s, attr, getattr(st, attr))
        return s

    async def access(self, inode, mode, ctx):
        return True  # default_permissions: the kernel checks

    # ------------------------------------------------------------------ xattrs
    def _xattr(self, node: Inode, fn, *args):
        """``fn(path, *args)`` on the inode's /proc/self/fd path (following it lands
        on the inode itself, symlinks included), the node pinned meanwhile."""
        with self._pinned(node) as fd:
            return fn(sysio.proc_path(fd), *args)

    async def setxattr(self, inode, name, value, ctx):
        self._writable()
        node = self.inode(inode)
        caller = _caller(ctx)

        def apply(stored: bytes) -> None:
            self._xattr(node, os.setxattr, stored, value)
            if name == _ACL_ACCESS and caller.uid != 0:
                self._acl_drop_sgid(node, caller)
        await self._xattr_change(node, caller, name, value, apply)

    async def _xattr_change(self, node: Inode, caller: Caller, name: bytes,
                            value: bytes | None, apply) -> None:
        try:
            if self.hooks.xattr_hooks:
                await self._in_thread(self.hooks.setxattr, caller, node, name, value, apply)
            else:
                apply(name)
        except Denied as d:
            raise FUSEError(d.errno)
        except OSError as e:
            raise _fuse_error(e)

    @staticmethod
    def _acl_drop_sgid(node: Inode, caller: Caller) -> None:
        """After an access ACL was set by an unprivileged caller: the kernel's
        posix_acl_update_mode() clears S_ISGID when the caller is not in the file's
        group (FUSE leaves it to the daemon, FUSE_SETXATTR_ACL_KILL_SGID, which
        pyfuse3 cannot receive; we set the ACL as root, so the backing keeps it)."""
        with node.pinned() as fd:
            st = os.fstat(fd)
            if st.st_mode & stat.S_ISGID and not _in_group(caller, st.st_gid):
                os.chmod(sysio.proc_path(fd), stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)

    async def getxattr(self, inode, name, ctx):
        node = self.inode(inode)
        if self.hooks.xattr_hooks:
            alt = self.hooks.getxattr(_caller(ctx), node, name)
            if type(alt) is tuple:
                for n in alt[:-1]:
                    try:
                        return self._xattr(node, os.getxattr, n)
                    except OSError as e:
                        if e.errno != errno.ENODATA:
                            raise _fuse_error(e)
                alt = alt[-1]
            if alt is not None:
                name = alt
        try:
            return self._xattr(node, os.getxattr, name)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP and name in _ACL_NAMES:
                # a backing file system without ACLs has none; the kernel fails the
                # permission check on any error other than "no such attribute"
                raise FUSEError(pyfuse3.ENOATTR)
            raise _fuse_error(e)

    async def listxattr(self, inode, ctx):
        node = self.inode(inode)
        try:
            names = [os.fsencode(n) for n in self._xattr(node, os.listxattr)]
        except OSError as e:
            raise _fuse_error(e)
        if ctx.uid != 0:
            # the kernel lists trusted.* only to CAP_SYS_ADMIN (approximated by
            # fsuid 0); we list as root, so hide them from everyone else
            names = [n for n in names if not n.startswith(b"trusted.")]
        if self.hooks.xattr_hooks:
            names = self.hooks.listxattr(_caller(ctx), node, names)
        return names

    async def removexattr(self, inode, name, ctx):
        self._writable()
        node = self.inode(inode)

        def apply(stored: bytes) -> None:
            self._xattr(node, os.removexattr, stored)
        await self._xattr_change(node, _caller(ctx), name, None, apply)

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


def _sup_groups(pid: int) -> set[int]:
    try:
        return pyfuse3.get_sup_groups(pid)
    except Exception:
        return set()
