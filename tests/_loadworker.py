"""Workers of tests/test_load.py.

    python _loadworker.py launch MNT NS COUNT FIRST SECONDS SEED OUTDIR
        enter integrity namespace NS (unless NS is "-"), write its policy, then run
        COUNT workers (ids FIRST...) as children, so they all belong to NS
    python _loadworker.py work MNT ID SECONDS SEED OUTDIR
        mixed work through the mount for SECONDS; writes OUTDIR/ID.json:
        {"ops": {op: count}, "errors": [[op, errno, message]], "max_latency": s}

Every file a worker writes, renames or deletes is its own (MNT/wID/ and its own
slots of the shared pool MNT/data/), so the backing file system itself would give no
error: every error is imafs's.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

POOL = 32          # shared files MNT/data/s00..s31; worker i rewrites those with n % 16 == i % 16


def work(mnt: str, wid: int, seconds: float, seed: int, outdir: str) -> int:
    rng = random.Random(seed)
    own = os.path.join(mnt, f"w{wid}")
    os.makedirs(own, exist_ok=True)
    ops: dict[str, int] = {}
    errors: list = []
    max_lat = 0.0
    end = time.monotonic() + seconds
    names: list[str] = []
    scripts: list[str] = []
    ctl = os.path.join(mnt, ".imafs")
    busybox = os.path.join(mnt, "bin", "busybox")
    mine = [n for n in range(POOL) if n % 16 == wid % 16]
    i = 0
    while time.monotonic() < end:
        i += 1
        op = rng.choice(("exec", "exec_script", "read", "read", "write", "rename", "readdir",
                         "ctl", "pool_write"))
        t = time.monotonic()
        try:
            if op == "exec":
                r = subprocess.run([busybox, "true"], timeout=60)
                if r.returncode != 0:
                    errors.append([op, 0, f"exit {r.returncode}"])
            elif op == "exec_script":
                p = os.path.join(own, f"s{i}.sh")
                with open(p, "w") as f:
                    f.write(f"#!{busybox} sh\nexit 0\n# {wid} {i}\n")
                os.chmod(p, 0o755)
                r = subprocess.run([p], timeout=60)
                if r.returncode != 0:
                    errors.append([op, 0, f"exit {r.returncode}"])
                scripts.append(p)
                if len(scripts) > 20:
                    os.unlink(scripts.pop(0))
            elif op == "read":
                p = os.path.join(mnt, "data", f"s{rng.randrange(POOL):02d}")
                with open(p, "rb") as f:
                    while f.read(1 << 16):
                        pass
            elif op == "write":
                p = os.path.join(own, f"f{rng.randrange(8)}")
                with open(p, "wb") as f:
                    f.write(os.urandom(rng.randrange(1, 1 << 16)))
                names.append(p)
            elif op == "rename":
                a = os.path.join(own, f"f{rng.randrange(8)}")
                b = os.path.join(own, f"f{rng.randrange(8)}")
                if os.path.exists(a):
                    os.rename(a, b)
            elif op == "readdir":
                os.listdir(os.path.join(mnt, "data"))
                os.listdir(own)
            elif op == "ctl":
                for name in ("runtime_measurements_count", "violations", "pcrs/sha256",
                             "policy"):
                    with open(os.path.join(ctl, name), "rb") as f:
                        f.read()
                with open(os.path.join(ctl, "ascii_runtime_measurements"), "rb") as f:
                    f.read(1 << 16)
            elif op == "pool_write":
                n = rng.choice(mine)
                tmp = os.path.join(own, "pool.tmp")
                with open(tmp, "wb") as f:
                    f.write(os.urandom(rng.randrange(1, 200000)))
                os.rename(tmp, os.path.join(mnt, "data", f"s{n:02d}"))
        except OSError as e:
            errors.append([op, e.errno, str(e)[:200]])
        except subprocess.TimeoutExpired:
            errors.append([op, 0, "timed out"])
        lat = time.monotonic() - t
        max_lat = max(max_lat, lat)
        ops[op] = ops.get(op, 0) + 1
    with open(os.path.join(outdir, f"{wid}.json"), "w") as f:
        json.dump({"ops": ops, "errors": errors[:50], "nerrors": len(errors),
                   "max_latency": max_lat}, f)
    return 0


def launch(mnt: str, ns: str, count: int, first: int, seconds: float, seed: int,
           outdir: str) -> int:
    if ns != "-":
        with open(os.path.join(mnt, ".imafs", "ns-create"), "w") as f:
            f.write(ns + "\n")
        with open(os.path.join(mnt, ".imafs", "policy"), "w") as f:
            f.write("measure func=BPRM_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ\n")
    procs = [subprocess.Popen([sys.executable, __file__, "work", mnt, str(first + k),
                               str(seconds), str(seed + k), outdir]) for k in range(count)]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    a = sys.argv
    if a[1] == "launch":
        sys.exit(launch(a[2], a[3], int(a[4]), int(a[5]), float(a[6]), int(a[7]), a[8]))
    sys.exit(work(a[2], int(a[3]), float(a[4]), int(a[5]), a[6]))
