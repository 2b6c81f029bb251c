"""Code loaded through the mount while a writer can change it (issue 14 item 1).

The library-load decision is taken at open (FUSE shows no mmap) from the backing
file, while the mount's page cache may hold other bytes: dirty pages of a shared
writable mapping reach the backing file only at munmap, writeback or invalidation.
The attacks, as uid 1000 from the host and as root in a chroot into the mount:

- a writer creates ``/tmp/e.so`` = "XXXX" + an unsigned library, keeps it open with a
  shared mapping whose first four bytes it sets to "\\x7fELF", and waits; the victim
  runs ``LD_PRELOAD=/tmp/e.so /bin/true``, or ``/lib64/ld-linux-x86-64.so.2 /tmp/p``
  (the same trick with a program);
- a library the attacker may write, signed, is patched in the page cache only.

Required: such an open, appraised as MMAP_CHECK or BPRM_CHECK while the file has
writers through the mount, fails with ETXTBSY and an audit record
(``mmapped_writers`` when a writer maps the file shared, as the kernel's
mmap_violation_check says, else ``open_writers``);
the decision reads the file after the kernel wrote the dirty pages back; a program
that writes a file, closes it and runs it keeps working."""
from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import subprocess

import pytest

from helpers.mounts import run_as, wait_for
from helpers.loadable import LOADER, Mapper, code, keydir, make_rootfs  # noqa: F401 (fixtures)
from imafs.ima.templates import parse_ascii

pytestmark = pytest.mark.mount

CODE_POLICY = ("appraise func=BPRM_CHECK appraise_type=imasig\n"
               "appraise func=MMAP_CHECK appraise_type=imasig\n")
WITH_FILE_CHECK = CODE_POLICY + "appraise func=FILE_CHECK mask=^MAY_READ\n"
ETXTBSY_LOADER = "Error 26"     # how ld.so prints ETXTBSY for the file it runs


def mount_rootfs(make_mount, world_tmp, code, keydir, policy, *extra):
    root = world_tmp / "rootfs"
    make_rootfs(root, code, keydir)
    p = world_tmp / "policy"
    p.write_text(policy)
    return make_mount(["--policy", str(p), "--key", str(keydir / "signing_cert.der"),
                       *extra], backing=root)


def as_user(uid=1000):
    def demote():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    return demote


def in_chroot(root):
    def enter():
        os.chroot(root)
        os.chdir("/")
    return enter


class Side:
    """Where the attacker and the victim run: as uid 1000 from the host (paths into
    the mount), or as root chrooted into it (paths inside)."""

    def __init__(self, m, how: str):
        self.m, self.how = m, how
        self.pre = as_user() if how == "uid1000" else in_chroot(str(m.mnt))

    def path(self, p: str) -> str:
        return str(self.m.mnt) + p if self.how == "uid1000" else p

    def run(self, argv, **env):
        e = {"PATH": "/bin"}
        e.update({k: self.path(v) for k, v in env.items()})
        return subprocess.run([self.path(a) if a.startswith("/") else a for a in argv],
                              env=e, preexec_fn=self.pre, capture_output=True, text=True,
                              timeout=60)

    def mapper(self, *args):
        return Mapper([self.path("/bin/mapper")] + [self.path(a) if a.startswith("/")
                                                    else a for a in args],
                      preexec_fn=self.pre)


def refusals(m, path: str) -> list[tuple]:
    return [(r["func"], r["cause"]) for r in m.audit()
            if r["type"] == "appraise" and r["path"] == path and r.get("errno") == "ETXTBSY"]


@pytest.mark.parametrize("policy", [CODE_POLICY, WITH_FILE_CHECK],
                         ids=["code", "code+file"])
@pytest.mark.parametrize("how", ["uid1000", "chroot-root"])
def test_a_library_made_elf_in_the_page_cache_is_not_loaded(make_mount, world_tmp, code,
                                                            keydir, policy, how):
    m = mount_rootfs(make_mount, world_tmp, code, keydir, policy)
    side = Side(m, how)
    mark = m.backing / "tmp/mark"
    # the victim runs as it should without the preload
    r = side.run(["/bin/true"], MARK="/tmp/mark")
    assert r.returncode == 0, r.stderr
    with side.mapper("/tmp/e.so", "/src/evil.x", "flip"):
        r = side.run(["/bin/true"], LD_PRELOAD="/tmp/e.so", MARK="/tmp/mark")
        assert not mark.exists(), "the unsigned constructor ran"
        assert "cannot be preloaded" in r.stderr, r.stderr
        # the decision read what the writer's mapping holds, written back first
        assert (m.backing / "tmp/e.so").read_bytes()[:4] == b"\x7fELF"
    assert ("MMAP_CHECK", "mmapped_writers") in refusals(m, "/tmp/e.so")
    # the writer gone, the file is appraised for what it is: unsigned, refused
    r = side.run(["/bin/true"], LD_PRELOAD="/tmp/e.so", MARK="/tmp/mark")
    assert not mark.exists() and "cannot be preloaded" in r.stderr


