"""Issue 14 item 3: hashing and memory exhaustion by an unprivileged user.

The attack: uid 1000 opens, read-only and once each, ten big sparse files that begin
with ``\\x7fELF`` under a policy that measures MMAP_CHECK (imafs approximates it at
open by the ELF magic) and FILE_CHECK, with read verification on: each open hashes
the whole file and builds its verity tree. It used to take every worker thread (root's
cold open of a small file: 60 s), go on after the openers were killed, and leave the
trees in memory (RSS 40 -> 465 MiB).

Asserted here, through a mount: root's cold opens of small files during the attack
complete within SMALL_OPEN_BOUND each; once the openers are killed (after FINISHED
of the big files were hashed whole), the engine's ``hashed_bytes`` stops growing
within a few seconds; the verity trees in memory stay within the budget the mount
is given (``--tree-memory 4``: each 1 GiB file's tree is 8 MiB, so every finished
one is spilled to the tree cache) and the daemon's RSS afterwards is below
RSS_BOUND. The files are 1 GiB here, not 3 GiB: sparse files hash at ~200 MB/s on
this two-CPU machine (sha256 and the tree in one pass), and ten of 3 GiB would take
minutes. The latency distribution is the bench's (``scripts/bench.py --only
attack``), not this test's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from helpers.mounts import wait_for

pytestmark = [pytest.mark.mount, pytest.mark.slow]

BIG = 1 << 30
OPENERS = 10
SMALL_OPEN_BOUND = 2.0      # seconds; never-flaking bound (goal p99 < 0.1 s: the bench)
RSS_BOUND = 128 << 20       # bytes of daemon RSS after the attack (it was 465 MiB)
TREE_MEMORY_MIB = 4
FINISHED = 2                # big files hashed whole before the openers are killed
POLICY = "measure func=MMAP_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ\n"
SYSTEM_PYTHON = "/usr/bin/python3"   # uid 1000 may not read the venv's


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _stats(m) -> dict:
    return json.loads(m.ctl("stats").read_text())


def _attack_files(backing, n=OPENERS, size=BIG):
    d = backing / "home"
    d.mkdir()
    os.chown(d, 1000, 1000)
    for i in range(n):
        p = d / f"lib{i}.so"
        with open(p, "wb") as f:
            f.write(b"\x7fELF" + os.urandom(60))
            f.truncate(size)
        os.chown(p, 1000, 1000)
    return d


def _openers(m, files):
    """uid 1000 opens each big file read-only and holds it (blocks while hashed)."""
    code = "import sys, time\nf = open(sys.argv[1], 'rb')\ntime.sleep(3600)\n"

    def demote():
        os.setgroups([])
        os.setgid(1000)
        os.setuid(1000)
    return [subprocess.Popen([SYSTEM_PYTHON, "-c", code, str(m.mnt / "home" / p.name)],
                             preexec_fn=demote, start_new_session=True) for p in files]


def test_one_users_big_files_do_not_starve_root(make_mount, world_tmp):
    pol = world_tmp / "policy"
    pol.write_text(POLICY)
    backing = world_tmp / "backing"
    backing.mkdir()
    files = sorted(_attack_files(backing).iterdir())
    small = backing / "small"
    small.mkdir()
    for i in range(300):
        (small / f"s{i:03d}").write_bytes(os.urandom(4096))
    m = make_mount(["--policy", str(pol), "--verify-reads", "on", "--log-level", "info",
                    "--tree-memory", str(TREE_MEMORY_MIB)], backing=backing)
    pid = m.pid()
    procs = _openers(m, files)
    try:
        assert wait_for(lambda: _stats(m)["hashed_bytes"] > 64 << 20, timeout=60), \
            "the attack does not hash"
        # root's cold opens of small files, while the big files are hashed
        worst, i = 0.0, 0
        t_end = time.monotonic() + 8
        while time.monotonic() < t_end and i < 300:     # each a cold open
            t = time.monotonic()
            with open(m.mnt / "small" / f"s{i:03d}", "rb") as f:
                f.read()
            worst = max(worst, time.monotonic() - t)
            i += 1
            time.sleep(0.02)
        assert worst < SMALL_OPEN_BOUND, f"a small-file open took {worst:.2f} s"
        assert wait_for(lambda: _stats(m)["hashed_bytes"] > FINISHED * BIG, timeout=90)
        assert _stats(m)["hashed_bytes"] < OPENERS * BIG, "the attack finished too soon"
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()
    # the hashing for the killed openers stops
    def still():
        a = _stats(m)["hashed_bytes"]
        time.sleep(1.0)
        return _stats(m)["hashed_bytes"] == a
    assert wait_for(still, timeout=15, interval=0), "hashing goes on for killed openers"
    assert _stats(m).get("hashing_abandoned", 0) >= 1
    # the trees of the passes that finished are held within the tree budget
    st = _stats(m)
    assert st["tree_bytes"] <= TREE_MEMORY_MIB << 20
    assert st["trees_spilled"] >= FINISHED
    rss = _rss(pid)
    print(f"worst small open {worst * 1000:.0f} ms over {i} opens; RSS {rss >> 20} MiB; "
          f"stats {_stats(m)}")
    assert rss < RSS_BOUND, f"daemon RSS {rss >> 20} MiB after the attack"
    # and the mount serves as before
    with open(m.mnt / "small" / "s299", "rb") as f:
        assert len(f.read()) == 4096
