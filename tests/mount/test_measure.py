"""Measurement through a real mount: hooks, list entries, PCRs, violations, audit, the
control directory. Expected values are computed here, independently of the engine
(hashlib over the backing files, PCR replay over the binary lists)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import time

import pytest

from helpers.mounts import IMAFS, REPO, run_as
from imafs.ima.templates import parse_ascii, parse_binary

pytestmark = pytest.mark.mount

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
HASH_SIZE = {"sha1": 20, "sha256": 32}
SH = 30  # timeout of every subprocess


# -- helpers --------------------------------------------------------------------

def policy_file(tmp, text: str):
    p = tmp / f"policy-{abs(hash(text)) & 0xffffff:06x}"
    p.write_text(text)
    return p


def mount_with(make_mount, world_tmp, policy: str, *extra, backing=None):
    return make_mount(["--policy", str(policy_file(world_tmp, policy)), *extra], backing=backing)


def sha(algo: str, path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).digest()


def binary_list(m, bank: str = "sha1"):
    name = "binary_runtime_measurements" + ("" if bank == "sha1" else f"_{bank}")
    return m.ctl(name).read_bytes()


def entries(m):
    """Entries of the mount's list (sha1 binary view), parsed by imafs.ima.templates."""
    return list(parse_binary(binary_list(m)))


def file_entries(m):
    """(pcr, name, algo, digest, entry) of every entry but the boot aggregate."""
    out = []
    for e in entries(m):
        if e.name == b"boot_aggregate":
            continue
        _, algo, digest = e.file_digest
        out.append((e.pcr, e.name, algo, digest, e))
    return out


def count(m) -> int:
    return int(m.ctl("runtime_measurements_count").read_text())


def violations(m) -> int:
    return int(m.ctl("violations").read_text())


def split_binary(blob: bytes, hsize: int):
    """An independent parser of a kernel binary list: (pcr, template hash, template
    name, the bytes the template hash covers)."""
    off, out = 0, []
    u32 = struct.Struct("<I")
    while off < len(blob):
        (pcr,) = u32.unpack_from(blob, off)
        th = blob[off + 4:off + 4 + hsize]
        off += 4 + hsize
        (nlen,) = u32.unpack_from(blob, off)
        name = blob[off + 4:off + 4 + nlen]
        off += 4 + nlen
        if name == b"ima":
            digest = blob[off:off + 20]
            (slen,) = u32.unpack_from(blob, off + 20)
            fname = blob[off + 24:off + 24 + slen]
            off += 24 + slen
            covered = digest + fname.ljust(256, b"\0")
        else:
            (dlen,) = u32.unpack_from(blob, off)
            covered = blob[off + 4:off + 4 + dlen]
            off += 4 + dlen
        out.append((pcr, th, name, covered))
    assert off == len(blob)
    return out


def read_pcrs(m, bank: str) -> list[bytes]:
    lines = m.ctl(f"pcrs/{bank}").read_text().splitlines()
    assert len(lines) == 24
    regs = []
    for i, line in enumerate(lines):
        mt = re.fullmatch(r"PCR-(\d\d): ([0-9a-f]+)", line)
        assert mt and int(mt.group(1)) == i, line
        assert len(mt.group(2)) == 2 * HASH_SIZE[bank], line
        regs.append(bytes.fromhex(mt.group(2)))
    return regs


def check_replay(m) -> None:
    """Replay both banks from the binary lists; every template hash must be the hash of
    its template data, violations extend 0xff.., and the result must equal pcrs/."""
    for bank, size in HASH_SIZE.items():
        regs = [bytes(size)] * 24
        for pcr, th, _name, covered in split_binary(binary_list(m, bank), size):
            if th == bytes(size):
                ext = b"\xff" * size
            else:
                assert th == hashlib.new(bank, covered).digest()
                ext = th
            regs[pcr] = hashlib.new(bank, regs[pcr] + ext).digest()
        assert regs == read_pcrs(m, bank), bank


def run(argv, **kw):
    kw.setdefault("capture_output", True)
    return subprocess.run(argv, timeout=SH, **kw)


