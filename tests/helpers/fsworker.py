"""A long-lived helper process that performs file system calls as another user.

The test process is root. ``Worker(uid, gid, groups)`` starts this file as a
subprocess that drops to uid/gid/groups and then runs requests, one JSON object a line
on stdin, answering one JSON object a line on stdout::

    {"code": "r = os.stat(p).st_mode", "vars": {"p": "/x"}}
    -> {"ok": 33188}            or   {"errno": 2}

``code`` is run with ``os``, ``stat``, ``errno``, ``fcntl``, ``mmap``, the helpers
below and the given ``vars`` in scope; its result is the variable ``r``. Bytes travel
as ``{"__b__": "<hex>"}`` both ways. Variables assigned by one request survive to the
next in ``S`` (a dict), e.g. to keep descriptors open across requests.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import stat
import struct
import subprocess
import sys
import time

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def utimensat(path: str, atime, mtime, follow: bool = True) -> None:
    """atime/mtime: (sec, nsec), or "now" / "omit"."""
    def ts(v):
        if v == "now":
            return _timespec(0, UTIME_NOW)
        if v == "omit":
            return _timespec(0, UTIME_OMIT)
        return _timespec(v[0], v[1])
    times = (_timespec * 2)(ts(atime), ts(mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times,
                       0 if follow else AT_SYMLINK_NOFOLLOW) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def _enc(o):
    if isinstance(o, (bytes, bytearray, memoryview)):
        return {"__b__": bytes(o).hex()}
    if isinstance(o, (list, tuple)):
        return [_enc(x) for x in o]
    if isinstance(o, dict):
        return {k: _enc(v) for k, v in o.items()}
    if isinstance(o, os.stat_result):
        return _enc(tuple(o))
    return o


def _dec(o):
    if isinstance(o, dict):
        if set(o) == {"__b__"}:
            return bytes.fromhex(o["__b__"])
        return {k: _dec(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_dec(x) for x in o]
    return o


def _serve() -> None:
    # drop privileges here, not in a preexec_fn: the interpreter may live where the
    # target user cannot execute it (e.g. a venv under /root); modules a snippet may
    # need are imported above, before the drop
    uid, gid, umask = (int(x) for x in sys.argv[1:4])
    groups = [int(g) for g in sys.argv[4].split(",") if g]
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    os.umask(umask)
    scope_base = {"os": os, "stat": stat, "errno": errno, "fcntl": fcntl, "mmap": mmap,
                  "struct": struct, "time": time, "renameat2": renameat2, "utimensat": utimensat, "S": {},
                  "RENAME_NOREPLACE": RENAME_NOREPLACE, "RENAME_EXCHANGE": RENAME_EXCHANGE}
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        scope = dict(scope_base)
        scope.update(_dec(req.get("vars", {})))
        try:
            exec(req["code"], scope)
            ans = {"ok": _enc(scope.get("r"))}
        except OSError as e:
            ans = {"errno": e.errno}
        except Exception as e:  # a bug in the test's snippet
            ans = {"exc": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(ans) + "\n")
        out.flush()


class Failed(Exception):
    pass


class Worker:
    """A subprocess running as uid/gid with the given supplementary groups."""

    def __init__(self, uid: int = 0, gid: int = 0, groups=(), umask: int = 0o022, cwd="/"):
        groups = list(groups)
        self.uid, self.gid, self.groups = uid, gid, groups
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(uid), str(gid), str(umask),
             ",".join(map(str, groups))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd, text=True, bufsize=1)

    def call(self, code: str, **vars):
        """Run code; return ("ok", r) or ("err", errno)."""
        self.proc.stdin.write(json.dumps({"code": code, "vars": _enc(vars)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise Failed(f"worker died (rc {self.proc.wait()})")
        ans = json.loads(line)
        if "exc" in ans:
            raise Failed(ans["exc"])
        if "errno" in ans:
            return ("err", errno.errorcode.get(ans["errno"], ans["errno"]))
        return ("ok", _dec(ans["ok"]))

    def __call__(self, code: str, **vars):
        """Run code; return r, raising OSError on an errno."""
        kind, v = self.call(code, **vars)
        if kind == "err":
            raise OSError(getattr(errno, v, 0), v)
        return v

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


class TwoRoots:
    """A plain directory (``native``: the kernel's answers) beside a mount, for tests
    that run the same calls on both. ``setup(fn)`` prepares both as root: in the
    roots themselves, or with ``in_backing`` in the native directory and the mount's
    backing directory (files made behind the mount)."""

    def __init__(self, mount, native, *, in_backing: bool = False):
        self.m = mount
        self.mnt = mount.mnt
        self.backing = mount.backing
        self.native = native
        self.roots = (native, mount.mnt)
        self.dirs = (native, mount.backing) if in_backing else self.roots

    def twice(self, worker: Worker, code: str, **vars):
        """Run code once with root=<plain dir> and once with root=<mount>; the two
        results (value or errno) must be equal. Returns the value, or the errno's
        name (e.g. "ENOENT")."""
        res = [worker.call(code, root=str(r), **vars) for r in self.roots]
        assert res[0] == res[1], f"native {res[0]!r} != mount {res[1]!r} for:\n{code}"
        return res[0][1]

    def setup(self, fn):
        for d in self.dirs:
            fn(d)

    @classmethod
    def make(cls, make_mount, world_tmp, args, *, mode: int, in_backing: bool = False):
        """A started mount with ``args`` and a native directory, both roots of mode
        ``mode``."""
        native = world_tmp / "native"
        native.mkdir()
        mount = make_mount(args, start=False)
        for d in (native, mount.backing):
            os.chmod(d, mode)
        return cls(mount.start(), native, in_backing=in_backing)


if __name__ == "__main__":
    _serve()
