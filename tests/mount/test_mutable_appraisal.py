"""Appraisal of files that change (issue 20), through real mounts whose policy
appraises FILE_CHECK with hashes -- ``mask=^MAY_READ`` ("masked") and without a mask
("unmasked") -- in enforce and fix mode, against the kernel's rules
(security/integrity/ima/ima_main.c and ima_appraise.c, v6.14 and later):

- a writable open that appraisal passed (or fixed) sets IMA_UPDATE_XATTR; when the
  last writer closes a file that changed, or a new file, the hash is rewritten
  (ima_check_last_writer -> ima_update_xattr): write, O_TRUNC, ftruncate on the
  handle, writes through a shared mapping;
- IMA_NEW_FILE: an appraised open that creates the file finds no label and passes;
  the allowance stays across chmod/chown (6.14: "ima: Reset IMA_NONACTION_RULE_FLAGS
  after post_setattr") until the last writer closes the file, in memory only;
- truncate(2) by path has no file and no last writer: the hash is not rewritten
  (the next appraisal sees the new content), unless a writer through the mount is
  open -- its close does it;
- chown(f, -1, -1) updates ctime, as on ext4;
- a crash of the daemon between the last write and the last close: the next open
  is measured and appraised again, never decided by a cached verdict (tested on a
  backing file system with one-second timestamps, where such a write keeps the
  file's stat as it was).
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.mounts import is_mounted, force_unmount, readable, run_as, wait_for

pytestmark = pytest.mark.mount

POLICIES = {
    "masked": "appraise func=FILE_CHECK mask=^MAY_READ\n",
    "unmasked": "appraise func=FILE_CHECK\n",
}


def sha(data: bytes) -> bytes:
    return b"\x04\x04" + hashlib.sha256(data).digest()   # 04 <sha256> <digest>


def label(path) -> bytes | None:
    try:
        return os.getxattr(path, "security.ima")
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return None


def labelled(backing: Path, name: str) -> bool:
    """Does the backing file's security.ima hold the hash of its content (the last
    writer's close, seen after close() returned: FUSE releases asynchronously)?"""
    p = backing / name
    return wait_for(lambda: label(p) == sha(p.read_bytes()), 10)


def write_file(path, data: bytes, flags=os.O_RDWR | os.O_CREAT | os.O_EXCL) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def mount(make_mount, world_tmp, policy: str, mode: str = "enforce", backing=None):
    p = world_tmp / f"policy-{hashlib.sha1(policy.encode()).hexdigest()[:8]}"
    p.write_text(policy)
    return make_mount(["--policy", str(p), "--appraise", mode], backing=backing)


def appraise_failures(m, name: str) -> list[str]:
    return [r["cause"] for r in m.audit() if r["type"] == "appraise" and r["path"] == name]


@pytest.fixture(params=["masked", "unmasked"])
def policy(request):
    return POLICIES[request.param]


@pytest.fixture(params=["enforce", "fix"])
def mode(request):
    return request.param


# -- the last writer's close rewrites the hash ---------------------------------------