# -- hooks: exec, read, library load ------------------------------------------------

HOOKS_POLICY = """\
measure func=BPRM_CHECK mask=MAY_EXEC pcr=11
measure func=MMAP_CHECK mask=MAY_EXEC pcr=12
measure func=FILE_CHECK mask=MAY_READ
"""


def test_exec_read_and_library_load(make_mount, world_tmp):
    b = world_tmp / "backing1"
    (b / "bin").mkdir(parents=True)
    (b / "lib").mkdir()
    shutil.copy(BUSYBOX, b / "bin/busybox")
    shutil.copy("/usr/bin/true", b / "bin/true")            # dynamically linked
    libc = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
    if not os.path.exists(libc):
        pytest.skip("no x86_64 glibc to load through the mount")
    shutil.copy(libc, b / "lib/libc.so.6")
    shutil.copy(libc, b / "lib/copy.so")
    (b / "data.txt").write_text("some data\n")
    m = mount_with(make_mount, world_tmp, HOOKS_POLICY, backing=b)
    mnt = m.mnt
    assert count(m) == 1                                    # boot aggregate

    def activity():
        r = run([str(mnt / "bin/busybox"), "echo", "exec ok"], text=True)
        assert r.returncode == 0 and r.stdout == "exec ok\n", r.stderr
        assert (mnt / "data.txt").read_text() == "some data\n"
        with open(mnt / "lib/copy.so", "rb") as f:            # read-only open of an ELF
            assert f.read(4) == b"\x7fELF"
        # the dynamic loader opens libc.so.6 through the mount
        r = run([str(mnt / "bin/true")], env={"LD_LIBRARY_PATH": str(mnt / "lib")})
        assert r.returncode == 0, r.stderr
        r = run([str(mnt / "bin/true")], text=True,
                env={"LD_LIBRARY_PATH": str(mnt / "lib"), "LD_DEBUG": "libs"})
        assert f"calling init: {mnt}/lib/libc.so.6" in r.stderr, r.stderr  # the mount's libc

    activity()
    got = {(pcr, name, algo, digest) for pcr, name, algo, digest, _ in file_entries(m)}
    s = lambda p: sha("sha256", b / p)  # noqa: E731
    want = {
        (11, b"/bin/busybox", "sha256", s("bin/busybox")),   # BPRM_CHECK
        (11, b"/bin/true", "sha256", s("bin/true")),
        (12, b"/bin/busybox", "sha256", s("bin/busybox")),   # MMAP_CHECK: its segments
        (12, b"/bin/true", "sha256", s("bin/true")),
        (10, b"/data.txt", "sha256", s("data.txt")),          # FILE_CHECK
        (10, b"/lib/copy.so", "sha256", s("lib/copy.so")),
        (12, b"/lib/copy.so", "sha256", s("lib/copy.so")),    # MMAP_CHECK (python's open)
        (10, b"/lib/libc.so.6", "sha256", s("lib/libc.so.6")),
        (12, b"/lib/libc.so.6", "sha256", s("lib/libc.so.6")),  # MMAP_CHECK (ld.so)
    }
    assert got == want
    assert len(file_entries(m)) == len(want)                # each exactly once
    # a text file is no library
    assert not any(pcr == 12 and name == b"/data.txt" for pcr, name, *_ in file_entries(m))
    n = count(m)
    activity()                                              # second time: nothing new
    assert count(m) == n
    assert violations(m) == 0
    check_replay(m)


# -- re-measurement after a change ------------------------------------------------------

