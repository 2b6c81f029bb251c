"""An fsx-style random workload on a hash-appraised mount, checked against a model of
the kernel's IMA (issue 20): one file at a time, opened in a random mode, written,
read, truncated (through the handle and by path), written and read through shared
mappings, chmod'ed, closed and reopened, unlinked and created again -- under
``appraise func=FILE_CHECK`` with and without ``mask=^MAY_READ``, enforce and fix mode.

The model follows ima_main.c / ima_appraise.c (v6.14 and later):
- an open the rule covers (unmasked: every one; masked: those with MAY_READ) passes
  when the label is the content's hash, or when the file has no label and is new
  (IMA_NEW_FILE, set by an appraised creating open); in fix mode a failing one
  rewrites the label and passes;
- a covered writable open that passes sets IMA_UPDATE_XATTR; the last writer's close
  clears it, and, if the file changed or is new, ends IMA_NEW_FILE and rewrites the
  label when the bit was set;
- truncate(2) by path rewrites nothing (no file), except through a writer's close.
Every open's outcome, every byte read, and the label after every close must be the
model's. Environment: IMAFS_FSX_SEED (default: time), IMAFS_FSX_OPS (default 400)."""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import time

import pytest

from helpers.mounts import wait_for

pytestmark = [pytest.mark.mount, pytest.mark.slow]

OPS = int(os.environ.get("IMAFS_FSX_OPS", "400"))
MAXLEN = 96 * 1024


def H(data: bytes) -> bytes:
    return b"\x04\x04" + hashlib.sha256(data).digest()


class Model:
    def __init__(self, masked: bool, fix: bool):
        self.masked, self.fix = masked, fix
        self.content = bytearray()
        self.label: bytes | None = None
        self.new_file = False
        self.update = False
        self.exists = False

    def covered(self, acc: int) -> bool:
        return not self.masked or acc != os.O_WRONLY

    def open(self, acc: int, created: bool) -> bool:
        """Does an open in access mode ``acc`` pass? (Updates the model as the kernel's
        process_measurement does.)"""
        if not self.covered(acc):
            return True
        if created:
            self.new_file = True
        ok = self.label == H(bytes(self.content)) or (self.label is None and self.new_file)
        if not ok and self.fix:
            self.label, ok = H(bytes(self.content)), True
        if ok and acc != os.O_RDONLY:
            self.update = True
        return ok

    def last_writer(self, changed: bool) -> None:
        if changed or self.new_file:
            if self.update:
                self.label = H(bytes(self.content))
            self.new_file = False
        self.update = False


class Handle:
    def __init__(self, fd: int, acc: int):
        self.fd, self.acc = fd, acc
        self.changed = False

    @property
    def writable(self) -> bool:
        return self.acc != os.O_RDONLY

    @property
    def readable(self) -> bool:
        return self.acc != os.O_WRONLY


