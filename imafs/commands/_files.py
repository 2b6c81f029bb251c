"""What the commands share about files: those named on the command line (walked,
refused with one reason each), opened safely, with a progress bar; EVM's options and
what EVM covers of a file (``imafs sign`` and ``imafs verify``); the type of an
``--algo`` argument; and a file written whole or not at all (the commands that write
keys, lists, policies, models)."""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import sys
import tempfile
import uuid as uuidlib

from imafs.ima import hashing


def walk(paths, recursive: bool, skip_special: bool):
    """Yield (path, refusal or None) for every candidate file."""
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError as e:
            yield p, e.strerror or str(e)
            continue
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                yield p, "is a directory (use -r)"
                continue
            # os.walk reports a directory it cannot list through onerror, and then
            # goes on (or stops, when it was the last one): report every such error
            # before the next directory's files and once more after the walk, so the
            # last directory visited (or ``p`` itself) is never skipped silently
            errs: list[OSError] = []

            def pending():
                for e in errs:
                    yield (getattr(e, "filename", None) or p,
                           f"cannot list directory: {e.strerror or e}")
                errs.clear()
            for root, dirs, files in os.walk(p, onerror=errs.append):
                dirs.sort()
                yield from pending()
                for name in sorted(files) + sorted(d for d in dirs
                                                   if os.path.islink(os.path.join(root, d))):
                    fp = os.path.join(root, name)
                    why = kind_refusal(fp)
                    if why and skip_special:
                        continue
                    yield fp, why
            yield from pending()
            continue
        yield p, kind_refusal(p, st)


def kind_refusal(path, st=None):
    """Why ``path`` is not a file to sign or verify (None: it is a regular file)."""
    if st is None:
        try:
            st = os.lstat(path)
        except OSError as e:
            return e.strerror or str(e)
    m = st.st_mode
    if stat.S_ISREG(m):
        return None
    if stat.S_ISLNK(m):
        return "is a symbolic link (sign its target instead)"
    kinds = {stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
             stat.S_ISFIFO: "fifo", stat.S_ISSOCK: "socket", stat.S_ISDIR: "directory"}
    for test, name in kinds.items():
        if test(m):
            return f"is a {name}, not a regular file"
    return "is not a regular file"


def open_regular(path: str) -> int:
    """An fd on a regular file, never following a symlink nor blocking on a fifo."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(0, kind_refusal(path, st) or "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def progress(total: int, quiet: bool, unit: str = "file"):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def algo_arg(text: str) -> str:
    """argparse type: a hash algorithm (any name hashing knows it by) that this Python
    can compute; its canonical name."""
    try:
        a = hashing.hash_algo(text)
        a.constructor()
    except hashing.HashAlgoError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return a.name


def xattr_name(which: str) -> str:
    """``--xattr security|user``."""
    return "user.ima" if which == "user" else "security.ima"


# --- EVM (security.evm): the options sign and verify share, and what EVM covers ---------


def uuid_arg(s: str) -> bytes | None:
    """``--uuid``: a file system UUID in text form (its bytes in text order, as
    ``sb->s_uuid`` and evmctl's ``--uuid``), or ``none`` to leave it out (evmctl's
    ``-u``, a kernel without CONFIG_EVM_ATTR_FSUUID)."""
    if s.lower() == "none":
        return None
    try:
        return uuidlib.UUID(s).bytes
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a UUID (or 'none')") from None


def add_evm_options(p) -> None:
    """``--uuid``, ``--m32``, ``--smack``: how a kernel computes what EVM covers."""
    p.add_argument("--uuid", type=uuid_arg, metavar="UUID|none", default=False,
                   help="with --evm: the file system UUID HMACs and type-3 signatures "
                   "cover (default: the file's own, FS_IOC_GETFSUUID); 'none' leaves it "
                   "out, as a kernel without CONFIG_EVM_ATTR_FSUUID (evmctl -u)")
    p.add_argument("--m32", action="store_true",
                   help="with --evm: the 32-bit struct h_misc (evmctl --m32)")
    p.add_argument("--smack", action="store_true",
                   help="with --evm: also cover SMACK64EXEC, SMACK64TRANSMUTE and "
                   "SMACK64MMAP (CONFIG_EVM_EXTRA_SMACK_XATTRS, evmctl --smack)")


def evm_config(args):
    """The evm.EvmConfig ``--uuid none``, ``--m32`` and ``--smack`` ask for."""
    from imafs.ima import evm
    kw = {"fsuuid": args.uuid is not None, "bits": 32 if args.m32 else 64}
    return evm.EvmConfig.with_smack_extras(**kw) if args.smack else evm.EvmConfig(**kw)


def evm_metadata(fd: int, args, config, overrides: dict | None = None):
    """What EVM covers of the open regular file ``fd`` (evm.FileMetadata): its
    protected xattrs (``overrides``: values to take instead, e.g. a security.ima not
    written yet), owner, group, mode, inode, generation and the file system's UUID
    (``--uuid`` or the file's own)."""
    from imafs.fs import sysio
    from imafs.ima import evm
    st = os.fstat(fd)
    overrides = overrides or {}

    def getxattr(name: str):
        if name in overrides:
            return overrides[name]
        try:
            return os.getxattr(fd, name)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise
    uuid = args.uuid if args.uuid is not False else sysio.fs_uuid(fd, st.st_dev)
    return evm.FileMetadata.collect(getxattr, st, generation=sysio.generation(fd, st.st_dev)
                                    & 0xFFFFFFFF, fs_uuid=uuid, config=config)


def write_whole(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` as the file ``path``, whole or not at all: into a new temporary
    file beside it (mode ``mode`` from the start, synced), then renamed over ``path``.
    On a failure the temporary file is removed, ``path`` is as it was, and the
    OSError is raised."""
    fd, tmp = tempfile.mkstemp(prefix=".imafs-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
