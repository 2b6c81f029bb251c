"""A real root filesystem through imafs: Debian bookworm minbase (debootstrap, built
once by scripts/rootfs.sh into a cache), every file signed with ``imafs sign -r``,
mounted with the kernel's ``appraise_tcb`` rules plus measurement and signature
appraisal of executables and shared libraries, and real programs run in a container
(``unshare --pid`` + ``chroot`` into the mount, in their own integrity namespace).

Skipped when the cache does not exist, unless IMAFS_BUILD_ROOTFS=1 (then the test
builds it; about 40 s on a fast mirror). ``./scripts/test`` builds the cache first when
it can (see scripts/lib/setup.sh, imafs_rootfs). Timings go to stdout (``-s``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO, Mount, force_unmount, is_mounted
from imafs.ima.policy_parse import BUILTIN_POLICIES

pytestmark = [pytest.mark.slow, pytest.mark.mount, pytest.mark.timeout(900)]

CACHE = Path(os.environ.get("IMAFS_ROOTFS_CACHE", "/var/cache/imafs/rootfs-bookworm-minbase"))

# The first matching appraise rule decides, so the signature rules for executables and
# libraries go before appraise_tcb's "appraise fowner=0" (which accepts a hash), as
# the kernel puts its secure_boot signature rules before the appraise_tcb ones.
POLICY = (
    "measure func=BPRM_CHECK\n"
    "measure func=MMAP_CHECK mask=MAY_EXEC\n"
    "appraise func=BPRM_CHECK appraise_type=imasig\n"
    "appraise func=MMAP_CHECK appraise_type=imasig\n") + BUILTIN_POLICIES["appraise_tcb"]

# (name, shell command, check of its stdout)
COMMANDS = [
    ("sh", "sh -c 'echo ok'", lambda out: out == "ok\n"),
    ("dpkg", "dpkg -l", lambda out: "ii  dpkg " in out and "ii  apt " in out),
    ("apt-get", "apt-get --version", lambda out: out.startswith("apt ")),
    ("ls-lR", "ls -lR /usr", lambda out: "/usr/bin:" in out and out.count("\n") > 1000),
    ("tar", "tar c /usr 2>/dev/null | wc -c", lambda out: int(out) > 50 << 20),
]

TIMINGS: dict[str, float] = {}


def _cache_ready() -> bool:
    return Path(str(CACHE) + ".complete").is_file() and CACHE.is_dir()


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="module")
def rootfs_mount():
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, unshare, security.ima)")
    for tool in ("unshare", "chroot", "evmctl"):
        _need(tool)
    if not _cache_ready():
        if os.environ.get("IMAFS_BUILD_ROOTFS", "") in ("", "0"):
            pytest.skip(f"no cached Debian rootfs at {CACHE} (build it with scripts/rootfs.sh, "
                        f"or set IMAFS_BUILD_ROOTFS=1 to let this test build it)")
        _need("debootstrap")
        t = time.monotonic()
        p = subprocess.run([str(REPO / "scripts" / "rootfs.sh"), str(CACHE)],
                           capture_output=True, text=True, timeout=840)
        assert p.returncode == 0, p.stderr
        TIMINGS["debootstrap"] = time.monotonic() - t
    work = Path(tempfile.mkdtemp(prefix="imafs-rootfs-", dir="/tmp"))
    os.chmod(work, 0o755)
    mnt = None
    try:
        root = work / "rootfs"
        t = time.monotonic()
        subprocess.run(["cp", "-a", str(CACHE), str(root)], check=True)
        TIMINGS["copy"] = time.monotonic() - t
        keys = work / "keys"
        subprocess.run(IMAFS + ["keygen", "--out", str(keys), "--type", "ec"], check=True,
                       capture_output=True, cwd=REPO)
        t = time.monotonic()
        # every regular file: appraise_tcb appraises whatever root owns
        p = subprocess.run(IMAFS + ["sign", "-q", "--key", str(keys / "signing_key.pem"),
                                    "--cert", str(keys / "signing_cert.der"),
                                    "-r", "--skip-special", str(root)],
                           capture_output=True, text=True, cwd=REPO)
        TIMINGS["sign"] = time.monotonic() - t
        assert p.returncode == 0, p.stderr
        TIMINGS["files"] = sum(1 for d, _, fs in os.walk(root) for f in fs
                               if os.path.isfile(os.path.join(d, f))
                               and not os.path.islink(os.path.join(d, f)))
        (work / "policy").write_text(POLICY)
        mnt = Mount(root, work / "mnt", work / "state",
                    ["--policy", str(work / "policy"), "--keys", str(keys),
                     "--template", "ima-sig"])
        mnt.mnt.mkdir()
        t = time.monotonic()
        mnt.start()
        TIMINGS["mount"] = time.monotonic() - t
        mnt.keys = keys
        mnt.work = work
        yield mnt
    finally:
        if mnt is not None:
            mnt.stop()
            force_unmount(str(mnt.mnt))
            assert not is_mounted(str(mnt.mnt))
        shutil.rmtree(work, ignore_errors=True)
        if TIMINGS:
            print("\nreal rootfs timings: " + ", ".join(
                f"{k} {v:.2f}s" if isinstance(v, float) else f"{k} {v}"
                for k, v in TIMINGS.items()))


_ns = [0]


def container(m: Mount, script: str, timeout: float = 300):
    """``script`` under the rootfs's /bin/sh, pid 1 of a new pid namespace chrooted
    into the mount, in a fresh integrity namespace of its own."""
    _ns[0] += 1
    full = f"echo c{_ns[0]} > /.imafs/ns-create || exit 99\n{script}"
    return subprocess.run(["unshare", "--fork", "--kill-child", "--pid",
                           f"--mount-proc={m.mnt}/proc", "chroot", str(m.mnt),
                           "/bin/sh", "-c", full],
                          capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})


@pytest.mark.parametrize("name,cmd,check", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_real_programs_run(rootfs_mount, name, cmd, check):
    t = time.monotonic()
    r = container(rootfs_mount, cmd)
    TIMINGS[name] = time.monotonic() - t
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:], rootfs_mount.log_text()[-4000:])
    assert check(r.stdout), r.stdout[-2000:]


def test_unsigned_binaries_refused(rootfs_mount):
    m = rootfs_mount
    root = m.backing

    def copy(dst):          # content and mode; not security.ima (shutil.copy2 copies xattrs)
        shutil.copyfile(root / "usr/bin/ls", root / dst)
        os.chmod(root / dst, 0o755)
    # an unsigned copy, owned by root: appraise_tcb (fowner=0) refuses its very open
    copy("usr/local/bin/unsigned")
    # a copy with a valid hash but no signature: passes appraise_tcb, not the
    # BPRM_CHECK appraise_type=imasig rule
    copy("usr/local/bin/hashonly")
    subprocess.run(IMAFS + ["sign", "-q", "--hash-only", str(root / "usr/local/bin/hashonly")],
                   check=True, cwd=REPO)
    # a user's unsigned binary: no fowner=0 rule, still the exec rule
    copy("tmp/users")
    os.chown(root / "tmp/users", 1000, 1000)
    r = container(m, "/usr/bin/ls / >/dev/null && echo signed=ok\n"
                     "for b in /usr/local/bin/unsigned /usr/local/bin/hashonly /tmp/users; do\n"
                     "  $b / >/dev/null 2>&1; echo \"$b=$?\"\n"
                     "done\n")
    out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert out.get("signed") == "ok", r
    for b in ("/usr/local/bin/unsigned", "/usr/local/bin/hashonly", "/tmp/users"):
        assert out.get(b) == "126", (b, r)
    audit = (m.state / "audit.log").read_text()
    for b in ("unsigned", "hashonly", "users"):
        assert f'"path": "/{"tmp" if b == "users" else "usr/local/bin"}/{b}"' in audit


def test_lists_verify(rootfs_mount):
    """The host's list and a container's list replay against their PCRs (evmctl, with
    its signature check, and imafs verify-log)."""
    m = rootfs_mount
    r = container(m, "echo 'measure func=BPRM_CHECK' > /.imafs/policy &&\n"
                     "echo 'measure func=MMAP_CHECK mask=MAY_EXEC' > /.imafs/policy &&\n"
                     "apt-get --version >/dev/null && dpkg -l >/dev/null")
    assert r.returncode == 0, r
    work = m.work
    last = max(int(n[1:]) for n in os.listdir(m.ctl("namespaces")) if n[1:].isdigit())
    for label, ctl in (("host", m.ctl()), ("container", m.ctl(f"namespaces/c{last}"))):
        lst = work / f"{label}.bin"
        lst.write_bytes((ctl / "binary_runtime_measurements").read_bytes())
        pcrs = {}
        for bank in ("sha1", "sha256"):
            pcrs[bank] = work / f"{label}.{bank}"
            pcrs[bank].write_bytes((ctl / "pcrs" / bank).read_bytes())
        entries = len((ctl / "ascii_runtime_measurements").read_bytes().splitlines())
        assert entries > (100 if label == "host" else 10), label
        p = subprocess.run(["evmctl", "ima_measurement", "--ignore-violations", "--verify-sig",
                            "--key", str(m.keys / "signing_cert.der"),
                            "--pcrs", f"sha1,{pcrs['sha1']}", "--pcrs", f"sha256,{pcrs['sha256']}",
                            str(lst)], capture_output=True, text=True)
        assert p.returncode == 0, (label, p.stdout[-2000:], p.stderr[-2000:])
        assert "verification failed" not in p.stderr, (label, p.stderr[-2000:])
        t = time.monotonic()
        p = subprocess.run(IMAFS + ["verify-log", str(lst), "--pcrs", f"sha1,{pcrs['sha1']}",
                                    "--pcrs", f"sha256,{pcrs['sha256']}", "--keys", str(m.keys)],
                           capture_output=True, text=True, cwd=REPO)
        TIMINGS[f"verify-log {label} ({entries} entries)"] = time.monotonic() - t
        assert p.returncode == 0, (label, p.stdout[-2000:], p.stderr[-2000:])
        assert "0 violations" in p.stdout, p.stdout
