"""What ``imafs sign`` and ``imafs verify`` share: the files named on the command line
(walked, refused with one reason each), opened safely, with a progress bar."""
from __future__ import annotations

import os
import stat
import sys


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


def xattr_name(which: str) -> str:
    """``--xattr security|user``."""
    return "user.ima" if which == "user" else "security.ima"