def test_change_remeasures(make_mount, world_tmp):
    m = mount_with(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n",
                   "--attr-timeout", "0")
    f, bf = m.mnt / "f.conf", m.backing / "f.conf"
    bf.write_bytes(b"version 1\n")
    digests = lambda: [d for _, name, _, d, _ in file_entries(m) if name == b"/f.conf"]  # noqa: E731

    assert f.read_bytes() == b"version 1\n"
    assert f.read_bytes() == b"version 1\n"
    assert digests() == [hashlib.sha256(b"version 1\n").digest()]

    # through the mount: write + close, then open again
    with open(f, "r+b") as w:
        w.write(b"version 2, longer\n")
    assert f.read_bytes() == b"version 2, longer\n"
    assert digests()[-1] == hashlib.sha256(b"version 2, longer\n").digest()
    assert len(digests()) == 2

    # behind the mount: the backing file changes directly
    time.sleep(0.01)
    bf.write_bytes(b"version 3 (behind the mount)\n")
    assert f.read_bytes() == b"version 3 (behind the mount)\n"
    assert digests()[-1] == hashlib.sha256(b"version 3 (behind the mount)\n").digest()
    assert len(digests()) == 3

    # back to an earlier content: the same template hash is not appended twice
    with open(f, "wb") as w:
        w.write(b"version 1\n")
    assert f.read_bytes() == b"version 1\n"
    assert len(digests()) == 3
    assert violations(m) == 0
    check_replay(m)


# -- violations -------------------------------------------------------------------

