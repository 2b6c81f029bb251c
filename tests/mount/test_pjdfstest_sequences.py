"""The sequences of pjdfstest's files that failed under a hash-appraisal policy (issue
20: ``open/06.t``, ``open/07.t``, ``open/25.t``, ``ftruncate/00.t``), replayed through
a real mount under ``appraise func=FILE_CHECK`` with and without ``mask=^MAY_READ``,
enforce mode. pjdfstest itself is not packaged; these are its operations, not its
code: every step runs in a process of its own (as pjdfstest's ``-u``/``-g`` do, a
fork that takes the uid and gid), so every writable handle is closed when the step's
process exits and the next step's open follows that close at once.

Each open's outcome is checked against the permission bits and a model of the
kernel's IMA (ima_main.c, ima_appraise.c, v6.14 and later; the same rules as
tests/stress/test_fsx_appraised.py): an open the rule covers (unmasked: all; masked:
those that read) passes when the label is the content's hash or when the file has no
label and is new (IMA_NEW_FILE, set by an appraised creating open, kept across
chmod); a covered writable open that passes asks for the label (IMA_UPDATE_XATTR);
the last writer's close of a file that changed or is new ends the allowance and, when
asked, writes the label. Under the unmasked rule everything the permission bits
allow must pass (before issue 20's fixes: EACCES in ``open/06.t`` and
``ftruncate/00.t``); under the masked rule an ``O_WRONLY`` open is not appraised and
asks for nothing, so some later reads fail -- where the kernel fails them too."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import time

import pytest

from helpers.mounts import wait_for

pytestmark = pytest.mark.mount

POLICIES = {
    "masked": "appraise func=FILE_CHECK mask=^MAY_READ\n",
    "unmasked": "appraise func=FILE_CHECK\n",
}
OWNER, GROUP, OTHER = (65534, 65534), (65533, 65534), (65533, 65533)


@pytest.fixture(params=["masked", "unmasked"])
def masked(request):
    return request.param == "masked"


def mount(make_mount, world_tmp, masked: bool):
    p = world_tmp / ("policy-masked" if masked else "policy-unmasked")
    p.write_text(POLICIES["masked" if masked else "unmasked"])
    m = make_mount(["--policy", str(p), "--appraise", "enforce"])
    w = m.mnt / "w"
    w.mkdir()
    os.chmod(w, 0o777)
    return m, w


def step(who, fn):
    """Run ``fn()`` in a forked process as ``who`` ((uid, gid), or None for root),
    as one pjdfstest invocation: (0, fn's result) or (errno, None). The process
    exits -- closing what it opened -- before this returns."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:    # pragma: no cover - the child
        try:
            os.close(r)
            if who is not None:
                os.setgroups([who[1]])
                os.setgid(who[1])
                os.setuid(who[0])
            out = (0, fn())
        except OSError as e:
            out = (e.errno, None)
        except BaseException as e:  # noqa: BLE001
            out = (-1, repr(e))
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    rc, value = json.loads(data)
    assert rc != -1, value
    return rc, value


def xattr(path) -> bytes | None:
    try:
        return os.getxattr(path, "security.ima")
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return None


def open_do(path, flags, mode=0o644, then=None):
    """pjdfstest's ``open path flags [mode] : then``."""
    def run():
        fd = os.open(path, flags, mode)
        return then(fd) if then is not None else None
    return run


class Kernel:
    """Permission bits and the kernel's IMA rules for one file (see the module's
    docstring). ``labelled``: the label is the hash of the content now."""

    def __init__(self, masked: bool):
        self.masked = masked
        self.owner = OWNER
        self.mode = 0o644
        self.labelled = False
        self.new_file = False
        self.ima_refusals = 0

    def dac(self, who, acc: int, trunc: bool = False) -> bool:
        if who is None:
            return True
        want = {os.O_RDONLY: 4, os.O_WRONLY: 2, os.O_RDWR: 6}[acc] | (2 if trunc else 0)
        if who[0] == self.owner[0]:
            bits = self.mode >> 6
        elif who[1] == self.owner[1]:
            bits = self.mode >> 3
        else:
            bits = self.mode
        return bits & want == want

    def open(self, who, acc: int, *, created=False, trunc=False, changes=False) -> int:
        """The errno an open must get (0: passes); updates the model as if the handle
        were then used (``changes``: written or truncated) and closed."""
        if not created and not self.dac(who, acc, trunc):
            return errno.EACCES
        update = False
        if not self.masked or acc != os.O_WRONLY:
            if created:
                self.new_file = True
            if not (self.labelled or self.new_file):
                self.ima_refusals += 1
                return errno.EACCES
            update = acc != os.O_RDONLY
        if changes:
            self.labelled = False
        if acc != os.O_RDONLY and (changes or self.new_file):    # the last writer
            self.new_file = False
            if update:
                self.labelled = True
        return 0


def check(results):
    bad = [r for r in results if r[1] != r[2]]
    assert not bad, "\n".join(f"{what}: got {os.strerror(got) if got else 0}, "
                              f"expected {os.strerror(exp) if exp else 0}"
                              for what, got, exp in bad)


def test_open_permissions_and_the_new_file(make_mount, world_tmp, masked):
    """open/06.t (regular files) and open/07.t: a file created empty by uid 65534 and
    opened by its owner, its group and others in every access mode after each chmod;
    O_RDONLY|O_TRUNC without write permission; then a write and a read."""
    m, w = mount(make_mount, world_tmp, masked)
    k = Kernel(masked)
    d = w / "d"
    d.mkdir()
    os.chown(d, *OWNER)
    f = str(d / "f")
    results = []

    def do(what, who, fn, expected):
        rc, _ = step(who, fn)
        results.append((what, rc, expected))

    do("create", OWNER, open_do(f, os.O_CREAT | os.O_EXCL | os.O_RDONLY),
       k.open(OWNER, os.O_RDONLY, created=True))
    for mode in (0o600, 0o060, 0o006, 0o477, 0o747, 0o774, 0o277, 0o727, 0o772,
                 0o177, 0o717, 0o771, 0o077, 0o707, 0o770):
        os.chmod(f, mode)
        k.mode = mode
        for who in (OWNER, GROUP, OTHER):
            for name, acc in (("O_RDONLY", os.O_RDONLY), ("O_WRONLY", os.O_WRONLY),
                              ("O_RDWR", os.O_RDWR)):
                do(f"chmod {mode:04o}; open {name} as {who}", who, open_do(f, acc),
                   k.open(who, acc))
            if not k.dac(who, os.O_RDONLY, trunc=True):
                do(f"chmod {mode:04o}; open O_RDONLY|O_TRUNC as {who}", who,
                   open_do(f, os.O_RDONLY | os.O_TRUNC), errno.EACCES)
    refusals = k.ima_refusals
    # open/07.t: written through O_WRONLY, then read by the owner
    os.unlink(f)
    k = Kernel(masked)
    do("create", OWNER, open_do(f, os.O_CREAT | os.O_EXCL | os.O_RDONLY),
       k.open(OWNER, os.O_RDONLY, created=True))
    do("open O_WRONLY: write", OWNER, open_do(f, os.O_WRONLY, then=lambda fd: os.write(fd, b"x")),
       k.open(OWNER, os.O_WRONLY, changes=True))
    os.chmod(f, 0o477)
    k.mode = 0o477
    do("open O_RDONLY|O_TRUNC (0477)", OWNER, open_do(f, os.O_RDONLY | os.O_TRUNC),
       errno.EACCES)
    os.chmod(f, 0o644)
    k.mode = 0o644
    do("open O_RDONLY: fstat", OWNER,
       open_do(f, os.O_RDONLY, then=lambda fd: os.fstat(fd).st_size),
       k.open(OWNER, os.O_RDONLY))
    check(results)
    # unmasked, all that the permission bits allow passes; masked, the kernel's
    # refusals (open/06.t 7 9 11 ..., open/07.t 23)
    assert (refusals + k.ima_refusals == 0) == (not masked)
    if not masked:
        assert os.getxattr(m.backing / "w/d/f", "security.ima") == \
            b"\x04\x04" + hashlib.sha256(b"x").digest()


def test_ftruncate_sequences(make_mount, world_tmp, masked):
    """ftruncate/00.t: grow and shrink through O_RDWR and O_WRONLY handles, on a file
    created empty and on one written by another program (dd); ctime; an ftruncate
    refused (EINVAL on a read-only handle) changes nothing; files created with mode 0
    truncated through their creating handle, by root and by uid 65534."""
    m, w = mount(make_mount, world_tmp, masked)
    f = str(w / "f")
    results = []

    def do(what, who, fn, expected):
        rc, value = step(who, fn)
        results.append((what, rc, expected))
        return value

    def ftrunc(size):
        return lambda fd: os.ftruncate(fd, size)

    k = Kernel(masked)
    k.owner = (0, 0)
    do("create", None, open_do(f, os.O_CREAT | os.O_EXCL | os.O_RDONLY),
       k.open(None, os.O_RDONLY, created=True))
    do("O_RDWR: ftruncate 1234567", None, open_do(f, os.O_RDWR, then=ftrunc(1234567)),
       k.open(None, os.O_RDWR, changes=True))
    assert os.lstat(f).st_size == 1234567
    do("O_WRONLY: ftruncate 567", None, open_do(f, os.O_WRONLY, then=ftrunc(567)),
       k.open(None, os.O_WRONLY, changes=True))
    assert os.lstat(f).st_size == 567
    do("read", None, open_do(f, os.O_RDONLY, then=lambda fd: len(os.read(fd, 4096))),
       k.open(None, os.O_RDONLY))
    os.unlink(f)

    # written by another program: dd opens O_WRONLY|O_CREAT|O_TRUNC
    k = Kernel(masked)
    k.owner = (0, 0)
    r = subprocess.run(["dd", "if=/dev/urandom", f"of={f}", "bs=12345", "count=1"],
                       capture_output=True)
    results.append(("dd", r.returncode and errno.EACCES,
                    k.open(None, os.O_WRONLY, created=True, changes=True)))
    do("O_RDWR: ftruncate 23456", None, open_do(f, os.O_RDWR, then=ftrunc(23456)),
       k.open(None, os.O_RDWR, changes=True))
    do("O_WRONLY: ftruncate 1", None, open_do(f, os.O_WRONLY, then=ftrunc(1)),
       k.open(None, os.O_WRONLY, changes=True))
    do("read", None, open_do(f, os.O_RDONLY, then=lambda fd: len(os.read(fd, 4096))),
       k.open(None, os.O_RDONLY))
    os.unlink(f)

    # ctime: a successful ftruncate updates it, a refused one does not
    k = Kernel(masked)
    k.owner = (0, 0)
    do("create", None, open_do(f, os.O_CREAT | os.O_EXCL | os.O_RDONLY),
       k.open(None, os.O_RDONLY, created=True))
    c1 = os.stat(f).st_ctime_ns
    time.sleep(0.02)
    do("O_RDWR: ftruncate 123", None, open_do(f, os.O_RDWR, then=ftrunc(123)),
       k.open(None, os.O_RDWR, changes=True))
    assert wait_for(lambda: os.stat(f).st_ctime_ns > c1, 10)
    # the last writer's close writes the label (a ctime change of its own, as
    # the kernel's): after it, only the refused ftruncate could change ctime
    b = m.backing / "w/f"
    label = b"\x04\x04" + hashlib.sha256(bytes(123)).digest()
    assert wait_for(lambda: xattr(b) == label, 10)
    assert wait_for(lambda: os.stat(f).st_ctime_ns == os.stat(b).st_ctime_ns, 10)
    c2 = os.stat(f).st_ctime_ns
    time.sleep(0.02)
    exp = k.open(OWNER, os.O_RDONLY)
    rc, _ = step(OWNER, open_do(f, os.O_RDONLY, then=ftrunc(1)))
    results.append(("O_RDONLY as 65534: ftruncate", rc, exp or errno.EINVAL))
    assert os.stat(f).st_ctime_ns == c2 and os.lstat(f).st_size == 123
    os.unlink(f)

    # created with mode 0, truncated through the creating handle
    for who in (None, OWNER):
        k = Kernel(masked)
        do(f"O_CREAT|O_RDWR 0 as {who}: ftruncate 0", who,
           open_do(f, os.O_CREAT | os.O_RDWR, 0, then=ftrunc(0)),
           k.open(who, os.O_RDWR, created=True, changes=True))
        os.unlink(f)
    check(results)
    assert all(r[2] in (0, errno.EINVAL) for r in results) == (not masked), results


def test_a_sparse_file_beyond_2_gib(make_mount, world_tmp, masked):
    """open/25.t: O_CREAT|O_WRONLY, one byte written at 2 GiB + 1; then read back.
    Unmasked, the creating writer's close labels the file (hashing 2 GiB of holes);
    masked, the writer was not appraised and asked for nothing: the read fails, as
    with the kernel."""
    m, w = mount(make_mount, world_tmp, masked)
    f = str(w / "big")
    at = 2 * 1024 * 1024 * 1024 + 1
    k = Kernel(masked)
    k.owner = (0, 0)
    exp = k.open(None, os.O_WRONLY, created=True, changes=True)
    rc, _ = step(None, open_do(f, os.O_CREAT | os.O_WRONLY, 0o755,
                               then=lambda fd: os.pwrite(fd, b"a", at)))
    assert rc == exp == 0
    assert os.lstat(f).st_size == at + 1
    exp = k.open(None, os.O_RDONLY)
    rc, value = step(None, open_do(f, os.O_RDONLY,
                                   then=lambda fd: os.pread(fd, 1, at).decode()))
    assert rc == exp, os.strerror(rc) if rc else rc
    assert exp != 0 or value == "a"
    assert (exp == 0) == (not masked)
    if masked:
        assert wait_for(lambda: any(r["type"] == "appraise" and r["path"] == "/w/big"
                                    for r in m.audit()))
    else:
        assert stat.S_ISREG(os.stat(m.backing / "w/big").st_mode)
        assert os.getxattr(m.backing / "w/big", "security.ima")[:2] == b"\x04\x04"
