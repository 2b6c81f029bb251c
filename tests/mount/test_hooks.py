"""The hook mapping through a real mount, against the kernel's (v6.x ima_main.c,
fs/binfmt_elf.c, fs/binfmt_script.c): which hooks an exec, its ELF interpreter, a
#! script, a set-uid binary and an O_DIRECT open trigger.

- exec of an ELF: FILE_CHECK (MAY_EXEC), BPRM_CHECK, CREDS_CHECK (the exec's new
  credentials), MMAP_CHECK_REQPROT and MMAP_CHECK (its PROT_EXEC segments);
- its interpreter (PT_INTERP, opened by load_elf_binary with open_exec, an open FUSE
  sees with __FMODE_EXEC): FILE_CHECK and the mmap hooks, no BPRM_CHECK;
- a #! script: FILE_CHECK and BPRM_CHECK; its interpreter is the binary the exec runs;
- O_DIRECT: never hashed; measured with a zero digest (and not marked measured),
  refused where appraised unless the rule says permit_directio.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import subprocess

import pytest

from imafs.ima.templates import parse_ascii

pytestmark = pytest.mark.mount

HOOKS = """\
measure func=FILE_CHECK mask=MAY_EXEC pcr=13
measure func=BPRM_CHECK pcr=11
measure func=CREDS_CHECK pcr=14
measure func=MMAP_CHECK pcr=12
measure func=MMAP_CHECK_REQPROT pcr=15
"""
LOADER = "/lib64/ld-linux-x86-64.so.2"


def _mount(make_mount, world_tmp, policy, backing, *extra):
    p = world_tmp / "policy"
    p.write_text(policy)
    return make_mount(["--policy", str(p), *extra], backing=backing)


def _entries(m):
    out = {}
    for e in parse_ascii(m.ctl("ascii_runtime_measurements").read_bytes()):
        if e.name in (b"boot_aggregate", None):
            continue
        out.setdefault(e.name.decode(), set()).add(e.pcr)
    return out


def _dynamic_rootfs(root):
    """A rootfs with a dynamically linked /bin/true, its loader and libc (as on the
    host: /lib64/ld-linux-x86-64.so.2 a symlink into /lib/x86_64-linux-gnu)."""
    if not os.path.exists(LOADER) or not os.path.exists("/usr/bin/true"):
        pytest.skip("no x86_64 glibc loader on this machine")
    (root / "bin").mkdir(parents=True)
    (root / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "lib64").mkdir()
    shutil.copy("/usr/bin/true", root / "bin/true")
    real_ld = os.path.realpath(LOADER)
    shutil.copy(real_ld, root / "lib/x86_64-linux-gnu" / os.path.basename(real_ld))
    os.symlink("../lib/x86_64-linux-gnu/" + os.path.basename(real_ld), root / LOADER[1:])
    shutil.copy(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"),
                root / "lib/x86_64-linux-gnu/libc.so.6")
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin/busybox")
    os.symlink("busybox", root / "bin/sh")
    return "/lib/x86_64-linux-gnu/" + os.path.basename(real_ld)


def test_elf_exec_and_its_interpreter_in_a_chroot(make_mount, world_tmp):
    b = world_tmp / "rootfs"
    ld = _dynamic_rootfs(b)
    m = _mount(make_mount, world_tmp, HOOKS, b)
    r = subprocess.run(["chroot", str(m.mnt), "/bin/true"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = _entries(m)
    # the program: every exec hook
    assert got["/bin/true"] == {11, 12, 13, 14, 15}, got
    # the loader: open_exec (FILE_CHECK MAY_EXEC) and its mapping, no BPRM/CREDS_CHECK
    assert got[ld] == {12, 13, 15}, got
    # libc: the loader's read-only open + mmap(PROT_EXEC)
    assert got["/lib/x86_64-linux-gnu/libc.so.6"] == {12, 15}, got
    # the loader run as the program itself is a program: BPRM_CHECK and CREDS_CHECK
    r = subprocess.run(["chroot", str(m.mnt), LOADER, "/bin/true"], capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert _entries(m)[ld] == {11, 12, 13, 14, 15}


def test_elf_exec_and_its_interpreter_under_pivot_root(make_mount, world_tmp):
    """As runc starts a container: pivot_root into the mount (in a mount namespace of
    its own). The loader is recorded as under chroot -- FILE_CHECK and the mmap hooks,
    no BPRM_CHECK (PCR 11) -- though /proc/PID/root now reads "/" to the daemon
    (issue 15 item 5: it compared that path with the mount point)."""
    b = world_tmp / "rootfs"
    ld = _dynamic_rootfs(b)
    (b / "old").mkdir()
    m = _mount(make_mount, world_tmp, HOOKS, b)
    r = subprocess.run(["unshare", "--mount", "--fork", "bash", "-c",
                        f"mount --make-rprivate / && cd {m.mnt} && pivot_root . old && "
                        f"exec /bin/true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = _entries(m)
    assert got["/bin/true"] == {11, 12, 13, 14, 15}, got
    assert got[ld] == {12, 13, 15}, got
    assert got["/lib/x86_64-linux-gnu/libc.so.6"] == {12, 15}, got


def test_an_appraised_exec_cannot_pass_as_a_loader(make_mount, world_tmp):
    """The loader role is taken only by the very file the previous exec's PT_INTERP
    names, opened next by the same task: a failed exec of a dynamically linked program
    followed by an exec of an unsigned binary is still BPRM_CHECK'ed (refused)."""
    b = world_tmp / "rootfs"
    _dynamic_rootfs(b)
    shutil.copy(b / "bin/busybox", b / "bin/unsigned")
    m = _mount(make_mount, world_tmp, "appraise func=BPRM_CHECK appraise_type=imasig\n", b,
               "--appraise", "enforce")
    r = subprocess.run(["chroot", str(m.mnt), "/bin/unsigned", "true"], capture_output=True,
                       timeout=60)
    assert r.returncode != 0
    r = subprocess.run(["chroot", str(m.mnt), "/bin/sh", "-c", "/bin/true; /bin/unsigned true"],
                       capture_output=True, timeout=60)
    assert r.returncode != 0


