"""Model-based test: the same random sequence of file system calls on a plain
directory and through the mount must give the same results, errnos, contents, modes,
owners, link counts and listings. The kernel on the plain directory is the model.

Hypothesis runs in this (root) process; the calls are made by a ``helpers.fsworker.Worker``
subprocess, once as root and once as an unprivileged user with a supplementary group.
Each example works in a fresh ``runN`` directory of both trees, so one mount serves
all examples.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import stat

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, rule, run_state_machine_as_test)

from helpers.fsworker import Worker

pytestmark = pytest.mark.mount

U, G, SUPP = 4011, 4011, 4110

NAMES = ["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a", "e"]
# relative, and never with "..": a symlink can only point inside the run directory
TARGETS = ["a", "b", "d", "d/a", "e", "missing"]
MODES = [0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o4755, 0o2755, 0o6777, 0o2767, 0o1777,
         0o777]
ACC = [os.O_RDONLY, os.O_WRONLY, os.O_RDWR]
EXTRA = [0, os.O_CREAT, os.O_CREAT | os.O_EXCL, os.O_TRUNC, os.O_APPEND, os.O_CREAT,
         os.O_CREAT | os.O_TRUNC, os.O_CREAT | os.O_APPEND, os.O_DIRECTORY, os.O_CREAT]

names = st.sampled_from(NAMES)
modes = st.sampled_from(MODES)
data = st.binary(min_size=0, max_size=300)
offsets = st.one_of(st.integers(0, 64), st.integers(0, 70000))

_TRY = """
def _t(f, *a, **kw):
    try:
        v = f(*a, **kw)
        return v if v is not None else 'ok'
    except OSError as e:
        return errno.errorcode[e.errno]
"""


def snapshot(top: str) -> dict:
    """Everything we compare about a tree, read as root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        rel_dir = os.path.relpath(dirpath, top)
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            rel = os.path.normpath(os.path.join(rel_dir, n))
            s = os.lstat(p)
            entry = [stat.S_IFMT(s.st_mode), oct(stat.S_IMODE(s.st_mode)), s.st_uid, s.st_gid,
                     s.st_nlink]
            if stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    entry += [s.st_size, hashlib.sha256(f.read()).hexdigest()]
            elif stat.S_ISLNK(s.st_mode):
                entry.append(os.readlink(p))
            if not stat.S_ISLNK(s.st_mode):
                entry.append(sorted((x, os.getxattr(p, x)) for x in os.listxattr(p)
                                    if x.startswith("user.")))
            out[rel] = entry
        out[rel_dir + "/"] = sorted(dirnames + filenames)
    return out