@pytest.mark.parametrize("how", ["uid1000", "chroot-root"])
def test_the_loader_does_not_run_a_program_made_elf_in_the_page_cache(
        make_mount, world_tmp, code, keydir, how):
    m = mount_rootfs(make_mount, world_tmp, code, keydir, CODE_POLICY)
    side = Side(m, how)
    with side.mapper("/tmp/p", "/src/prog.x", "flip"):
        r = side.run([LOADER, "/tmp/p"], MARK="/tmp/mark")
        assert r.returncode != 0 and ETXTBSY_LOADER in r.stderr, r
    assert not (m.backing / "tmp/mark").exists(), "the unsigned program ran"
    assert ("MMAP_CHECK", "mmapped_writers") in refusals(m, "/tmp/p")


def test_a_mapping_alone_keeps_the_writer(make_mount, world_tmp, code, keydir):
    """The writer closed its descriptor: the mapping alone keeps the file open for
    write (FUSE releases the handle at munmap)."""
    m = mount_rootfs(make_mount, world_tmp, code, keydir, CODE_POLICY)
    side = Side(m, "uid1000")
    with side.mapper("/tmp/e.so", "/src/evil.x", "flip", "closefd"):
        side.run(["/bin/true"], LD_PRELOAD="/tmp/e.so", MARK="/tmp/mark")
    assert not (m.backing / "tmp/mark").exists()
    assert refusals(m, "/tmp/e.so") == [("MMAP_CHECK", "mmapped_writers")]


def test_a_plain_writer_is_open_writers(make_mount, world_tmp, code, keydir):
    """A writer without a mapping: write(2) goes through the daemon at once, yet it
    could write other bytes between the decision and the loader's read."""
    m = mount_rootfs(make_mount, world_tmp, code, keydir, CODE_POLICY)
    f = m.mnt / "tmp/w.so"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, code["evil.so"].read_bytes())
        r = run_as(1000, 1000, [str(m.mnt / "bin/true")],
                   env={"LD_PRELOAD": str(f), "MARK": str(m.mnt / "tmp/mark")},
                   capture_output=True, text=True)
        assert "cannot be preloaded" in r.stderr
    finally:
        os.close(fd)
    assert refusals(m, "/tmp/w.so") == [("MMAP_CHECK", "open_writers")]


def test_a_signed_library_patched_in_the_page_cache_is_not_loaded(make_mount, world_tmp,
                                                                  code, keydir):
    """uid 1000 may write /lib/genuine.so (signed) and patches its text in a shared
    mapping only: the backing bytes still pass appraisal, the loader would map the
    patched ones."""
    m = mount_rootfs(make_mount, world_tmp, code, keydir, CODE_POLICY)
    side = Side(m, "uid1000")
    mark = m.backing / "tmp/mark"
    r = side.run(["/bin/true"], LD_PRELOAD="/lib/genuine.so", MARK="/tmp/mark")
    assert r.returncode == 0 and mark.read_text() == "genuine library ran\n", r.stderr
    mark.unlink()
    with side.mapper("/lib/genuine.so", "-", "patch=genuine=patched"):
        r = side.run(["/bin/true"], LD_PRELOAD="/lib/genuine.so", MARK="/tmp/mark")
        assert not mark.exists(), mark.read_text()
    assert refusals(m, "/lib/genuine.so") == [("MMAP_CHECK", "mmapped_writers")]


def test_the_decision_reads_what_the_writer_left_in_the_page_cache(make_mount, world_tmp,
                                                                   code, keydir):
    """A policy that measures MMAP_CHECK (and appraises execs): a read of a file a
    writer turned into ELF in its mapping is the loader's, measured with the digest
    of what the page cache holds -- the kernel wrote it back before the decision."""
    m = mount_rootfs(make_mount, world_tmp, code, keydir,
                     "measure func=MMAP_CHECK pcr=12\n"
                     "appraise func=BPRM_CHECK appraise_type=imasig\n")
    side = Side(m, "uid1000")
    elf = b"\x7fELF" + code["evil.so"].read_bytes()[4:]
    with side.mapper("/tmp/e.so", "/src/evil.x", "flip"):
        r = run_as(1000, 1000, ["cat", str(m.mnt / "tmp/e.so")], capture_output=True)
        assert r.returncode == 0 and r.stdout == elf
    got = [e for e in parse_ascii(m.ctl("ascii_runtime_measurements").read_bytes())
           if e.name == b"/tmp/e.so"]
    # the measurement of what the loader would map, and the kernel's open_writers
    # violation (a measured read while a writer is open)
    assert [(e.pcr, e.file_digest[-1]) for e in got if not e.violation] == \
        [(12, hashlib.sha256(elf).digest())]
    assert [e.pcr for e in got if e.violation] == [10]


