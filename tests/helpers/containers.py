"""Containers for the namespace tests: a busybox rootfs, processes started in a
namespace of a mount, its measurement list and cgroup, host commands, keys."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from helpers.mounts import IMAFS, REPO
from imafs.ima.keys import keyid_of
from imafs.ima.templates import parse_ascii


BUSYBOX = "/bin/busybox"

APPLETS = ("sh cat ls echo sleep setsid ps printf mkdir test wc grep head tr cp id true "
           "false kill stat").split()

MEASURE_READS = "measure func=FILE_CHECK mask=MAY_READ\n"


# ------------------------------------------------------------------ helpers
def rootfs(backing: Path) -> None:
    """A busybox root filesystem in the backing directory."""
    (backing / "bin").mkdir()
    shutil.copy(BUSYBOX, backing / "bin" / "busybox")
    for a in APPLETS:
        os.symlink("busybox", backing / "bin" / a)
    for d in ("proc", "dev", "tmp", "keys"):
        (backing / d).mkdir()
    os.chmod(backing / "tmp", 0o1777)
    os.mknod(backing / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def container(m, script: str, *, timeout: float = 30, wait: bool = True):
    """Run ``script`` under /bin/sh of the mount, pid 1 of a new pid namespace,
    chrooted into the mount (its own /proc)."""
    argv = ["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={m.mnt}/proc",
            "chroot", str(m.mnt),
            "/bin/sh", "-c", script]
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def host_sh(script: str, *, timeout: float = 30, pidns: bool = True, **kw):
    """A shell of the host's tools (setfattr, setpriv, python), optionally in a new pid
    namespace: for what busybox inside the mount cannot do. bash: its messages name the
    errno of a failed write (dash says "I/O error" for all)."""
    argv = (["unshare", "--fork", "--kill-child", "--pid", "--mount-proc"] if pidns else []) + \
        ["bash", "-c", script]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def keygen(d: Path) -> Path:
    subprocess.run(IMAFS + ["keygen", "--out", str(d), "--type", "ec"], check=True,
                   capture_output=True, cwd=REPO)
    return d


def sign(key: Path, *paths, print_only=False) -> str:
    r = subprocess.run(IMAFS + ["sign", "-q", "--key", str(key / "signing_key.pem"), "--cert",
                                str(key / "signing_cert.der")] + (["-n"] if print_only else [])
                       + [str(p) for p in paths], check=True, capture_output=True, text=True,
                       cwd=REPO)
    return r.stdout


def keyid(key: Path) -> str:
    return f"{keyid_of((key / 'signing_cert.der').read_bytes()):08x}"


def names(list_text: str | bytes) -> list[bytes]:
    data = list_text.encode() if isinstance(list_text, str) else list_text
    return [e.name for e in parse_ascii(data)]


def entries(path: Path):
    return list(parse_ascii(path.read_bytes()))


def ns_bufs(path: Path, event: bytes) -> list[str]:
    return [e.get("buf").decode() for e in entries(path) if e.name == event]


def buf_id(buf: str) -> int:
    return int(re.search(r" id=(\d+) ", buf).group(1))


def lines(r) -> dict[str, str]:
    """key=value lines a container script printed."""
    out = {}
    for line in r.stdout.splitlines():
        k, eq, v = line.partition("=")
        if eq:
            out[k] = v
    return out


def cg_key(m) -> str:
    """The key of the mount's cgroup hierarchy (kept in the state; the daemon logs it
    at mount). The hierarchy is mounted nowhere: cg_dirs looks into it."""
    found = re.findall(r"namespace binding: pid namespaces; cgroup hierarchy "
                       r"name=imafs\.(\w+) mounted nowhere", m.log_text())
    assert found, "no 'namespace binding' line in the daemon's log"
    return found[-1]
