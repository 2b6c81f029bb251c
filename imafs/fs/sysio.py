"""System calls that the os module does not offer with the flags we need.

The overlay works relative to O_PATH descriptors of backing inodes, never by a
path from the backing root: ``AT_EMPTY_PATH`` variants of chown, utimensat, linkat and
readlinkat operate on the very inode (a symlink included), and ``/proc/self/fd/N``
reopens it (a magic link: it jumps to the inode, never re-resolves a name).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import resource
import select
import struct

from imafs.ima.iint import FsInfo

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


# ---------------------------------------------------------------------- page-cache reads
_nowait_ok = hasattr(os, "RWF_NOWAIT")


def pread_nowait(fd: int, size: int, off: int) -> bytearray | None:
    """Up to ``size`` bytes at ``off`` from the page cache only (preadv2 with
    RWF_NOWAIT: for the event loop, which must not wait for the disk); fewer at EOF,
    or when only part is cached. None when nothing is cached, or when the backing
    file system has no RWF_NOWAIT (EOPNOTSUPP: found out once, for every caller);
    other errors raise."""
    global _nowait_ok
    if not _nowait_ok:
        return None
    buf = bytearray(size)
    try:
        n = os.preadv(fd, [buf], off, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            _nowait_ok = False      # a backing file system without RWF_NOWAIT
            return None
        if e.errno == errno.EINVAL:
            return None             # let the blocking read say what is wrong
        raise
    if n < size:
        del buf[n:]
    return buf


AT_STATX_DONT_SYNC = 0x4000
_STATX_SIZE = 256          # struct statx
_STATX_DEV = 136           # offset of stx_dev_major, stx_dev_minor (u32 each)


def statx_dev(path: str) -> int | None:
    """The device number of the file ``path`` names, from the attributes the kernel
    has cached (statx with AT_STATX_DONT_SYNC): a file of this very FUSE mount is
    answered without a request to the daemon, so the event loop may ask. None when
    it cannot be found out."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(AT_FDCWD, os.fsencode(path), AT_STATX_DONT_SYNC, 0, buf) < 0:
        return None
    major, minor = struct.unpack_from("=II", buf.raw, _STATX_DEV)
    return os.makedev(major, minor)


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


# openat2(2) (Linux 5.6): the same number on every architecture (the new syscall table)
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str | bytes, flags: int, resolve: int) -> int:
    """openat2(dirfd, path, {flags, 0, resolve}): with RESOLVE_IN_ROOT, ``path`` is
    resolved as if ``dirfd`` were the root (absolute symlinks and ``..`` stay in it)."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    name = os.fsencode(path)
    return _check(_libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dirfd),
                                ctypes.c_char_p(name), ctypes.byref(how),
                                ctypes.c_size_t(ctypes.sizeof(how))), "openat2", name)


# ---------------------------------------------------------------------- file facts
AT_STATX_DONT_SYNC = 0x4000
STATX_INO = 0x100
_AT_FDCWD = -100


def identity_nosync(path: str) -> tuple[int, int, int] | None:
    """(dev major, dev minor, ino) of what ``path`` names, from the inode the kernel
    holds -- statx(AT_STATX_DONT_SYNC): on this very FUSE mount (a process's
    /proc/PID/root) no request reaches the daemon, which may be the caller, on its
    event loop. None when it cannot be read."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(_AT_FDCWD, os.fsencode(path), AT_STATX_DONT_SYNC, STATX_INO, buf) != 0:
        return None
    (ino,) = struct.unpack_from("=Q", buf.raw, 32)          # stx_ino
    major, minor = struct.unpack_from("=II", buf.raw, 136)  # stx_dev_major, _minor
    return (major, minor, ino)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
                ("f_blocks", ctypes.c_ulong), ("f_bfree", ctypes.c_ulong),
                ("f_bavail", ctypes.c_ulong), ("f_files", ctypes.c_ulong),
                ("f_ffree", ctypes.c_ulong), ("f_fsid", ctypes.c_int * 2),
                ("f_namelen", ctypes.c_long), ("f_frsize", ctypes.c_long),
                ("f_flags", ctypes.c_long), ("f_spare", ctypes.c_long * 4)]


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
    return FsInfo(magic=magic, name=name or "", subtype=subtype, uuid=uuid,
                  s_uuid=fs_uuid(fd, dev))


FS_IOC_GETFSUUID = 0x80111500           # _IOR(0x15, 0, struct fsuuid2): u8 len, u8 uuid[16]
_fs_uuids: dict[int, bytes | None] = {}  # st_dev -> sb->s_uuid