def test_write_then_exec_after_close_keeps_working(make_mount, world_tmp, code, keydir):
    """A program written through the mount, closed, then run (cp; exec, and gcc's
    output run at once), 20 times: never ETXTBSY (FUSE releases the writer's handle
    asynchronously, but before the exec's open)."""
    m = mount_rootfs(make_mount, world_tmp, code, keydir,
                     "appraise func=BPRM_CHECK\nappraise func=FILE_CHECK\n"
                     "appraise func=MMAP_CHECK\n")
    prog = code["prog"]
    for i in range(20):
        dst = m.mnt / f"tmp/p{i}"
        shutil.copy(prog, dst)
        r = subprocess.run([str(dst)], env={"MARK": str(m.mnt / f"tmp/mark{i}")},
                           capture_output=True, timeout=30)
        assert r.returncode == 0, (i, r.stderr)
    assert (m.mnt / "tmp/mark19").read_text() == "unsigned program ran\n"
    src = code["prog"].with_name("prog.c")
    r = subprocess.run(["gcc", "-o", str(m.mnt / "tmp/built"), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(m.mnt / "tmp/built")], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert not [r for r in m.audit() if r.get("errno") == "ETXTBSY"]


def test_mmap_exec_by_the_writer_itself_is_not_seen_but_no_other_process_loads(
        make_mount, world_tmp, code, keydir):
    """FUSE's blind spot: a process that opened an unsigned file O_RDWR can map it
    executable itself (no request shows the mapping). No other process can load it
    through the mount while it is open for write, and once it is closed the file is
    appraised as what it is."""
    m = mount_rootfs(make_mount, world_tmp, code, keydir, CODE_POLICY)
    f = m.mnt / "tmp/own.so"
    data = code["evil.so"].read_bytes()
    f.write_bytes(data)
    os.chmod(f, 0o644)
    fd = os.open(f, os.O_RDWR)
    try:
        mx = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_EXEC)
        assert mx[:4] == b"\x7fELF"          # mapped executable: not refused, not seen
        r = run_as(1000, 1000, [str(m.mnt / "bin/true")],
                   env={"LD_PRELOAD": str(f), "MARK": str(m.mnt / "tmp/mark")},
                   capture_output=True, text=True)
        assert "cannot be preloaded" in r.stderr
        mx.close()
    finally:
        os.close(fd)
    assert ("MMAP_CHECK", "mmapped_writers") in refusals(m, "/tmp/own.so")
    assert wait_for(lambda: not (m.backing / "tmp/mark").exists())
    r = run_as(1000, 1000, [str(m.mnt / "bin/true")],
               env={"LD_PRELOAD": str(f), "MARK": str(m.mnt / "tmp/mark")},
               capture_output=True, text=True)
    assert "cannot be preloaded" in r.stderr and not (m.backing / "tmp/mark").exists()
    causes = [r["cause"] for r in m.audit() if r["type"] == "appraise"
              and r["path"] == "/tmp/own.so" and r.get("errno") is None]
    assert "IMA-signature-required" in causes


def test_log_mode_audits_and_allows(make_mount, world_tmp, code, keydir):
    """As the kernel's mmap_violation_check, the refusal belongs to enforce mode."""
    m = mount_rootfs(make_mount, world_tmp, code, keydir, CODE_POLICY, "--appraise", "log")
    side = Side(m, "uid1000")
    with side.mapper("/tmp/e.so", "/src/evil.x", "flip"):
        r = side.run(["/bin/true"], LD_PRELOAD="/tmp/e.so", MARK="/tmp/mark")
        assert r.returncode == 0
    assert (m.backing / "tmp/mark").read_text() == "unsigned code ran\n"
    assert ("MMAP_CHECK", "mmapped_writers") in refusals(m, "/tmp/e.so")


def test_a_non_elf_file_with_writers_is_refused_as_possible_code(make_mount, world_tmp,
                                                                 code, keydir):
    """A writer could turn the file into ELF in the page cache after the decision, so
    a read-only open that could be a library load is refused while writers are open
    (--mmap-check all-elf, an MMAP_CHECK appraise rule), whatever the file holds;
    with --mmap-check off it is a plain read."""
    m = mount_rootfs(make_mount, world_tmp, code, keydir, CODE_POLICY)
    side = Side(m, "uid1000")
    with side.mapper("/tmp/x", "/src/evil.x", "keep"):
        r = run_as(1000, 1000, ["cat", str(m.mnt / "tmp/x")], capture_output=True,
                   text=True)
        assert r.returncode != 0 and "Text file busy" in r.stderr, r
    assert refusals(m, "/tmp/x") == [("MMAP_CHECK", "mmapped_writers")]
    # the writer gone: a plain file, read
    r = run_as(1000, 1000, ["cat", str(m.mnt / "tmp/x")], capture_output=True)
    assert r.returncode == 0 and r.stdout[:4] == b"XXXX"
