"""The workloads on the synthetic tree, and the choice of workloads and measurements a
run makes (``--only``). The backing holds ``tree/`` (only the small files: dNN/fNNNNN),
``big/file`` and ``bin/busybox`` (a static busybox)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from benchlib import ROOTFS, read_files
from benchlib.measure import MICRO
from benchlib.rootfs import rootfs_workloads
from benchlib.runs import Run, Sizes, Workload, at_least, dd_bytes, int_out, lines_starting

if TYPE_CHECKING:
    from benchlib.run import Bench


def _w_cat(b: "Bench", root: Path) -> Run:
    return Run(["bash", "-c", "set -o pipefail; cat d*/f* | wc -c"], root / "tree",
               int_out(b.sizes.files * b.sizes.file_size, "bytes read"))


def _w_seq(b: "Bench", root: Path) -> Run:
    return Run(["dd", f"if={root / 'big' / 'file'}", "of=/dev/null", "bs=1M"], root,
               dd_bytes(b.sizes.big_mib << 20))


def _w_exec(b: "Bench", root: Path) -> Run:
    script = 'set -e; i=0; while [ "$i" -lt "$2" ]; do "$1" true; i=$((i+1)); done; echo "$i"'
    return Run(["sh", "-c", script, "execs", str(root / "bin" / "busybox"),
                str(b.sizes.execs)], root, int_out(b.sizes.execs, "execs"))


def _w_tar(b: "Bench", root: Path) -> Run:
    # GNU tar skips reading the files when the archive is /dev/null, hence the pipe
    return Run(["bash", "-c", "set -o pipefail; tar cf - . | wc -c"], root / "tree",
               at_least(b.sizes.files * b.sizes.file_size, "tar bytes"))


def _w_ls(b: "Bench", root: Path) -> Run:
    return Run(["ls", "-lR", "."], root / "tree", lines_starting("-", b.sizes.files,
                                                                 "files listed"))


CREATE_CODE = r"""
import os, sys
out, n, ndirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(int(sys.argv[4]))
os.mkdir(out)
dirs = [os.path.join(out, "d%02d" % i) for i in range(ndirs)]
for d in dirs:
    os.mkdir(d)
for i in range(n):
    with open(os.path.join(dirs[i % ndirs], "f%05d" % i), "wb") as f:
        f.write(data)
print(n)
"""


def _w_create(b: "Bench", root: Path) -> Run:
    return Run([sys.executable, "-S", "-c", CREATE_CODE, str(root / "out"),
                str(b.sizes.creates), str(b.sizes.create_dirs), str(b.sizes.file_size)],
               root, int_out(b.sizes.creates, "files written"))


def _warm_tree(b: "Bench") -> None:
    read_files(b.backing / "tree")


def _warm_big(b: "Bench") -> None:
    read_files(b.backing / "big")


def _warm_bin(b: "Bench") -> None:
    read_files(b.backing / "bin")


def reset_out(b: "Bench") -> None:
    """Remove what workload e wrote."""
    out = b.backing / "out"
    if out.exists():
        shutil.rmtree(out)
    os.sync()


def workloads(s: Sizes) -> list[Workload]:
    kib = s.file_size // 1024
    return [
        Workload("a", f"cat d*/f* | wc -c: {s.files:,} files of {kib} KiB in {s.dirs} "
                 "directories", _w_cat, s.files, "files/s", warm=_warm_tree),
        Workload("b-cold", f"sequential read of a {s.big_mib} MiB file, page cache dropped",
                 _w_seq, s.big_mib, "MiB/s", cold=True),
        Workload("b-warm", f"sequential read of a {s.big_mib} MiB file, backing file cached",
                 _w_seq, s.big_mib, "MiB/s", warm=_warm_big),
        Workload("c", f"{s.execs:,} execs of a static busybox in the backing", _w_exec,
                 s.execs, "execs/s", warm=_warm_bin),
        Workload("d", f"tar cf - . | wc -c in the tree ({s.files:,} files)", _w_tar,
                 s.files, "files/s", warm=_warm_tree),
        Workload("e", f"create and write {s.creates:,} files of {kib} KiB", _w_create,
                 s.creates, "files/s", reset=reset_out),
        Workload("f", f"ls -lR . in the tree ({s.files:,} files in {s.dirs} directories)",
                 _w_ls, s.files, "files/s", warm=_warm_tree),
    ] + rootfs_workloads(s)


def select_workloads(all_w: list[Workload], only: str | None,
                     rootfs: bool) -> tuple[list[Workload], list[str]]:
    """The workloads and the measurements (MICRO) to run: all (the rootfs's only with
    --rootfs) or those ``--only`` names."""
    if not only:
        return [w for w in all_w if rootfs or w.target != ROOTFS], list(MICRO)
    keys = [k.strip() for k in only.split(",") if k.strip()]
    chosen, micro = [], []
    for k in keys:
        if k in MICRO:
            micro += [k] if k not in micro else []
            continue
        hit = [w for w in all_w if w.key == k or w.key.split("-")[0] == k]
        if not hit:
            raise SystemExit(f"bench: unknown workload {k!r} "
                             f"(one of {', '.join(w.key for w in all_w)}, b for both b-*, "
                             f"r for all r-*, or {' or '.join(MICRO)})")
        if not rootfs and any(w.target == ROOTFS for w in hit):
            raise SystemExit(f"bench: workload {k!r} runs on a real rootfs: add --rootfs")
        chosen += [w for w in hit if w not in chosen]
    return [w for w in all_w if w in chosen], [m for m in MICRO if m in micro]
