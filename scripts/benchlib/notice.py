"""How long a change behind the mount takes to be noticed (``--only`` key
``notice``): a 4 MiB file, signed, read whole through a mount that verifies reads (so
every page of it is in the kernel's page cache); then 4 KiB in its middle change in
the backing file and the changed block is read from the same descriptor every
millisecond until it fails (EIO). The time from the change to that EIO, per way:

- ``write``: write(2) by another process (inotify's IN_MODIFY);
- ``mapping``: a write through a shared mapping of the backing file, then its mtime
  put back (no IN_MODIFY; the utimes is an IN_ATTRIB);
- ``stat pass``: without a mount, ``imafs.fs.inotify.Inotify`` alone, its watch
  taken out (what a file beyond the watch limit gets): the time from a
  shared-mapping write to its ``changed`` call (the pass runs every
  ``Inotify.RESCAN`` seconds; a mount adds the invalidation, about a millisecond).

Until the change is noticed the reads return the original bytes (checked)."""
from __future__ import annotations

import errno
import mmap
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import import_imafs
from benchlib.mounts import ImafsMount

WAYS = ("write", "mapping")
SIZE = 4 << 20
AT = 2 << 20
LIMIT = 30.0


def _change(path: Path, way: str) -> None:
    if way == "write":
        with open(path, "r+b") as f:
            f.seek(AT)
            f.write(os.urandom(4096))
        return
    st = os.stat(path)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        m[AT:AT + 4096] = os.urandom(4096)
        m.flush()
        m.close()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _one(m: ImafsMount, key_pem: Path, way: str, n: int) -> float:
    import_imafs()
    from imafs.cli import main
    f = m.backing / f"f{n}"
    data = os.urandom(SIZE)
    f.write_bytes(data)
    assert main(["sign", "-q", "--key", str(key_pem), str(f)]) == 0
    fd = os.open(m.mnt / f.name, os.O_RDONLY)
    try:
        assert os.pread(fd, SIZE, 0) == data
        t0 = time.perf_counter()
        _change(f, way)
        while True:
            try:
                d = os.pread(fd, 4096, AT)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                return time.perf_counter() - t0
            if d != data[AT:AT + 4096]:
                raise RuntimeError(f"{way}: a changed block was served")
            if time.perf_counter() - t0 > LIMIT:
                raise RuntimeError(f"{way}: not noticed within {LIMIT:g} s")
            time.sleep(0.001)
    finally:
        os.close(fd)


def stat_pass_delay(reps: int) -> list[float]:
    """Seconds from a shared-mapping write (no inotify event) to the stat pass's
    ``changed`` call, in-process."""
    import_imafs()
    import threading
    from imafs.fs.inotify import Inotify
    out = []
    with tempfile.TemporaryDirectory(prefix="imafs-notice-") as tmp:
        f = Path(tmp) / "f"
        f.write_bytes(os.urandom(SIZE))
        fd = os.open(f, os.O_PATH)
        seen = threading.Event()
        ino = Inotify(lambda key: seen.set())
        try:
            ino.watch("f", fd)
            ino.unwatch("f")
            for _ in range(reps):
                seen.clear()
                time.sleep(random.uniform(0, ino.rescan))   # any phase of the pass
                t0 = time.perf_counter()
                with open(f, "r+b") as fh:
                    m = mmap.mmap(fh.fileno(), 0)
                    m[AT:AT + 8] = os.urandom(8)
                    m.close()
                if not seen.wait(LIMIT):
                    raise RuntimeError("the stat pass did not see the change")
                out.append(time.perf_counter() - t0)
        finally:
            ino.close()
            os.close(fd)
    return out


def notice_micro(reps: int) -> dict:
    """Seconds from a change behind the mount to the EIO of a read of the changed
    block, ``reps`` times per way (at least 5)."""
    import_imafs()
    from imafs.cli import main
    out: dict[str, list[float]] = {w: [] for w in WAYS}
    with tempfile.TemporaryDirectory(prefix="imafs-notice-") as tmp:
        t = Path(tmp)
        os.chmod(t, 0o755)
        keys = t / "keys"
        assert main(["keygen", "--out", str(keys), "--cn", "notice"]) == 0
        policy = t / "policy"
        policy.write_text("appraise func=FILE_CHECK appraise_type=imasig\n")
        (t / "b").mkdir()
        (t / "m").mkdir()
        args = ["--policy", str(policy), "--key", str(keys / "signing_cert.der")]
        m = ImafsMount(t / "b", t / "m", t / "state", t / "log", args)
        m.start()
        try:
            n = 0
            for _ in range(max(5, reps)):
                for way in WAYS:        # taking turns: the machine's load hits both alike
                    out[way].append(_one(m, keys / "signing_key.pem", way, n))
                    n += 1
        finally:
            m.stop()
    out["stat pass"] = stat_pass_delay(max(5, reps))
    return {"seconds": out}


NOTICE_ROWS = {
    "write": "write(2) behind the mount (inotify IN_MODIFY)",
    "mapping": "shared-mapping write, mtime put back (inotify IN_ATTRIB)",
    "stat pass": "a shared-mapping write seen by the stat pass alone (no mount)",
}


def notice_summary(r: dict | None) -> list[dict]:
    if not r or "error" in r:
        return []
    rows = []
    for key, label in NOTICE_ROWS.items():
        ts = r["seconds"].get(key)
        if ts:
            rows.append({"key": key, "label": label, "times": ts,
                         "median": statistics.median(ts), "max": max(ts)})
    return rows
