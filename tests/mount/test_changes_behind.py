"""Changes behind the mount while a verified handle is open (issue 14 item 4).

An 8 MiB file signed by ``evmctl ima_sign``, policy ``measure func=FILE_CHECK
mask=^MAY_READ`` + ``appraise func=FILE_CHECK appraise_type=imasig``, default options
(reads verified): open, read the first half (or all of it: every page cached), change
4 KiB at 6 MiB in the backing file -- with write(2), or through a shared mapping and
its mtime put back -- then read the second half from the same descriptor again and
again. Whatever is cached, no read ever returns a changed byte; once the daemon has
noticed (inotify, or its stat pass: docs/read-verification.md), the changed block
fails with EIO and a read-verify violation is recorded. The test waits for that by
reading, with a generous limit, never a fixed sleep."""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import time

import pytest

from helpers.mounts import wait_for
from imafs.cli import main as imafs_main

pytestmark = pytest.mark.mount

SIZE = 8 << 20
CHANGED = 6 << 20
NOTICE_LIMIT = 30.0      # seconds; the delay itself is measured by scripts/bench.py


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    if not shutil.which("evmctl"):
        pytest.skip("needs evmctl")
    d = tmp_path_factory.mktemp("keys") / "k"
    assert imafs_main(["keygen", "--out", str(d), "--cn", "behind"]) == 0
    return d


def signed_mount(make_mount, world_tmp, keydir):
    b = world_tmp / "backing"
    b.mkdir()
    data = os.urandom(SIZE)
    (b / "big").write_bytes(data)
    subprocess.run(["evmctl", "ima_sign", "--key", str(keydir / "signing_key.pem"), "-a",
                    "sha256", str(b / "big")], check=True, capture_output=True)
    p = world_tmp / "policy"
    p.write_text("measure func=FILE_CHECK mask=^MAY_READ\n"
                 "appraise func=FILE_CHECK appraise_type=imasig\n")
    m = make_mount(["--policy", str(p), "--key", str(keydir / "signing_cert.der")],
                   backing=b)
    return m, data


def change_by_write(path):
    with open(path, "r+b") as f:
        f.seek(CHANGED)
        f.write(b"\xab" * 4096)


def change_by_mapping(path):
    """No inotify event for the write itself; mtime is put back (ctime moves)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        m[CHANGED:CHANGED + 4096] = b"\xcd" * 4096
        m.flush()
        m.close()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def read_until_refused(fd, orig: bytes, start: int) -> tuple[int, float]:
    """Read [start, end) again and again from ``fd``: every byte returned must be
    the original one. Returns (offset of the EIO, seconds it took) once a read fails."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < NOTICE_LIMIT:
        pos = start
        try:
            while pos < len(orig):
                d = os.pread(fd, len(orig) - pos, pos)
                assert d == orig[pos:pos + len(d)], f"changed bytes served at {pos}"
                if not d:
                    break
                pos += len(d)
        except OSError as e:
            assert e.errno == errno.EIO, e
            return pos, time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"no EIO within {NOTICE_LIMIT} s")


def violations(m) -> list[dict]:
    return [r for r in m.audit() if r["type"] == "violation" and r["path"] == "/big"]


@pytest.mark.parametrize("change", [change_by_write, change_by_mapping],
                         ids=["write", "mapping"])
@pytest.mark.parametrize("cached", ["half", "all"])
def test_a_change_behind_the_mount_is_noticed(make_mount, world_tmp, keydir, change,
                                              cached):
    m, orig = signed_mount(make_mount, world_tmp, keydir)
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        n = SIZE // 2 if cached == "half" else SIZE
        assert os.pread(fd, n, 0) == orig[:n]
        change(m.backing / "big")
        pos, _took = read_until_refused(fd, orig, SIZE // 2)
        assert pos == CHANGED
        assert wait_for(lambda: violations(m), 10)
        v = violations(m)[0]
        assert (v["cause"], v["block"], v["what"]) == ("read-verify", CHANGED // 4096, "content")
        # the unchanged part still reads, the changed block never does
        assert os.pread(fd, 4096, 0) == orig[:4096]
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, CHANGED)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    # the next open appraises the changed file: its signature no longer matches
    with pytest.raises(PermissionError):
        os.close(os.open(m.mnt / "big", os.O_RDONLY))


def test_a_mapping_of_the_mount_sees_the_change_refused(make_mount, world_tmp, keydir):
    """A reader that mapped the file: once the change is noticed its pages are
    dropped, and the page with the changed block faults in through the daemon (SIGBUS
    in the reader: checked in a child)."""
    m, orig = signed_mount(make_mount, world_tmp, keydir)
    code = f"""
import mmap, os, sys, time
fd = os.open({str(m.mnt / 'big')!r}, os.O_RDONLY)
mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
orig = open({str(m.backing / 'big')!r}, 'rb').read(4096)
assert mm[:4096] == orig
sys.stdout.write("mapped\\n"); sys.stdout.flush()
sys.stdin.readline()
t0 = time.monotonic()
while time.monotonic() - t0 < {NOTICE_LIMIT}:
    page = mm[{CHANGED}:{CHANGED} + 4096]      # SIGBUS once refused
    assert page != b"\\xab" * 4096, "changed page served"
    time.sleep(0.02)
"""
    p = subprocess.Popen(["python3", "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "mapped\n"
        change_by_write(m.backing / "big")
        p.stdin.write("go\n")
        p.stdin.flush()
        rc = p.wait(NOTICE_LIMIT + 30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == -7, rc           # SIGBUS: never the changed page
    assert wait_for(lambda: violations(m), 10)