def test_ftruncate_on_a_writable_handle_relabels(make_mount, world_tmp, policy, mode):
    """A size change sent as SETATTR through a writable handle is a change: the last
    close rewrites the hash (before, the old hash stayed: invalid-hash at the next
    open), also for a file created empty and truncated up (before: missing-hash)."""
    m = mount(make_mount, world_tmp, policy, mode)
    f, b = m.mnt / "f", m.backing
    content = b"x" * 10000
    write_file(f, content)
    assert labelled(b, "f")
    for size in (10, 5000, 0, 123457):
        fd = os.open(f, os.O_RDWR)
        os.ftruncate(fd, size)
        os.close(fd)
        content = content[:size].ljust(size, b"\0")
        # checked before any open: fix mode must not be what repairs it
        assert labelled(b, "f"), size
        assert f.read_bytes() == content
    # created empty, then truncated up through the creating handle
    fd = os.open(m.mnt / "g", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.ftruncate(fd, 8192)
    os.close(fd)
    assert labelled(b, "g")
    assert (m.mnt / "g").read_bytes() == bytes(8192)
    assert appraise_failures(m, "/f") == [] and appraise_failures(m, "/g") == []


def test_o_trunc_write_and_append_relabel(make_mount, world_tmp, policy, mode):
    m = mount(make_mount, world_tmp, policy, mode)
    f, b = m.mnt / "f", m.backing
    write_file(f, b"first version\n" * 100)
    assert labelled(b, "f")
    write_file(f, b"second\n", os.O_RDWR | os.O_TRUNC)
    assert labelled(b, "f") and f.read_bytes() == b"second\n"
    fd = os.open(f, os.O_RDWR | os.O_APPEND)
    os.write(fd, b"appended\n")
    os.close(fd)
    assert labelled(b, "f") and f.read_bytes() == b"second\nappended\n"
    fd = os.open(f, os.O_RDWR)
    os.pwrite(fd, b"S", 0)
    os.close(fd)
    assert labelled(b, "f") and f.read_bytes() == b"Second\nappended\n"
    assert appraise_failures(m, "/f") == []


@pytest.mark.parametrize("close_first", [False, True], ids=["munmap-first", "close-first"])
def test_writes_through_a_shared_mapping_relabel(make_mount, world_tmp, policy, mode,
                                                 close_first):
    """Dirty pages of a shared mapping reach the daemon as WRITEs through the handle
    (at munmap, at the latest); the handle's release, which comes after, rewrites the
    hash. With ``close_first`` the descriptor is closed before the mapping is written:
    the mapping alone keeps the handle."""
    m = mount(make_mount, world_tmp, policy, mode)
    f, b = m.mnt / "f", m.backing
    write_file(f, b"a" * 20000)
    assert labelled(b, "f")
    fd = os.open(f, os.O_RDWR)
    mm = mmap.mmap(fd, 20000, mmap.MAP_SHARED)
    if close_first:
        os.close(fd)
    mm[100:200] = b"b" * 100
    mm[19000:19010] = b"c" * 10
    mm.close()
    if not close_first:
        os.close(fd)
    expected = b"a" * 100 + b"b" * 100 + b"a" * 18800 + b"c" * 10 + b"a" * 990
    assert wait_for(lambda: (b / "f").read_bytes() == expected)
    assert labelled(b, "f")
    assert f.read_bytes() == expected
    assert appraise_failures(m, "/f") == []


def test_reopen_right_after_the_last_close(make_mount, world_tmp, policy, mode):
    """close() returns before FUSE's RELEASE is processed, and the last writer's close
    (the hash rewritten) takes a worker thread: an open that comes meanwhile waits for
    it (fsx's close/reopen: "docloseopen: open: Permission denied" before)."""
    m = mount(make_mount, world_tmp, policy, mode)
    f = m.mnt / "f"
    content = bytearray(b"a" * 4096)
    write_file(f, bytes(content))
    for i in range(150):
        fd = os.open(f, os.O_RDWR)
        os.pwrite(fd, bytes([i % 251]) * 64, (i * 37) % 4000)
        content[(i * 37) % 4000:(i * 37) % 4000 + 64] = bytes([i % 251]) * 64
        if i % 3 == 0:
            os.ftruncate(fd, 4096 - i)
            del content[4096 - i:]
            content.extend(bytes(max(0, 4096 - i - len(content))))
        os.close(fd)
        fd = os.open(f, os.O_RDONLY)         # at once
        assert os.read(fd, 8192) == bytes(content), i
        os.close(fd)
    assert appraise_failures(m, "/f") == []


def test_rename_over_keeps_each_hash(make_mount, world_tmp, policy, mode):
    m = mount(make_mount, world_tmp, policy, mode)
    b = m.backing
    write_file(m.mnt / "target", b"old\n" * 50)
    assert labelled(b, "target")
    assert (m.mnt / "target").read_bytes() == b"old\n" * 50
    write_file(m.mnt / "target.tmp", b"new\n" * 70)
    assert labelled(b, "target.tmp")
    os.rename(m.mnt / "target.tmp", m.mnt / "target")
    assert (m.mnt / "target").read_bytes() == b"new\n" * 70
    assert labelled(b, "target")
    # and the renamed file is written again under its new name
    write_file(m.mnt / "target", b"more\n", os.O_RDWR | os.O_APPEND)
    assert labelled(b, "target")
    assert (m.mnt / "target").read_bytes() == b"new\n" * 70 + b"more\n"
    # O_WRONLY: the masked rule does not appraise such an open, so nothing asks for
    # the hash to be rewritten at its close (IMA_UPDATE_XATTR): as with the kernel,
    # the next appraisal fails (fix mode then writes the hash)
    write_file(m.mnt / "target", b"last\n", os.O_WRONLY | os.O_APPEND)
    content = b"new\n" * 70 + b"more\nlast\n"
    if policy == POLICIES["unmasked"]:
        assert labelled(b, "target")
    else:
        time.sleep(0.3)
        assert label(b / "target") != sha(content)
    if policy == POLICIES["masked"] and mode == "enforce":
        assert not readable(m.mnt / "target")
    else:
        assert (m.mnt / "target").read_bytes() == content
        assert labelled(b, "target")


def test_truncate_by_path_as_the_kernel(make_mount, world_tmp, policy, mode):
    """truncate(2) by path has no file, so no last writer: the kernel leaves the hash
    (the next appraisal sees the new content: refused in enforce mode, fixed in fix
    mode). While a writer has the file open through the mount, its last close sees
    the change (the kernel's i_version check) and rewrites the hash."""
    m = mount(make_mount, world_tmp, policy, mode)
    f, b = m.mnt / "f", m.backing
    write_file(f, b"y" * 5000)
    assert labelled(b, "f")
    old = label(b / "f")
    os.truncate(f, 100)
    time.sleep(0.3)
    assert label(b / "f") == old            # not rewritten
    if mode == "enforce":
        assert not readable(f)
        assert appraise_failures(m, "/f") == ["invalid-hash"]
    else:
        assert f.read_bytes() == b"y" * 100
        assert label(b / "f") == sha(b"y" * 100)
    # with a writer open through the mount
    write_file(m.mnt / "g", b"z" * 5000)
    assert labelled(b, "g")
    fd = os.open(m.mnt / "g", os.O_RDWR)
    os.truncate(m.mnt / "g", 10)
    os.close(fd)
    assert labelled(b, "g")
    assert (m.mnt / "g").read_bytes() == b"z" * 10


# -- the new-file allowance (IMA_NEW_FILE) ----------------------------------------------

def test_new_file_allowance_survives_chmod_and_chown(make_mount, world_tmp, policy):
    """``create; chmod; open O_RDONLY`` (pjdfstest's open/06.t and chmod groups): an
    empty file created by an appraised open has no label yet and passes, after chmod
    and chown too (before: EACCES, missing-hash); as uid 1000 in a directory it owns,
    and as root."""
    m = mount(make_mount, world_tmp, policy)
    d = m.mnt / "d"
    d.mkdir()
    os.chown(d, 1000, 1000)
    f = d / "new"
    # pjdfstest's "create": open(O_CREAT|O_EXCL) -- read-only, so the masked rule too
    # appraises it (MAY_READ)
    code = ("import os,sys; os.close(os.open(sys.argv[1], os.O_CREAT|os.O_EXCL, 0o644))")
    assert run_as(1000, 1000, ["python3", "-c", code, str(f)]).returncode == 0
    assert label(m.backing / "d/new") is None
    for change in (lambda: os.chmod(f, 0o600), lambda: os.chown(f, 1000, 1000),
                   lambda: os.chown(f, -1, -1), lambda: os.chmod(f, 0o640)):
        change()
        r = run_as(1000, 1000, ["python3", "-c", "import sys; open(sys.argv[1]).read()",
                                str(f)], capture_output=True)
        assert r.returncode == 0, r.stderr
        assert readable(f)
    assert appraise_failures(m, "/d/new") == []
    # a hard link is the same inode: the same allowance
    os.link(f, d / "link")
    assert readable(d / "link")


def test_new_file_allowance_ends_at_the_last_writer_close(make_mount, world_tmp, policy):
    """The allowance ends when the last writer closes the file, written or not
    (ima_check_last_writer: IMA_NEW_FILE or a change). The unmasked rule appraised the
    writable open, so the close writes the hash; the masked rule did not (O_WRONLY has
    no MAY_READ), so the file is left without a label and refused, as by the kernel."""
    m = mount(make_mount, world_tmp, policy)
    f = m.mnt / "f"
    os.close(os.open(f, os.O_CREAT | os.O_EXCL, 0o644))
    os.chmod(f, 0o600)
    assert readable(f)
    fd = os.open(f, os.O_WRONLY)
    os.write(fd, b"x")
    os.close(fd)
    if policy == POLICIES["unmasked"]:
        assert labelled(m.backing, "f")
        assert f.read_bytes() == b"x"
    else:
        assert wait_for(lambda: not readable(f))
        assert label(m.backing / "f") is None
        assert appraise_failures(m, "/f") == ["missing-hash"]
    # an O_RDWR writer is appraised by both rules: it passes (a hash matching, or
    # the allowance) and its close labels the file
    g = m.mnt / "g"
    os.close(os.open(g, os.O_CREAT | os.O_EXCL, 0o644))
    fd = os.open(g, os.O_RDWR)
    os.write(fd, b"data")
    os.close(fd)
    assert labelled(m.backing, "g") and g.read_bytes() == b"data"


def test_new_file_allowance_is_not_kept_across_a_remount(make_mount, world_tmp, policy):
    """In memory only, as the kernel keeps IMA_NEW_FILE with the inode: after a
    remount an empty file nobody labelled is refused (missing-hash), also when an
    earlier open passed on the allowance (its verdict is not written to the verdict
    cache)."""
    m = mount(make_mount, world_tmp, policy)
    f = m.mnt / "empty"
    os.close(os.open(f, os.O_CREAT | os.O_EXCL, 0o644))
    assert readable(f) and readable(f)
    m.restart(m.args)
    assert not readable(f)
    assert appraise_failures(m, "/empty") == ["missing-hash"]


def test_chown_minus_one_updates_ctime(make_mount, world_tmp):
    """chown(f, -1, -1) changes nothing but ctime, as ext4 does (POSIX allows either);
    the kernel sends it as a SETATTR without any field."""
    m = mount(make_mount, world_tmp, POLICIES["unmasked"])
    f = m.mnt / "f"
    write_file(f, b"c")
    d = m.mnt / "d"
    d.mkdir()
    for p in (f, d):
        before = os.stat(m.backing / p.name).st_ctime_ns
        time.sleep(0.05)
        os.chown(p, -1, -1)
        after_backing = os.stat(m.backing / p.name).st_ctime_ns
        assert after_backing > before, p
        assert wait_for(lambda: os.stat(p).st_ctime_ns == after_backing, 10), p
    assert labelled(m.backing, "f") and readable(f)


# -- a crash between the last write and the last close ------------------------------------

@pytest.fixture
def coarse_backing(world_tmp):
    """A backing file system with one-second timestamps (ext4 with 128-byte inodes on
    a loop device): a write within a second keeps a file's stat as it was."""
    img = world_tmp / "coarse.img"
    with open(img, "wb") as fh:
        fh.truncate(64 << 20)
    r = subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", str(img)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mkfs.ext4: {r.stderr.strip()}")
    mp = world_tmp / "coarse"
    mp.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mp)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot loop-mount: {r.stderr.strip()}")
    try:
        yield mp
    finally:
        # the imafs mount on top goes first (make_mount's teardown runs after this
        # fixture's only if it was requested first: unmount it here too)
        for sub in world_tmp.iterdir():
            if sub.name.startswith("mnt") and is_mounted(str(sub)):
                force_unmount(str(sub))
        subprocess.run(["umount", str(mp)], capture_output=True)
        if is_mounted(str(mp)):
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)


