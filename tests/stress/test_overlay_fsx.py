"""fsx-style data integrity through the mount: thousands of random writes, truncates
and reads (through one long-lived descriptor, fresh descriptors, O_APPEND, the path,
and mmap) at random offsets, each checked against an in-memory model of the file.
Fixed seeds; a failure names its seed and the last operations."""
from __future__ import annotations

import mmap
import os
import random

import pytest

pytestmark = pytest.mark.mount

MAXLEN = 1 << 20          # the file stays below 1 MiB (the >4 GiB case is in test_overlay_posix)
PAGE = mmap.PAGESIZE


class Fsx:
    def __init__(self, path: str, backing: str, seed: int):
        self.path, self.backing, self.seed = path, backing, seed
        self.rnd = random.Random(seed)
        self.model = bytearray()
        self.log: list[str] = []
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    # ------------------------------------------------------------------ helpers
    def fail(self, msg: str):
        tail = "\n  ".join(self.log[-25:])
        raise AssertionError(f"fsx seed {self.seed}, op {len(self.log)}: {msg}\n"
                             f"last operations:\n  {tail}")

    def span(self, maxlen=MAXLEN):
        r = self.rnd.random()
        if r < 0.1:
            size = 1
        elif r < 0.6:
            size = self.rnd.randint(1, 4 * PAGE)
        else:
            size = self.rnd.randint(1, 128 * 1024)
        off = self.rnd.randrange(0, maxlen)
        if self.rnd.random() < 0.3:      # page-aligned, or just around a page edge
            off = off // PAGE * PAGE + self.rnd.choice([0, -1, 1]) if off >= PAGE else off
        return off, min(size, maxlen - off)

    def expect(self, off: int, size: int) -> bytes:
        return bytes(self.model[off:off + size])

    def check(self, got: bytes, off: int, size: int, how: str):
        want = self.expect(off, size)
        if got != want:
            bad = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                       min(len(got), len(want)))
            self.fail(f"{how} at {off}+{size}: got {len(got)} bytes, want {len(want)}; "
                      f"first difference at file offset {off + bad}")

    def model_write(self, off: int, data: bytes):
        if off > len(self.model):
            self.model.extend(b"\0" * (off - len(self.model)))
        self.model[off:off + len(data)] = data

    def model_truncate(self, size: int):
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(b"\0" * (size - len(self.model)))

    # ------------------------------------------------------------------ operations
    def op_write(self):
        off, size = self.span()
        data = self.rnd.randbytes(size)
        how = self.rnd.choice(["fd", "fd", "fresh", "append"])
        self.log.append(f"write/{how} {off}+{size}")
        if how == "fd":
            n = os.pwrite(self.fd, data, off)
        elif how == "fresh":
            fd = os.open(self.path, os.O_WRONLY)
            try:
                n = os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        else:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                off = len(self.model)
                if off + size > MAXLEN:
                    return
                n = os.write(fd, data)
            finally:
                os.close(fd)
        if n != size:
            self.fail(f"short write {n} of {size}")
        self.model_write(off, data)

    def op_truncate(self):
        size = self.rnd.randrange(0, MAXLEN)
        if self.rnd.random() < 0.2:
            size = self.rnd.randrange(0, 2 * PAGE)
        how = self.rnd.choice(["ftruncate", "path", "otrunc"] if self.rnd.random() < 0.1
                              else ["ftruncate", "path"])
        if how == "otrunc":
            size = 0
        self.log.append(f"truncate/{how} {size}")
        if how == "ftruncate":
            os.ftruncate(self.fd, size)
        elif how == "path":
            os.truncate(self.path, size)
        else:
            os.close(os.open(self.path, os.O_WRONLY | os.O_TRUNC))
        self.model_truncate(size)

    def op_read(self):
        off, size = self.span(MAXLEN)
        if self.model and self.rnd.random() < 0.7:
            off = self.rnd.randrange(0, len(self.model))
        how = self.rnd.choice(["fd", "fresh"])
        self.log.append(f"read/{how} {off}+{size}")
        if how == "fd":
            got = os.pread(self.fd, size, off)
        else:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = os.pread(fd, size, off)
            finally:
                os.close(fd)
        self.check(got, off, size, f"read/{how}")

    def op_mapread(self):
        if not self.model:
            return
        off = self.rnd.randrange(0, len(self.model))
        size = self.rnd.randint(1, min(len(self.model) - off, 64 * 1024))
        self.log.append(f"mapread {off}+{size}")
        with mmap.mmap(self.fd, len(self.model), prot=mmap.PROT_READ) as m:
            got = m[off:off + size]
        self.check(got, off, size, "mapread")

    def op_mapwrite(self):
        if not self.model:
            return
        off = self.rnd.randrange(0, len(self.model))
        size = self.rnd.randint(1, min(len(self.model) - off, 64 * 1024))
        data = self.rnd.randbytes(size)
        self.log.append(f"mapwrite {off}+{size}")
        with mmap.mmap(self.fd, len(self.model)) as m:
            m[off:off + size] = data
            m.flush()
        self.model_write(off, data)

    def op_size(self):
        self.log.append("stat")
        for s, how in ((os.fstat(self.fd).st_size, "fstat"), (os.stat(self.path).st_size, "stat")):
            if s != len(self.model):
                self.fail(f"{how} size {s}, want {len(self.model)}")

    def op_reopen(self):
        self.log.append("reopen" + (" + fsync" if self.rnd.random() < 0.5 else ""))
        if self.log[-1].endswith("fsync"):
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)

    def op_backing(self):
        """The bytes must really be in the backing file, not only in the page cache."""
        self.log.append("compare with the backing file")
        with open(self.backing, "rb") as f:
            got = f.read()
        if got != bytes(self.model):
            self.check(got, 0, max(len(got), len(self.model)), "backing file")

    def run(self, n: int):
        ops = [(self.op_write, 30), (self.op_truncate, 6), (self.op_read, 30),
               (self.op_mapread, 8), (self.op_mapwrite, 6), (self.op_size, 8),
               (self.op_reopen, 4), (self.op_backing, 2)]
        fns, weights = zip(*ops)
        try:
            for _ in range(n):
                self.rnd.choices(fns, weights)[0]()
            self.op_size()
            self.op_backing()
            os.close(self.fd)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = b""
                while chunk := os.read(fd, 1 << 20):
                    got += chunk
            finally:
                os.close(fd)
            self.check(got, 0, len(self.model) + 1, "final read")
        except OSError as e:
            self.fail(f"{e!r}")


# IMAFS_FSX_SEEDS=1-50 for a long hunt
_seeds = os.environ.get("IMAFS_FSX_SEEDS", "1-3").split("-")
SEEDS = list(range(int(_seeds[0]), int(_seeds[-1]) + 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_fsx(plain_mount, seed):
    name = f"fsx{seed}"
    Fsx(str(plain_mount.mnt / name), str(plain_mount.backing / name), seed).run(3000)


def test_fsx_two_files_interleaved(plain_mount):
    """Two files driven alternately: no cross-talk between handles or inodes."""
    a = Fsx(str(plain_mount.mnt / "x"), str(plain_mount.backing / "x"), 11)
    b = Fsx(str(plain_mount.mnt / "y"), str(plain_mount.backing / "y"), 12)
    ops = ["op_write", "op_read", "op_truncate", "op_mapread", "op_size"]
    rnd = random.Random(13)
    for _ in range(600):
        for f in (a, b):
            getattr(f, rnd.choice(ops))()
    a.op_backing()
    b.op_backing()
    os.close(a.fd)
    os.close(b.fd)
