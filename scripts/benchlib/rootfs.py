"""The real root filesystem (``--rootfs [DIR]``, by default the Debian minbase that
scripts/rootfs.sh caches): whether DIR is one, its copy in the work directory with every
file signed, and the commands run in it (``chroot ROOT /bin/sh -c CMD``, ROOT the copy
or the mount, so the dynamic loader and the libraries are read through the mount)."""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchlib import DEFAULT_ROOTFS, ROOTFS, read_files
from benchlib.runs import Run, Sizes, Workload, contains, int_out, ok, same_count, starts

if TYPE_CHECKING:
    from benchlib.run import Bench

CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LC_ALL": "C", "HOME": "/root", "TERM": "dumb"}


def rootfs_problem(d: str) -> str | None:
    """Why DIR cannot be used as --rootfs (one line), or None."""
    p = Path(d)
    hint = f"build it with scripts/rootfs.sh{'' if d == DEFAULT_ROOTFS else ' ' + d}"
    if not p.is_dir():
        return f"bench: no root filesystem at {d} ({hint})"
    if Path(d + ".lock").exists() and not Path(d + ".complete").exists():
        return f"bench: {d} is an unfinished scripts/rootfs.sh build ({hint})"
    if not os.path.lexists(p / "bin" / "sh") or not (p / "usr").is_dir():
        return f"bench: {d} has no bin/sh or usr/: not a root filesystem ({hint})"
    if shutil.which("chroot") is None:
        return "bench: --rootfs needs chroot(8) (coreutils)"
    return None


def built_record(marker_line: str) -> str:
    """What the results keep of scripts/rootfs.sh's marker line ("suite=... mirror=...
    seconds=... date=..."): the Debian suite and the date only. The mirror the rootfs
    was fetched from is no part of a result (results are committed, and no mirror or
    registry address may be)."""
    fields = dict(f.split("=", 1) for f in marker_line.split() if "=" in f)
    return " ".join(f"{k}={fields[k]}" for k in ("suite", "date") if k in fields)[:120]


def build_rootfs(b: "Bench") -> dict:
    """The copy of --rootfs at b.rootfs (cp -a: owners, modes, xattrs, devices), every
    regular file signed (imafs sign -r --skip-special); what the report says of it."""
    src = Path(b.args.rootfs)
    t0 = time.monotonic()
    p = subprocess.run(["cp", "-a", str(src), str(b.rootfs)], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"cp -a {src}: {p.stderr.strip()[-200:]}")
    t1 = time.monotonic()
    b.imafs(b.sign_args() + ["--skip-special", str(b.rootfs)])
    t2 = time.monotonic()
    files = size = 0
    for dirpath, _, names in os.walk(b.rootfs):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    info = {"source": str(src), "files": files, "bytes": size,
            "copy_s": t1 - t0, "sign_s": t2 - t1}
    marker = Path(str(src) + ".complete")
    with contextlib.suppress(OSError, IndexError):
        info["built"] = built_record(marker.read_text().splitlines()[0])
    b.log(f"bench: rootfs ready: {files:,} files, {size / 2**20:.0f} MiB, copied in "
          f"{t1 - t0:.1f} s, signed in {t2 - t1:.1f} s ({b.rootfs})")
    return info


def _chroot(root: Path, script: str, check) -> Run:
    return Run(["chroot", str(root), "/bin/sh", "-c", script], root, check, env=CHROOT_ENV)


def _r_true(b: "Bench", root: Path) -> Run:
    n = b.sizes.rootfs_execs
    # the loop of the issue, with a failed exec ending it (the status of a plain for
    # loop is only its last command's) and the count printed for the check
    return _chroot(root, f'for i in $(seq {n}); do /bin/true || exit 1; done; echo "$i"',
                   int_out(n, "execs"))


def _r_dpkg(b: "Bench", root: Path) -> Run:
    return _chroot(root, "dpkg -l", contains("ii  dpkg ", "ii  apt "))


def _r_apt(b: "Bench", root: Path) -> Run:
    return _chroot(root, "apt-get --version", starts("apt "))


def _r_ls(b: "Bench", root: Path) -> Run:
    return _chroot(root, "ls -lR /usr > /dev/null", ok)


def _r_tar(b: "Bench", root: Path) -> Run:
    return _chroot(root, "tar c /usr | wc -c", same_count(b, "r-tar", 10 << 20, "tar bytes"))


def _warm_rootfs(b: "Bench") -> None:
    read_files(b.rootfs)


def rootfs_workloads(s: Sizes) -> list[Workload]:
    r = dict(target=ROOTFS, warm=_warm_rootfs)
    return [
        Workload("r-true", f"sh -c 'for i in $(seq {s.rootfs_execs}); do /bin/true; done'",
                 _r_true, s.rootfs_execs, "execs/s", **r),
        Workload("r-dpkg", "dpkg -l", _r_dpkg, **r),
        Workload("r-apt", "apt-get --version", _r_apt, **r),
        Workload("r-ls", "ls -lR /usr > /dev/null", _r_ls, **r),
        Workload("r-tar", "tar c /usr | wc -c", _r_tar, **r),
    ]
