"""Control files that take a path inside the mount -- ``query``, a path line written to
``keys``, a policy loaded by path through ``policy`` -- open regular files only. A
FIFO, a socket, a device node or a directory is refused at once with EINVAL and a log
line naming it; nothing is opened. (A FIFO was opened with a plain O_RDONLY: the
daemon's worker thread waited for a writer that never came and the writing process
stayed in D state, unkillable; about 40 such writes used up trio's worker threads and
the whole mount hung.)"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.mount

KINDS = {"fifo": "a FIFO", "sock": "a socket", "null": "a character device",
         "dir": "a directory", "link": "a FIFO"}       # link: a symlink to the FIFO

# Writes DATA to CTL in each of N threads at once (one open each); prints one JSON line
# per thread: the errno of its write (0: written) and how long it took.
WRITER = r"""
import json, os, sys, threading, time
ctl, n, data = sys.argv[1], int(sys.argv[2]), os.fsencode(sys.argv[3])
out = [None] * n
def one(i):
    t = time.monotonic()
    fd = os.open(ctl, os.O_WRONLY)
    try:
        os.write(fd, data)
        err = 0
    except OSError as e:
        err = e.errno
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    out[i] = (err, time.monotonic() - t)
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(out))
"""


def special_tree(b: Path) -> None:
    b.mkdir()
    os.mkfifo(b / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(b / "sock"))
    s.close()                       # the socket file stays; nobody listens
    os.mknod(b / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))   # /dev/null's numbers
    (b / "dir").mkdir()
    os.symlink("fifo", b / "link")
    (b / "f").write_text("a regular file\n")


def _unblock(fifo: Path) -> None:
    """Wake a reader blocked in open(2) of the FIFO (the daemon, before the fix): a
    writer's open lets every waiting reader's open return."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def write_from(ctl: Path, data: str, fifo: Path, n: int = 1, timeout: float = 15):
    """[(errno, seconds)] of n concurrent writes of data to ctl. A writer still blocked
    after timeout is released through the FIFO and the test fails (so a regression
    never leaves a process in D state behind)."""
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(ctl), str(n), data],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        deadline = time.monotonic() + 30
        while p.poll() is None and time.monotonic() < deadline:
            _unblock(fifo)
            time.sleep(0.05)
        p.kill()
        p.communicate()
        pytest.fail(f"writing {data!r} to {ctl.name} blocked for over {timeout} s")
    assert p.returncode == 0, err
    return [tuple(x) for x in json.loads(out)]


def alive(m) -> bool:
    """The mount answers: a control file and a regular file, opened and read."""
    return (int(m.ctl("runtime_measurements_count").read_text()) >= 0
            and (m.mnt / "f").read_text() == "a regular file\n")


@pytest.fixture
def sm(make_mount, world_tmp):
    b = world_tmp / "rootfs"
    special_tree(b)
    m = make_mount(["--policy", "tcb"], backing=b)
    m.fifo = b / "fifo"
    return m


@pytest.mark.parametrize("ctl,line,logged", [
    ("query", "{path}", r"query write to namespace / rejected \(pid \d+\): "),
    ("query", "exec {path}", r"query write to namespace / rejected \(pid \d+\): "),
    ("keys", "{path}\n", r"key write to namespace / rejected \(pid \d+\): "),
    ("policy", "{path}\n", r"policy write to namespace / rejected \(pid \d+\): "),
], ids=["query", "query-exec", "keys", "policy"])
def test_non_regular_files_are_refused_at_once(sm, ctl, line, logged):
    """Each kind, by its path in the mount and below the mount point: EINVAL within a
    second, one log line saying what the file is; the mount keeps answering."""
    m = sm
    policy, keys = m.ctl("policy").read_text(), m.ctl("keys").read_text()
    for name, kind in KINDS.items():
        for prefix in ("", str(m.mnt)):
            path = f"{prefix}/{name}"
            before = len(m.log_text())
            [(err, took)] = write_from(m.ctl(ctl), line.format(path=path), m.fifo)
            assert err == errno.EINVAL, (ctl, path, err)
            assert took < 5.0, (ctl, path, took)   # a FIFO opened would block for good
            new = m.log_text()[before:]
            want = logged + re.escape(f"{path}: not a regular file ({kind})")
            assert len(re.findall(want, new)) == 1, (ctl, path, new)
            assert alive(m)
    assert m.ctl("policy").read_text() == policy and m.ctl("keys").read_text() == keys
    if ctl != "query":
        rej = "policy_rejected" if ctl == "policy" else "key_rejected"
        recs = [json.loads(x) for x in (m.state / "audit.log").read_text().splitlines()]
        assert sum(r["type"] == rej and "not a regular file" in r["error"] for r in recs) \
            == 2 * len(KINDS)


def test_many_fifo_queries_at_once_leave_the_mount_responsive(sm):
    """60 concurrent writes of a FIFO's path (more than trio's 40 worker threads; 41
    hung the mount): every one refused at once, and the mount answers during and
    after them; a regular file is still queried."""
    m = sm
    for ctl, data in (("query", "/fifo"), ("keys", "/fifo\n"), ("policy", "/link\n")):
        res = write_from(m.ctl(ctl), data, m.fifo, n=60, timeout=30)
        assert [e for e, _ in res] == [errno.EINVAL] * 60, (ctl, res)
        assert max(t for _, t in res) < 10, (ctl, res)
        assert alive(m)
    m.ctl("query").write_text("/f\n")
    q = json.loads(m.ctl("query").read_text())
    assert q["path"] == "/f" and "error" not in q, q
