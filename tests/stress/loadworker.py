"""Workers of tests/stress/test_load.py.

    python loadworker.py launch MNT NS COUNT FIRST SECONDS SEED OUTDIR
        enter integrity namespace NS (unless NS is "-"), write its policy (POLICY),
        then run COUNT workers (ids FIRST...) as children, so they all belong to NS
    python loadworker.py work MNT ID SECONDS SEED OUTDIR
        mixed work through the mount for SECONDS; writes OUTDIR/ID.json:
        {"ops": {op: count}, "errors": [[op, errno, message]], "nerrors": n,
         "max_latency": s, "facts": [[kind, path, sha256]], "written": [[path, sha256]],
         "own": {path: sha256}}

Every file a worker writes, renames or deletes is its own (MNT/wID/ and its own
slots of the shared pool MNT/data/), so the backing file system itself would give no
error: every error is imafs's. Everything read is checked:

- a pool file MNT/data/sNN (read by every worker, rewritten by its one owner with a
  rename over it) is a header ``POOL WRITER SEQ LEN SHA256\\n`` and LEN bytes whose
  sha256 is SHA256; a read that does not hash to its header is an error, and its
  sha256 goes to "facts" (the test checks it is a version that was written);
- a worker's own files MNT/wID/f0..f7 (written, renamed among themselves) are read
  back and must hash to what the worker last wrote to that name (a model of
  writes and renames), at random and all of them at the end ("own": the model);
- an exec of /bin/busybox (``echo TAG``) and of a ``#!/bin/busybox sh`` script
  (``echo TAG``) must print its TAG.

"facts": what the worker saw succeed, for the test to find in the lists: ``x`` an
exec (of busybox, of a script, and of busybox as the script's interpreter), ``r`` a
read of a whole file (sha256 of what was read). "written": every pool version the
worker renamed into place, in order.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time

POOL = 32          # shared files MNT/data/s00..s31; worker i rewrites those with n % 16 == i % 16
OWN = 8            # MNT/wID/f0..f7
POLICY = "measure func=BPRM_CHECK pcr=11\nmeasure func=FILE_CHECK mask=MAY_READ\n"


def pool_version(writer: int, seq: int, payload: bytes) -> bytes:
    """A pool file: a header that names its own payload's length and digest."""
    head = b"POOL %d %d %d %s\n" % (writer, seq, len(payload),
                                    hashlib.sha256(payload).hexdigest().encode())
    return head + payload


def pool_problem(data: bytes) -> str | None:
    """Why data is not a whole pool file (None: it is one)."""
    head, nl, payload = data.partition(b"\n")
    words = head.split()
    if not nl or len(words) != 5 or words[0] != b"POOL":
        return f"no pool header ({len(data)} bytes: {data[:40]!r})"
    if int(words[3]) != len(payload):
        return f"{len(payload)} bytes after the header of {head!r}"
    if hashlib.sha256(payload).hexdigest().encode() != words[4]:
        return f"the payload does not hash to the header {head!r}"
    return None