def test_open_writers_and_tomtou(make_mount, world_tmp):
    m = mount_with(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n")
    (m.backing / "log.txt").write_text("start\n")
    p = m.mnt / "log.txt"

    # open_writers: a reader opens a file that is open for write
    with open(p, "ab"):
        with open(p, "rb") as r:
            r.read()
    assert violations(m) == 1
    # ToMToU: a writer opens a file that a measured reader holds open (O_RDWR...)
    with open(p, "rb"):
        with open(p, "r+b") as w:
            w.write(b"S")
    assert violations(m) == 2
    # ... and O_WRONLY|O_TRUNC, which changes the file as it opens it
    with open(p, "rb"):
        with open(p, "wb") as w:
            w.write(b"truncated\n")
    assert violations(m) == 3
    # a writer with no measured reader, a reader with no writer: nothing
    with open(p, "ab") as w:
        w.write(b"more\n")
    with open(p, "rb") as r:
        r.read()
    assert violations(m) == 3

    viol = [e for e in entries(m) if e.violation]
    assert len(viol) == 3
    for e in viol:
        assert e.pcr == 10 and e.name == b"/log.txt" and e.template == "ima-ng"
        assert e.recorded_hash == bytes(20)
        assert e.file_digest == (None, "sha256", bytes(32))
    # the ascii list shows them with a zero template hash too
    lines = [ln for ln in m.ctl("ascii_runtime_measurements").read_bytes().splitlines()
             if ln.startswith(b"10 " + b"0" * 40)]
    assert len(lines) == 3
    check_replay(m)                              # 0xff.. extension, checked independently
    audit = [json.loads(ln) for ln in (m.state / "audit.log").read_text().splitlines()]
    causes = [a["cause"] for a in audit if a["type"] == "violation"]
    assert causes == ["open_writers", "ToMToU", "ToMToU"]


def test_no_violation_from_a_late_release(make_mount, world_tmp):
    """FUSE RELEASE is asynchronous: close(writer); open(reader) may reach the daemon
    as open before release. That must not look like open_writers (nor the reverse like
    ToMToU); real ones are still seen."""
    m = mount_with(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n")
    p = m.mnt / "busy.txt"
    p.write_bytes(b"0")
    for i in range(150):
        with open(p, "ab") as w:
            w.write(b"%d" % i)
        with open(p, "rb") as r:
            r.read()
        with open(p, "r+b") as w:
            w.write(b"x")
    assert violations(m) == 0
    with open(p, "rb"):
        with open(p, "ab"):
            pass
    with open(p, "ab"):
        with open(p, "rb") as r:
            r.read()
    assert violations(m) == 2


def test_policy_loaded_by_path_is_no_lasting_reader(make_mount, world_tmp):
    m = mount_with(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n"
                                          "measure func=POLICY_CHECK\n")
    (m.backing / "extra.policy").write_text("measure func=BPRM_CHECK\n")
    with open(m.ctl("policy"), "w") as f:
        f.write("/extra.policy\n")
    assert m.ctl("policy").read_text().endswith("measure func=BPRM_CHECK \n")
    pol = [e for e in entries(m) if e.name == b"/extra.policy"]
    assert len(pol) == 1                                    # POLICY_CHECK measured it
    # read (measured) and closed, then written: no ToMToU from the policy load
    (m.mnt / "extra.policy").read_bytes()
    with open(m.mnt / "extra.policy", "a") as f:
        f.write("# edited\n")
    assert violations(m) == 0


# -- audit ----------------------------------------------------------------------

def test_audit_rule_one_line_per_version(make_mount, world_tmp):
    m = mount_with(make_mount, world_tmp, "audit func=FILE_CHECK mask=MAY_READ\n",
                   "--attr-timeout", "0")
    (m.backing / "a").write_text("alpha\n")
    (m.backing / "b").write_text("beta\n")
    pids = []
    for name in ("a", "a", "b", "a"):
        p = subprocess.Popen(["cat", str(m.mnt / name)], stdout=subprocess.DEVNULL)
        assert p.wait(timeout=SH) == 0
        pids.append(p.pid)
    (m.backing / "a").write_text("alpha, changed\n")
    assert (m.mnt / "a").read_text() == "alpha, changed\n"
    recs = [json.loads(ln) for ln in (m.state / "audit.log").read_text().splitlines()]
    recs = [r for r in recs if r["type"] == "audit"]
    assert [(r["path"], r["hash"]) for r in recs] == [
        ("/a", "sha256:" + hashlib.sha256(b"alpha\n").hexdigest()),
        ("/b", "sha256:" + hashlib.sha256(b"beta\n").hexdigest()),
        ("/a", "sha256:" + hashlib.sha256(b"alpha, changed\n").hexdigest()),
    ]
    assert recs[0]["pid"] == pids[0] and recs[1]["pid"] == pids[2]
    assert recs[2]["pid"] == os.getpid()
    for r in recs:
        assert r["uid"] == 0 and r["rule"] == "audit func=FILE_CHECK mask=MAY_READ"
        assert r["func"] == "FILE_CHECK" and "time" in r
    assert count(m) == 1                      # audit does not measure


# -- hash algorithm and templates ----------------------------------------------------

TEMPLATES_POLICY = """\
measure func=FILE_CHECK mask=MAY_READ fowner=1000 template=ima-sig
measure func=FILE_CHECK mask=MAY_READ fowner=1001 template=ima
measure func=FILE_CHECK mask=MAY_READ
"""


def test_sha512_and_templates(make_mount, world_tmp):
    from helpers.testkeys import key
    from imafs.ima import appraise as ap

    b = world_tmp / "backing1"
    b.mkdir()
    for name, owner in (("plain", 0), ("signed", 1000), ("unsigned", 1000), ("old", 1001)):
        (b / name).write_text(f"content of {name}\n")
        os.chown(b / name, owner, owner)
    # the kernel hashes a file in its security.ima's algorithm (ima_get_hash_algo) and
    # records that digest, whatever the mount's --hash says
    sig = ap.sign_v2(key("rsa"), "sha256", sha("sha256", b / "signed"), 0x12345678)
    os.setxattr(b / "signed", "security.ima", sig)
    os.setxattr(b / "plain", "security.ima", ap.hash_xattr("sha384", sha("sha384", b / "plain")))
    m = mount_with(make_mount, world_tmp, TEMPLATES_POLICY, "--hash", "sha512", backing=b)
    for name in ("plain", "signed", "unsigned", "old"):
        (m.mnt / name).read_bytes()

    got = {e.name: e for e in entries(m)}
    assert got[b"boot_aggregate"].file_digest == (None, "sha512", bytes(64))
    e = got[b"/plain"]
    assert e.template == "ima-ng"
    assert e.fields == (b"sha384:\0" + sha("sha384", b / "plain"), b"/plain\0")
    e = got[b"/signed"]
    assert e.template == "ima-sig"
    assert e.fields == (b"sha256:\0" + sha("sha256", b / "signed"), b"/signed\0", sig)
    e = got[b"/unsigned"]
    assert e.template == "ima-sig" and e.fields[2] == b""
    assert e.fields[0] == b"sha512:\0" + sha("sha512", b / "unsigned")
    e = got[b"/old"]
    assert e.template == "ima"
    assert e.fields == (sha("sha1", b / "old"), b"/old\0")
    assert e.recorded_hash == hashlib.sha1(sha("sha1", b / "old") + b"/old".ljust(256, b"\0")).digest()
    # template hashes per bank, as the parser computes them and as recorded
    for e in got.values():
        assert e.template_hash("sha1") == e.recorded_hash
    by256 = list(parse_binary(binary_list(m, "sha256"), "sha256"))
    assert [e.fields for e in by256] == [e.fields for e in entries(m)]
    for e in by256:
        assert e.template_hash("sha256") == e.recorded_hash
    # the ascii list says the same (ima-sig without a signature ends in "name \n")
    ascii_ = m.ctl("ascii_runtime_measurements").read_bytes()
    assert [(e.template, e.fields, e.recorded_hash) for e in parse_ascii(ascii_)] == \
        [(e.template, e.fields, e.recorded_hash) for e in entries(m)]
    assert b" /unsigned \n" in ascii_
    assert f" ima-sig sha256:{sha('sha256', b / 'signed').hex()} /signed {sig.hex()}\n".encode() in ascii_
    # the ascii view of the sha256 bank: 64-hex template hashes, same entries
    lines256 = m.ctl("ascii_runtime_measurements_sha256").read_bytes().splitlines()
    assert [bytes.fromhex(ln.split()[1].decode()) for ln in lines256] == \
        [e.recorded_hash for e in by256]
    check_replay(m)


# -- names ----------------------------------------------------------------------

def test_odd_names_recorded_as_the_kernel_does(make_mount, world_tmp):
    m = mount_with(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n")
    b = bytes(m.backing)
    os.mkdir(b + b"/dir with space")
    names = [b"/dir with space/file  two", b"/new\nline", b"/raw\xff\xfe bytes", b"/tab\there",
             b"/" + b"l" * 250]
    for n in names:
        with open(b + n, "wb") as f:
            f.write(n)
    for n in names:
        with open(bytes(m.mnt) + n, "rb") as f:
            assert f.read() == n
    recorded = {e.name: e for e in entries(m)}
    for n in names:
        want = n.replace(b" ", b"_")               # the kernel's only rewrite of a name
        assert want in recorded, (n, list(recorded))
        assert recorded[want].file_digest[2] == hashlib.sha256(n).digest()
    # the binary list is exact; the ascii line of a name with a newline prints it
    # \012 (the kernel's %s would split the line), and parses back to the name
    ascii_ = m.ctl("ascii_runtime_measurements").read_bytes()
    assert b" /new\\012line\n" in ascii_
    assert {e.name for e in parse_ascii(ascii_)} == set(recorded)
    assert b" /raw\xff\xfe_bytes\n" in ascii_
    check_replay(m)


# -- one hash for a hundred openers; bounded memory ----------------------------------------

def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_hundred_openers_hash_once(make_mount, world_tmp):
    from imafs.fs.daemon import daemon_pid

    m = mount_with(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n")
    size = 256 << 20
    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    with open(m.backing / "big", "wb") as f:
        for i in range(size >> 20):
            chunk = block[i:] + block[:i]
            f.write(chunk)
            h.update(chunk)
    pid = daemon_pid(str(m.state))
    assert pid
    hwm0 = _hwm_kib(pid)
    before = json.loads(m.ctl("stats").read_text())

    r, w = os.pipe()
    kids = []
    target = os.fsencode(m.mnt / "big")
    for _ in range(100):
        k = os.fork()
        if k == 0:                                  # child: wait for the start signal
            code = 1
            try:
                os.close(w)
                os.read(r, 1)
                fd = os.open(target, os.O_RDONLY)
                code = 0 if os.read(fd, 1) == block[:1] else 2
                os.close(fd)
            finally:
                os._exit(code)
        kids.append(k)
    os.close(r)
    os.write(w, b"x" * 100)                          # all at once
    os.close(w)
    deadline = time.monotonic() + 40
    codes = []
    for k in kids:
        while True:
            done, status = os.waitpid(k, os.WNOHANG)
            if done:
                codes.append(os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() > deadline:
                os.kill(k, 9)
            time.sleep(0.005)
    assert codes == [0] * 100

    after = json.loads(m.ctl("stats").read_text())
    assert after["hashed_files"] - before["hashed_files"] == 1
    assert after["hashed_bytes"] - before["hashed_bytes"] == size
    big = [e for e in entries(m) if e.name == b"/big"]
    assert len(big) == 1 and big[0].file_digest[2] == h.digest()
    # the daemon never held the file: its peak RSS grew far less than the file's size
    assert _hwm_kib(pid) - hwm0 < 64 * 1024, (hwm0, _hwm_kib(pid))
    assert stat.S_IMODE(os.stat(m.ctl("stats")).st_mode) == 0o440


# -- the control directory ----------------------------------------------------------

CTL_FILES = {"policy", "ascii_runtime_measurements", "ascii_runtime_measurements_sha1",
             "ascii_runtime_measurements_sha256", "binary_runtime_measurements",
             "binary_runtime_measurements_sha1", "binary_runtime_measurements_sha256",
             "runtime_measurements_count", "violations", "pcrs", "query", "stats", "keys"}


def test_control_directory(make_mount, world_tmp):
    m = mount_with(make_mount, world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n")
    (m.backing / "visible").write_text("x")
    ls = run(["ls", "-a", str(m.mnt)], text=True).stdout.split()
    assert ls == [".", "..", "visible"]
    assert ".imafs" not in os.listdir(m.mnt)
    assert stat.S_ISDIR(os.stat(m.ctl()).st_mode)               # reachable by path
    assert CTL_FILES <= set(os.listdir(m.ctl()))
    assert sorted(os.listdir(m.ctl("pcrs"))) == ["sha1", "sha256"]
    for bank in HASH_SIZE:
        read_pcrs(m, bank)                                       # 24 lines, evmctl format
    # nothing can be created in or over it
    for bad in (lambda: os.mkdir(m.ctl("new")), lambda: os.mkdir(m.ctl()),
                lambda: os.rename(m.mnt / "visible", m.ctl("x"))):
        with pytest.raises(OSError) as ei:
            bad()
        assert ei.value.errno in (errno.EPERM, errno.EEXIST, errno.EACCES)
    # a non-root process sees the directory, but neither reads the lists nor writes policy
    r = run_as(1000, 1000, [BUSYBOX, "cat", str(m.ctl("ascii_runtime_measurements"))],
               capture_output=True, text=True, timeout=SH)
    assert r.returncode != 0 and "Permission denied" in r.stderr

    # --control-name renames it; --policy tcb is the kernel's tcb policy
    from imafs.ima.policy_parse import BUILTIN_POLICIES
    m2 = make_mount(["--policy", "tcb", "--control-name", "ima-ctl"])
    ctl2 = m2.mnt / "ima-ctl"
    assert not os.path.exists(m2.mnt / ".imafs")
    assert os.listdir(m2.mnt) == []
    assert (ctl2 / "policy").read_text() == BUILTIN_POLICIES["tcb"]
    (m2.backing / "root-reads").write_text("measured by tcb (uid=0, not tmpfs)\n")
    (m2.mnt / "root-reads").read_text()
    tmpfs = _fs_magic(m2.backing) == 0x01021994     # tcb: dont_measure FILE_CHECK on tmpfs
    assert int((ctl2 / "runtime_measurements_count").read_text()) == (1 if tmpfs else 2)

    # no --policy: no rules, nothing measured, until rules are written
    m3 = make_mount([])
    (m3.backing / "f").write_text("x")
    (m3.mnt / "f").read_text()
    assert m3.ctl("policy").read_text() == ""
    assert int(m3.ctl("runtime_measurements_count").read_text()) == 1
    m3.ctl("policy").write_text("measure func=FILE_CHECK\n")
    (m3.mnt / "f").read_text()
    assert int(m3.ctl("runtime_measurements_count").read_text()) == 2


def _fs_magic(path) -> int:
    import ctypes
    buf = (ctypes.c_long * 16)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.statfs(os.fsencode(str(path)), buf) == 0
    return buf[0] & 0xFFFFFFFF


def test_policy_file(make_mount, world_tmp):
    text = "measure func=FILE_CHECK mask=MAY_READ\ndont_measure fsmagic=0x9fa0\n"
    m = mount_with(make_mount, world_tmp, text)
    pol = m.ctl("policy")
    shown = pol.read_text()
    # the kernel's format: every keyword followed by a space, fsmagic in hex
    assert shown == "measure func=FILE_CHECK mask=MAY_READ \ndont_measure fsmagic=0x9fa0 \n"
    # offline check prints the same text
    r = run(IMAFS + ["policy", "check", str(policy_file(world_tmp, text))], text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout == shown

    # root appends rules
    with open(pol, "a") as f:
        f.write("measure func=BPRM_CHECK\naudit func=MMAP_CHECK\n")
    shown += "measure func=BPRM_CHECK \naudit func=MMAP_CHECK \n"
    assert pol.read_text() == shown

    # a bad line rejects the whole write: EINVAL, old policy kept, reason logged
    fd = os.open(pol, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.write(fd, b"measure func=POLICY_CHECK\nmeasure func=NO_SUCH_HOOK\n")
        assert ei.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert pol.read_text() == shown
    assert re.search(r"policy write to namespace / rejected \(pid \d+\): line 2, column \d+: .*",
                     m.log_text()), m.log_text()[-2000:]

    # not root: EACCES, whatever the mode of the caller's descriptor
    r = run_as(1000, 1000, [BUSYBOX, "sh", "-c", f"echo 'measure func=BPRM_CHECK' >> {pol}"],
               capture_output=True, text=True, timeout=SH)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    assert pol.read_text() == shown
    # the offline checker refuses what the control file refuses, with line and column
    bad = policy_file(world_tmp, "measure func=FILE_CHECK\nmeasure bogus=1\n")
    r = run(IMAFS + ["policy", "check", str(bad)], text=True, cwd=REPO)
    assert r.returncode == 1 and "line 2, column" in r.stderr


def test_query(make_mount, world_tmp):
    b = world_tmp / "backing1"
    b.mkdir()
    (b / "good").write_text("appraised and measured\n")
    (b / "bad").write_text("no hash\n")
    for n in ("good", "bad"):
        os.chown(b / n, 1234, 1234)
    from imafs.ima import appraise as ap
    os.setxattr(b / "good", "security.ima", ap.hash_xattr("sha256", sha("sha256", b / "good")))
    m = mount_with(make_mount, world_tmp,
                   "measure func=FILE_CHECK mask=MAY_READ\nappraise func=FILE_CHECK fowner=1234\n",
                   backing=b)
    assert (m.mnt / "good").read_text() == "appraised and measured\n"
    with pytest.raises(PermissionError):
        (m.mnt / "bad").read_text()

    q = m.query("/good")
    assert q["path"] == "/good" and q["namespace"] == "/"
    (ns,) = q["namespaces"]
    assert ns["digest"] == "sha256:" + sha("sha256", b / "good").hex()
    assert ns["measured_pcrs"] == [10]
    (hook,) = ns["hooks"]
    assert hook["func"] == "FILE_CHECK" and hook["decision"]["measure"]
    assert hook["decision"]["rules"]["measure"]["rule"] == "measure func=FILE_CHECK mask=MAY_READ"
    assert hook["decision"]["rules"]["appraise"]["rule"] == "appraise func=FILE_CHECK fowner=1234"
    assert hook["appraisal"]["allowed"] and hook["appraisal"]["status"] == "pass"

    q = m.query(str(m.mnt / "bad"))                      # a host path below the mount works too
    (ns,) = q["namespaces"]
    assert ns["measured_pcrs"] == [10]           # measured, then refused, as the kernel does
    (hook,) = ns["hooks"]
    assert not hook["appraisal"]["allowed"] and hook["appraisal"]["status"] != "pass"
    assert hook["appraisal"]["cause"]

    q = m.query("/no/such/file")
    assert q == {"path": "/no/such/file", "error": "No such file or directory"}
    # the last answer stays readable by a later open
    assert json.loads(m.ctl("query").read_text()) == q
