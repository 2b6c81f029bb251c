"""Connects the overlay's hooks to the integrity engine.

Only translation lives here: a FUSE open (caller, inode, flags) becomes an engine
``Subject`` and ``FileRef``; an engine refusal becomes an errno. No policy, list or
signature is looked at in this module.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import re
import stat
import threading

import pyfuse3

from imafs.fs import sysio
from imafs.fs.overlay import NOT_NOW, Caller, Denied, Inode, NullHooks
from imafs.fs.resolve import resolve
from imafs.fs.watch import Watcher
from imafs.ima.appraise import XattrError, parse_ima_xattr
from imafs.ima.engine import WOULD_BLOCK, AccessDenied, Engine, FileRef, FsInfo, Subject

log = logging.getLogger("imafs.fs.integrity")

IMA_XATTR = b"security.ima"
PRIVATE_PREFIX = b"security.imafs."   # per-namespace security.ima copies


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
                ("f_blocks", ctypes.c_ulong), ("f_bfree", ctypes.c_ulong),
                ("f_bavail", ctypes.c_ulong), ("f_files", ctypes.c_ulong),
                ("f_ffree", ctypes.c_ulong), ("f_fsid", ctypes.c_int * 2),
                ("f_namelen", ctypes.c_long), ("f_frsize", ctypes.c_long),
                ("f_flags", ctypes.c_long), ("f_spare", ctypes.c_long * 4)]


_libc = ctypes.CDLL(None, use_errno=True)
FS_IOC_GETVERSION = 0x80087601          # _IOR('v', 1, long)
_generation_ok: dict[int, bool] = {}    # st_dev -> whether the ioctl works there


def generation(fd: int, dev: int) -> int:
    """The inode's generation number (ext2/3/4, btrfs, ...), 0 where there is none."""
    if _generation_ok.get(dev) is False:
        return 0
    buf = ctypes.c_long(0)
    if _libc.ioctl(fd, FS_IOC_GETVERSION, ctypes.byref(buf)) != 0:
        _generation_ok[dev] = False     # ENOTTY/EOPNOTSUPP: the file system has none
        return 0
    _generation_ok[dev] = True
    return buf.value & 0xFFFFFFFFFFFFFFFF


_MI_ESCAPE = re.compile(r"\\([0-7]{3})")


def _mountinfo_field(text: str) -> str:
    """A /proc/self/mountinfo field with its octal escapes (space, tab, newline, \\)
    undone."""
    return _MI_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def fs_info(fd: int, dev: int) -> FsInfo:
    """Magic, type name, subtype and UUID of the backing filesystem holding ``fd``.

    The name is the kernel's ``sb->s_type->name`` (what ``fsname=`` compares): the
    mountinfo type field is that name, then ``.subtype`` for a FUSE file system with
    one (``fuse.sshfs``; no in-kernel type name has a dot). The mount is found by
    device number, else (a device number mountinfo does not show, as with btrfs
    subvolumes) as the mount point that is the longest prefix of the file's path."""
    buf = _Statfs()
    magic = None
    if _libc.fstatfs(fd, ctypes.byref(buf)) == 0:
        magic = buf.f_type & 0xFFFFFFFF
    want = f"{os.major(dev)}:{os.minor(dev)}"
    fstype = None
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = None
    best = -1
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                kind = _mountinfo_field(parts[parts.index("-") + 1])
                if parts[2] == want:
                    fstype = kind
                    break
                mp = _mountinfo_field(parts[4])
                if path is not None and len(mp) > best and (
                        path == mp or path.startswith(mp.rstrip("/") + "/")):
                    best, fstype = len(mp), kind
    except (OSError, ValueError, IndexError):
        pass
    name = subtype = None
    if fstype is not None:
        name, dot, sub = fstype.partition(".")
        subtype = sub if dot and sub else None
    uuid = None
    try:
        for link in os.listdir("/dev/disk/by-uuid"):
            try:
                if os.stat(os.path.join("/dev/disk/by-uuid", link)).st_rdev == dev:
                    uuid = link.lower()
                    break
            except OSError:
                continue
    except OSError:
        pass
    return FsInfo(magic=magic, name=name or "", subtype=subtype, uuid=uuid)


