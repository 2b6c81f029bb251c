"""The mount answers FUSE FLUSH with ENOSYS, so the kernel stops sending it
(``fc->no_flush``): close(2) returns at once, and what a close does happens at
RELEASE, which the kernel sends without waiting for it. These tests check, through
real mounts, that everything that depended on the close stays exact:

- a control file's close (a policy or keys written through it take effect there)
  is seen by every open that follows the close(2): the open waits for the release;
- control-file writes report their errors from write(2), and close(2) succeeds (as
  the kernel's securityfs release);
- a program rewritten and executed right after its last writer's close(2) is
  appraised with the hash that close wrote: the exec's open waits for the release.
"""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

pytestmark = pytest.mark.mount


def write_ctl(path, data: bytes) -> tuple[int, int]:
    """One open, one write(2), close(2): (errno of the write, errno of the close)."""
    fd = os.open(path, os.O_WRONLY)
    werr = cerr = 0
    try:
        os.write(fd, data)
    except OSError as e:
        werr = e.errno
    try:
        os.close(fd)
    except OSError as e:
        cerr = e.errno
    return werr, cerr


def test_a_policy_is_in_force_for_the_open_right_after_its_close(make_mount):
    """Each round adds a rule for one file (by its owner) and opens that file as
    soon as close(2) returned: every file is measured. Without the wait for the
    control file's release, the open is decided under the policy before it."""
    m = make_mount()
    rounds = 25
    for i in range(rounds):
        f = m.backing / f"f{i}"
        f.write_bytes(b"x%d\n" % i)
        os.chown(f, 3000 + i, 3000)
    # rules for nobody before each one (a load that takes a while)
    filler = b"audit func=FILE_CHECK fowner=2999\n" * 150
    for i in range(rounds):
        assert write_ctl(m.ctl("policy"), filler + b"measure func=FILE_CHECK fowner=%d\n"
                         % (3000 + i)) == (0, 0)
        with open(m.mnt / f"f{i}", "rb") as fh:         # at once
            assert fh.read() == b"x%d\n" % i
    names = {line.split()[-1] for line in
             m.ctl("ascii_runtime_measurements").read_text().splitlines()}
    assert {f"/f{i}" for i in range(rounds)} <= names, sorted(names)


def test_the_control_file_shows_what_the_last_close_loaded(make_mount):
    m = make_mount()
    p = m.ctl("policy")
    filler = b"audit func=FILE_CHECK fowner=2999\n" * 150
    for i in range(25):
        assert write_ctl(p, filler + b"measure func=FILE_CHECK fowner=%d\n"
                         % (4000 + i)) == (0, 0)
        assert p.read_text().count("measure func=FILE_CHECK") == i + 1      # at once


def test_control_write_errors_come_from_write_and_close_succeeds(make_mount):
    """With FLUSH off (after the first close of the mount), a bad policy line fails
    its write(2) with EINVAL and nothing of that open is loaded; close(2) returns 0
    as the kernel's securityfs release does."""
    m = make_mount()
    (m.mnt / "warm").write_bytes(b"")            # a first close: FLUSH answered ENOSYS
    p = m.ctl("policy")
    assert write_ctl(p, b"measure func=FILE_CHECK\nmeasure func=BOGUS\n") == (errno.EINVAL, 0)
    assert p.read_text() == ""
    assert write_ctl(m.ctl("keys"), b"garbage\n") == (errno.EINVAL, 0)
    # what only the close can refuse (a bad last line without its newline) is refused
    # at release: logged, nothing loaded, before the next open is answered
    assert write_ctl(p, b"measure func=FILE_CHECK\nmeasure func=BOGUS") == (0, 0)
    assert p.read_text() == ""
    assert "line 2, column 9: " in m.log_text()


def test_a_program_rewritten_and_run_at_once(make_mount, world_tmp):
    """A script relabelled by its last writer's close (the hash rewritten in a
    worker thread at RELEASE) and executed right after close(2): its appraisal
    (enforce, BPRM_CHECK) waits for that close and passes, every round."""
    pol = world_tmp / "policy-exec"
    pol.write_text("appraise func=BPRM_CHECK\nappraise func=FILE_CHECK mask=^MAY_READ\n")
    m = make_mount(["--policy", str(pol), "--appraise", "enforce"])
    f = m.mnt / "prog"
    fd = os.open(f, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o755)
    os.write(fd, b"#!/bin/sh\necho 0\n")
    os.close(fd)
    for i in range(1, 80):
        fd = os.open(f, os.O_RDWR | os.O_TRUNC)
        os.write(fd, b"#!/bin/sh\necho %d\n" % i)
        os.close(fd)
        r = subprocess.run([str(f)], capture_output=True, text=True)    # at once
        assert (r.returncode, r.stdout) == (0, f"{i}\n"), (i, r)
