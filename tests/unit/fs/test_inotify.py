"""fs/inotify.py without a mount: inotify events, the queue-overflow fallback, the
stat pass (what inotify does not see: writes through a shared mapping, watches it
could not add or dropped), and the registry of files verified handles hold open."""
from __future__ import annotations

import mmap
import os
import struct
import threading
import time

import pytest

from imafs.fs.inotify import IN_Q_OVERFLOW, Inotify


class Seen:
    def __init__(self):
        self.keys = []
        self.cond = threading.Condition()

    def __call__(self, key):
        with self.cond:
            self.keys.append(key)
            self.cond.notify_all()

    def wait_for(self, key, timeout=5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while key not in self.keys:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


@pytest.fixture
def files(tmp_path):
    out = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * 8192)
        out.append((p, os.open(p, os.O_PATH)))
    yield out
    for _, fd in out:
        os.close(fd)


def test_a_write_is_seen_by_inotify(files):
    seen = Seen()
    ino = Inotify(seen, rescan=3600)
    try:
        if not ino.available:
            pytest.skip("no inotify")
        (p, fd) = files[0]
        ino.watch("a", fd)
        with open(p, "r+b") as f:
            f.write(b"y")
        assert seen.wait_for("a")
    finally:
        ino.close()


def test_a_mapping_write_is_seen_by_the_stat_pass(files):
    """Writes through a shared mapping raise no inotify event; the pass sees the new
    mtime -- and the new ctime when mtime is put back (utimes raises IN_ATTRIB, so
    here the watch is taken out of inotify first)."""
    seen = Seen()
    ino = Inotify(seen, rescan=3600)
    try:
        (p, fd) = files[0]
        ino.watch("a", fd)
        ino.unwatch("a")                  # the stat pass alone
        assert ino.live("a") and not ino.watching("a")
        st = os.stat(p)
        time.sleep(0.01)
        with open(p, "r+b") as f:
            m = mmap.mmap(f.fileno(), 0)
            m[100:104] = b"EVIL"
            m.flush()
            m.close()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(p).st_mtime_ns == st.st_mtime_ns
        ino.scan()
        assert seen.keys == ["a"]
        ino.scan()                        # seen once
        assert seen.keys == ["a"]
    finally:
        ino.close()


def test_the_pass_runs_by_itself(files):
    seen = Seen()
    ino = Inotify(seen, rescan=0.05)
    try:
        (p, fd) = files[1]
        ino.watch("b", fd)
        ino.unwatch("b")
        time.sleep(0.02)
        with open(p, "r+b") as f:
            m = mmap.mmap(f.fileno(), 0)
            m[0:1] = b"Z"
            m.close()
        assert seen.wait_for("b", 5.0)
    finally:
        ino.close()


def test_queue_overflow_takes_every_file_as_changed(files):
    seen = Seen()
    ino = Inotify(seen, rescan=3600)
    try:
        for key, (_, fd) in zip("abc", files):
            ino.watch(key, fd)
        ino.unwatch("c")                  # live, not watched: still taken as changed
        ino.dispatch(struct.pack("iIII", -1, IN_Q_OVERFLOW, 0, 0))
        assert sorted(seen.keys) == ["a", "b", "c"]
    finally:
        ino.close()


def test_watches_beyond_max_leave_live_files_to_the_pass(files, monkeypatch):
    """More files than watches: the idle ones go first, and a live file without a
    watch is still in the stat pass."""
    monkeypatch.setattr(Inotify, "MAX", 2)
    seen = Seen()
    ino = Inotify(seen, rescan=3600)
    try:
        if not ino.available:
            pytest.skip("no inotify")
        for key, (_, fd) in zip("abc", files):
            ino.watch(key, fd)
        assert sum(ino.watching(k) for k in "abc") == 2
        assert all(ino.live(k) for k in "abc")
        ino.release("b")
        ino.watch("a", files[0][1])       # again: a is the most recent
        (p, _) = files[2]
        with open(p, "r+b") as f:
            m = mmap.mmap(f.fileno(), 0)
            m[0:1] = b"Q"
            m.close()
        ino.scan()
        assert "c" in seen.keys and "b" not in seen.keys
    finally:
        ino.close()


def test_released_files_leave_the_pass(files):
    seen = Seen()
    ino = Inotify(seen, rescan=3600)
    try:
        (p, fd) = files[0]
        ino.watch("a", fd)
        ino.watch("a", fd)               # two handles
        ino.release("a")
        assert ino.live("a")
        ino.release("a")
        assert not ino.live("a")
        ino.unwatch("a")
        with open(p, "r+b") as f:
            m = mmap.mmap(f.fileno(), 0)
            m[0:1] = b"W"
            m.close()
        ino.scan()
        assert seen.keys == []
    finally:
        ino.close()