def _kernel_has_getfsuuid() -> bool:
    """FS_IOC_GETFSUUID came with Linux 6.5."""
    try:
        major, minor = (int(x) for x in
                        re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    except (AttributeError, ValueError):
        return False
    return (major, minor) >= (6, 5)


def fs_uuid(fd: int, dev: int) -> bytes | None:
    """The file system's ``sb->s_uuid`` (16 bytes; what EVM hashes into HMACs and
    type-3 signatures, and evmctl's ``--uuid``), by FS_IOC_GETFSUUID, once per
    device. Where the ioctl exists (Linux 6.5+) and the file system has no UUID
    (ENOTTY: proc, ...), the kernel hashes its zero-filled ``s_uuid``: 16 zero bytes.
    On an older kernel the UUID is unknown (None): EVM values that cover it then
    fail as such rather than against a guess."""
    if dev in _fs_uuids:
        return _fs_uuids[dev]
    buf = ctypes.create_string_buffer(17)
    if _libc.ioctl(fd, FS_IOC_GETFSUUID, buf) == 0:
        n = buf.raw[0]
        uuid = buf.raw[1:1 + n].ljust(16, b"\0")[:16]
    elif ctypes.get_errno() == errno.ENOTTY:
        uuid = bytes(16) if _kernel_has_getfsuuid() else None
    else:
        return None         # this descriptor cannot say (EBADF: O_PATH): ask again
    _fs_uuids[dev] = uuid
    return uuid


MNT_DETACH = 2


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2): no stat() of the target first, unlike umount(8)."""
    _check(_libc.umount2(os.fsencode(target), flags), "umount2", target)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (never the hard limit itself:
    that is the administrator's, e.g. ``prlimit --nofile=1024``). The overlay's
    descriptor use is bounded (fs/nodefd.py sizes its cache from the result), so a
    low limit makes the daemon slower, never unable to serve. Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


# ---------------------------------------------------------------------- file handles
MAX_HANDLE_SZ = 128
_HANDLE_HEAD = struct.Struct("=Ii")     # struct file_handle: handle_bytes, handle_type
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def name_to_handle(fd: int) -> tuple[int, bytes]:
    """(mount id, file handle) of the inode behind ``fd`` (an O_PATH descriptor will
    do; a symlink is its own). The handle is the ``struct file_handle`` as the kernel
    filled it: it names that inode and, where the file system has them, its
    generation, so it never opens another file that reused the inode number.
    EOPNOTSUPP where the file system exports no handles (overlayfs without
    nfs_export=on, FUSE, procfs)."""
    buf = ctypes.create_string_buffer(_HANDLE_HEAD.size + MAX_HANDLE_SZ)
    _HANDLE_HEAD.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int(0)
    _check(_libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH),
           "name_to_handle_at")
    size = _HANDLE_HEAD.unpack_from(buf, 0)[0]
    return mount_id.value, buf.raw[:_HANDLE_HEAD.size + size]


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2) (needs CAP_DAC_READ_SEARCH): ``mount_fd`` is any
    descriptor on the handle's mount that is not O_PATH. ESTALE once the inode is
    gone."""
    return _check(_libc.open_by_handle_at(mount_fd, handle, flags), "open_by_handle_at")


STATX_BTIME = 0x800
_STATX_SIZE = 256
_STATX_BTIME_OFF = 80           # struct statx: stx_btime (tv_sec s64, tv_nsec u32)
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                        ctypes.c_char_p]


def birth_time(fd: int) -> int:
    """The inode's birth time in ns (statx STATX_BTIME, on an O_PATH descriptor too);
    0 where the file system does not record it. Tells a new file apart from an old
    one whose inode number it reused."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_BTIME, buf) != 0:
        return 0
    if not struct.unpack_from("=I", buf, 0)[0] & STATX_BTIME:
        return 0
    sec, nsec = struct.unpack_from("=qI", buf, _STATX_BTIME_OFF)
    return sec * 1_000_000_000 + nsec


# ---------------------------------------------------------------------- per-thread ids
# setfsuid/setfsgid act on the calling thread only (glibc does not broadcast them);
# glibc's setgroups() does change every thread of the process (its setxid broadcast),
# so supplementary groups are set with the raw system call, which is per thread.
_SYS_SETGROUPS = {
    "x86_64": 116, "aarch64": 159, "riscv64": 159, "loongarch64": 159, "ppc64le": 81,
    "ppc64": 81, "s390x": 206, "i386": 206, "i686": 206, "armv7l": 206, "armv6l": 206,
}.get(os.uname().machine)   # the 32-bit ABIs: setgroups32
HAVE_THREAD_CREDS = _SYS_SETGROUPS is not None
_libc.setfsuid.restype = ctypes.c_int
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.restype = ctypes.c_int
_libc.setfsgid.argtypes = [ctypes.c_uint]
_NO_ID = 0xFFFFFFFF          # (uid_t)-1: never valid, so set*fs*id only reports


class CredentialsError(OSError):
    """The thread's ids could not be switched (or, worse, restored)."""


