"""System calls that the os module does not offer with the flags we need.

The overlay holds an O_PATH descriptor per inode and works relative to it, never by a
path from the backing root: ``AT_EMPTY_PATH`` variants of chown, utimensat, linkat and
readlinkat operate on the very inode (a symlink included), and ``/proc/self/fd/N``
reopens it (a magic link: it jumps to the inode, never re-resolves a name).
"""
from __future__ import annotations

import ctypes
import os
import resource
import struct

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(ret: int, what: str, name=None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name) if name is not None else OSError(err, os.strerror(err))
    return ret


def proc_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """chown the inode behind an O_PATH fd (works on symlinks)."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH), "fchownat")


def utimens_empty(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set times of the inode behind an O_PATH fd; None leaves a time unchanged."""
    def ts(v):
        if v is None:
            return _timespec(0, UTIME_OMIT)
        return _timespec(v // 1_000_000_000, v % 1_000_000_000)
    times = (_timespec * 2)(ts(atime_ns), ts(mtime_ns))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH), "utimensat")


def link_empty(fd: int, newdirfd: int, name: bytes) -> None:
    """Hard-link the inode behind an O_PATH fd as newdirfd/name."""
    _check(_libc.linkat(fd, b"", newdirfd, name, AT_EMPTY_PATH), "linkat", name)


def readlink_empty(fd: int) -> bytes:
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = _check(_libc.readlinkat(fd, b"", buf, size), "readlinkat")
        if n < size:
            return buf.raw[:n]
        size *= 4


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, oldname, newdirfd, newname, flags), "renameat2", newname)


_SYS_GETDENTS64 = {
    "x86_64": 217, "aarch64": 61, "riscv64": 61, "loongarch64": 61, "ppc64le": 202,
    "ppc64": 202, "s390x": 220, "i386": 220, "i686": 220, "armv7l": 217, "armv6l": 217,
}.get(os.uname().machine)
HAVE_GETDENTS = _SYS_GETDENTS64 is not None
_libc.syscall.restype = ctypes.c_long
_DIRENT = struct.Struct("=QqHB")   # d_ino, d_off, d_reclen, d_type; then the name


def getdents(fd: int, bufsize: int = 32768) -> list[tuple[bytes, int]]:
    """One getdents64() at the descriptor's position: [(name, d_off)], [] at the end.
    d_off is the file system's own cookie for the position after the entry: it stays
    valid while the directory changes, and lseek() to it resumes there."""
    buf = ctypes.create_string_buffer(bufsize)
    n = _check(_libc.syscall(ctypes.c_long(_SYS_GETDENTS64), ctypes.c_long(fd), buf,
                             ctypes.c_long(bufsize)), "getdents64")
    raw = buf.raw[:n]
    out = []
    pos = 0
    unpack = _DIRENT.unpack_from
    while pos < n:
        _ino, off, reclen, _type = unpack(raw, pos)
        name = raw[pos + 19:raw.index(b"\0", pos + 19)]
        out.append((name, off))
        pos += reclen
    return out


MNT_DETACH = 2


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2): no stat() of the target first, unlike umount(8)."""
    _check(_libc.umount2(os.fsencode(target), flags), "umount2", target)


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE as far as the kernel allows (the overlay holds one O_PATH
    descriptor per inode the kernel remembers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
    except OSError:
        nr_open = hard
    for want in (max(hard, nr_open), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            continue
    return soft
