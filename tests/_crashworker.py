"""A worker of tests/test_crash.py: works through an imafs mount until the mount dies.

    python _crashworker.py MNT WORKER ROUND JOURNAL SEED [NS-NAME]

It creates, fsyncs, execs, reads, appends to and atomically replaces files under
MNT/wWORKER/ and writes what it *observed* to JOURNAL (outside the mount), one line
per fact, only after the fact (a successful exec, a read of a whole file, an fsync
that returned, a rename that returned):

    exec    PATH SHA256          the script ran and printed what it holds
    read    PATH SHA256          the whole file was read; SHA256 of what was read
    append  PATH DATA-HEX        DATA was written at the end of PATH and fsync returned
    pending PATH SHA256          about to rename a new version (fsync'ed) over PATH
    replace PATH SHA256          the rename returned
    error   OP ERRNO MESSAGE     a failure the backing file system would not give
    ns      NAME                 this worker entered integrity namespace NAME

PATH is the path inside the mount, hex-encoded. It stops at the first ENOTCONN /
ECONNABORTED (the daemon was killed). With NS-NAME it first enters a new child
integrity namespace with a measure policy of its own.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys

DEAD = {errno.ENOTCONN, errno.ECONNABORTED}


class Dead(Exception):
    pass


def main() -> int:
    mnt, wid, rnd, journal, seed = sys.argv[1:6]
    ns_name = sys.argv[6] if len(sys.argv) > 6 else None
    rng = random.Random(int(seed))
    jfd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(*words: str) -> None:
        os.write(jfd, (" ".join(words) + "\n").encode())

    def rel(p: str) -> str:
        return os.fsencode(p[len(mnt):]).hex()

    def fail(op: str, e: OSError) -> None:
        if e.errno in DEAD or not mounted():
            raise Dead()
        note("error", op, str(e.errno), str(e).replace("\n", " ")[:200])

    def mounted() -> bool:
        # the control files are never cached by the kernel: this asks the daemon
        try:
            os.stat(os.path.join(mnt, ".imafs", "runtime_measurements_count"))
            return True
        except OSError:
            return False

    d = os.path.join(mnt, f"w{wid}")
    try:
        os.makedirs(d, exist_ok=True)
        if ns_name:
            with open(os.path.join(mnt, ".imafs", "ns-create"), "w") as f:
                f.write(ns_name + "\n")
            with open(os.path.join(mnt, ".imafs", "policy"), "w") as f:
                f.write("measure func=BPRM_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ\n")
            note("ns", ns_name)
    except OSError as e:
        try:
            fail("setup", e)
        except Dead:
            return 0
        return 0
    scripts: list[str] = []
    replaced = False
    cur = os.path.join(d, f"cur{rnd}")
    logf = os.path.join(d, f"r{rnd}.log")
    i = 0
    try:
        while True:
            i += 1
            op = rng.choice(("exec", "exec", "read", "append", "append", "replace", "list"))
            if op == "exec":
                tag = f"{wid}-{rnd}-{i}-{rng.getrandbits(32):08x}"
                p = os.path.join(d, f"x{rnd}_{i}.sh")
                body = f"#!/bin/sh\necho {tag}\n".encode()
                try:
                    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
                    try:
                        os.write(fd, body)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    r = subprocess.run([p], capture_output=True, timeout=20)
                except OSError as e:
                    fail("exec", e)
                    continue
                except subprocess.TimeoutExpired:
                    note("error", "exec", "0", "exec timed out")
                    continue
                if r.returncode == 0 and r.stdout == (tag + "\n").encode():
                    note("exec", rel(p), hashlib.sha256(body).hexdigest())
                    scripts.append(p)
                elif not mounted():
                    raise Dead()
                else:
                    note("error", "exec", str(r.returncode), repr(r.stderr[-200:]))
            elif op == "read":
                choices = scripts + ([cur] if replaced else [])
                if not choices:
                    continue
                p = rng.choice(choices)
                try:
                    with open(p, "rb") as f:
                        data = f.read()
                except OSError as e:
                    fail("read", e)
                    continue
                note("read", rel(p), hashlib.sha256(data).hexdigest())
            elif op == "append":
                rec = f"{wid}:{rnd}:{i}:{'x' * rng.randrange(1, 3000)}\n".encode()
                try:
                    fd = os.open(logf, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    try:
                        n = os.write(fd, rec)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError as e:
                    fail("append", e)
                    continue
                if n != len(rec):
                    note("error", "append", "0", f"short write {n} of {len(rec)}")
                    continue
                note("append", rel(logf), rec.hex())
            elif op == "replace":
                data = os.urandom(rng.randrange(1, 200000))
                tmp = cur + ".tmp"
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    note("pending", rel(cur), hashlib.sha256(data).hexdigest())
                    os.rename(tmp, cur)
                except OSError as e:
                    fail("replace", e)
                    continue
                note("replace", rel(cur), hashlib.sha256(data).hexdigest())
                replaced = True
            else:
                try:
                    os.listdir(d)
                    os.stat(os.path.join(mnt, ".imafs", "runtime_measurements_count"))
                except OSError as e:
                    fail("list", e)
    except Dead:
        return 0


if __name__ == "__main__":
    sys.exit(main())
