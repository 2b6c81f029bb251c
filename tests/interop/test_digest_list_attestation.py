"""The measurement list of a mount that measures with digest lists, checked by the
verifiers: evmctl ima_measurement replays it against the mount's PCR banks, and
keylime's own checker (scripts/keylime_check.py) accepts it against a runtime policy
that allows the digest list -- the keylime-verifiable configuration of
docs/digest-lists.md: everything on PCR 10 -- and names a program from no package
that ran."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers.mounts import IMAFS, REPO, Mount, overlay_of

pytestmark = [pytest.mark.interop, pytest.mark.mount, pytest.mark.slow,
              pytest.mark.timeout(900)]

EVMCTL = shutil.which("evmctl")
POLICY = """\
measure func=DIGEST_LIST_CHECK
appraise func=DIGEST_LIST_CHECK appraise_type=imasig
measure func=BPRM_CHECK digest_cache=content pcr=10
measure func=MMAP_CHECK digest_cache=content pcr=10
"""


def run(*args, ok=True, **kw):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if ok is not None:
        assert (p.returncode == 0) == ok, f"{args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def keylime_check(m: Mount, policy) -> subprocess.CompletedProcess:
    return run(sys.executable, REPO / "scripts" / "keylime_check.py", policy,
               m.ctl("ascii_runtime_measurements"), m.ctl("pcrs/sha256"), ok=None, cwd=REPO)


def test_evmctl_and_keylime_accept_a_digest_list_mount(debian_rootfs, debian_digest_list,
                                                       tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("chroot") is None:
        pytest.skip("needs root and chroot")
    pytest.importorskip("keylime")
    work = tmp_path_factory.mktemp("dl-attest")
    os.chmod(work, 0o755)
    with overlay_of(debian_rootfs, work / "ov") as root:
        (root / "lists").mkdir()
        shutil.copy2(debian_digest_list.list, root / "lists" / "debian.list")
        stray = root / "usr/local/bin/stray"
        stray.write_bytes((root / "usr/bin/true").read_bytes() + b"\0")
        stray.chmod(0o755)
        (work / "policy").write_text(POLICY)
        m = Mount(root, work / "mnt", work / "state",
                  ["--policy", str(work / "policy"), "--keys", str(debian_digest_list.keys)])
        m.mnt.mkdir()
        m.start()
        try:
            run(*IMAFS, "digest-list", "load", m.mnt, m.mnt / "lists/debian.list", cwd=REPO)
            for cmd in ("dpkg -l", "apt-get --version", "ls -l /usr/bin"):
                run("chroot", m.mnt, "/bin/sh", "-c", cmd)
            names = [ln.split()[4] for ln in
                     m.ctl("ascii_runtime_measurements").read_text().splitlines()]
            assert names == ["boot_aggregate", "/lists/debian.list"]
            # keylime's runtime policy allows the list (made from the lists alone)
            allowed = work / "allowed"
            (allowed / "lists").mkdir(parents=True)
            shutil.copyfile(debian_digest_list.list, allowed / "lists" / "debian.list")
            policy = work / "policy.json"
            run(*IMAFS, "keylime-policy", "--rootfs", allowed, "--boot-aggregate", "zero",
                "--output", policy, cwd=REPO)
            assert sorted(json.loads(policy.read_text())["digests"]) == [
                "/lists/debian.list", "boot_aggregate"]
            p = keylime_check(m, policy)
            assert p.returncode == 0, p.stdout + p.stderr
            if EVMCTL:
                p = run(EVMCTL, "ima_measurement", "--pcrs", f"sha1,{m.ctl('pcrs/sha1')}",
                        "--pcrs", f"sha256,{m.ctl('pcrs/sha256')}",
                        m.ctl("binary_runtime_measurements"), ok=None)
                assert p.returncode == 0, p.stdout + p.stderr
            # a program from no package: measured on PCR 10 as well, and keylime says so
            run("chroot", m.mnt, "/usr/local/bin/stray")
            p = keylime_check(m, policy)
            assert p.returncode == 1 and "/usr/local/bin/stray" in p.stdout + p.stderr
        finally:
            m.stop()
