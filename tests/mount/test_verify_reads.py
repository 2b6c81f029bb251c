"""Read-time verification through a real mount: a file changed behind the mount while
it is open (rewritten in place, truncated, extended) is never served changed -- reads
fail with EIO, a violation is logged, mapped pages fault -- and a fresh open is
appraised again; a random tamper test; ``digest_type=verity`` with sigv3 signatures
written by ``imafs sign --verity``.

Mounts use ``--attr-timeout 30``: within it the kernel keeps the size it knew at open,
so a read after a truncation reaches the daemon (and fails) instead of ending at the
new size, which the kernel learns from a getattr once the timeout expires (then the
read ends early -- still without a changed byte)."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time

from helpers import testkeys as tk
import pytest
from helpers.mounts import IMAFS, REPO, wait_for

from imafs.ima import appraise as ap
from imafs.ima.verity import fsverity_digest_text
from imafs.ima.keys import keyid_of

pytestmark = pytest.mark.mount

BS = 4096
SIZE = 8 * 1024 * 1024 + 1234           # not a whole number of pages: see the extend case
APPRAISE = ("appraise func=FILE_CHECK appraise_type=imasig\n"
            "measure func=FILE_CHECK mask=MAY_READ\n")
SH = 60


def _key():
    return tk.key("rsa")


def _cert_file(tmp):
    p = tmp / "cert.der"
    if not p.exists():
        p.write_bytes(tk.der(tk.cert(_key())))
    return p


def sign_v2(path):
    import hashlib
    d = hashlib.sha256(path.read_bytes()).digest()
    os.setxattr(path, "security.ima", ap.sign_v2(_key(), "sha256", d, keyid_of(tk.cert(_key()))))


def setup(make_mount, world_tmp, policy=APPRAISE, *, size=SIZE, extra=(), seed=7):
    backing = world_tmp / "backing"
    backing.mkdir(exist_ok=True)
    data = random.Random(seed).randbytes(size)
    f = backing / "big"
    f.write_bytes(data)
    sign_v2(f)
    pol = world_tmp / "policy"
    pol.write_text(policy)
    m = make_mount(["--policy", str(pol), "--key", str(_cert_file(world_tmp)),
                    "--attr-timeout", "30", *extra], backing=backing)
    return m, f, data


def violations(m) -> int:
    return int(m.ctl("violations").read_text())


def audit(m, type_="violation", cause="read-verify"):
    out = []
    with open(m.state / "audit.log") as f:
        for line in f:
            rec = json.loads(line)
            if rec["type"] == type_ and (cause is None or rec.get("cause") == cause):
                out.append(rec)
    return out


def read_half(fd, data: bytes) -> bytearray:
    """Read at least the first half of ``data``'s length, in 64 KiB reads."""
    got = bytearray()
    while len(got) < len(data) // 2:
        got += os.read(fd, 65536)
    return got


def read_on(fd, got: bytearray, chunk=65536):
    """Read to EOF; returns the error that ended it, or None."""
    try:
        while True:
            b = os.read(fd, chunk)
            if not b:
                return None
            got += b
    except OSError as e:
        return e


def invalidations(m) -> int:
    """How many cache invalidations the daemon has sent the kernel (or tried: ENOENT
    when the kernel had already forgotten the inode), from its debug log."""
    return len(re.findall(r"invalidate(?:d the kernel cache of)? inode \d+", m.log_text()))


def seen(m, before: int) -> None:
    """Wait until the daemon has seen a change made behind the mount: it learns of it
    by inotify, asynchronously, and then drops the kernel's cache of the inode; until
    then a reader may be served the pages of the version it opened (which the digest
    pass of its open stored in the page cache): measured bytes, never changed ones.
    ``before`` is ``invalidations(m)`` from before the change."""
    assert wait_for(lambda: invalidations(m) > before, 30), "the daemon never saw the change"


def changed_bytes(got, orig) -> int:
    n = min(len(got), len(orig))
    diff = sum(1 for a, b in zip(got[:n], orig[:n]) if a != b) if got[:n] != orig[:n] else 0
    return diff + max(0, len(got) - len(orig))   # bytes past the original end are changed


