"""Resolve a path of the mount to a backing inode without ever leaving the backing
tree: component by component with O_PATH|O_NOFOLLOW; symlinks are followed *inside*
the mount (an absolute target restarts at the mount root, like a chroot), ``..``
never climbs above the root. ``open_regular``: a path of the mount opened read-only,
regular files only (what the control files read: a policy, certificates, a query).
``open_as_seen_by``: a path as a process sees it (its root, its credentials), a file
of the mount opened on its backing inode (what digest_list_add reads)."""
from __future__ import annotations

import errno
import os
import stat

from imafs.fs import sysio

MAX_SYMLINKS = 40


def resolve(root_fd: int, path: str, *, follow: bool = True) -> tuple[int, str]:
    """Return (O_PATH fd of the inode, normalised path inside the mount). The caller
    closes the fd. Raises OSError (ENOENT, ELOOP, ENOTDIR, ...)."""
    todo = [c for c in path.split("/") if c not in ("", ".")]
    todo.reverse()
    stack: list[tuple[int, str]] = []   # (dir fd, name) from the root down
    cur = os.dup(root_fd)
    hops = 0
    try:
        while todo:
            comp = todo.pop()
            if comp == "..":
                if stack:
                    os.close(cur)
                    cur, _ = stack.pop()
                continue
            try:
                nxt = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            except OSError:
                raise
            st = os.fstat(nxt)
            if stat.S_ISLNK(st.st_mode) and (todo or follow):
                hops += 1
                if hops > MAX_SYMLINKS:
                    os.close(nxt)
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.fsdecode(sysio.readlink_empty(nxt))
                os.close(nxt)
                parts = [c for c in target.split("/") if c not in ("", ".")]
                if target.startswith("/"):
                    while stack:
                        os.close(cur)
                        cur, _ = stack.pop()
                todo.extend(reversed(parts))
                continue
            if todo and not stat.S_ISDIR(st.st_mode):
                os.close(nxt)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            stack.append((cur, comp))
            cur = nxt
        rel = "/" + "/".join(name for _, name in stack)
        result = cur
        cur = -1
        return result, rel
    finally:
        if cur >= 0:
            os.close(cur)
        for fd, _ in stack:
            os.close(fd)


_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory",
         stat.S_IFLNK: "a symbolic link"}


def _regular(st: os.stat_result) -> os.stat_result:
    """``st`` when it is a regular file's; else OSError(EINVAL) saying what it is (as
    the kernel's kernel_read_file refuses a policy file that is not regular)."""
    if not stat.S_ISREG(st.st_mode):
        kind = _KIND.get(stat.S_IFMT(st.st_mode), "of an unknown type")
        raise OSError(errno.EINVAL, f"not a regular file ({kind})")
    return st


def _blocking_regular(fd: int) -> os.stat_result:
    """The stat of ``fd`` (a file opened O_NONBLOCK), checked once more to be a regular
    file's, and ``fd`` made blocking; ``fd`` is closed when either fails."""
    try:
        st = _regular(os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return st


def open_regular(root_fd: int, path: str,
                 mountpoint: str = "") -> tuple[int, os.stat_result, str]:
    """Open a path of the mount -- absolute in the mount, or a host path below
    ``mountpoint`` (its real path) -- read-only, resolving symlinks inside the mount
    only: (descriptor, its stat, the normalised path inside the mount); the caller
    closes the descriptor. OSError(EINVAL) with a reason for a relative path, a NUL
    byte, or anything but a regular file."""
    if mountpoint and (path == mountpoint or path.startswith(mountpoint + "/")):
        path = path[len(mountpoint):] or "/"
    if not path.startswith("/"):
        raise OSError(errno.EINVAL, "path must be absolute (inside the mount)")
    if "\0" in path:
        raise OSError(errno.EINVAL, "path contains a NUL byte")
    # Only a regular file is opened (a FIFO's open would wait for a writer forever,
    # a device's read may never end): the type is read from the O_PATH descriptor
    # the resolver returns, and the file is opened through it -- the same inode,
    # no second lookup by name -- non-blocking, and checked again.
    node_fd, rel = resolve(root_fd, path)
    try:
        _regular(os.fstat(node_fd))
        fd = os.open(sysio.proc_path(node_fd), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(node_fd)
    st = _blocking_regular(fd)
    return fd, st, rel


def open_as_seen_by(pid: int, path: str, *, mount_dev: int | None, backing_of,
                    creds=None) -> tuple[int, os.stat_result, bytes, bool]:
    """Open ``path`` as process ``pid`` sees it -- in its root (``/proc/PID/root``:
    its chroot, in its mount namespace), symlinks and ``..`` never leaving that root
    (openat2 RESOLVE_IN_ROOT), and with its credentials (``creds()``: a context
    manager in force around every lookup and open, e.g. sysio.thread_credentials) --
    read-only, regular files only: (descriptor, stat, path recorded for it, whether
    it is a file of the imafs mount). A file of the mount (on ``mount_dev``) is opened
    on its backing inode (``backing_of(nodeid) -> (O_PATH descriptor, path inside the
    mount)``), never through the mount: the daemon would call itself, and the open
    would be its own. OSError(EINVAL) with a reason for a relative path, a NUL byte or
    anything but a regular file; ESRCH when the process is gone."""
    if not path.startswith("/"):
        raise OSError(errno.EINVAL, "path must be absolute (as the writer sees it)")
    if "\0" in path:
        raise OSError(errno.EINVAL, "path contains a NUL byte")
    try:
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OSError(errno.ESRCH, f"process {pid} is gone") from None
    creds = creds or _no_creds
    try:
        with creds():
            node = sysio.openat2(root, path, os.O_PATH,
                                 sysio.RESOLVE_IN_ROOT | sysio.RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(root)
    try:
        st = _regular(os.fstat(node))
        on_mount = mount_dev is not None and st.st_dev == mount_dev
        shown = os.fsencode(path)
        if on_mount:
            backing, shown = backing_of(st.st_ino)
            os.close(node)
            node = backing
            _regular(os.fstat(node))
        # the very inode resolved, opened non-blocking (no FIFO can be swapped in)
        with creds():
            fd = os.open(sysio.proc_path(node), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(node)
    st = _blocking_regular(fd)
    return fd, st, shown, on_mount


class _no_creds:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
