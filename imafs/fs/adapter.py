"""The overlay's hooks, served by the integrity engine: one FUSE request, one engine
call.

Only translation lives here: a FUSE open (caller, inode, flags) becomes an engine
``Subject``, ``FileRef`` and ``OpenMode``; the engine's answer -- an ``OpenState``, a
``Pending`` for the overlay to finish in a worker thread, or a refusal
(``AccessDenied``, which is the overlay's ``Denied``) -- goes back as it is. Besides,
the FUSE side of read-time verification: which cached pages the kernel may keep
(``opened``), the page-cache fill of a digest pass (``notify_store``),
invalidations, and inotify on files whose reads are verified. No policy, list,
signature or xattr format is looked at in this module.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading

import pyfuse3

from imafs.fs import sysio
from imafs.fs.inotify import Inotify
from imafs.fs.inode import Caller, Denied, Inode
from imafs.fs.overlay import Hooks
from imafs.fs.resolve import open_as_seen_by, open_regular, resolve
from imafs.ima.engine import (AccessDenied, Change, Engine, FileRef, FsInfo, OpenMode, Pending,
                               Subject)

log = logging.getLogger("imafs.fs.adapter")

#: how long an open waits for the kernel to write back a file's dirty pages
WRITEBACK_TIMEOUT = 30.0


def _identity(inode: Inode, root_key, pid: int, path: bytes) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what the absolute ``path`` names inside the mount (symlinks
    followed inside it, never out of the backing tree) -- if the process's root is the
    mount's root; else None. Compared by identity (``root_key()``: the mount root's,
    as ``sysio.identity_nosync`` reads it), not by path: after pivot_root into the
    mount (runc), /proc/PID/root reads "/" in the daemon, while a chroot reads the
    mount point; both are the mount's root inode."""
    want = root_key()
    if want is None or sysio.identity_nosync(f"/proc/{pid}/root") != want:
        return None
    root = inode
    while root.parent is not None:
        root = root.parent
    try:
        with root.pinned() as rfd:
            fd, _rel = resolve(rfd, os.fsdecode(path))
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return (st.st_dev, st.st_ino)


def file_ref(fd: int, st: os.stat_result, path: bytes, *, reopen, setxattr, readable: bool,
             fs: FsInfo, generation: int, resolve=None, fill_cache=None,
             pread_nowait=None, removexattr=None, opener=None, writeback=None,
             shared_mapping=None) -> FileRef:
    """THE place that makes a backing file a ``FileRef`` (an open through the mount,
    a path a control file reads, a file whose attributes change): ``fd`` the open
    descriptor; ``reopen()`` a fresh read-only descriptor of the backing inode,
    ``setxattr(name, value)`` and ``removexattr(name)`` on it."""
    def getxattr(name: str):
        try:
            return os.getxattr(fd, name)   # fgetxattr: no walk through /proc
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise

    return FileRef(
        fd=fd, st=st, path=path, readable=readable, reopen=reopen, getxattr=getxattr,
        setxattr=setxattr, fs=fs, resolve=resolve, fill_cache=fill_cache,
        generation=generation, pread_nowait=pread_nowait, removexattr=removexattr,
        opener=opener, writeback=writeback, shared_mapping=shared_mapping)


def fd_file_ref(fd: int, st: os.stat_result, path: bytes, **kw) -> FileRef:
    """A read-only ``FileRef`` of a descriptor the caller holds (and closes), reopened
    and its xattrs written through ``/proc/self/fd/N``: the inode itself, no name. ``kw``:
    ``fs`` and ``generation`` when the caller knows them, else read here."""
    node = sysio.proc_path(fd)
    if "fs" not in kw:
        kw["fs"] = sysio.fs_info(fd, st.st_dev)
    if "generation" not in kw:
        kw["generation"] = sysio.generation(fd, st.st_dev)
    return file_ref(fd, st, path, readable=True,
                    reopen=lambda: os.open(node, os.O_RDONLY | os.O_CLOEXEC),
                    setxattr=lambda n, v: os.setxattr(node, n, v),
                    removexattr=lambda n: os.removexattr(node, n), **kw)


def open_in_mount(root_fd: int, path: str, mountpoint: str = "") -> FileRef:
    """A path of the mount (``resolve.open_regular``: regular files only, symlinks
    resolved inside the mount) as a read-only ``FileRef``; the caller closes its
    ``fd``. What the control files (ima/securityfs.py) open a path with."""
    fd, st, rel = open_regular(root_fd, path, mountpoint)
    try:
        return fd_file_ref(fd, st, rel.encode())
    except BaseException:
        os.close(fd)
        raise


