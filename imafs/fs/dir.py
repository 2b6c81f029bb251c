"""Directory and attribute requests of the overlay (as fs/fuse/dir.c): setattr,
readlink, mknod/mkdir/symlink/unlink/rmdir/rename/link, opendir/readdir/releasedir/
fsyncdir.  A mixin of ``overlay.Overlay``: it uses the node table and helpers there.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
from pyfuse3 import FUSEError

from imafs.fs import sysio
from imafs.fs.inode import (Caller, Denied, DirHandle, Inode, OpenFile, _caller,
                            _fuse_error, _in_group, _privs_to_drop)
from imafs.ima.iint import Pending

log = logging.getLogger("imafs.fs")


class DirOps:
    """The directory requests of ``overlay.Overlay``."""

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
        await self._remove(parent_inode, name, ctx, "inode_unlink", os.unlink)

    async def rmdir(self, parent_inode, name, ctx):
        await self._remove(parent_inode, name, ctx, "inode_rmdir", os.rmdir)

    async def _remove(self, parent_inode, name, ctx, hook: str, remove) -> None:
        """unlink or rmdir (``remove``) of ``name`` in the parent, after the hook."""
        self._writable()
        parent = self.inode(parent_inode)
        await self._lsm(ctx, hook, parent=parent, name=name)
        try:
            with self._pinned(parent) as pfd:
                remove(name, dir_fd=pfd)
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
