"""Load: 16 processes of mixed work (exec of a binary and of scripts, reads, writes,
renames, readdir, control-file reads) for IMAFS_LOAD_SECONDS (default 30) against
one mount, 4 on the host and 6 in each of two child integrity namespaces.

Checks: no error at all (every file a worker changes is its own, so the backing file
system would give none; tests/stress/loadworker.py checks everything it reads: a pool file
must hash to its own header, an own file to what was last written to that name, an
exec must print its tag), no deadlock (every worker finishes, the mount answers), the
daemon's anonymous memory stays bounded, and afterwards:

- every list (host and both children) replays to its PCRs (imafs.ima.verifylog and
  evmctl);
- every pool file version a worker read is one its owner wrote (or the initial one),
  and the backing tree ends with each owner's last version and each worker's own
  files as its model says;
- every file version a worker executed (busybox, its scripts) has its BPRM_CHECK
  entry on PCR 11, and every one it read its FILE_CHECK entry on PCR 10 (path and
  sha256), in the host's list and, for a worker in a namespace, in that namespace's
  list (every policy measures both);
- a worker's own files (MNT/wID/) appear only in the lists of its namespace and the
  host's, never in the other namespace's.

Prints the throughput (operations per second, by kind).

test_large_list: a 200,000-entry list (cat rate, daemon memory, restart time).

Run time: IMAFS_LOAD_SECONDS + about 10 s, and about 20 s for the large list.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.mounts import wait_for
from stress.listcheck import check_list, evmctl_check, read_list

sys.path.insert(0, str(Path(__file__).parent))
from stress.loadworker import POLICY, POOL, pool_version  # noqa: E402

pytestmark = [pytest.mark.mount, pytest.mark.slow]

SECONDS = float(os.environ.get("IMAFS_LOAD_SECONDS", "30"))
WORKER = Path(__file__).with_name("loadworker.py")
FACT_PCR = {"x": 11, "r": 10}      # exec: BPRM_CHECK on PCR 11; read: FILE_CHECK on 10


def daemon_pid(m) -> int:
    return int((m.state / "daemon.lock").read_text().strip())


def mem_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out


def test_sixteen_workers_two_namespaces(make_mount, world_tmp):
    pol = world_tmp / "policy"
    pol.write_text(POLICY)
    backing = world_tmp / "rootfs"
    (backing / "bin").mkdir(parents=True)
    (backing / "data").mkdir()
    shutil.copy("/bin/busybox", backing / "bin" / "busybox")
    versions: dict[str, set[str]] = {}        # pool file -> sha256 of every version
    for n in range(POOL):
        data = pool_version(99, n, os.urandom(20000 + n * 1000))
        (backing / "data" / f"s{n:02d}").write_bytes(data)
        versions[f"/data/s{n:02d}"] = {hashlib.sha256(data).hexdigest()}
    m = make_mount(["--policy", str(pol), "--log-level", "info"], backing=backing)
    out = world_tmp / "results"
    out.mkdir()
    pid = daemon_pid(m)
    mem = [mem_kib(pid)]
    groups = [("-", 4, 0), ("A", 6, 4), ("B", 6, 10)]
    ns_of = {first + k: ns for ns, count, first in groups for k in range(count)}
    t0 = time.monotonic()
    launchers = [subprocess.Popen([sys.executable, str(WORKER), "launch", str(m.mnt), ns,
                                   str(count), str(first), str(SECONDS), str(1000 + first),
                                   str(out)], start_new_session=True)
                 for ns, count, first in groups]
    try:
        while any(p.poll() is None for p in launchers):
            time.sleep(1)
            mem.append(mem_kib(pid))
            assert time.monotonic() - t0 < SECONDS + 120, "workers did not finish: deadlock?"
    finally:
        for p in launchers:        # a failed assertion leaves no worker behind
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    elapsed = time.monotonic() - t0
    assert [p.returncode for p in launchers] == [0, 0, 0]
    t = time.monotonic()
    assert int(m.ctl("runtime_measurements_count").read_text()) > 0
    assert time.monotonic() - t < 5

    results = {int(p.stem): json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(results) == list(range(16))
    errors = [e for r in results.values() for e in r["errors"]]
    assert not errors, errors[:10]
    ops: dict[str, int] = {}
    for r in results.values():
        for k, v in r["ops"].items():
            ops[k] = ops.get(k, 0) + v
    total = sum(ops.values())
    worst = max(r["max_latency"] for r in results.values())

    # memory: the anonymous part (the LMDB map is file-backed) must level off
    anon = [x["RssAnon"] for x in mem]
    quarter = anon[len(anon) // 4]
    growth = (anon[-1] - quarter) / 1024
    peak = max(x["VmRSS"] for x in mem) / 1024

    # the data: every pool version read is one that was written; the backing tree
    # ends as the workers left it
    last: dict[str, str] = {}
    for wid in sorted(results):
        for path, sha in results[wid]["written"]:
            versions[path].add(sha)
            last[path] = sha
    for wid, r in sorted(results.items()):
        for kind, path, sha in r["facts"]:
            if path.startswith("/data/"):
                assert sha in versions[path], \
                    f"worker {wid} read a version of {path} that nobody wrote"
        for path, sha in r["own"].items():
            real = hashlib.sha256((backing / path.lstrip("/")).read_bytes()).hexdigest()
            assert real == sha, f"{path} in the backing tree is not what worker {wid} wrote"
    for path, sha in last.items():
        real = hashlib.sha256((backing / path.lstrip("/")).read_bytes()).hexdigest()
        assert real == sha, f"{path} in the backing tree is not its owner's last version"

    # the lists: host and both children replay to their PCRs, and hold every file
    # version that was executed or read in them
    counts, entries = {}, {}
    for name, d in [("-", m.ctl()), ("A", m.ctl("namespaces/A")), ("B", m.ctl("namespaces/B"))]:
        lst = read_list(d)
        entries[name] = check_list(lst, name)
        evmctl_check(lst, world_tmp)
        counts[name] = lst["count"]
    assert counts["A"] > 10 and counts["B"] > 10
    looked_up = 0
    for wid, r in sorted(results.items()):
        for kind, path, sha in r["facts"]:
            key = (FACT_PCR[kind], path.encode(), sha)
            for ns in {"-", ns_of[wid]}:
                assert key in entries[ns], \
                    f"worker {wid} ({ns_of[wid]}): {'exec' if kind == 'x' else 'read'} of " \
                    f"{path} ({sha[:16]}) is not on PCR {key[0]} of the list of {ns}"
                looked_up += 1
    for ns in ("A", "B"):
        for pcr, name, sha in entries[ns]:
            if name.startswith(b"/w"):
                wid = int(name[2:].split(b"/", 1)[0])
                assert ns_of[wid] == ns, \
                    f"the list of {ns} has {name!r}, a file of worker {wid} ({ns_of[wid]})"
    facts = sum(len(r["facts"]) for r in results.values())
    reads = sum(1 for r in results.values() for f in r["facts"] if f[0] == "r")
    assert looked_up > 1000 and reads > 500, (looked_up, reads)

    print(f"load: 16 workers, {elapsed:.0f} s: {total} ops, {total / elapsed:.0f} ops/s "
          f"({', '.join(f'{k} {v / elapsed:.0f}/s' for k, v in sorted(ops.items()))}); "
          f"worst op {worst * 1000:.0f} ms; daemon RSS peak {peak:.0f} MiB, anon growth "
          f"after the first quarter {growth:.1f} MiB; entries host {counts['-']} "
          f"A {counts['A']} B {counts['B']}; {facts} distinct file versions executed or "
          f"read ({reads} read), {looked_up} look-ups in the lists; "
          f"{sum(len(v) for v in versions.values())} pool versions")
    assert peak < 400, f"daemon RSS reached {peak:.0f} MiB"
    assert growth < 64, f"daemon anonymous memory grew {growth:.0f} MiB under steady load"


def test_large_list(world_tmp):
    """A list of IMAFS_LIST_ENTRIES (default 100,000; scripts/reliability.py --million
    for a million) written straight into a --state: cat of the ascii and binary lists
    streams (rate printed), the daemon's resident memory stays under 200 MiB while it
    does, evmctl replays the binary list, and a restart is ready in under 3 s."""
    import importlib.util
    from helpers.mounts import REPO
    spec = importlib.util.spec_from_file_location("imafs_reliability",
                                                  REPO / "scripts" / "reliability.py")
    rel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rel)
    n = int(os.environ.get("IMAFS_LIST_ENTRIES", "100000"))
    fig = rel.run(n, keep=str(world_tmp / "big"), verify=True, log=print)
    for view in ("ascii_runtime_measurements", "binary_runtime_measurements"):
        c = fig[view]
        assert c["peak_rss_mib"] < 200, (view, c)
        assert c["mb_per_s"] > 2, (view, c)
    assert fig["evmctl_ok"]
    assert fig["restart_seconds"] < 3, fig
