"""Resolve a path of the mount to a backing inode without ever leaving the backing
tree: component by component with O_PATH|O_NOFOLLOW; symlinks are followed *inside*
the mount (an absolute target restarts at the mount root, like a chroot), ``..``
never climbs above the root."""
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