def open_as_writer(pid: int, uid: int, gid: int, path: str, *, backing_of,
                   mountpoint: str = "") -> FileRef:
    """A path as the process that wrote it sees it (``resolve.open_as_seen_by``: its
    root, its fsuid, fsgid and supplementary groups), read-only, as a ``FileRef``;
    a file of the mount is its backing file (``backing_of(nodeid)``, the overlay's).
    The caller closes its ``fd``. What digest_list_add and digest_list_del read."""
    creds = None
    if uid != 0:
        try:
            groups = pyfuse3.get_sup_groups(pid)
        except Exception:  # noqa: BLE001 - a gone process: no groups, it fails anyway
            groups = set()
        creds = lambda: sysio.thread_credentials(uid, gid, groups | {gid})  # noqa: E731
    fd, st, shown, _on_mount = open_as_seen_by(pid, path, mount_dev=_mount_dev(mountpoint),
                                               backing_of=backing_of, creds=creds)
    try:
        return fd_file_ref(fd, st, shown)
    except BaseException:
        os.close(fd)
        raise


def _mount_dev(mountpoint: str) -> int | None:
    """The st_dev of the FUSE mount at ``mountpoint`` (from /proc/self/mountinfo, not
    a stat: that would be a request to ourselves); None when it is not mounted."""
    if not mountpoint:
        return None
    dev = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" ")
                if len(fields) > 4 and sysio._mountinfo_field(fields[4]) == mountpoint:
                    major, minor = fields[2].split(":")
                    dev = os.makedev(int(major), int(minor))   # the last one: on top
    except OSError:
        return None
    return dev


def _setxattr(inode: Inode, name: str, value: bytes) -> None:
    """Set an xattr of the backing inode (through its /proc/self/fd path)."""
    with inode.pinned() as fd:
        os.setxattr(sysio.proc_path(fd), name, value)


def _read_only(*_args) -> None:
    """The xattr writer of a file of a read-only mount."""
    raise OSError(errno.EROFS, "read-only mount")


def _removexattr(inode: Inode, name: str) -> None:
    """Remove an xattr of the backing inode (through its /proc/self/fd path)."""
    with inode.pinned() as fd:
        os.removexattr(sysio.proc_path(fd), name)


def _child(dir_path: bytes, name: bytes) -> bytes:
    """The path inside the mount of ``name`` in the directory at ``dir_path``."""
    return dir_path.rstrip(b"/") + b"/" + name


def _fstat(node: Inode) -> os.stat_result:
    with node.pinned() as fd:
        return os.fstat(fd)


def _stat_in(parent: Inode, name: bytes) -> os.stat_result:
    """lstat of ``name`` in the directory ``parent`` (FileNotFoundError if absent)."""
    with parent.pinned() as fd:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)


def _lstat(parent: Inode, name: bytes) -> os.stat_result | None:
    try:
        return _stat_in(parent, name)
    except FileNotFoundError:
        return None


