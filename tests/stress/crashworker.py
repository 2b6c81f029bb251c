"""A worker of tests/stress/test_crash.py: works through an imafs mount until the mount dies.

    python crashworker.py MNT WORKER ROUND JOURNAL SEED [NS-NAME]

It creates, fsyncs, execs, reads, appends to and atomically replaces files under
MNT/wWORKER/ and writes what it *observed* to JOURNAL (outside the mount), one line
per fact, only after the fact (a successful exec, a read of a whole file, an fsync
that returned, a rename that returned):

    exec    PATH SHA256          the #! script ran and printed what it holds
    elf     PATH SHA256          the ELF binary (a copy of busybox with a tag of its
                                 own at the end) ran and printed the tag given to it
    read    PATH SHA256          the whole file was read; SHA256 of what was read
    append  PATH DATA-HEX        DATA was written at the end of PATH and fsync returned
    pending PATH SHA256          about to rename a new version (fsync'ed) over PATH
    replace PATH SHA256          the rename returned
    error   OP ERRNO MESSAGE     a failure the backing file system would not give
    ns      NAME                 this worker entered integrity namespace NAME

PATH is the path inside the mount, hex-encoded. It stops at the first ENOTCONN /
ECONNABORTED (the daemon was killed). With NS-NAME it first enters a new child
integrity namespace with a measure policy of its own (POLICY, the host's rules).

ELF probes: MNT/wWORKER/bb0..bb2 are copies of BUSYBOX followed by TAGLEN bytes,
made once (copy, fsync, rename, so a slot is always whole) and kept across rounds.
Each ELF exec first writes a new tag over the last TAGLEN bytes (a new file version,
whose sha256 the worker knows without reading it back) and then runs the slot as
``busybox echo TAG``. A script's exec is followed by the shell's read of it; an ELF
exec is not, so its BPRM_CHECK record can be told from anything else.

Each worker also reads and runs again up to 6 scripts of its earlier rounds (their
entries were made before earlier kills, and must neither be missing nor appended
twice). The first operations are one of each kind (exec, elf, append, replace, then read) in
a random order, so that every kind is observed early in every round.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import subprocess
import sys

DEAD = {errno.ENOTCONN, errno.ECONNABORTED}
BUSYBOX = os.environ.get("IMAFS_CRASH_BUSYBOX", "/bin/busybox")
TAGLEN = 16
SLOTS = 3
# the host's policy, also written by a worker in a child namespace: BPRM_CHECK,
# MMAP_CHECK and CREDS_CHECK each on a PCR of its own, reads on PCR 10
POLICY = ("measure func=BPRM_CHECK pcr=11\n"
          "measure func=MMAP_CHECK pcr=12\n"
          "measure func=CREDS_CHECK pcr=13\n"
          "measure func=FILE_CHECK mask=MAY_READ\n")


class Dead(Exception):
    pass


def main() -> int:
    mnt, wid, rnd, journal, seed = sys.argv[1:6]
    ns_name = sys.argv[6] if len(sys.argv) > 6 else None
    rng = random.Random(int(seed))
    jfd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with open(BUSYBOX, "rb") as f:
        elf = f.read()
    elf_hash = hashlib.sha256(elf)

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

    def write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    d = os.path.join(mnt, f"w{wid}")
    slots = [os.path.join(d, f"bb{k}") for k in range(SLOTS)]
    try:
        os.makedirs(d, exist_ok=True)
        if ns_name:
            with open(os.path.join(mnt, ".imafs", "ns-create"), "w") as f:
                f.write(ns_name + "\n")
            with open(os.path.join(mnt, ".imafs", "policy"), "w") as f:
                f.write(POLICY)
            note("ns", ns_name)
        for p in slots:
            try:
                if os.stat(p).st_size == len(elf) + TAGLEN:
                    continue
            except FileNotFoundError:
                pass
            fd = os.open(p + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
            try:
                write_all(fd, elf + b"\0" * TAGLEN)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(p + ".tmp", p)
    except OSError as e:
        with contextlib.suppress(Dead):   # a dead mount is no error of the worker's
            fail("setup", e)
        return 0
    scripts: list[str] = []
    readable: list[str] = []
    # scripts of this worker's earlier rounds, measured before earlier kills: read
    # and run again, they must be found under the entries made then (and not
    # appended twice)
    try:
        old = sorted(n for n in os.listdir(d) if n.startswith("x") and n.endswith(".sh")
                     and not n.startswith(f"x{rnd}_"))
    except OSError as e:
        with contextlib.suppress(Dead):   # a dead mount is no error of the worker's
            fail("setup", e)
        return 0
    old = [os.path.join(d, n) for n in rng.sample(old, min(len(old), 6))]
    readable.extend(old)
    replaced = False
    cur = os.path.join(d, f"cur{rnd}")
    logf = os.path.join(d, f"r{rnd}.log")
    first = ["exec", "elf", "append", "replace"]
    rng.shuffle(first)
    first.append("read")
    i = 0
    try:
        while True:
            i += 1
            op = first.pop(0) if first else rng.choice(
                ("exec", "elf", "elf", "read", "read", "append", "append", "replace", "list"))
            if op == "exec":
                try:
                    if old and rng.random() < 0.25:
                        # a script of an earlier round, if it was written whole then
                        p = rng.choice(old)
                        with open(p, "rb") as f:
                            body = f.read()
                        note("read", rel(p), hashlib.sha256(body).hexdigest())
                        words = body.split(b"\n")
                        if len(words) != 3 or words[0] != b"#!/bin/sh" or words[2] \
                                or not words[1].startswith(b"echo "):
                            old.remove(p)           # torn by an earlier kill: not run
                            continue
                        tag = words[1][5:].decode()
                    else:
                        tag = f"{wid}-{rnd}-{i}-{rng.getrandbits(32):08x}"
                        p = os.path.join(d, f"x{rnd}_{i}.sh")
                        body = f"#!/bin/sh\necho {tag}\n".encode()
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
                    if p not in old:
                        scripts.append(p)
                elif not mounted():
                    raise Dead()
                else:
                    note("error", "exec", str(r.returncode), repr(r.stderr[-200:]))
            elif op == "elf":
                p = rng.choice(slots)
                tag = f"{rng.getrandbits(64):016x}".encode()
                h = elf_hash.copy()
                h.update(tag)
                try:
                    fd = os.open(p, os.O_WRONLY)
                    try:
                        if os.pwrite(fd, tag, len(elf)) != TAGLEN:
                            note("error", "elf", "0", "short tag write")
                            continue
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    r = subprocess.run(["busybox", "echo", tag.decode()], executable=p,
                                       capture_output=True, timeout=20)
                except OSError as e:
                    fail("elf", e)
                    continue
                except subprocess.TimeoutExpired:
                    note("error", "elf", "0", "exec timed out")
                    continue
                if r.returncode == 0 and r.stdout == tag + b"\n":
                    note("elf", rel(p), h.hexdigest())
                elif not mounted():
                    raise Dead()
                else:
                    note("error", "elf", str(r.returncode), repr(r.stderr[-200:]))
            elif op == "read":
                choices = scripts + readable + ([cur] if replaced else [])
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
                if logf not in readable:
                    readable.append(logf)
            elif op == "replace":
                data = os.urandom(rng.randrange(1, 200000))
                tmp = cur + ".tmp"
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        write_all(fd, data)
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