def _within_one_second(b: Path, name: str, steps) -> bool:
    """Run ``steps()`` from the start of a second; True when the backing file's mtime
    and ctime at the end are those of before (it all stayed within the second)."""
    for _ in range(5):
        now = time.time()
        time.sleep(1.0 - (now - int(now)) + 0.01)
        st = os.stat(b / name) if (b / name).exists() else None
        steps()
        after = os.stat(b / name)
        if st is None or (after.st_mtime_ns, after.st_ctime_ns) == \
                (st.st_mtime_ns, st.st_ctime_ns):
            if int(time.time()) == int(after.st_ctime_ns // 10**9):
                return True
    return False


def test_crash_between_the_last_write_and_the_last_close(make_mount, world_tmp,
                                                         coarse_backing, mode):
    m = mount(make_mount, world_tmp, POLICIES["unmasked"], mode, backing=coarse_backing)
    f, b = m.mnt / "f", coarse_backing
    fds = []

    def steps():
        # a labelled file, a verdict and digests for its version (in memory and in
        # the verdict cache), then a writer changes it, keeping its size: all within
        # one second, the stat shows the version the verdict was made for
        if (b / "f").exists():
            os.unlink(f)
        write_file(f, b"A" * 4096)
        assert labelled(b, "f")
        assert readable(f) and readable(f)
        fd = os.open(f, os.O_RDWR)
        fds.append(fd)
        os.pwrite(fd, b"B" * 4096, 0)

    ok = _within_one_second(b, "f", steps)
    if not ok:
        for fd in fds:
            os.close(fd)
        pytest.skip("could not stay within one second (a loaded machine)")
    # the daemon dies before the writer's close
    pid = int((m.state / "daemon.lock").read_text().strip())
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    force_unmount(str(m.mnt))
    assert (b / "f").read_bytes() == b"B" * 4096 and label(b / "f") == sha(b"A" * 4096)
    m.start()
    hashed = json.loads(m.ctl("stats").read_text())["hashed_files"]
    if mode == "enforce":
        # measured again: the old hash no longer matches -> refused
        assert not readable(f)
        assert appraise_failures(m, "/f") == ["invalid-hash"]
    else:
        assert f.read_bytes() == b"B" * 4096
        assert label(b / "f") == sha(b"B" * 4096)
    assert json.loads(m.ctl("stats").read_text())["hashed_files"] == hashed + 1


def test_same_second_rewrite_through_the_mount_is_measured_again(make_mount, world_tmp,
                                                                 coarse_backing):
    """Without a crash: a rewrite through the mount that keeps the stat is relabelled
    at its close, and what the caches held about the old content is dropped, so a
    remount neither skips the new measurement (a verdict) nor appraises the new
    content with the old digest."""
    m = mount(make_mount, world_tmp, "measure func=FILE_CHECK mask=^MAY_READ\n"
              + POLICIES["masked"], backing=coarse_backing)
    f, b = m.mnt / "f", coarse_backing

    def steps():
        if (b / "f").exists():
            os.unlink(f)
        write_file(f, b"A" * 4096)
        assert labelled(b, "f")
        assert readable(f)
        fd = os.open(f, os.O_RDWR)
        os.pwrite(fd, b"B" * 4096, 0)
        os.close(fd)
        assert labelled(b, "f")

    if not _within_one_second(b, "f", steps):
        pytest.skip("could not stay within one second (a loaded machine)")
    m.restart(m.args)
    assert f.read_bytes() == b"B" * 4096
    digests = [line.split()[3] for line in
               m.ctl("ascii_runtime_measurements").read_text().splitlines()
               if line.endswith(" /f")]
    assert "sha256:" + hashlib.sha256(b"B" * 4096).hexdigest() in digests, digests
