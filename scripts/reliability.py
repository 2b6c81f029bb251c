#!/usr/bin/env python3
"""Reliability figures of a large measurement list (run as root).

    .venv/bin/python scripts/reliability.py --million          # 1,000,000 entries
    .venv/bin/python scripts/reliability.py --entries 200000   # any size
            [--keep DIR] [--verify]

Builds a state directory whose root list holds N entries (written straight into the
LMDB store with MeasurementList.add_many, as a mount would have recorded them: a
mount takes far longer to record a million opens), then:

  1. mounts it and times how long ``imafs mount`` takes to be ready;
  2. ``cat``s the ascii list (and the binary one) to /dev/null, timing the rate, while
     sampling the daemon's resident memory (VmRSS, and its anonymous part) every
     50 ms;
  3. unmounts, remounts with the same --state and times the restart;
  4. with --verify, replays the binary list against pcrs/ with evmctl.

Prints one line per figure and, last, a JSON object with all of them.
tests/stress/test_load.py::test_large_list runs the same steps with 200,000 entries.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
IMAFS = [sys.executable, "-m", "imafs"]


def build_state(state: str, n: int, *, batch: int = 20000, progress=None) -> float:
    """A state directory whose root namespace list holds n entries (the boot
    aggregate included). Returns the seconds it took."""
    from imafs.ima.measurelog import MeasurementList
    from imafs.ima.templates import build_entry
    from imafs.store import Store
    t0 = time.monotonic()
    store = Store(os.path.join(state, "lmdb"), sync=False)
    try:
        ml = MeasurementList(store, 0)         # the mount's defaults: ima-ng, sha256
        i = ml.count
        while i < n:
            k = min(batch, n - i)
            ml.add_many([build_entry(
                "ima-ng", name=f"/usr/lib/x86_64-linux-gnu/pkg{j // 1000:04d}/lib{j:07d}.so",
                algo="sha256", digest=hashlib.sha256(j.to_bytes(8, "little")).digest())
                for j in range(i, i + k)])
            i += k
            if progress:
                progress(i)
        store.env.sync(True)
    finally:
        store.close()
    return time.monotonic() - t0


def _is_mounted(mnt: str) -> bool:
    mnt = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == mnt for line in f)


def mount(backing: str, mnt: str, state: str) -> float:
    """Seconds from ``imafs mount`` to a control file answering."""
    t0 = time.monotonic()
    r = subprocess.run(IMAFS + ["mount", backing, mnt, "--state", state],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"mount failed: {r.stderr}")
    with open(os.path.join(mnt, ".imafs", "runtime_measurements_count")) as f:
        f.read()
    return time.monotonic() - t0


def umount(mnt: str) -> None:
    subprocess.run(IMAFS + ["umount", mnt], capture_output=True, cwd=REPO)
    if _is_mounted(mnt):
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def daemon_pid(state: str) -> int:
    with open(os.path.join(state, "daemon.lock")) as f:
        return int(f.read().strip())


def _mem(pid: int) -> tuple[int, int]:
    rss = anon = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
    return rss, anon


def cat(path: str, pid: int) -> dict:
    """cat PATH > /dev/null, sampling the daemon's memory; bytes, seconds, rate,
    peak VmRSS and RssAnon (MiB)."""
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(_mem(pid))
            time.sleep(0.05)
    th = threading.Thread(target=sample)
    th.start()
    t0 = time.monotonic()
    try:
        r = subprocess.run(f"cat {path} | wc -c", shell=True, capture_output=True, text=True,
                           check=True)
    finally:
        dt = time.monotonic() - t0
        stop.set()
        th.join()
    size = int(r.stdout)
    return {"bytes": size, "seconds": dt, "mb_per_s": size / dt / 1e6,
            "peak_rss_mib": max(s[0] for s in samples) / 1024,
            "peak_anon_mib": max(s[1] for s in samples) / 1024}


def run(n: int, *, keep: str | None = None, verify: bool = False, log=print) -> dict:
    base = keep or tempfile.mkdtemp(prefix="imafs-reliability-")
    backing, mnt, state = (os.path.join(base, d) for d in ("backing", "mnt", "state"))
    for d in (backing, mnt, state):
        os.makedirs(d, exist_ok=True)
    fig: dict = {"entries": n}
    try:
        have = 0
        if os.path.exists(os.path.join(state, "lmdb")):
            from imafs.ima.measurelog import MeasurementList
            from imafs.store import Store
            s = Store(os.path.join(state, "lmdb"), readonly=True)
            have = MeasurementList(s, 0).count
            s.close()
        if have < n:
            fig["build_seconds"] = build_state(state, n)
            log(f"built {n} entries in {fig['build_seconds']:.1f} s")
        fig["lmdb_mib"] = sum(os.path.getsize(os.path.join(state, "lmdb", f))
                              for f in os.listdir(os.path.join(state, "lmdb"))) / 2**20
        fig["first_mount_seconds"] = mount(backing, mnt, state)
        log(f"first mount ready in {fig['first_mount_seconds']:.2f} s "
            f"(state {fig['lmdb_mib']:.0f} MiB)")
        pid = daemon_pid(state)
        fig["idle_rss_mib"] = _mem(pid)[0] / 1024
        count = int(open(os.path.join(mnt, ".imafs", "runtime_measurements_count")).read())
        assert count == max(n, 1), (count, n)
        for view in ("ascii_runtime_measurements", "binary_runtime_measurements"):
            c = cat(os.path.join(mnt, ".imafs", view), pid)
            fig[view] = c
            log(f"cat {view}: {c['bytes'] / 1e6:.0f} MB in {c['seconds']:.1f} s = "
                f"{c['mb_per_s']:.1f} MB/s ({n / c['seconds']:.0f} entries/s); daemon peak "
                f"VmRSS {c['peak_rss_mib']:.0f} MiB (anonymous {c['peak_anon_mib']:.0f} MiB)")
        if verify:
            for bank in ("sha1", "sha256"):
                shutil.copy(os.path.join(mnt, ".imafs", "pcrs", bank), os.path.join(base, bank))
            shutil.copy(os.path.join(mnt, ".imafs", "binary_runtime_measurements"),
                        os.path.join(base, "bin"))
            t0 = time.monotonic()
            r = subprocess.run(["evmctl", "ima_measurement", "--pcrs",
                                f"sha1,{os.path.join(base, 'sha1')}", "--pcrs",
                                f"sha256,{os.path.join(base, 'sha256')}", os.path.join(base, "bin")],
                               capture_output=True, text=True)
            fig["evmctl_ok"] = r.returncode == 0
            fig["evmctl_seconds"] = time.monotonic() - t0
            log(f"evmctl ima_measurement: {'ok' if r.returncode == 0 else 'FAILED'} in "
                f"{fig['evmctl_seconds']:.1f} s")
        umount(mnt)
        fig["restart_seconds"] = mount(backing, mnt, state)
        log(f"restart ready in {fig['restart_seconds']:.2f} s")
        fig["restart_rss_mib"] = _mem(daemon_pid(state))[0] / 1024
    finally:
        if _is_mounted(mnt):
            umount(mnt)
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--million", action="store_true", help="1,000,000 entries")
    g.add_argument("--entries", type=int, default=200000)
    ap.add_argument("--keep", metavar="DIR", help="build (or reuse) the state here, keep it")
    ap.add_argument("--verify", action="store_true", help="evmctl replay of the binary list")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("reliability.py: run as root (it mounts)", file=sys.stderr)
        return 2
    fig = run(1_000_000 if a.million else a.entries, keep=a.keep, verify=a.verify)
    print(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