def _thread_setgroups(groups) -> None:
    arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
    _check(_libc.syscall(ctypes.c_long(_SYS_SETGROUPS), ctypes.c_long(len(groups)), arr),
           "setgroups")


def _set_fsids(uid: int, gid: int) -> None:
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    if _libc.setfsuid(_NO_ID) != uid or _libc.setfsgid(_NO_ID) != gid:
        raise CredentialsError(1, f"cannot switch to fsuid {uid} fsgid {gid}")


class thread_credentials:
    """``with thread_credentials(uid, gid, groups):`` -- the calling thread's file
    system ids (fsuid, fsgid) and supplementary groups are the given ones inside the
    block, so the kernel checks permissions (modes, ACLs, ownership rules) as for that
    user; the other threads of the process are unaffected. A fsuid other than 0 also
    clears the thread's file system capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, ...);
    setting it back to 0 restores them. Restored on exit, whatever happens inside; a
    failure to restore is fatal (the thread would go on with another user's ids)."""

    def __init__(self, uid: int, gid: int, groups=()):
        if not HAVE_THREAD_CREDS:
            raise CredentialsError(38, f"no per-thread setgroups on {os.uname().machine}")
        self.uid, self.gid, self.groups = uid, gid, sorted(set(groups))

    def __enter__(self):
        self._uid = _libc.setfsuid(_NO_ID)
        self._gid = _libc.setfsgid(_NO_ID)
        self._groups = os.getgroups()     # the calling thread's own (a plain syscall)
        try:
            _thread_setgroups(self.groups)
            _set_fsids(self.uid, self.gid)
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        try:
            _set_fsids(self._uid, self._gid)    # fsuid first: brings back the caps
            _thread_setgroups(self._groups)
            if sorted(os.getgroups()) != sorted(self._groups):
                raise CredentialsError(1, "supplementary groups not restored")
        except BaseException as e:
            import logging
            logging.getLogger("imafs.fs").critical(
                "cannot restore the ids of a worker thread (%s): exiting", e)
            os.abort()

    def __exit__(self, *exc):
        self._restore()
        return False


# ---------------------------------------------------------------------- openers
PIDFD_THREAD = os.O_EXCL      # pidfd_open(2) of a thread, not only a process (Linux 6.9)


class ProcessWatch:
    """``with ProcessWatch(tid) as gone:`` -- ``gone()`` tells whether the task has
    exited or is dying (a fatal signal pending: a task killed while its FUSE request
    is being answered cannot exit before the answer, so waiting for its exit alone
    would wait for the work it no longer wants). A pidfd tells that it still runs,
    so that /proc/TID is that task, never one that reused the number. FUSE requests
    carry the calling thread's id: watched as a thread where the kernel can
    (PIDFD_THREAD), else as a process (a thread group leader). ``gone`` is None
    when the task cannot be watched at all (then nothing is abandoned for it)."""

    def __init__(self, tid: int):
        self.tid = tid
        self.fd = None

    def __enter__(self):
        for flags in (PIDFD_THREAD, 0):
            try:
                self.fd = os.pidfd_open(self.tid, flags)
                break
            except ProcessLookupError:
                return lambda: True          # gone already
            except (OSError, AttributeError):
                continue
        if self.fd is None:
            return None
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        status = f"/proc/{self.tid}/status"

        def gone() -> bool:
            if poller.poll(0):
                return True                   # exited
            return _fatal_signal_pending(status)
        return gone

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return False


_SIGKILL_BIT = 1 << (9 - 1)


def _fatal_signal_pending(status_path: str) -> bool:
    """SIGKILL pending for the task (/proc/TID/status SigPnd): the kernel adds it
    to every thread of a process that a fatal signal ends."""
    try:
        with open(status_path, "rb") as f:
            for line in f:
                if line.startswith(b"SigPnd:"):
                    return bool(int(line.split()[1], 16) & _SIGKILL_BIT)
    except FileNotFoundError:
        return True
    except (OSError, ValueError, IndexError):
        return False
    return False
