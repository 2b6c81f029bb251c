"""The hashing attack of issue 14 item 3, measured (``--only attack``): root's cold
opens of small files while an unprivileged user makes the daemon hash ten big sparse
files beginning with ``\\x7fELF`` (policy: measure MMAP_CHECK and FILE_CHECK reads,
reads verified). Reports the latency of root's opens before and during the attack
(p50, p99, max), how fast the hashing stops once the openers are killed, and the
daemon's RSS and verity-tree bytes. Its own mount, in the work directory."""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

from benchlib import IMAFS, REPO, env

POLICY = "measure func=MMAP_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ\n"
OPENER = "import sys, time\nf = open(sys.argv[1], 'rb')\ntime.sleep(3600)\n"
SYSTEM_PYTHON = "/usr/bin/python3"


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _opens(mnt: Path, names: list[str], seconds: float) -> list[float]:
    """Cold opens and reads of small files by root, one every 10 ms, for ``seconds``:
    their latencies."""
    out = []
    end = time.monotonic() + seconds
    for name in names:
        if time.monotonic() >= end:
            break
        t = time.perf_counter()
        with open(mnt / "small" / name, "rb") as f:
            f.read()
        out.append(time.perf_counter() - t)
        time.sleep(0.01)
    return out


def _summary(ts: list[float]) -> dict:
    if not ts:
        return {"n": 0}
    s = sorted(ts)
    return {"n": len(s), "p50_ms": statistics.median(s) * 1000,
            "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, "max_ms": s[-1] * 1000}


def attack_micro(work: Path, quick: bool) -> dict:
    """Run the attack on a fresh mount under ``work``; the figures as a dict."""
    size = (256 if quick else 3072) << 20
    openers, seconds = 10, (5.0 if quick else 20.0)
    backing, mnt, state = work / "attack-backing", work / "attack-mnt", work / "attack-state"
    for d in (backing / "home", backing / "small", mnt):
        d.mkdir(parents=True, exist_ok=True)
    os.chown(backing / "home", 1000, 1000)
    for i in range(openers):
        p = backing / "home" / f"lib{i}.so"
        with open(p, "wb") as f:
            f.write(b"\x7fELF" + os.urandom(60))
            f.truncate(size)
        os.chown(p, 1000, 1000)
    names = [f"s{i:05d}" for i in range(int(seconds * 2 * 100) + 200)]
    for n in names:
        (backing / "small" / n).write_bytes(os.urandom(4096))
    (work / "attack-policy").write_text(POLICY)
    subprocess.run(IMAFS + ["mount", str(backing), str(mnt), "--state", str(state),
                            "--policy", str(work / "attack-policy"), "--verify-reads", "on"],
                   check=True, env=env(), cwd=REPO, timeout=120)
    procs = []
    try:
        pid = int((state / "daemon.lock").read_text())

        def stats():
            return json.loads((mnt / ".imafs" / "stats").read_text())
        rss0 = _rss_mib(pid)
        before = _opens(mnt, names[:100], 3.0)

        def demote():
            os.setgroups([])
            os.setgid(1000)
            os.setuid(1000)
        procs = [subprocess.Popen([SYSTEM_PYTHON, "-c", OPENER, str(mnt / "home" / f"lib{i}.so")],
                                  preexec_fn=demote, start_new_session=True)
                 for i in range(openers)]
        time.sleep(0.5)
        during = _opens(mnt, names[100:], seconds)
        hashed = stats()["hashed_bytes"]
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        t_kill = time.monotonic()
        last, stopped = stats()["hashed_bytes"], None
        while time.monotonic() - t_kill < 30:
            time.sleep(0.25)
            now = stats()["hashed_bytes"]
            if now == last:
                stopped = time.monotonic() - t_kill - 0.25
                break
            last = now
        st = stats()
        return {"file_mib": size >> 20, "openers": openers, "seconds": seconds,
                "before": _summary(before), "during": _summary(during),
                "hashed_during_mib": hashed / 2**20, "stopped_after_s": stopped,
                "abandoned": st.get("hashing_abandoned"), "tree_bytes": st.get("tree_bytes"),
                "trees_spilled": st.get("trees_spilled"), "rss_before_mib": rss0,
                "rss_after_mib": _rss_mib(pid)}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        subprocess.run(IMAFS + ["umount", str(mnt)], env=env(), cwd=REPO, timeout=120)


def attack_lines(a: dict) -> list[str]:
    """The markdown table of :func:`attack_micro`'s figures."""
    def row(label, s):
        if not s.get("n"):
            return f"| {label} | 0 | | | |"
        return (f"| {label} | {s['n']} | {s['p50_ms']:.1f} ms | {s['p99_ms']:.1f} ms | "
                f"{s['max_ms']:.1f} ms |")
    stop = a.get("stopped_after_s")
    return ["| root's cold small-file opens | n | p50 | p99 | max |", "|---|---:|---:|---:|---:|",
            row("before the attack", a["before"]), row("during the attack", a["during"]), "",
            f"Attack: {a['openers']} sparse files of {a['file_mib']:,} MiB opened by uid 1000; "
            f"{a['hashed_during_mib']:,.0f} MiB hashed in {a['seconds']:.0f} s; hashing stopped "
            + (f"{stop:.2f} s after the openers were killed" if stop is not None
               else "not within 30 s of the kill")
            + f" ({a['abandoned']} passes abandoned); verity trees in memory afterwards "
            f"{(a['tree_bytes'] or 0) / 2**20:.1f} MiB ({a['trees_spilled']} spilled); daemon "
            f"RSS {a['rss_before_mib']:.0f} MiB before, {a['rss_after_mib']:.0f} MiB after."]
