"""imafs.ima.hooks without a mount: which (func, mask) hooks an open stands for, as the
kernel runs them (ima_main.c, binfmt_elf.c: the mount-level checks are
tests/mount/test_hooks.py), the credentials each hook sees, OpenMode from open(2)
flags, and the AccessEvents built from them."""
from __future__ import annotations

import os
import stat

import pytest

from imafs.ima import hooks as hk
from imafs.ima.iint import FsInfo
from imafs.ima.policy import MAY_APPEND, MAY_EXEC, MAY_READ, MAY_WRITE, Policy
from imafs.ima.policy_parse import parse_policy

MMAP = [("MMAP_CHECK_REQPROT", MAY_EXEC), ("MMAP_CHECK", MAY_EXEC)]
CALLER = {"uid": 1000, "euid": 1000, "suid": 1000, "gid": 100, "egid": 100, "sgid": 100}


def st_of(mode, uid=0, gid=0):
    return os.stat_result((mode, 1, 2, 1, uid, gid, 10, 0, 0, 0))


@pytest.mark.parametrize("mask, exec_, role, library, want", [
    (MAY_READ, False, None, False, [("FILE_CHECK", MAY_READ)]),
    (MAY_READ | MAY_WRITE, False, None, False, [("FILE_CHECK", MAY_READ | MAY_WRITE)]),
    (MAY_READ, False, None, True, [("FILE_CHECK", MAY_READ)] + MMAP),        # the loader's
    (0, True, "elf", False,
     [("FILE_CHECK", MAY_EXEC), ("BPRM_CHECK", MAY_EXEC), ("CREDS_CHECK", MAY_EXEC)] + MMAP),
    (0, True, "interp", False, [("FILE_CHECK", MAY_EXEC)] + MMAP),          # no BPRM_CHECK
    (0, True, "other", False, [("FILE_CHECK", MAY_EXEC), ("BPRM_CHECK", MAY_EXEC)]),  # #!
])
def test_open_hooks_are_the_kernels(mask, exec_, role, library, want):
    assert hk.open_hooks(mask, exec_, role, library) == want


def test_open_mode_from_flags():
    m = hk.OpenMode.from_flags(os.O_RDONLY)
    assert (m.readable, m.writable, m.mask) == (True, False, MAY_READ)
    m = hk.OpenMode.from_flags(os.O_WRONLY | os.O_APPEND, created=True)
    assert (m.readable, m.writable, m.append, m.created) == (False, True, True, True)
    assert m.mask == MAY_WRITE | MAY_APPEND
    m = hk.OpenMode.from_flags(os.O_RDWR | os.O_DIRECT, exec_=True)
    assert m.mask == MAY_READ | MAY_WRITE and m.direct and m.exec_


def test_the_set_id_credentials_only_for_creds_check_and_an_execs_mmap():
    suid = st_of(stat.S_IFREG | 0o6755, uid=0, gid=42)
    creds = hk.hook_ids("CREDS_CHECK", True, CALLER, suid, "elf")
    assert (creds["euid"], creds["suid"], creds["egid"], creds["sgid"]) == (0, 0, 42, 42)
    assert creds["uid"] == 1000 and creds["gid"] == 100          # real ids stay
    assert hk.hook_ids("MMAP_CHECK", True, CALLER, suid, "elf")["euid"] == 0
    assert hk.hook_ids("BPRM_CHECK", True, CALLER, suid, "elf") == CALLER
    assert hk.hook_ids("MMAP_CHECK", False, CALLER, suid, None) == CALLER   # a library
    # set-gid without group execute is mandatory locking, not set-gid
    sgid_noexec = st_of(stat.S_IFREG | 0o2744, gid=42)
    assert hk.exec_creds(CALLER, sgid_noexec)["egid"] == 100
    # the loader: the binary's bits count, not its own
    assert hk.exec_creds(CALLER, suid, role="interp")["euid"] == 1000


def test_has_func_and_has_measure():
    p = Policy(parse_policy("measure func=FILE_MMAP\nappraise func=BPRM_CHECK\n"))
    assert hk.has_func(p, "MMAP_CHECK") and hk.has_func(p, "BPRM_CHECK")
    assert not hk.has_func(p, "FILE_CHECK")
    assert hk.has_func(Policy(parse_policy("audit fowner=0\n")), "FILE_CHECK")  # no func=
    assert hk.has_measure(p) and not hk.has_measure(Policy(parse_policy("appraise\n")))


def test_access_events_carry_who_what_and_where():
    fs = FsInfo(magic=0xEF53, name="ext4", subtype=None, uuid="u-1")
    suid = st_of(stat.S_IFREG | 0o4755, uid=0, gid=7)
    evs = hk.access_events(hk.open_hooks(0, True, "elf", False), CALLER, suid, fs,
                           "/bin/x", True, "elf")
    assert [e.func for e in evs] == ["FILE_CHECK", "BPRM_CHECK", "CREDS_CHECK",
                                     "MMAP_CHECK_REQPROT", "MMAP_CHECK"]
    assert all(e.mask == MAY_EXEC and e.path == "/bin/x" for e in evs)
    assert all((e.fowner, e.fgroup, e.fsmagic, e.fsname, e.fsuuid) == (0, 7, 0xEF53, "ext4",
                                                                       "u-1") for e in evs)
    assert [e.euid for e in evs] == [1000, 1000, 0, 0, 0]
    # and the policy decides on them as on the engine's own
    p = Policy(parse_policy("appraise func=CREDS_CHECK euid=0\n"))
    assert [p.match(e).appraise for e in evs] == [False, False, True, False, False]
