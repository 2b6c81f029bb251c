"""The one place where the overlay tells the control directory (``MNT/.imafs``) apart
from the backing tree: its node ids and handle numbers, its name in the root."""
from __future__ import annotations

import errno
import threading

import pyfuse3
from pyfuse3 import FUSEError

CONTROL_BASE = 1 << 60      # node ids and handle numbers of the control directory


class ControlRoutes:
    """The one place where the overlay tells the control directory apart from the
    backing tree. Its node ids and its handle numbers are CONTROL_BASE and up; a
    request about one of its nodes or handles goes to ``control`` (or is refused as
    the kernel's securityfs refuses it), its name in the root is looked up there and
    never listed, and no name can be made, removed or renamed in it or at its place.
    The overlay's own handlers serve the backing tree only.

    ``install()`` puts a route in front of each handler concerned, on the overlay
    instance (what pyfuse3 calls). A route is a plain function that returns the
    coroutine of the handler that serves the request: no extra await per request."""

    def __init__(self, overlay, control):
        self.ov = overlay
        self.ctl = control
        self.name = overlay.control_name
        self.handles: dict[int, object] = {}
        self._next_fh = CONTROL_BASE
        self._lock = threading.Lock()

    BY_NODE = ("lookup", "forget", "getattr", "setattr", "readlink", "open", "opendir",
               "setxattr", "getxattr", "listxattr", "removexattr", "link")
    BY_NAME = ("mknod", "mkdir", "symlink", "unlink", "rmdir", "rename", "create")
    BY_HANDLE = ("read", "write", "release", "fsync", "readdir", "releasedir",
                 "fsyncdir")

    def install(self) -> None:
        for name in self.BY_NODE + self.BY_NAME + self.BY_HANDLE:
            own = getattr(self.ov, name)
            setattr(self.ov, name, getattr(self, "_" + name)(own))

    # -- helpers
    def _is_ours(self, parent: int, name: bytes) -> bool:
        """Is (parent, name) in the control directory, or the control directory?"""
        return parent >= CONTROL_BASE or (parent == pyfuse3.ROOT_INODE and name == self.name)

    def _fh(self, h) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
        self.handles[fh] = h
        return fh

    def _handle(self, fh: int):
        h = self.handles.get(fh)
        if h is None:
            raise FUSEError(errno.EBADF)
        return h

    @staticmethod
    def _refused(err: int):
        raise FUSEError(err)

    # -- by node
    def _lookup(self, own):
        def lookup(parent, name, ctx=None):
            if parent >= CONTROL_BASE:
                return self.ctl.lookup(parent, name, ctx)
            if parent == pyfuse3.ROOT_INODE and name == self.name:
                return self.ctl.lookup_root(ctx)
            return own(parent, name, ctx)
        return lookup

    def _forget(self, own):
        def forget(inode_list):
            rest = []
            for nodeid, n in inode_list:
                if nodeid >= CONTROL_BASE:
                    self.ctl.forget(nodeid, n)
                else:
                    rest.append((nodeid, n))
            return own(rest)
        return forget

    def _getattr(self, own):
        def getattr(inode, ctx=None):
            return (self.ctl.getattr if inode >= CONTROL_BASE else own)(inode, ctx)
        return getattr

    def _setattr(self, own):
        def setattr(inode, attr, fields, fh, ctx):
            return (self.ctl.setattr if inode >= CONTROL_BASE else own)(inode, attr, fields,
                                                                       fh, ctx)
        return setattr

    def _readlink(self, own):
        def readlink(inode, ctx):
            if inode >= CONTROL_BASE:
                self._refused(errno.EINVAL)
            return own(inode, ctx)
        return readlink

    def _open(self, own):
        async def open_control(inode, flags, ctx):
            await self.ov.settled()      # what a control file's close did is seen
            h = await self.ctl.open(inode, flags, ctx)
            return pyfuse3.FileInfo(fh=self._fh(h), direct_io=True, nonseekable=False)

        def open(inode, flags, ctx):
            return (open_control if inode >= CONTROL_BASE else own)(inode, flags, ctx)
        return open

    def _opendir(self, own):
        async def opendir_control(inode, ctx):
            return self._fh(await self.ctl.opendir(inode, ctx))

        def opendir(inode, ctx):
            return (opendir_control if inode >= CONTROL_BASE else own)(inode, ctx)
        return opendir

    def _setxattr(self, own):
        def setxattr(inode, name, value, ctx):
            if inode >= CONTROL_BASE:
                self._refused(errno.EPERM)
            return own(inode, name, value, ctx)
        return setxattr

    def _removexattr(self, own):
        def removexattr(inode, name, ctx):
            if inode >= CONTROL_BASE:
                self._refused(errno.EPERM)
            return own(inode, name, ctx)
        return removexattr

    def _getxattr(self, own):
        def getxattr(inode, name, ctx):
            if inode >= CONTROL_BASE:
                self._refused(pyfuse3.ENOATTR)
            return own(inode, name, ctx)
        return getxattr

    def _listxattr(self, own):
        async def nothing():
            return []

        def listxattr(inode, ctx):
            return nothing() if inode >= CONTROL_BASE else own(inode, ctx)
        return listxattr

    def _link(self, own):
        def link(inode, new_parent, new_name, ctx):
            if inode >= CONTROL_BASE or self._is_ours(new_parent, new_name):
                self._refused(errno.EPERM)
            return own(inode, new_parent, new_name, ctx)
        return link

    # -- by name: nothing is made, removed or renamed in the control directory
    def _named(self, own):
        def named(parent, name, *args):
            if self._is_ours(parent, name):
                self._refused(errno.EPERM)
            return own(parent, name, *args)
        return named

    _mknod = _mkdir = _symlink = _unlink = _rmdir = _create = _named

    def _rename(self, own):
        def rename(parent_old, name_old, parent_new, name_new, flags, ctx):
            if self._is_ours(parent_old, name_old) or self._is_ours(parent_new, name_new):
                self._refused(errno.EPERM)
            return own(parent_old, name_old, parent_new, name_new, flags, ctx)
        return rename

    # -- by handle
    def _read(self, own):
        def read(fh, off, size):
            if fh >= CONTROL_BASE:
                return self.ctl.read(self._handle(fh), off, size)
            return own(fh, off, size)
        return read

    def _write(self, own):
        def write(fh, off, buf):
            if fh >= CONTROL_BASE:
                return self.ctl.write(self._handle(fh), off, buf)
            return own(fh, off, buf)
        return write

    def _release(self, own):
        async def nothing():
            return None

        async def release_control(h):
            # a control file's close takes effect here (FLUSH is off: the overlay's
            # flush): every open that comes meanwhile waits for it
            self.ov.settle_begin()
            try:
                await self.ctl.release(h)
            finally:
                self.ov.settle_end()

        def release(fh):
            if fh >= CONTROL_BASE:
                h = self.handles.pop(fh, None)
                return nothing() if h is None else release_control(h)
            return own(fh)
        return release

    def _releasedir(self, own):
        async def nothing():
            return None

        def releasedir(fh):
            if fh >= CONTROL_BASE:
                self.handles.pop(fh, None)
                return nothing()
            return own(fh)
        return releasedir

    def _readdir(self, own):
        def readdir(fh, start_id, token):
            if fh >= CONTROL_BASE:
                return self.ctl.readdir(self._handle(fh), start_id, token)
            return own(fh, start_id, token)
        return readdir

    def _fsync(self, own):
        async def nothing():
            return None

        def fsync(fh, datasync):
            return nothing() if fh >= CONTROL_BASE else own(fh, datasync)
        return fsync

    _fsyncdir = _fsync
