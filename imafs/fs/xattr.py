"""Extended-attribute requests of the overlay (as fs/fuse/xattr.c): setxattr,
getxattr, listxattr, removexattr, with the hooks told of each change.  A mixin of
``overlay.Overlay``.
"""
from __future__ import annotations

import errno
import os
import stat

import pyfuse3
from pyfuse3 import FUSEError

from imafs.fs import sysio
from imafs.fs.inode import (_ACL_ACCESS, _ACL_NAMES, Caller, Denied, Inode, _caller,
                            _fuse_error, _in_group)


class XattrOps:
    """The xattr requests of ``overlay.Overlay``."""

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