def tamper(f, data, how):
    if how == "same":            # rewritten in place, same size: every block differs
        new = bytearray(data)
        for i in range(0, len(new), BS):
            new[i] ^= 0xFF
        with open(f, "r+b") as fh:
            fh.write(new)
    elif how == "truncate":
        os.truncate(f, len(data) * 3 // 4 + 100)
    elif how == "extend":
        with open(f, "ab") as fh:
            fh.write(b"appended behind the mount" * 100)


# ------------------------------------------------------------------ mid-read changes
@pytest.mark.parametrize("how", ["same", "truncate", "extend"])
def test_change_behind_the_mount_mid_read(make_mount, world_tmp, how):
    m, f, data = setup(make_mount, world_tmp)
    v0 = violations(m)
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        got = read_half(fd, data)
        assert got == data[:len(got)]
        n = invalidations(m)
        tamper(f, data, how)
        seen(m, n)
        err = read_on(fd, got)
    finally:
        os.close(fd)
    assert err is not None and err.errno == errno.EIO, (err, len(got))
    assert changed_bytes(got, data) == 0
    assert len(got) < len(data) + (how == "extend")
    assert violations(m) == v0 + 1
    (rec,) = audit(m)
    assert rec["path"] == "/big" and rec["offset"] >= len(data) // 2 - (128 << 10)
    assert {"block", "expected", "found"} <= set(rec)
    if how == "same":
        assert rec["expected"] != rec["found"] and len(rec["found"]) == 64
    # the violation is in the list: zero digest, PCR 10
    lines = m.ctl("ascii_runtime_measurements").read_text().splitlines()
    assert any(ln.split()[0] == "10" and set(ln.split()[3].split(":")[-1]) == {"0"}
               and ln.split()[-1] == "/big" for ln in lines)
    # a fresh open is appraised again, and refused: the signature no longer matches
    with pytest.raises(PermissionError):
        (m.mnt / "big").read_bytes()
    assert any(r["result"] == "fail" for r in audit(m, "appraise", None))


def test_a_fresh_open_after_restoring_is_appraised_and_served(make_mount, world_tmp):
    m, f, data = setup(make_mount, world_tmp)
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        os.read(fd, 4096)
        n = invalidations(m)
        tamper(f, data, "same")
        seen(m, n)
        with pytest.raises(OSError) as ei:
            os.pread(fd, 1 << 20, len(data) // 2)
        assert ei.value.errno == errno.EIO
        f.write_bytes(data)      # restored (xattr kept): a new version, signature good
        assert (m.mnt / "big").read_bytes() == data
    finally:
        os.close(fd)


_MMAP_CHILD = r"""
import mmap, os, sys
path, size = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDONLY)
m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
half = size // 2 // 4096 * 4096
m[:half]                                    # the first half is read and cached
print("ready", flush=True)
sys.stdin.readline()
for off in range(0, size, 4096):            # every page of the mapping, in order
    page = m[off:off + 4096]
    print(off, page.hex()[:16], flush=True)
print("end", flush=True)
"""


def _mmap_child(path, size):
    def nocore():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return subprocess.Popen([sys.executable, "-c", _MMAP_CHILD, str(path), str(size)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=nocore)  # noqa: PLW1509 - the child only sets a limit


def _pages(out: str, data: bytes, new: bytes):
    """(pages that read as the original, pages that read as the changed file)."""
    old_pages = new_pages = 0
    for line in out.splitlines():
        if line in ("ready", "end"):
            continue
        off, head = line.split()
        off = int(off)
        if head == data[off:off + 8].hex():
            old_pages += 1
        elif head == new[off:off + 8].hex():
            new_pages += 1
    return old_pages, new_pages


@pytest.mark.parametrize("how", ["inotify", "failed-read"])
def test_mmap_after_the_change_never_shows_new_bytes(make_mount, world_tmp, how):
    """A mapping made before the change: once the daemon has seen the change (by
    inotify, or by a failed read through another descriptor) it drops the inode's
    cached pages: every page of the mapping faults again, and fails (SIGBUS); no page
    ever shows the changed bytes."""
    m, f, data = setup(make_mount, world_tmp)
    new = bytearray(data)
    for i in range(0, len(new), BS):
        new[i] ^= 0xFF
    other = os.open(m.mnt / "big", os.O_RDONLY)
    child = _mmap_child(m.mnt / "big", len(data))
    try:
        assert child.stdout.readline().strip() == "ready"
        n = invalidations(m)
        tamper(f, data, "same")
        seen(m, n)
        if how == "failed-read":
            os.posix_fadvise(other, 0, 0, os.POSIX_FADV_DONTNEED)
            with pytest.raises(OSError) as ei:
                os.pread(other, 1 << 20, len(data) - (1 << 20))
            assert ei.value.errno == errno.EIO
            n = invalidations(m)   # one more is sent right after the EIO reply
            assert wait_for(lambda: invalidations(m) > n, 30)
        out, _ = child.communicate("go\n", timeout=SH)
    finally:
        os.close(other)
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGBUS, (child.returncode, out[-300:])
    old_pages, new_pages = _pages(out, data, bytes(new))
    assert new_pages == 0
    assert old_pages == 0            # page 0 faulted: nothing stale survived


def test_mmap_of_a_fresh_open_is_refused(make_mount, world_tmp):
    m, f, data = setup(make_mount, world_tmp)
    (m.mnt / "big").read_bytes()
    tamper(f, data, "same")
    child = _mmap_child(m.mnt / "big", len(data))
    out, _ = child.communicate("go\n", timeout=SH)
    assert child.returncode != 0 and "ready" not in out     # open: EACCES


_READER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
got = bytearray()
err = "none"
try:
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        got += b
except OSError as e:
    err = str(e.errno)
sys.stdout.buffer.write(err.encode() + b"\n" + bytes(got))
"""


def _read_as(uid, path):
    """(errno or None, bytes read) of a whole read of ``path`` by another process."""
    cmd = [sys.executable, "-c", _READER, str(path)]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] + cmd
    out = subprocess.run(cmd, capture_output=True, timeout=SH).stdout
    head, _, body = out.partition(b"\n")
    return (None if head == b"none" else int(head)), body


# ------------------------------------------------------------------ filled at open
def _stats(m):
    return json.loads(m.ctl("stats").read_text())


def page_cache_drops() -> int | None:
    """How many times a process dropped the page caches of the whole machine (``echo 1``
    or ``3 > /proc/sys/vm/drop_caches``) since boot: /proc/vmstat ``drop_pagecache``;
    None when the kernel does not count them."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("drop_pagecache "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


FILL_ATTEMPTS_FOR = 90.0      # seconds: attempts until one that no cache drop disturbed


def test_the_digest_pass_fills_the_page_cache(make_mount, world_tmp):
    """A verified open that hashes the file stores the bytes it hashed in the kernel's
    page cache: the reads that follow are served from there, the very bytes measured,
    without a second hash; a file another verified handle holds open is not filled
    (its pages must match that handle's tree), so its reads are checked one by one.

    Any process on the machine may drop every page cache meanwhile (benches' cold runs
    and test_overlay_posix write /proc/sys/vm/drop_caches, up to ten times a second on
    a busy machine): the filled pages are gone, and the reads rightly reach the daemon,
    verified (test_pages_dropped_after_the_fill_are_read_verified). Such an attempt
    proves nothing either way, so the same bytes are read again under a new name (a new
    digest pass, a new fill) until an attempt ran with no drop: its reads must all have
    been served from the page cache."""
    m, f, data = setup(make_mount, world_tmp)
    deadline = time.monotonic() + FILL_ATTEMPTS_FOR
    disturbed = 0
    while True:
        s0 = _stats(m)
        d0 = page_cache_drops()
        got = (m.mnt / f.name).read_bytes()
        d1 = page_cache_drops()
        s1 = _stats(m)
        assert got == data
        assert s1["hashed_files"] == s0["hashed_files"] + 1
        if d1 == d0:
            break
        disturbed += 1
        if time.monotonic() > deadline:
            pytest.skip(f"another process dropped the page caches during each of "
                        f"{disturbed} attempts ({d1 - d0} drops in the last)")
        f = f.with_name(f"big{disturbed}")
        f.write_bytes(data)
        sign_v2(f)
    assert s1["reads_verified"] == s0["reads_verified"], \
        f"reads reached the daemon after {disturbed} disturbed attempts"   # none did
    fd = os.open(m.mnt / f.name, os.O_RDONLY)
    try:
        # a new version while this verified handle is open: not filled, every read
        # (of an unchanged file) checked against both trees
        data2 = bytearray(data)
        data2[5] ^= 1
        n = invalidations(m)
        f.write_bytes(bytes(data2))
        sign_v2(f)
        seen(m, n)
        with pytest.raises(OSError):        # block 0 differs from the open handle's tree
            (m.mnt / f.name).read_bytes()
        s2 = _stats(m)
        assert s2["hashed_files"] == s1["hashed_files"] + 1
        assert s2["reads_verified"] > s1["reads_verified"]
    finally:
        os.close(fd)
    assert (m.mnt / f.name).read_bytes() == bytes(data2)   # alone now: served


def test_pages_dropped_after_the_fill_are_read_verified(make_mount, world_tmp):
    """The kernel may drop the pages a digest pass filled at any time (memory pressure,
    drop_caches, fadvise): the reads of them then reach the daemon and are verified
    against the tree of the open, every byte the measured one, no violation -- what a
    run of the test above sees when another process drops the caches."""
    m, f, data = setup(make_mount, world_tmp)
    v0 = violations(m)
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        s0 = _stats(m)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # this file's pages only
        got = bytearray()
        assert read_on(fd, got) is None
        s1 = _stats(m)
    finally:
        os.close(fd)
    assert bytes(got) == data
    assert s1["hashed_files"] == s0["hashed_files"]          # the open's tree, no new pass
    # the whole file came from the daemon again, checked (128 KiB reads at most)
    assert s1["reads_verified"] - s0["reads_verified"] >= len(data) // (128 << 10)
    assert violations(m) == v0 and not audit(m)


# ------------------------------------------------------------------ one page cache
ROOT_ONLY = ("appraise func=FILE_CHECK appraise_type=imasig uid=0\n"
             "measure func=FILE_CHECK mask=MAY_READ uid=0\n")


@pytest.mark.parametrize("second", ["unverified-user", "measured-root"])
def test_another_reader_cannot_fill_the_cache_with_changed_bytes(make_mount, world_tmp, second):
    """The kernel's page cache of an inode is shared by all its handles, and a cached
    page is read without asking the daemon. After the file changed behind the mount, a
    second reader -- one the policy does not cover (uid 1000), or one that measures
    the new version (root, measure-only policy) -- must not put changed pages into the
    cache that the first, verified handle would then read unchecked."""
    policy = ROOT_ONLY if second == "unverified-user" else "measure func=FILE_CHECK mask=MAY_READ\n"
    m, f, data = setup(make_mount, world_tmp, policy, extra=["--verify-reads=on"])
    os.chmod(f, 0o644)
    v0 = violations(m)
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        got = read_half(fd, data)
        tamper(f, data, "same")
        err2, got2 = _read_as(1000 if second == "unverified-user" else None, m.mnt / "big")
        err = read_on(fd, got)
    finally:
        os.close(fd)
    assert changed_bytes(got, data) == 0
    assert err is not None and err.errno == errno.EIO, (err, len(got))
    # the second reader got no changed block either, while the verified handle was open
    assert err2 == errno.EIO and changed_bytes(got2, data) == 0, (err2, len(got2))
    assert violations(m) > v0
    # once the old handle is closed, the file is what it is now: the measure-only
    # policy serves the new version; under the root-only appraisal uid 1000 reads it
    # unverified, as the policy says
    new = f.read_bytes()
    err3, got3 = _read_as(1000 if second == "unverified-user" else None, m.mnt / "big")
    assert err3 is None and got3 == new


def test_mapped_pages_never_come_from_another_readers_fill(make_mount, world_tmp):
    """A verified mapping (an exec's text, a library) keeps its handle open; after the
    file changed behind the mount, another process reads it whole: the mapping's later
    faults must not find changed pages that the other reader put in the cache."""
    m, f, data = setup(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n",
                       extra=["--verify-reads=on"])
    new = bytearray(data)
    for i in range(0, len(new), BS):
        new[i] ^= 0xFF
    child = _mmap_child(m.mnt / "big", len(data))
    try:
        assert child.stdout.readline().strip() == "ready"
        tamper(f, data, "same")
        err2, got2 = _read_as(None, m.mnt / "big")      # root: measures the new version
        out, _ = child.communicate("go\n", timeout=SH)
    finally:
        if child.poll() is None:
            child.kill()
    assert changed_bytes(got2, data) == 0
    assert child.returncode == -signal.SIGBUS, (child.returncode, out[-300:])
    old_pages, new_pages = _pages(out, data, bytes(new))
    assert new_pages == 0


def test_block_aligned_truncation_with_the_default_attribute_timeout(make_mount, world_tmp):
    """With the default --attr-timeout (1 s) the kernel refreshes the size of a file
    truncated behind the mount; it must still be shown the measured size while a
    verified handle is open, so the read of the missing part fails (EIO, violation)
    instead of ending early at the new size."""
    backing = world_tmp / "backing"
    backing.mkdir()
    data = random.Random(3).randbytes(SIZE)
    f = backing / "big"
    f.write_bytes(data)
    sign_v2(f)
    pol = world_tmp / "policy"
    pol.write_text(APPRAISE)
    m = make_mount(["--policy", str(pol), "--key", str(_cert_file(world_tmp))],
                   backing=backing)
    v0 = violations(m)
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        got = read_half(fd, data)
        os.truncate(f, 6 * 1024 * 1024)          # a whole number of blocks, past the reader
        time.sleep(2.5)                          # the kernel's attributes time out
        assert os.fstat(fd).st_size == len(data)  # the size it was measured with
        err = read_on(fd, got)
    finally:
        os.close(fd)
    assert err is not None and err.errno == errno.EIO, (err, len(got))
    assert changed_bytes(got, data) == 0
    assert violations(m) == v0 + 1
    with pytest.raises(PermissionError):
        (m.mnt / "big").read_bytes()


# ------------------------------------------------------------------ random tamper
def test_random_tamper_while_readers_run(make_mount, world_tmp):
    size = 2 * 1024 * 1024 + 777
    m, f, data = setup(make_mount, world_tmp, size=size)
    path = m.mnt / "big"
    stop = time.monotonic() + 5.0
    lock = threading.Lock()
    stats = {"changed": 0, "bytes": 0, "eio": 0, "eacces": 0, "full": 0, "tampers": 0}

    def reader(seed):
        rnd = random.Random(seed)
        while time.monotonic() < stop:
            try:
                fd = os.open(path, os.O_RDONLY)
            except PermissionError:
                with lock:
                    stats["eacces"] += 1
                continue
            try:
                off = rnd.randrange(0, size) // BS * BS if rnd.random() < 0.5 else 0
                got = bytearray()
                if rnd.random() < 0.5:
                    # a long-lived reader: random blocks for a while, each fetched
                    # from the daemon (cached pages dropped first)
                    until = time.monotonic() + 0.2
                    err = None
                    while time.monotonic() < until and err is None:
                        off = rnd.randrange(0, size)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        got = bytearray()
                        try:
                            got += os.pread(fd, rnd.choice([1, 100, 4096, 70000]), off)
                        except OSError as e:
                            err = e
                        n = min(len(got), size - off)
                        bad = sum(1 for a, b in zip(got[:n], data[off:off + n]) if a != b)
                        with lock:
                            stats["changed"] += bad + max(0, len(got) - (size - off))
                            stats["bytes"] += len(got)
                    with lock:
                        if err is None:
                            stats["full"] += 1
                        elif err.errno == errno.EIO:
                            stats["eio"] += 1
                        else:
                            raise err
                    continue
                os.lseek(fd, off, os.SEEK_SET)
                err = read_on(fd, got, rnd.choice([4096, 65536, 1 << 20]))
                n = min(len(got), size - off)
                bad = sum(1 for a, b in zip(got[:n], data[off:off + n]) if a != b) \
                    if got[:n] != data[off:off + n] else 0
                bad += max(0, len(got) - (size - off))
                with lock:
                    stats["changed"] += bad
                    stats["bytes"] += len(got)
                    if err is None:
                        stats["full"] += 1
                    elif err.errno == errno.EIO:
                        stats["eio"] += 1
                    else:
                        raise err
            finally:
                os.close(fd)

    def tamperer():
        rnd = random.Random(99)
        with open(f, "r+b") as fh:
            while time.monotonic() < stop:
                off = rnd.randrange(0, size)
                fh.seek(off)
                fh.write(bytes([data[off] ^ rnd.randrange(1, 256)]))
                fh.flush()
                stats["tampers"] += 1
                time.sleep(rnd.random() * 0.01)
                fh.seek(off)
                fh.write(data[off:off + 1])       # restored
                fh.flush()
                time.sleep(rnd.random() * 0.01)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=tamperer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SH)
    assert not any(t.is_alive() for t in threads)
    print(stats)
    assert stats["changed"] == 0, stats
    assert stats["tampers"] > 50 and stats["bytes"] > 0
    assert stats["eio"] + stats["eacces"] > 0, stats     # tampering was noticed
    f.write_bytes(data)
    assert path.read_bytes() == data


# ------------------------------------------------------------------ options
def test_verify_reads_off_checks_at_open_only(make_mount, world_tmp):
    """What the kernel's IMA does (and --verify-reads=off): checked at open only -- a
    change behind the mount fails no read and is audited nowhere. The handle is
    served the pages the digest pass of its open stored (the bytes measured) until
    the kernel drops them, then the backing file's bytes, unchecked; a new open is
    appraised again, and refused."""
    m, f, data = setup(make_mount, world_tmp, extra=["--verify-reads=off"])
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        got = bytearray(os.read(fd, 4096))
        tamper(f, data, "same")
        assert read_on(fd, got) is None
    finally:
        os.close(fd)
    assert len(got) == len(data)
    assert not audit(m)
    with pytest.raises(PermissionError):
        os.open(m.mnt / "big", os.O_RDONLY)


def reread_until_error(fd, data, timeout=30.0):
    """Read the whole file through ``fd`` again and again (pread from 0) until a read
    fails, or ``timeout`` passes. The daemon learns of a change behind the mount
    asynchronously (inotify drops the kernel's pages of the file): until then reads
    may be served from the page cache -- the bytes this open measured. Asserts on
    every pass that no served byte differs from ``data``; returns the error (None on
    timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        got, err = bytearray(), None
        try:
            while True:
                b = os.pread(fd, 65536, len(got))
                if not b:
                    break
                got += b
        except OSError as e:
            err = e
        assert changed_bytes(got, data) == 0        # never a changed byte
        if err is not None or time.monotonic() > deadline:
            return err
        time.sleep(0.05)


def test_verify_reads_on_for_a_measure_only_policy(make_mount, world_tmp):
    m, f, data = setup(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n",
                       extra=["--verify-reads=on"])
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        got = bytearray(os.read(fd, 4096))
        tamper(f, data, "same")
        err = read_on(fd, got)         # may be served from the page cache: see below
        assert changed_bytes(got, data) == 0
        if err is None:
            err = reread_until_error(fd, data)
        assert err is not None and err.errno == errno.EIO
    finally:
        os.close(fd)
    assert wait_for(lambda: audit(m), 30.0)          # the read-verify violation
    # not appraised: a fresh open is measured again (a new entry) and served
    n = int(m.ctl("runtime_measurements_count").read_text())
    assert (m.mnt / "big").read_bytes() == f.read_bytes()
    assert int(m.ctl("runtime_measurements_count").read_text()) == n + 1


def test_changes_through_the_mount_are_not_read_failures(make_mount, world_tmp):
    """A write or truncation through the mount is IMA's business (ToMToU, a new
    measurement at the next open), not a change behind the mount: readers open at
    the time go on without EIO."""
    m, f, data = setup(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n",
                       extra=["--verify-reads=on"])
    for how in ("write", "truncate"):
        fd = os.open(m.mnt / "big", os.O_RDONLY)
        try:
            got = bytearray(os.read(fd, 4096))
            if how == "write":
                with open(m.mnt / "big", "r+b") as w:
                    w.seek(len(data) // 2)
                    w.write(b"through the mount")
            else:
                os.truncate(m.mnt / "big", len(data) // 2 + 10)
            assert read_on(fd, got) is None
        finally:
            os.close(fd)
        assert got == f.read_bytes()[:len(got)]
    assert not audit(m)
    assert [r["cause"] for r in audit(m, cause=None)] == ["ToMToU"]


def test_remount_loads_the_tree_instead_of_rehashing(make_mount, world_tmp):
    m, f, data = setup(make_mount, world_tmp)
    assert (m.mnt / "big").read_bytes() == data
    m.restart()
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        got = bytearray(os.read(fd, 4096))
        tamper(f, data, "same")
        assert read_on(fd, got).errno == errno.EIO
    finally:
        os.close(fd)
    assert changed_bytes(got, data) == 0


# ------------------------------------------------------------------ digest_type=verity
VERITY_POLICY = ("appraise func=FILE_CHECK digest_type=verity appraise_type=sigv3\n"
                 "measure func=FILE_CHECK mask=MAY_READ digest_type=verity template=ima-ngv2\n")


def _imafs(*args, **kw):
    return subprocess.run(IMAFS + [str(a) for a in args], capture_output=True, text=True,
                          timeout=SH, cwd=REPO, check=False, **kw)


def test_digest_type_verity_with_sigv3_signatures(make_mount, world_tmp):
    backing = world_tmp / "backing"
    backing.mkdir()
    keys = world_tmp / "keys"
    assert _imafs("keygen", "--out", keys).returncode == 0
    good, v2, unsigned = backing / "good", backing / "v2", backing / "unsigned"
    for i, p in enumerate((good, v2, unsigned)):
        p.write_bytes(random.Random(i).randbytes(300 * BS + 11))
    r = _imafs("sign", "--verity", "--key", keys / "signing_key.pem", "-q", good)
    assert r.returncode == 0, r.stderr
    assert os.getxattr(good, "security.ima")[:2] == b"\x06\x03"
    assert _imafs("sign", "--key", keys / "signing_key.pem", "-q", v2).returncode == 0
    r = _imafs("verify", "--key", keys / "signing_cert.der", "-q", "-v", good)
    assert r.returncode == 0 and "pass" in r.stdout, r.stdout + r.stderr
    pol = world_tmp / "policy"
    pol.write_text(VERITY_POLICY)
    m = make_mount(["--policy", str(pol), "--key", str(keys / "signing_cert.der"),
                    "--attr-timeout", "30"], backing=backing)
    data = good.read_bytes()
    assert (m.mnt / "good").read_bytes() == data
    for p in ("v2", "unsigned"):
        with pytest.raises(PermissionError):
            (m.mnt / p).read_bytes()
    # measured as the fs-verity digest, exactly what fsverity-utils computes
    want = subprocess.run(["fsverity", "digest", str(good)], capture_output=True, text=True,
                          check=True).stdout.split()[0] if os.path.exists("/usr/bin/fsverity") \
        else fsverity_digest_text(os.open(good, os.O_RDONLY))
    lines = [ln.split() for ln in m.ctl("ascii_runtime_measurements").read_text().splitlines()]
    mine = [ln for ln in lines if ln[-1] == "/good"]
    assert mine and mine[0][2] == "ima-ngv2" and mine[0][3] == "verity:" + want
    # and reads are verified (the pages the kernel cached above are the verified
    # original: drop them, so that the reads reach the daemon)
    fd = os.open(m.mnt / "good", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        got = bytearray(os.read(fd, 4096))
        tamper(good, data, "same")
        assert read_on(fd, got).errno == errno.EIO
    finally:
        os.close(fd)
    assert changed_bytes(got, data) == 0
    with pytest.raises(PermissionError):
        (m.mnt / "good").read_bytes()


@pytest.mark.parametrize("algo", ["sha256", "sha512"])
def test_sigv3_in_an_ima_sigv2_list_covers_the_recorded_digest(make_mount, world_tmp, algo):
    """The fs-verity digest measured next to a v3 signature is in the signature's
    algorithm (ima_get_hash_algo), whatever the mount's --hash: so the list verifies
    (`imafs verify-log --keys`) and the digest is what `fsverity digest` prints."""
    backing = world_tmp / "backing"
    backing.mkdir()
    keys = world_tmp / "keys"
    assert _imafs("keygen", "--out", keys).returncode == 0
    f = backing / "v"
    f.write_bytes(random.Random(5).randbytes(3 * BS + 5))
    r = _imafs("sign", "--verity", "-a", algo, "--key", keys / "signing_key.pem", "-q", f)
    assert r.returncode == 0, r.stderr
    pol = world_tmp / "policy"
    pol.write_text("appraise func=FILE_CHECK digest_type=verity appraise_type=sigv3\n"
                   "measure func=FILE_CHECK mask=MAY_READ digest_type=verity "
                   "template=ima-sigv2\n")
    other = "sha512" if algo == "sha256" else "sha256"
    m = make_mount(["--policy", str(pol), "--key", str(keys / "signing_cert.der"),
                    "--hash", other], backing=backing)
    assert (m.mnt / "v").read_bytes() == f.read_bytes()
    want = subprocess.run(["fsverity", "digest", f"--hash-alg={algo}", str(f)],
                          capture_output=True, text=True, check=True).stdout.split()[0]
    (line,) = [ln.split() for ln in m.ctl("ascii_runtime_measurements").read_text().splitlines()
               if ln.endswith(" /v") or " /v " in ln]
    assert line[2] == "ima-sigv2" and line[3] == "verity:" + want
    r = _imafs("verify-log", m.ctl("binary_runtime_measurements"),
               "--keys", keys, "--pcrs", f"sha1,{m.ctl('pcrs/sha1')}")
    assert r.returncode == 0 and "1 signatures verified" in r.stdout, r.stdout + r.stderr