class Workload:
    def __init__(self, m, model: Model, rng: random.Random, log: list):
        self.m, self.model, self.rng, self.log = m, model, rng, log
        self.path = m.mnt / "fsxfile"
        self.backing = m.backing / "fsxfile"
        self.h: Handle | None = None

    # -- opening and closing -----------------------------------------------------
    def close(self) -> None:
        h, self.h = self.h, None
        if h is None:
            return
        os.close(h.fd)
        if h.writable:
            self.model.last_writer(h.changed)
            # the close is processed after close() returns: wait for the label
            want = self.model.label
            assert wait_for(lambda: self._label() == want, 10), \
                (self.log[-5:], self._label(), want)

    def _label(self):
        try:
            return os.getxattr(self.backing, "security.ima")
        except OSError as e:
            assert e.errno == errno.ENODATA
            return None

    def open(self) -> None:
        self.close()
        acc = self.rng.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR])
        extra = 0
        if acc != os.O_RDONLY and self.rng.random() < 0.15:
            extra = os.O_TRUNC
        self.log.append(("open", acc, extra))
        expect = self.model.open(acc, created=False)
        try:
            fd = os.open(self.path, acc | extra)
        except PermissionError:
            assert not expect, (self.log[-5:], "refused, the kernel would allow")
            return
        assert expect, (self.log[-5:], "allowed, the kernel would refuse")
        self.h = Handle(fd, acc)
        if extra:
            self.model.content.clear()
            self.h.changed = True

    def recreate(self) -> None:
        self.close()
        if self.model.exists:
            os.unlink(self.path)
        acc = self.rng.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR])
        self.log.append(("create", acc))
        fd = os.open(self.path, acc | os.O_CREAT | os.O_EXCL, 0o644)
        m = self.model
        m.content, m.label, m.new_file, m.update, m.exists = bytearray(), None, False, False, True
        assert m.open(acc, created=True)
        self.h = Handle(fd, acc)

    # -- data ------------------------------------------------------------------------
    def _range(self, size=None):
        size = len(self.model.content) if size is None else size
        off = self.rng.randrange(0, max(1, size))
        n = self.rng.randrange(1, 16 * 1024)
        return off, n

    def write(self) -> None:
        h = self.h
        if h is None or not h.writable:
            return
        off, n = self._range(MAXLEN - 16 * 1024)
        data = self.rng.randbytes(n)
        self.log.append(("write", off, n))
        assert os.pwrite(h.fd, data, off) == n
        c = self.model.content
        if off > len(c):
            c.extend(bytes(off - len(c)))
        c[off:off + n] = data
        h.changed = True

    def read(self) -> None:
        h = self.h
        if h is None or not h.readable:
            return
        off, n = self._range()
        self.log.append(("read", off, n))
        got = os.pread(h.fd, n, off)
        assert got == bytes(self.model.content[off:off + n]), self.log[-5:]

    def ftruncate(self) -> None:
        h = self.h
        if h is None or not h.writable:
            return
        size = self.rng.randrange(0, MAXLEN)
        self.log.append(("ftruncate", size))
        os.ftruncate(h.fd, size)
        self._resize(size)
        h.changed = True

    def truncate_path(self) -> None:
        size = self.rng.randrange(0, MAXLEN)
        self.log.append(("truncate", size))
        os.truncate(self.path, size)
        self._resize(size)
        if self.h is not None and self.h.writable:
            self.h.changed = True       # its close sees the change (i_version)

    def _resize(self, size) -> None:
        c = self.model.content
        if size < len(c):
            del c[size:]
        else:
            c.extend(bytes(size - len(c)))

    def mapwrite(self) -> None:
        h = self.h
        if h is None or h.acc != os.O_RDWR or not self.model.content:
            return
        off, n = self._range()
        n = min(n, len(self.model.content) - off)
        data = self.rng.randbytes(n)
        self.log.append(("mapwrite", off, n))
        mm = mmap.mmap(h.fd, len(self.model.content), mmap.MAP_SHARED)
        mm[off:off + n] = data
        mm.close()
        self.model.content[off:off + n] = data
        h.changed = True

    def mapread(self) -> None:
        h = self.h
        if h is None or not h.readable or not self.model.content:
            return
        off, n = self._range()
        self.log.append(("mapread", off, n))
        mm = mmap.mmap(h.fd, len(self.model.content), mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            assert mm[off:off + n] == bytes(self.model.content[off:off + n]), self.log[-5:]
        finally:
            mm.close()

    def chmod(self) -> None:
        mode = self.rng.choice([0o644, 0o600, 0o640])
        self.log.append(("chmod", oct(mode)))
        os.chmod(self.path, mode)

    def run(self, ops: int) -> None:
        self.recreate()
        actions = [(self.write, 20), (self.read, 15), (self.ftruncate, 6),
                   (self.truncate_path, 4), (self.mapwrite, 6), (self.mapread, 5),
                   (self.chmod, 4), (self.open, 12), (self.recreate, 2)]
        funcs = [f for f, w in actions for _ in range(w)]
        for _ in range(ops):
            self.rng.choice(funcs)()
        self.close()
        # a last read of the whole file when the model says it is readable
        ok = self.model.open(os.O_RDONLY, created=False)
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except PermissionError:
            assert not ok
        else:
            assert ok and data == bytes(self.model.content)


@pytest.mark.parametrize("mode", ["enforce", "fix"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_random_workload_against_the_kernels_rules(make_mount, world_tmp, masked, mode):
    seed = int(os.environ.get("IMAFS_FSX_SEED", str(int(time.time()))))
    print(f"IMAFS_FSX_SEED={seed}")
    p = world_tmp / "policy"
    p.write_text("appraise func=FILE_CHECK" + (" mask=^MAY_READ" if masked else "") + "\n")
    m = make_mount(["--policy", str(p), "--appraise", mode])
    log: list = []
    w = Workload(m, Model(masked, mode == "fix"), random.Random(f"{seed}-{masked}-{mode}"),
                 log)
    try:
        w.run(OPS)
    except AssertionError:
        print("last operations:", log[-20:])
        raise
    finally:
        if w.h is not None:
            os.close(w.h.fd)