class FsModel(RuleBasedStateMachine):
    """Subclassed per run with ``env`` (roots, worker, uids to try) bound."""
    env: dict = {}
    counter = itertools.count()

    fds = Bundle("fds")

    def __init__(self):
        super().__init__()
        e = self.env
        self.w: Worker = e["worker"]
        run = f"run{next(self.counter)}"
        self.tops = []
        for r in (e["native"], e["mnt"]):
            top = os.path.join(r, run)
            os.mkdir(top)
            os.chown(top, self.w.uid, self.w.gid)
            os.chmod(top, 0o755)
            self.tops.append(top)
        self.nfd = itertools.count()
        self.log = []

    def both(self, code: str, **vars):
        res = []
        for side, top in zip("nm", self.tops):
            res.append(self.w.call(_TRY + code, root=top, side=side, **vars))
        self.log.append((code.strip().splitlines()[0], vars, res[0]))
        assert res[0] == res[1], (f"native {res[0]!r} != mount {res[1]!r}\n{code}\n{vars}")
        return res[0][1]

    @initialize()
    def populate(self):
        """Start from a small tree, so that most calls find something to act on."""
        self.both("os.mkdir(root + '/d'); os.mkdir(root + '/d/e')\n"
                  "with open(root + '/a', 'wb') as f: f.write(b'hello')\n"
                  "with open(root + '/d/a', 'wb') as f: f.write(bytes(range(256)) * 20)\n"
                  "r = 0")

    # ------------------------------------------------------------------ descriptors
    @rule(target=fds, path=names, acc=st.sampled_from(ACC), extra=st.sampled_from(EXTRA),
          mode=modes)
    def open(self, path, acc, extra, mode):
        k = next(self.nfd)
        r = self.both("r = _t(os.open, root + '/' + path, flags, mode)\n"
                      "if isinstance(r, int): S[side + str(k)] = r; r = 'fd'",
                      path=path, flags=acc | extra, mode=mode, k=k)
        return k if r == "fd" else -1

    def _fd(self, code, k, **vars):
        if k < 0:
            return
        self.both("fd = S[side + str(k)]\n" + code, k=k, **vars)

    @rule(k=fds, off=offsets, buf=data)
    def pwrite(self, k, off, buf):
        self._fd("r = _t(os.pwrite, fd, buf, off)", k, off=off, buf=buf)

    @rule(k=fds, buf=data)
    def write(self, k, buf):
        self._fd("r = (_t(os.write, fd, buf), os.lseek(fd, 0, os.SEEK_CUR))", k, buf=buf)

    @rule(k=fds, off=offsets, size=st.integers(0, 5000))
    def pread(self, k, off, size):
        self._fd("r = _t(os.pread, fd, size, off)", k, off=off, size=size)

    @rule(k=fds, size=offsets)
    def ftruncate(self, k, size):
        self._fd("r = _t(os.ftruncate, fd, size)", k, size=size)

    @rule(k=fds)
    def fstat(self, k):
        self._fd("s = os.fstat(fd); r = (s.st_mode, s.st_uid, s.st_gid, s.st_nlink, s.st_size)",
                 k)

    @rule(k=fds)
    def fsync(self, k):
        self._fd("r = _t(os.fsync, fd)", k)

    @rule(k=consumes(fds))
    def close(self, k):
        self._fd("r = _t(os.close, fd); del S[side + str(k)]", k)

    # ------------------------------------------------------------------ names
    @rule(path=names, size=offsets)
    def truncate(self, path, size):
        self.both("r = _t(os.truncate, root + '/' + path, size)", path=path, size=size)

    @rule(path=names, mode=modes)
    def mkdir(self, path, mode):
        self.both("r = _t(os.mkdir, root + '/' + path, mode)", path=path, mode=mode)

    @rule(path=names)
    def rmdir(self, path):
        self.both("r = _t(os.rmdir, root + '/' + path)", path=path)

    @rule(path=names)
    def unlink(self, path):
        self.both("r = _t(os.unlink, root + '/' + path)", path=path)

    @rule(src=names, dst=names, flags=st.sampled_from([0, 1, 2]))
    def rename(self, src, dst, flags):
        self.both("r = _t(renameat2, root + '/' + src, root + '/' + dst, flags)",
                  src=src, dst=dst, flags=flags)

    @rule(src=names, dst=names)
    def link(self, src, dst):
        self.both("r = _t(os.link, root + '/' + src, root + '/' + dst)", src=src, dst=dst)

    @rule(dest=st.sampled_from(TARGETS), path=names)
    def symlink(self, dest, path):
        self.both("r = _t(os.symlink, dest, root + '/' + path)", dest=dest, path=path)

    @rule(path=names)
    def readlink(self, path):
        self.both("r = _t(os.readlink, root + '/' + path)", path=path)

    @rule(path=names, mode=modes)
    def chmod(self, path, mode):
        self.both("r = _t(os.chmod, root + '/' + path, mode)", path=path, mode=mode)

    @rule(data=st.data())
    def chown(self, data):
        path = data.draw(names)
        uid = data.draw(st.sampled_from(self.env["uids"]))
        gid = data.draw(st.sampled_from(self.env["gids"]))
        self.both("r = _t(os.chown, root + '/' + path, uid, gid, follow_symlinks=False)",
                  path=path, uid=uid, gid=gid)

    @rule(path=names, t=st.integers(0, 2**33), ns=st.integers(0, 999_999_999),
          now=st.booleans())
    def utime(self, path, t, ns, now):
        self.both("r = _t(os.utime, root + '/' + path) if now else "
                  "_t(os.utime, root + '/' + path, ns=(t * 10**9 + ns, t * 10**9 + ns))\n"
                  "if r == 'ok' and not now: r = os.stat(root + '/' + path).st_mtime_ns",
                  path=path, t=t, ns=ns, now=now)

    @rule(path=names, name=st.sampled_from(["user.a", "user.b"]), value=data,
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]))
    def setxattr(self, path, name, value, flags):
        self.both("r = _t(os.setxattr, root + '/' + path, name, value, flags)",
                  path=path, name=name, value=value, flags=flags)

    @rule(path=names, name=st.sampled_from(["user.a", "user.b"]))
    def removexattr(self, path, name):
        self.both("r = _t(os.removexattr, root + '/' + path, name)", path=path, name=name)

    @rule(path=names)
    def stat(self, path):
        self.both("s = _t(os.lstat, root + '/' + path)\n"
                  "r = s if isinstance(s, str) else (s.st_mode, s.st_uid, s.st_gid, s.st_nlink,"
                  " s.st_size if not stat.S_ISDIR(s.st_mode) else 0)", path=path)

    @rule(path=names)
    def listdir(self, path):
        self.both("r = _t(lambda: sorted(os.listdir(root + '/' + path)))", path=path)

    @rule(path=names, flags=st.sampled_from([os.O_WRONLY, os.O_RDWR]), buf=data)
    def write_file(self, path, flags, buf):
        """open-write-close in one step: exercises release and set-id clearing."""
        self.both("fd = _t(os.open, root + '/' + path, flags)\n"
                  "r = fd if isinstance(fd, str) else (_t(os.write, fd, buf), os.close(fd))",
                  path=path, flags=flags, buf=buf)

    # ------------------------------------------------------------------ the whole tree
    @invariant()
    def trees_agree(self):
        a, b = (snapshot(t) for t in self.tops)
        if a != b:
            diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
            raise AssertionError(f"trees differ: {diff}\nlast steps: {self.log[-5:]}")

    def teardown(self):
        if os.environ.get("IMAFS_MODEL_STATS"):
            with open(os.environ["IMAFS_MODEL_STATS"], "a") as f:
                for line, vars, res in self.log:
                    f.write(f"{line[:40]!r} {str(res[1])[:20]!r}\n")
        self.w.call("for k in list(S):\n    os.close(S.pop(k))\nr = 0")


def _run(make_mount, world_tmp, worker, uids, gids, examples, steps):
    native = world_tmp / "native"
    native.mkdir()
    mount = make_mount(["--no-integrity"], start=False)
    for d in (native, mount.backing):
        os.chmod(d, 0o755)
    mount.start()
    env = {"native": str(native), "mnt": str(mount.mnt), "worker": worker,
           "uids": uids, "gids": gids}
    machine = type("BoundFsModel", (FsModel,), {"env": env})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        suppress_health_check=list(HealthCheck)))


# bounded for the suite; IMAFS_MODEL_EXAMPLES=500 for a long hunt
EXAMPLES = int(os.environ.get("IMAFS_MODEL_EXAMPLES", "30"))


def test_model_as_root(make_mount, world_tmp):
    with Worker(0, 0, [0]) as w:
        _run(make_mount, world_tmp, w, uids=[-1, 0, U], gids=[-1, 0, G, SUPP],
             examples=EXAMPLES, steps=50)


def test_model_as_user(make_mount, world_tmp):
    with Worker(U, G, [G, SUPP]) as w:
        _run(make_mount, world_tmp, w, uids=[-1, U, 0], gids=[-1, G, SUPP, 0],
             examples=EXAMPLES, steps=50)
