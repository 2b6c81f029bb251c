"""``imafs mount --tpm``: the root namespace's list is also extended into a TPM 2.0.

Debian's swtpm runs on a free loopback port for each test (always stopped at
teardown); tpm2-tools reads its PCRs as a verifier would, and the values must equal the
mount's ``pcrs/`` files and the replay of its binary list (imafs verify-log, evmctl)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO
from imafs.ima.templates import parse_ascii

pytestmark = [pytest.mark.interop, pytest.mark.mount]

for _tool in ("swtpm", "tpm2_pcrread", "tpm2_pcrextend", "evmctl"):
    if shutil.which(_tool) is None:
        pytestmark.append(pytest.mark.skip(reason=f"{_tool} is not installed"))
try:
    import tpm2_pytss  # noqa: F401
except ImportError as _e:
    pytestmark.append(pytest.mark.skip(reason=f"tpm2-pytss is not installed: {_e}"))

POLICY = ("measure func=BPRM_CHECK\n"
          "measure func=FILE_CHECK mask=MAY_READ\n")


def _free_port_pair() -> int:
    """A port P with P and P+1 free on 127.0.0.1 (swtpm's server and control ports)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair on 127.0.0.1")


class SWTPM:
    """swtpm on 127.0.0.1:port (control port+1), state in ``state``."""

    def __init__(self, state: Path):
        self.state = state
        self.port = _free_port_pair()
        self.tcti = f"swtpm:host=127.0.0.1,port={self.port}"
        self.proc = None

    def start(self) -> "SWTPM":
        self.state.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear", "--tpmstate", f"dir={self.state}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"swtpm exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("swtpm did not listen")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        if p.stderr:
            p.stderr.close()

    def tools(self, *argv, check=True) -> str:
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        r = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=30)
        if check:
            assert r.returncode == 0, (argv, r.stderr)
        return r.stdout

    def pcrread(self, spec: str = "sha1:10+sha256:10") -> dict[str, dict[int, bytes]]:
        """tpm2_pcrread, parsed: {bank: {pcr: value}}."""
        out, bank = {}, None
        for line in self.tools("tpm2_pcrread", spec).splitlines():
            m = re.match(r"\s*(sha\w+):\s*$", line)
            if m:
                bank = m.group(1)
                continue
            m = re.match(r"\s*(\d+)\s*:\s*0x([0-9A-Fa-f]+)", line)
            if m and bank:
                out.setdefault(bank, {})[int(m.group(1))] = bytes.fromhex(m.group(2))
        return out


@pytest.fixture
def swtpm(world_tmp):
    t = SWTPM(world_tmp / "swtpm-state")
    try:
        yield t.start()
    finally:
        t.stop()


def pcr_file(path: Path, n: int = 10) -> bytes:
    for line in path.read_text().splitlines():
        if line.startswith(f"PCR-{n:02d}:"):
            return bytes.fromhex(line.split(":", 1)[1].strip())
    raise AssertionError(f"no PCR-{n:02d} in {path}")


def backing_files(backing: Path) -> None:
    (backing / "bin").mkdir(exist_ok=True)
    shutil.copy("/bin/busybox", backing / "bin" / "busybox")
    for i in range(5):
        (backing / f"file{i}").write_text(f"content {i}\n")