def test_script_and_its_interpreter(make_mount, world_tmp):
    b = world_tmp / "rootfs"
    _dynamic_rootfs(b)
    (b / "run.sh").write_text("#!/bin/busybox sh\nexit 0\n")
    os.chmod(b / "run.sh", 0o755)
    m = _mount(make_mount, world_tmp, HOOKS, b)
    r = subprocess.run(["chroot", str(m.mnt), "/run.sh"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = _entries(m)
    assert got["/run.sh"] == {11, 13}, got                  # FILE_CHECK + BPRM_CHECK
    assert got["/bin/busybox"] == {11, 12, 13, 14, 15}, got  # the binary the exec runs


def test_creds_check_sees_the_credentials_of_a_set_uid_exec(make_mount, world_tmp):
    b = world_tmp / "rootfs"
    (b / "bin").mkdir(parents=True)
    for n in ("plain", "setuid"):
        shutil.copy("/usr/bin/true", b / "bin" / n)
        os.chown(b / "bin" / n, 1234, 1234)
        os.chmod(b / "bin" / n, 0o755)
    os.chmod(b / "bin/setuid", 0o4755)
    m = _mount(make_mount, world_tmp,
               "measure func=CREDS_CHECK euid=1234 pcr=14\n"
               "measure func=BPRM_CHECK euid=1234 pcr=11\n", b)
    for n in ("plain", "setuid"):
        r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                            str(m.mnt / "bin" / n)], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
    got = _entries(m)
    # only the set-uid exec runs with euid 1234; BPRM_CHECK sees the caller's (1000)
    assert got == {"/bin/setuid": {14}}, got


def test_o_direct_is_never_hashed(make_mount, world_tmp):
    b = world_tmp / "b"
    b.mkdir()
    data = os.urandom(64 * 1024)
    for n in ("m", "a", "p"):
        (b / n).write_bytes(data)
    m = _mount(make_mount, world_tmp,
               "measure func=FILE_CHECK mask=MAY_READ\n"
               "appraise func=FILE_CHECK mask=MAY_READ fowner=0 permit_directio\n", b)
    os.chown(b / "a", 1000, 0)                 # appraised without permit_directio
    (world_tmp / "policy").write_text("")

    def direct_read(name):
        fd = os.open(m.mnt / name, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)           # page-aligned, as O_DIRECT wants
            return os.readv(fd, [buf]), bytes(buf)
        finally:
            os.close(fd)

    # measured only (fowner 1000 matches no appraise rule): a zero digest, audited
    n, head = direct_read("a")
    assert n == 4096 and head == data[:4096]
    lines = [e for e in parse_ascii(m.ctl("ascii_runtime_measurements").read_bytes())
             if e.name == b"/a"]
    assert len(lines) == 1 and set(lines[0].file_digest[2]) == {0}
    audit = [json.loads(x) for x in (m.state / "audit.log").read_text().splitlines()]
    assert any(r["type"] == "collect_data" and r["cause"] == "failed(directio)"
               and r["path"] == "/a" for r in audit)
    # not marked measured: a normal open measures the real digest
    assert (m.mnt / "a").read_bytes() == data
    digests = [e.file_digest[2] for e in parse_ascii(m.ctl("ascii_runtime_measurements")
                                                     .read_bytes()) if e.name == b"/a"]
    assert hashlib.sha256(data).digest() in digests
    # appraised with permit_directio (fowner 0): allowed unappraised
    n, _ = direct_read("p")
    assert n == 4096


def test_o_direct_of_an_appraised_file_is_refused(make_mount, world_tmp):
    b = world_tmp / "b"
    b.mkdir()
    (b / "f").write_bytes(os.urandom(8192))
    m = _mount(make_mount, world_tmp, "appraise func=FILE_CHECK mask=MAY_READ\n", b)
    with pytest.raises(OSError) as e:
        os.open(m.mnt / "f", os.O_RDONLY | os.O_DIRECT)
    assert e.value.errno == errno.EACCES
