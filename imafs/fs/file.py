"""File requests of the overlay (as fs/fuse/file.c): open, create, read, write,
flush, release, fsync, and the hooks' open and release around them.  A mixin of
``overlay.Overlay``: it uses the node table and helpers there.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import trio
from pyfuse3 import FUSEError

from imafs.fs import sysio
from imafs.fs.inode import (FMODE_EXEC, _OPEN_PASS_MASK, _SETID, SMALL_IO, Caller, Denied,
                            Inode, OpenFile, _caller, _fuse_error, _privs_to_drop,
                            _sup_groups, _truncate_opened)
from imafs.ima.iint import Pending

log = logging.getLogger("imafs.fs")


class FileOps:
    """The file requests of ``overlay.Overlay``."""

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