def work(mnt: str, wid: int, seconds: float, seed: int, outdir: str) -> int:
    rng = random.Random(seed)
    own = os.path.join(mnt, f"w{wid}")
    os.makedirs(own, exist_ok=True)
    ops: dict[str, int] = {}
    errors: list = []
    facts: set[tuple[str, str, str]] = set()
    written: list[list[str]] = []
    model: dict[str, str] = {}          # own file -> sha256 of what it must hold
    max_lat = 0.0
    end = time.monotonic() + seconds
    scripts: list[str] = []
    ctl = os.path.join(mnt, ".imafs")
    busybox = os.path.join(mnt, "bin", "busybox")
    with open("/bin/busybox", "rb") as f:      # what the test copied to MNT/bin/busybox
        busybox_sha = hashlib.sha256(f.read()).hexdigest()
    mine = [n for n in range(POOL) if n % 16 == wid % 16]
    seq = 0

    def rel(p: str) -> str:
        return p[len(mnt):]

    def read_own(p: str) -> None:
        with open(p, "rb") as f:
            data = f.read()
        sha = hashlib.sha256(data).hexdigest()
        if sha != model[p]:
            errors.append(["read_own", 0, f"{rel(p)}: {len(data)} bytes that are not what "
                           f"was last written to it"])
        facts.add(("r", rel(p), sha))

    i = 0
    while time.monotonic() < end:
        i += 1
        op = rng.choice(("exec", "exec_script", "read", "read", "read_own", "write", "rename",
                         "readdir", "ctl", "pool_write"))
        t = time.monotonic()
        try:
            if op == "exec":
                tag = f"{wid}.{i}.{rng.getrandbits(32):08x}"
                r = subprocess.run([busybox, "echo", tag], capture_output=True, timeout=60)
                if r.returncode != 0 or r.stdout != (tag + "\n").encode():
                    errors.append([op, 0, f"exit {r.returncode}, printed {r.stdout[:80]!r}"])
                else:
                    facts.add(("x", "/bin/busybox", busybox_sha))
            elif op == "exec_script":
                p = os.path.join(own, f"s{i}.sh")
                tag = f"{wid}.{i}.{rng.getrandbits(32):08x}"
                body = f"#!{busybox} sh\necho {tag}\n# {wid} {i}\n".encode()
                with open(p, "wb") as f:
                    f.write(body)
                os.chmod(p, 0o755)
                r = subprocess.run([p], capture_output=True, timeout=60)
                if r.returncode != 0 or r.stdout != (tag + "\n").encode():
                    errors.append([op, 0, f"exit {r.returncode}, printed {r.stdout[:80]!r}"])
                else:
                    facts.add(("x", rel(p), hashlib.sha256(body).hexdigest()))
                    facts.add(("x", "/bin/busybox", busybox_sha))
                scripts.append(p)
                if len(scripts) > 20:
                    os.unlink(scripts.pop(0))
            elif op == "read":
                p = os.path.join(mnt, "data", f"s{rng.randrange(POOL):02d}")
                parts = []
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 16):
                        parts.append(chunk)
                data = b"".join(parts)
                why = pool_problem(data)
                if why:
                    errors.append([op, 0, f"{rel(p)}: {why}"])
                facts.add(("r", rel(p), hashlib.sha256(data).hexdigest()))
            elif op == "read_own":
                if model:
                    read_own(rng.choice(sorted(model)))
            elif op == "write":
                p = os.path.join(own, f"f{rng.randrange(OWN)}")
                data = os.urandom(rng.randrange(1, 1 << 16))
                with open(p, "wb") as f:
                    f.write(data)
                model[p] = hashlib.sha256(data).hexdigest()
            elif op == "rename":
                a = os.path.join(own, f"f{rng.randrange(OWN)}")
                b = os.path.join(own, f"f{rng.randrange(OWN)}")
                if os.path.exists(a) != (a in model):
                    errors.append([op, 0, f"{rel(a)} exists: {os.path.exists(a)}, "
                                   f"written: {a in model}"])
                elif a in model:
                    os.rename(a, b)
                    model[b] = model.pop(a)
            elif op == "readdir":
                names = os.listdir(os.path.join(mnt, "data"))
                if len(names) != POOL:
                    errors.append([op, 0, f"data/ lists {len(names)} names, not {POOL}"])
                have = {n for n in os.listdir(own) if n.startswith("f")}
                want = {os.path.basename(p) for p in model}
                if have != want:
                    errors.append([op, 0, f"{rel(own)} lists {sorted(have)}, "
                                   f"written {sorted(want)}"])
            elif op == "ctl":
                for name in ("runtime_measurements_count", "violations", "pcrs/sha256",
                             "policy"):
                    with open(os.path.join(ctl, name), "rb") as f:
                        data = f.read()
                    if name in ("runtime_measurements_count", "violations"):
                        int(data)
                    elif name == "pcrs/sha256" and data.count(b"\nPCR-") != 23:
                        errors.append([op, 0, f"pcrs/sha256: {data[:80]!r}"])
                with open(os.path.join(ctl, "ascii_runtime_measurements"), "rb") as f:
                    head = f.read(1 << 16)
                if not head.startswith(b"10 ") or b"boot_aggregate" not in head[:200]:
                    errors.append([op, 0, f"ascii list starts {head[:80]!r}"])
            elif op == "pool_write":
                n = rng.choice(mine)
                seq += 1
                data = pool_version(wid, seq, os.urandom(rng.randrange(1, 200000)))
                tmp = os.path.join(own, "pool.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                dst = os.path.join(mnt, "data", f"s{n:02d}")
                os.rename(tmp, dst)
                written.append([rel(dst), hashlib.sha256(data).hexdigest()])
        except OSError as e:
            errors.append([op, e.errno, str(e)[:200]])
        except ValueError as e:
            errors.append([op, 0, str(e)[:200]])
        except subprocess.TimeoutExpired:
            errors.append([op, 0, "timed out"])
        lat = time.monotonic() - t
        max_lat = max(max_lat, lat)
        ops[op] = ops.get(op, 0) + 1
    for p in sorted(model):            # every own file, once more
        try:
            read_own(p)
        except OSError as e:
            errors.append(["read_own", e.errno, str(e)[:200]])
    with open(os.path.join(outdir, f"{wid}.json"), "w") as f:
        json.dump({"ops": ops, "errors": errors[:50], "nerrors": len(errors),
                   "max_latency": max_lat, "facts": sorted(facts), "written": written,
                   "own": {rel(p): sha for p, sha in model.items()}}, f)
    return 0


def launch(mnt: str, ns: str, count: int, first: int, seconds: float, seed: int,
           outdir: str) -> int:
    if ns != "-":
        with open(os.path.join(mnt, ".imafs", "ns-create"), "w") as f:
            f.write(ns + "\n")
        with open(os.path.join(mnt, ".imafs", "policy"), "w") as f:
            f.write(POLICY)
    procs = [subprocess.Popen([sys.executable, __file__, "work", mnt, str(first + k),
                               str(seconds), str(seed + k), outdir]) for k in range(count)]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    a = sys.argv
    if a[1] == "launch":
        sys.exit(launch(a[2], a[3], int(a[4]), int(a[5]), float(a[6]), int(a[7]), a[8]))
    sys.exit(work(a[2], int(a[3]), float(a[4]), int(a[5]), a[6]))