class IntegrityHooks(Hooks):
    xattr_hooks = True

    def __init__(self, engine: Engine, *, mountpoint: str | None = None,
                 read_only: bool = False):
        self.engine = engine
        # -o ro: the backing directory is never written, appraise_mode=fix included
        # (its xattr writes fail EROFS, which the engine logs and goes on)
        self._read_only = read_only
        self._mountpoint = os.path.realpath(mountpoint) if mountpoint else None
        self._root_key = None   # the mount root's (dev major, minor, ino): _mount_root
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
        self._inval_waiters: dict[int, list[threading.Event]] = {}
        self._mount_dev: int | None = None
        # nodeids whose page cache the digest pass of an open filled (keep_cache)
        self._filled: set[int] = set()
        self._fill_ok = True
        # inotify (and a stat pass) on the backing inodes of files verified handles hold
        # open: a change behind the mount drops the kernel's pages of the file at once;
        # id(token) -> nodeid of the handles registered there
        self._inotify = Inotify(self._changed_behind) if engine.verify_reads else None
        self._watched: dict[int, int] = {}

    def _mount_root(self):
        """The mount root's identity, as the kernel's inode has it (read once the
        mount is up: its inode number is the FUSE root's, 1)."""
        if self._root_key is None and self._mountpoint is not None:
            key = sysio.identity_nosync(self._mountpoint)
            if key is not None and key[2] == pyfuse3.ROOT_INODE:
                self._root_key = key
        return self._root_key

    @property
    def active(self) -> bool:  # open/release hooks only while some policy has rules
        return self.engine.active()     # (or some namespace has a behaviour model)

    @property
    def modelled(self) -> bool:  # namespace operations only while some model exists
        return self.engine.modelled()

    @property
    def attr_hooks(self) -> bool:
        return self.engine.watches_attrs()

    # ------------------------------------------------------------------ open
    @staticmethod
    def _generation(inode: Inode, fd: int, dev: int) -> int:
        gen = inode.generation
        if gen is None:
            gen = inode.generation = sysio.generation(fd, dev)
        return gen

    def _fsinfo(self, fd: int, dev: int) -> FsInfo:
        info = self._fs.get(dev)
        if info is None:
            info = self._fs[dev] = sysio.fs_info(fd, dev)
        return info

    def _file(self, inode: Inode, fd: int, flags: int, pid: int = 0) -> FileRef | None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        verify = self.engine.verify_reads
        return file_ref(
            fd, st, inode.path(), readable=(flags & os.O_ACCMODE) != os.O_WRONLY,
            reopen=lambda: inode.reopen(os.O_RDONLY | os.O_CLOEXEC),
            setxattr=_read_only if self._read_only else lambda n, v: _setxattr(inode, n, v),
            removexattr=_read_only if self._read_only else lambda n: _removexattr(inode, n),
            fs=self._fsinfo(fd, st.st_dev), generation=self._generation(inode, fd, st.st_dev),
            resolve=lambda pid, p: _identity(inode, self._mount_root, pid, p),
            fill_cache=lambda: self._fill_cache(inode),
            pread_nowait=sysio.pread_nowait if verify else None,
            opener=(lambda: sysio.ProcessWatch(pid)) if pid else None,
            writeback=lambda: self.writeback(inode.nodeid),
            shared_mapping=lambda pids: self._shared_mapping(inode.nodeid, pids))

    def open(self, caller: Caller, inode: Inode, fd: int, flags: int, exec_: bool,
             created: bool = False):
        """On the event loop: the engine decides a warm open right here (a worker
        thread's round trip costs more than the decision itself) and returns a
        Pending for anything else."""
        f = self._file(inode, fd, flags, caller.pid)
        if f is None:
            return None
        subject = Subject(caller.pid, caller.uid, caller.gid, program_here=self._program_here)
        return self.engine.file_open(subject, f,
                                     OpenMode.from_flags(flags, exec_=exec_, created=created))

    def _mountdev(self) -> int | None:
        if self._mount_dev is None and self._mountpoint is not None:
            self._mount_dev = _mount_dev(self._mountpoint)     # mountinfo, read once
        return self._mount_dev

    def _shared_mapping(self, nodeid: int, pids) -> bool:
        """Does one of ``pids`` map the inode ``nodeid`` of this mount shared (a line
        of /proc/PID/maps with its device and inode number, and "s" in its perms)?"""
        dev = self._mountdev()
        if dev is None:
            return False
        want = (f"{os.major(dev):02x}:{os.minor(dev):02x}", str(nodeid))
        for pid in pids:
            try:
                with open(f"/proc/{pid}/maps", "rb") as fh:
                    for line in fh:
                        parts = line.split(None, 5)
                        if len(parts) >= 5 and (parts[3].decode(), parts[4].decode()) \
                                == want and parts[1][3:4] == b"s":
                            return True
            except OSError:
                continue
        return False

    def _program_here(self, pid: int) -> bool:
        """Does process ``pid`` run a program from this mount (its executable is a file
        of the mount's device)? Cheap and safe on the event loop: no request reaches
        the daemon (sysio.statx_dev)."""
        mdev = self._mountdev()
        dev = sysio.statx_dev(f"/proc/{pid}/exe")
        return dev is not None and dev == mdev

    def release(self, token):
        """On the event loop (cheap): None, or the slow part as a Pending."""
        nodeid = self._watched.pop(id(token), None)
        if nodeid is not None:
            self._inotify.release(nodeid)
        return self.engine.file_release(token)

    def wrote(self, token) -> None:
        self.engine.file_written(token)


    # ------------------------------------------------------------------ verified reads
    def read(self, token, fd, off, size):
        """On the event loop: the verified bytes when the engine can check them right
        here (all in the backing page cache: ~100 us of hashing per 128 KiB, less
        than a thread hop); a Pending for the rest (data on disk, or a mismatch to
        record); None when no handle of the file verifies reads (then the overlay
        reads itself, and the inode is remembered: the kernel may cache pages of it
        that were never verified)."""
        r = self.engine.file_read(token, fd, off, size)
        if r is None:
            if token.ref is not None:
                self._unverified.add(token.ref)
            return None
        if type(r) is Pending:
            return Pending(self._finish_read, r, token)
        return r

    def _finish_read(self, pending: Pending, token):
        try:
            data = pending.finish()
        except AccessDenied as e:
            log.warning("read refused: %s", e.reason)
            self._tainted.add(token.ref)
            self.invalidate(token.ref)
            raise Denied(errno.EIO, e.reason) from None
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

    # ------------------------------------------------------------------ page cache
    def opened(self, inode: Inode, token, unchanged: bool) -> bool:
        """An open succeeded: a handle whose reads are verified gets its inode watched
        (inotify) and its nodeid (``OpenState.ref``). Returns whether the open may keep
        the kernel's cached pages of the inode: when the digest pass of this open
        filled them (they are the bytes just measured); else only if the file is
        unchanged since the last open, and not after a failed verification, nor when
        pages read unverified could be among them."""
        if token is not None and self.engine.verify_reads:
            token.ref = inode.nodeid
            if token.tree is not None:
                if self._inotify is not None and id(token) not in self._watched:
                    # the pinned descriptor: the handle pins its node while it is
                    # open, so the stat pass may fstat it until the release
                    try:
                        with inode.pinned() as fd:
                            self._inotify.watch(inode.nodeid, fd)
                        self._watched[id(token)] = inode.nodeid
                    except OSError as e:
                        log.warning("inotify watch of inode %d: %s", inode.nodeid, e)
                if inode.nodeid in self._unverified:
                    # the kernel may hold pages of this inode that were served without
                    # verification: do not let this verified open keep them
                    self._unverified.discard(inode.nodeid)
                    self._tainted.add(inode.nodeid)
        if inode.nodeid in self._filled:
            self._filled.discard(inode.nodeid)
            self._tainted.discard(inode.nodeid)
            self._unverified.discard(inode.nodeid)
            return True
        if inode.nodeid in self._tainted:
            self._tainted.discard(inode.nodeid)
            return False
        return unchanged

    def _changed_behind(self, nodeid: int) -> None:
        """inotify: a file verified handles hold open changed behind the mount. Its
        cached pages (which may be a whole file filled at open) go; the next reads
        reach the daemon and are checked; the next open does not keep them either."""
        self._tainted.add(nodeid)
        self.invalidate(nodeid)

    def _fill_cache(self, inode: Inode):
        """For the engine's digest pass of any open that hashes (a worker thread, the
        file's IInt locked, no other handle verifying it, no writer): drop the kernel's
        pages and attributes of the inode and return a sink that stores the bytes being
        hashed in its page cache; the open keeps them (``opened``), so its reads are
        served the bytes measured without reaching the daemon."""
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
        self._queue_invalidation(nodeid)

    def writeback(self, nodeid: int) -> None:
        """Have the kernel write back and drop the mount's cached pages of an inode,
        mapped dirty pages included, and wait until it has (a worker thread: an open
        deciding on the file's bytes). The kernel does it inside the invalidation
        (fuse_reverse_inval_inode -> invalidate_inode_pages2_range, which launders
        dirty pages: WRITE requests, which the event loop serves meanwhile), so it is
        the invalidation thread's job, for the reason ``invalidate`` gives."""
        done = threading.Event()
        self._queue_invalidation(nodeid, done)
        if not done.wait(WRITEBACK_TIMEOUT):
            raise OSError(errno.ETIMEDOUT, "the kernel did not write back the file's "
                                           f"pages within {WRITEBACK_TIMEOUT:.0f} s")

    def _queue_invalidation(self, nodeid: int, done: threading.Event | None = None) -> None:
        with self._inval_lock:
            if done is not None:
                self._inval_waiters.setdefault(nodeid, []).append(done)
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
                waiters = self._inval_waiters.pop(nodeid, ())
            try:
                pyfuse3.invalidate_inode(nodeid, attr_only=False)
                log.debug("invalidated the kernel cache of inode %d", nodeid)
            except OSError as e:   # ENOENT: the kernel has forgotten the inode
                log.debug("invalidate inode %d: %s", nodeid, e)
            except Exception as e:  # noqa: BLE001 - never let the thread die
                log.warning("invalidate inode %d: %s", nodeid, e)
            finally:
                for done in waiters:
                    done.set()

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
        if self._inval_q is not None:
            self._inval_q.put(None)
        with self._inval_lock:
            for waiters in self._inval_waiters.values():
                for done in waiters:
                    done.set()
            self._inval_waiters.clear()

    # ------------------------------------------------------------------ attributes
    def _changing(self, inode: Inode, opened: list):
        """A worker thread's ``file()`` for the engine: the regular file whose
        attributes change, read-only, as a FileRef (its descriptor goes in
        ``opened``, closed by the caller); None for anything else."""
        def file() -> FileRef | None:
            if inode.kind != stat.S_IFREG:
                return None
            fd = inode.reopen(os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            opened.append(fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            return file_ref(fd, st, inode.path(), readable=True,
                            reopen=lambda: inode.reopen(os.O_RDONLY | os.O_CLOEXEC),
                            setxattr=lambda n, v: _setxattr(inode, n, v),
                            removexattr=lambda n: _removexattr(inode, n),
                            fs=self._fsinfo(fd, st.st_dev),
                            generation=self._generation(inode, fd, st.st_dev))
        return file

    def setattr(self, caller: Caller, inode: Inode, uid, gid, mode, apply):
        opened: list[int] = []
        try:
            return self.engine.inode_setattr(
                Subject(caller.pid, caller.uid, caller.gid), (inode.dev, inode.ino),
                Change(uid=uid, gid=gid, mode=mode), apply, self._changing(inode, opened))
        finally:
            for fd in opened:
                os.close(fd)

    def setxattr(self, caller: Caller, inode: Inode, name: bytes, value: bytes | None,
                 apply) -> None:
        opened: list[int] = []
        try:
            self.engine.inode_setxattr(Subject(caller.pid, caller.uid, caller.gid),
                                       (inode.dev, inode.ino), inode.path(), name, value,
                                       apply, self._changing(inode, opened),
                                       st=_fstat(inode))
        finally:
            for fd in opened:
                os.close(fd)

    # ------------------------------------------------------------------ namespace ops
    def inode_event(self, caller: Caller, hook: str, *, parent: Inode | None = None,
                    name: bytes | None = None, node: Inode | None = None,
                    new_parent: Inode | None = None, new_name: bytes | None = None,
                    **given):
        """The engine's inode_event with the facts it needs: the stat results of the
        directories and inodes involved (backing files, as the caller sees them),
        their paths inside the mount, and what ``given`` says (mode, attributes,
        symlink target). A name that is not there is no event: the operation will
        fail (ENOENT) -- or, for a create, opens a file that exists (no create)."""
        facts = dict(given)
        try:
            if hook == "inode_link":
                facts.update(st=_fstat(node), old_path=node.path(),
                             new_dir=_fstat(new_parent),
                             new_path=_child(new_parent.path(), new_name))
            elif hook == "inode_setattr":
                facts.update(st=_fstat(node), path=node.path())
            elif hook == "inode_rename":
                facts.update(old_dir=_fstat(parent),
                             old_path=_child(parent.path(), name),
                             st=_stat_in(parent, name),
                             new_dir=_fstat(new_parent),
                             new_path=_child(new_parent.path(), new_name),
                             target=_lstat(new_parent, new_name))
            else:
                facts.update(dir=_fstat(parent), path=_child(parent.path(), name))
                if hook in ("inode_unlink", "inode_rmdir"):
                    facts["st"] = _stat_in(parent, name)
                elif hook == "inode_create" and _lstat(parent, name) is not None:
                    return None
        except FileNotFoundError:
            return None
        return self.engine.inode_event(Subject(caller.pid, caller.uid, caller.gid), hook,
                                       facts)

    def listxattr(self, caller: Caller, inode: Inode, names: list[bytes]) -> list[bytes]:
        return self.engine.inode_listxattr(caller.pid, names)

    def getxattr(self, caller: Caller, inode: Inode, name: bytes):
        return self.engine.inode_getxattr(caller.pid, name)
