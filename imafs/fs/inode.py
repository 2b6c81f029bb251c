"""The overlay's nodes, open handles and callers (as fs/fuse/inode.c keeps
``fuse_inode``): ``Inode`` (a node the kernel knows, reached through fs/nodefd.py),
``OpenFile``, ``DirHandle``, ``Caller`` (who made a request), and the small helpers
the overlay's request handlers share (``_caller``, ``_fuse_error``, the set-id and ACL
rules of a change by a caller).
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import FUSEError

from imafs.fs import sysio
from imafs.fs.nodefd import NodeFds
from imafs.ima.iint import AccessDenied

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


def _sup_groups(pid: int) -> set[int]:
    try:
        return pyfuse3.get_sup_groups(pid)
    except Exception:
        return set()