def _identity(inode: Inode, root_link: str | None, pid: int,
              path: bytes) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what the absolute ``path`` names inside the mount (symlinks
    followed inside it, never out of the backing tree) -- if the process's root is the
    mount (``root_link``: the mount point, as /proc/PID/root reads for a process
    chrooted into it); else None."""
    if root_link is None:
        return None
    try:
        if os.readlink(f"/proc/{pid}/root") != root_link:
            return None
    except OSError:
        return None
    root = inode
    while root.parent is not None:
        root = root.parent
    try:
        fd, _rel = resolve(root.fd, os.fsdecode(path))
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return (st.st_dev, st.st_ino)


class IntegrityHooks(NullHooks):
    watch_xattrs = True

    def __init__(self, engine: Engine, *, mountpoint: str | None = None):
        self.engine = engine
        # what /proc/PID/root reads for a process chrooted into the mount
        self._root_link = os.path.realpath(mountpoint) if mountpoint else None
        self._fs: dict[int, FsInfo] = {}
        # read-time verification: nodeids whose kernel page cache must not be kept at
        # the next open (a failed verification, or pages read unverified before a
        # verified open), nodeids read through unverified handles, and the queue of
        # the thread that sends the kernel its cache invalidations
        self._tainted: set[int] = set()
        self._unverified: set[int] = set()
        self._inval_q: queue.SimpleQueue | None = None
        self._inval_lock = threading.Lock()
        self._inval_pending: set[int] = set()
        self._nowait = True
        # nodeids whose page cache the digest pass of an open filled (keep_cache)
        self._filled: set[int] = set()
        self._fill_ok = True
        # inotify on the backing inodes of files verified handles hold open: a change
        # behind the mount drops the kernel's pages of the file at once
        self._watch = Watcher(self._changed_behind) if engine.verify_reads else None

    @property
    def active(self) -> bool:  # open/release hooks only while some policy has rules
        return self.engine.active()

    @staticmethod
    def _generation(inode: Inode, fd: int, dev: int) -> int:
        gen = inode.generation
        if gen is None:
            gen = inode.generation = generation(fd, dev)
        return gen

    def _fsinfo(self, fd: int, dev: int) -> FsInfo:
        info = self._fs.get(dev)
        if info is None:
            info = self._fs[dev] = fs_info(fd, dev)
        return info

    def _file(self, inode: Inode, fd: int, flags: int) -> FileRef | None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        path = sysio.proc_path(inode.fd)
        acc = flags & os.O_ACCMODE

        def getxattr(name: str):
            try:
                return os.getxattr(fd, name)   # fgetxattr: no walk through /proc
            except OSError as e:
                if e.errno in (errno.ENODATA, errno.ENOTSUP):
                    return None
                raise

        return FileRef(
            fd=fd, st=st, path=inode.path(), readable=acc != os.O_WRONLY,
            reopen=lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC),
            getxattr=getxattr, setxattr=lambda n, v: os.setxattr(path, n, v),
            fs=self._fsinfo(fd, st.st_dev),
            resolve=lambda pid, p: _identity(inode, self._root_link, pid, p),
            fill_cache=(lambda: self._fill_cache(inode)) if self.engine.verify_reads else None,
            generation=self._generation(inode, fd, st.st_dev))

    def _open(self, caller: Caller, inode: Inode, fd: int, flags: int, exec_: bool,
              created: bool, inline: bool = False):
        f = self._file(inode, fd, flags)
        if f is None:
            return None
        acc = flags & os.O_ACCMODE
        try:
            return self.engine.file_open(
                Subject(caller.pid, caller.uid, caller.gid), f,
                readable=acc != os.O_WRONLY, writable=acc != os.O_RDONLY,
                append=bool(flags & os.O_APPEND), exec_=exec_, created=created,
                inline=inline, direct=bool(flags & os.O_DIRECT))
        except AccessDenied as e:
            log.warning("denied: pid %d uid %d: %s", caller.pid, caller.uid, e.reason)
            raise Denied(e.errno, e.reason)

    def open_inline(self, caller, inode, fd, flags, exec_):
        """On the event loop: a warm open (nothing to hash, nobody hashing it) is
        decided right here, which saves the worker-thread round trip that costs more
        than the decision itself; anything else answers NOT_NOW."""
        state = self._open(caller, inode, fd, flags, exec_, False, inline=True)
        if state is WOULD_BLOCK:
            return NOT_NOW
        return self._opened(state, inode)

    def open(self, caller, inode, fd, flags, exec_):
        return self._opened(self._open(caller, inode, fd, flags, exec_, False), inode)

    def _changed_behind(self, nodeid: int) -> None:
        """inotify: a file verified handles hold open changed behind the mount. Its
        cached pages (which may be a whole file filled at open) go; the next reads
        reach the daemon and are checked; the next open does not keep them either."""
        self._tainted.add(nodeid)
        self.invalidate(nodeid)

    def _opened(self, state, inode: Inode):
        if state is not None and self.engine.verify_reads:
            state.ref = inode.nodeid
            if state.tree is not None and self._watch is not None:
                self._watch.watch(inode.nodeid, inode.fd)
            if state.tree is not None and inode.nodeid in self._unverified:
                # the kernel may hold pages of this inode that were served without
                # verification: do not let this verified open keep them
                self._unverified.discard(inode.nodeid)
                self._tainted.add(inode.nodeid)
        return state

    # ------------------------------------------------------------------ verified reads
    def read(self, token, fd, off, size):
        try:
            data = self.engine.read_verified(token, fd, off, size)
        except AccessDenied as e:
            log.warning("read refused: %s", e.reason)
            self._tainted.add(token.ref)
            self.invalidate(token.ref)
            raise Denied(errno.EIO, e.reason)
        if data is None and token.ref is not None:   # no longer verified (a writer)
            self._unverified.add(token.ref)
        return data

    def shown_size(self, st: os.stat_result) -> int | None:
        """While handles that verify a file's reads are open, the kernel is shown the
        size they were measured with: otherwise, once the attributes time out, it
        would clip reads of a file truncated behind the mount at the new end (a clean
        EOF, no read reaching the daemon) instead of letting them fail."""
        if not stat.S_ISREG(st.st_mode):
            return None
        size = self.engine.measured_size((st.st_dev, st.st_ino))
        return size if size is not None and size != st.st_size else None

    def wants_read(self, token) -> bool:
        """On the event loop: reads need the hooks while some handle of the file
        verifies (every read of it is then checked: they all fill one page cache);
        other reads are served by the overlay directly (and their inode remembered: the
        kernel may cache pages of it that were never verified)."""
        if not self.engine.verifies(token):
            if token.ref is not None:
                self._unverified.add(token.ref)
            return False
        return True

    def read_cached(self, token, fd, off, size):
        """On the event loop: verify a read whose blocks are all in the backing page
        cache right here (~100 us of hashing per 128 KiB, less than a thread hop and
        the GIL traffic of hashing in a worker); None sends the read to ``read`` in a
        worker thread (data to fetch from disk, or a mismatch to record)."""
        if not self._nowait:
            return None
        try:
            return self.engine.read_verified(token, fd, off, size, nowait=True)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False     # backing file system without RWF_NOWAIT
            return None

    def keep_cache(self, inode: Inode, unchanged: bool) -> bool:
        """Whether an open may keep the kernel's cached pages of the inode: when the
        digest pass of this open filled them (they are the bytes just measured); else
        only if the file is unchanged since the last open, and not after a failed
        verification, nor when pages read unverified could be among them."""
        if inode.nodeid in self._filled:
            self._filled.discard(inode.nodeid)
            self._tainted.discard(inode.nodeid)
            self._unverified.discard(inode.nodeid)
            return True
        if inode.nodeid in self._tainted:
            self._tainted.discard(inode.nodeid)
            return False
        return unchanged

    def _fill_cache(self, inode: Inode):
        """For the engine's digest pass (a worker thread, the file's IInt locked, no
        other handle verifying it): drop the kernel's pages and attributes of the inode
        and return a sink that stores the bytes being hashed in its page cache."""
        if not self._fill_ok:
            return None
        nodeid = inode.nodeid
        try:
            pyfuse3.invalidate_inode(nodeid, attr_only=False)
        except OSError:
            return None
        self._filled.add(nodeid)

        def store(off: int, data) -> None:
            if not self._fill_ok:
                return
            try:
                pyfuse3.notify_store(nodeid, off, bytes(data))
            except OSError as e:      # ENOSYS: no FUSE_NOTIFY_STORE; ENOENT: forgotten
                if e.errno == errno.ENOSYS:
                    self._fill_ok = False
                log.debug("notify_store inode %d offset %d: %s", nodeid, off, e)
                self._filled.discard(nodeid)
        return store

    def invalidate(self, nodeid: int) -> None:
        """Make the kernel drop its cached pages and attributes of an inode, mapped
        pages included (they fault and are read -- and verified -- again).

        pyfuse3.invalidate_inode() writes FUSE_NOTIFY_INVAL_INODE to /dev/fuse and the
        kernel acts on it inside that write (fuse_reverse_inval_inode ->
        invalidate_inode_pages2_range), locking every cached page of the inode -- and
        waiting for the pages of reads still in flight, which stay locked until the
        daemon answers those reads.  Done in a request handler, or in a worker thread
        a handler waits for (our case: the failed read itself), it would wait for its
        own answer: a deadlock.  So invalidations go to one thread that does nothing
        else; pyfuse3 drops the GIL for the write, the event loop answers the read
        (EIO) meanwhile, and the invalidation completes right after."""
        if nodeid is None:
            return
        with self._inval_lock:
            if nodeid in self._inval_pending:   # one is queued already
                return
            self._inval_pending.add(nodeid)
            if self._inval_q is None:
                self._inval_q = queue.SimpleQueue()
                threading.Thread(target=self._invalidator, args=(self._inval_q,),
                                 name="imafs-invalidate", daemon=True).start()
        self._inval_q.put(nodeid)

    def _invalidator(self, q: queue.SimpleQueue) -> None:
        while True:
            nodeid = q.get()
            if nodeid is None:
                return
            with self._inval_lock:
                self._inval_pending.discard(nodeid)
            try:
                pyfuse3.invalidate_inode(nodeid, attr_only=False)
                log.debug("invalidated the kernel cache of inode %d", nodeid)
            except OSError as e:   # ENOENT: the kernel has forgotten the inode
                log.debug("invalidate inode %d: %s", nodeid, e)
            except Exception as e:  # noqa: BLE001 - never let the thread die
                log.warning("invalidate inode %d: %s", nodeid, e)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._inval_q is not None:
            self._inval_q.put(None)

    def created(self, caller, inode, fd, flags):
        return self._open(caller, inode, fd, flags, False, True)

    def release(self, token):
        """Runs on the event loop (cheap): returns the slow part, or None."""
        return self.engine.file_release(token)

    def wrote(self, token) -> None:
        self.engine.file_written(token)

    def changed(self, inode: Inode) -> None:
        try:
            size = os.fstat(inode.fd).st_size if inode.kind == stat.S_IFREG else None
        except OSError:
            size = None
        self.engine.file_changed((inode.dev, inode.ino), size)

    def setxattr(self, caller: Caller, inode: Inode, name: bytes, value: bytes | None):
        if name.startswith(PRIVATE_PREFIX):
            raise Denied(errno.EPERM, "namespace-private integrity attributes are managed by imafs")
        if name != IMA_XATTR:
            return None
        if value is not None:
            try:
                parse_ima_xattr(value)
            except XattrError as e:
                log.warning("refused security.ima on %s: %s", os.fsdecode(inode.path()), e)
                raise Denied(errno.EINVAL, str(e))
        ns = self.engine.tree.of_pid(caller.pid)
        if ns is None:
            raise Denied(errno.EACCES, f"pid {caller.pid}: integrity namespace unknown")
        self.engine.file_changed((inode.dev, inode.ino))
        if ns.id != 0:
            return (ns.xattr_name.encode(), value)
        return None

    def listxattr(self, caller: Caller, inode: Inode, names: list[bytes]) -> list[bytes]:
        """Each namespace sees its own security.ima: ``security.ima`` is listed when the
        caller's namespace has a value (the host's attribute, or the namespace's private
        copy), and the private names are listed to nobody."""
        out = [n for n in names if n != IMA_XATTR and not n.startswith(PRIVATE_PREFIX)]
        ns = self.engine.tree.of_pid(caller.pid)
        if ns is not None and ns.xattr_name.encode() in names:
            out.append(IMA_XATTR)
        return out

    def getxattr(self, caller: Caller, inode: Inode, name: bytes):
        if name.startswith(PRIVATE_PREFIX):
            # a namespace's own security.ima is read as security.ima inside it; by
            # its private name nobody reads it (a sibling would, otherwise)
            return PRIVATE_PREFIX + b"unknown"
        if name == IMA_XATTR:
            ns = self.engine.tree.of_pid(caller.pid)
            if ns is None:
                return PRIVATE_PREFIX + b"unknown"   # reads as ENODATA
            if ns.id != 0:
                return ns.xattr_name.encode()
        return None