def assert_tpm_matches(m, tpm: SWTPM) -> dict[str, dict[int, bytes]]:
    """tpm2_pcrread == pcrs/ (PCR 10, both banks) == the replay of the binary list."""
    hw = tpm.pcrread()
    for bank in ("sha1", "sha256"):
        assert hw[bank][10] == pcr_file(m.ctl(f"pcrs/{bank}")), bank
        assert any(hw[bank][10]), bank
    lst = m.state / "list.bin"
    lst.write_bytes(m.ctl("binary_runtime_measurements").read_bytes())
    r = subprocess.run(IMAFS + ["verify-log", str(lst), "--pcr", f"sha1:10={hw['sha1'][10].hex()}",
                                "--pcr", f"sha256:10={hw['sha256'][10].hex()}"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "sha1 PCR 10 match" in r.stdout and "sha256 PCR 10 match" in r.stdout, r.stdout
    # evmctl, with the TPM's values in its PCR file format
    for bank in ("sha1", "sha256"):
        size = hashlib.new(bank).digest_size
        (m.state / f"tpm.{bank}").write_text("".join(
            f"PCR-{i:02d}: {(hw[bank][10] if i == 10 else bytes(size)).hex()}\n"
            for i in range(11)))
    r = subprocess.run(["evmctl", "ima_measurement", "--ignore-violations",
                        "--pcrs", f"sha1,{m.state / 'tpm.sha1'}",
                        "--pcrs", f"sha256,{m.state / 'tpm.sha256'}", str(lst)],
                       capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return hw


def test_tpm_pcr10_matches_list(make_mount, world_tmp, swtpm):
    # PCR 0 as firmware would leave it, so the boot aggregate is not a constant
    swtpm.tools("tpm2_pcrextend", "0:sha1=" + "11" * 20 + ",sha256=" + "22" * 32)
    backing = world_tmp / "b"
    backing.mkdir()
    backing_files(backing)
    (world_tmp / "policy").write_text(POLICY)
    m = make_mount(["--policy", str(world_tmp / "policy"), "--tpm", swtpm.tcti], backing=backing)
    # boot aggregate: sha256 over the TPM's PCRs 0-9 (sha256 bank), as the kernel does
    regs = swtpm.pcrread("sha256:0,1,2,3,4,5,6,7,8,9")["sha256"]
    agg = hashlib.sha256(b"".join(regs[i] for i in range(10))).digest()
    first = next(iter(parse_ascii(m.ctl("ascii_runtime_measurements").read_bytes())))
    assert first.name == b"boot_aggregate"
    assert first.get("d-ng") == b"sha256:\0" + agg     # "algo:" NUL digest, as the kernel
    # execs and reads through the mount
    r = subprocess.run([str(m.mnt / "bin/busybox"), "cat"] + [str(m.mnt / f"file{i}")
                                                              for i in range(5)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "content 4" in r.stdout, r
    # a violation (ToMToU: a write-open while a measured reader holds the file):
    # 0xff.. goes into both the list's PCRs and the TPM's
    with open(m.mnt / "file0") as reader:
        with open(m.mnt / "file0", "a") as w:
            w.write("more\n")
        reader.read()
    assert int(m.ctl("violations").read_text()) == 1
    assert (m.mnt / "file0").read_text() == "content 0\nmore\n"   # measured again
    entries = int(m.ctl("runtime_measurements_count").read_text())
    assert entries >= 9
    assert_tpm_matches(m, swtpm)
    # the other banks of the TPM were extended too (the kernel extends every bank)
    assert any(swtpm.pcrread("sha384:10")["sha384"][10])


def test_tpm_many_opens_in_parallel(make_mount, world_tmp, swtpm):
    """Appends from many worker threads reach the TPM in list order."""
    backing = world_tmp / "b"
    backing.mkdir()
    for i in range(60):
        (backing / f"f{i}").write_bytes(os.urandom(1000 + i))
    (world_tmp / "policy").write_text(POLICY)
    m = make_mount(["--policy", str(world_tmp / "policy"), "--tpm", swtpm.tcti], backing=backing)

    def reader(k):
        for i in range(k, 60, 6):
            (m.mnt / f"f{i}").read_bytes()
    threads = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(m.ctl("runtime_measurements_count").read_text()) == 61
    assert_tpm_matches(m, swtpm)


def test_tpm_remount_and_reset(make_mount, world_tmp, swtpm):
    """A remount on the same TPM continues; a reset TPM (swtpm restarted) gets the
    whole list again, whether it was reset between mounts or under a running mount."""
    backing = world_tmp / "b"
    backing.mkdir()
    backing_files(backing)
    (world_tmp / "policy").write_text(POLICY)
    m = make_mount(["--policy", str(world_tmp / "policy"), "--tpm", swtpm.tcti], backing=backing)
    (m.mnt / "file1").read_text()
    assert_tpm_matches(m, swtpm)
    m.restart()                                       # same state, same TPM: in sync
    (m.mnt / "file2").read_text()
    assert_tpm_matches(m, swtpm)
    m.stop()
    swtpm.stop()
    swtpm.start()                                     # startup-clear: PCRs reset
    assert not any(swtpm.pcrread()["sha256"][10])
    m.start()                                         # replays the list
    assert "at their reset value" in m.log_text()
    (m.mnt / "file3").read_text()
    assert_tpm_matches(m, swtpm)
    # the TPM goes away under the mount: a measured open fails closed (EIO) ...
    swtpm.stop()
    with pytest.raises(OSError) as e:
        (m.mnt / "file4").read_text()
    assert e.value.errno == 5
    assert "TPM" in m.log_text()
    # ... and once it is back (reset), the next open extends what was pending
    swtpm.start()
    assert (m.mnt / "file4").read_text() == "content 4\n"
    assert_tpm_matches(m, swtpm)


def test_tpm_unreachable_refused(make_mount, world_tmp):
    port = _free_port_pair()
    m = make_mount(["--tpm", f"swtpm:host=127.0.0.1,port={port}"], start=False)
    with pytest.raises(RuntimeError) as e:
        m.start()
    assert "--tpm" in str(e.value) and f"port={port}" in str(e.value)
    r = subprocess.run(IMAFS + ["mount", str(m.backing), str(m.mnt), "--tpm", "bad tcti"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "--tpm" in r.stderr


def test_tpm_pcr10_in_use_refused(make_mount, swtpm):
    """A TPM whose PCR 10 holds someone else's measurements (kernel IMA's, on a real
    machine) is refused: its PCR 10 could never match the list."""
    swtpm.tools("tpm2_pcrextend", "10:sha256=" + "33" * 32)
    m = make_mount(["--tpm", swtpm.tcti], start=False)
    with pytest.raises(RuntimeError) as e:
        m.start()
    assert "PCR 10" in str(e.value) and "something else extends" in str(e.value)
