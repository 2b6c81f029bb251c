#!/usr/bin/env python3
"""imafs benchmark: the same workloads on the native backing directory and through
imafs mounts in several modes, in one run; prints times and ratios, writes a markdown
table (and a PNG plot, and optionally JSON).

    .venv/bin/python scripts/bench.py --rootfs --json bench/results.json   # full run
    .venv/bin/python scripts/bench.py --quick --reps 1    # smoke test sizes
    .venv/bin/python scripts/bench.py --only a,b --modes native,overlay
    .venv/bin/python scripts/bench.py --rootfs --only r-apt --modes native,appraise
    .venv/bin/python scripts/bench.py --only a,d,f --modes c,overlay,appraise-warm --pin both

Run as root (it mounts FUSE filesystems, chroots and drops the page cache for the cold
runs). The headline ratio is to "overlay", the mount with integrity off
(--no-integrity): what the integrity engine costs on top of any FUSE overlay. The ratio
to "passthrough-c", libfuse's own C passthrough daemon, says how far a mode is from
what FUSE itself costs on this machine (the limit issue 16 measures against); the ratio
to native is in the per-workload tables.

Modes (``--modes``; "-warm": remount on the state of a priming run, see Method)
  native                       the backing directory itself
  passthrough-c (or c)         libfuse's passthrough_ll example, built at bench time from
                               the source Debian's libfuse3-dev ships (gcc, pkg-config
                               fuse3), run -f -o source=BACKING with its defaults
                               (multi-threaded); n/a when they are not installed
  overlay (or integrity-off)   imafs mount --no-integrity: the baseline of the ratios
  integrity                    the engine on, empty policy
  measure, measure-warm        measure every read, exec and executable mmap (rootfs: tcb)
  appraise, appraise-warm      signature appraisal of reads and execs, --verify-reads=off
                               (rootfs: imasig for execs and mmaps, then appraise_tcb)
  measure-appraise[-warm]      both kinds of rules in one policy, reads verified (the
                               default when the policy appraises)
  verified, verified-warm      measure, and every read checked against the Merkle tree
                               (--verify-reads=on)
  digest-list, digest-list-warm  measure and appraise through a signed digest list
                               (digest_cache=content; no file signature counts): the
                               tree's reads and execs (a list of its files), the rootfs's
                               execs and mmaps (from-dpkg of --rootfs with DIR.archive);
                               loaded through digest_list_add at the start of each run
                               (timed; the warm state has it already)
  namespace                    as measure, the workload in a child integrity namespace
With --pin on, every mode runs pinned (its daemon and its workload under ``taskset -c
0``: cross-CPU wake-ups between caller and daemon are a large part of the time on a
small VM); with --pin both, every mode runs unpinned and again pinned as MODE-pinned.

Workloads on a synthetic tree: 5,000 files of 4 KiB in 50 directories (tree/dNN/fNNNNN),
beside it a 256 MiB file and a static busybox. a, d and f are the three small-file
workloads issue 16 sets its goals on, run in the tree.
  a        ``cat d*/f* | wc -c``
  b-cold   sequential read of the 256 MiB file (``dd bs=1M``) after dropping the page
           cache
  b-warm   the same with the backing file in the page cache: in the measure modes the
           first read of a measured file, whose throughput the issue targets compare to
           hashlib.sha256's over the same bytes
  c        500 execs of the busybox, by its path through the mount
  d        ``tar cf - . | wc -c`` (GNU tar skips reading when the archive is /dev/null,
           hence the pipe)
  e        creating and writing 2,000 files of 4 KiB (20 directories, one process)
  f        ``ls -lR .``

Workloads on a real root filesystem (with --rootfs [DIR]; default the Debian bookworm
minbase that scripts/rootfs.sh caches). DIR is copied once into the work directory
(``cp -a``, xattrs kept) and every file signed (``imafs sign -r --skip-special``); each
command runs as ``chroot ROOT /bin/sh -c CMD`` with ROOT the copy (native) or the mount,
so the dynamic loader and the libraries are read through the mount. No /proc or /dev
is mounted in the chroot (none of the commands needs one).
  r-true   ``for i in $(seq 200); do /bin/true; done`` (200 dynamically linked execs)
  r-dpkg   ``dpkg -l``
  r-apt    ``apt-get --version``
  r-ls     ``ls -lR /usr > /dev/null``
  r-tar    ``tar c /usr | wc -c``

Measurements apart from the modes (``--only`` keys: hash, ns, dl, attack, model, notice)
  hash     imafs's own hashing (imafs.ima.hashing.hash_fd, sha256, and sha256 with the
           fs-verity Merkle tree in the same pass) of the 256 MiB file, page cache dropped
           ("cold") and cached, against hashlib.sha256 over the same bytes in memory
  ns       per-open cost of finding the caller's integrity namespace
           (Binder.ns_of, and read_ns uncached), host process and namespaced ones
  dl       a digest list of 100,000 sha256 digests (10,000 with --quick): parse and
           load into a namespace's LMDB index, removal, and the per-open lookup
  attack   issue 14's hashing attack on a mount of its own (benchlib/attack.py): uid 1000
           opens ten sparse 3 GiB ELF-magic files (256 MiB with --quick) under a policy
           measuring MMAP_CHECK and FILE_CHECK reads, reads verified; root's cold opens
           of small files meanwhile: p50, p99, max (goal p99 < 100 ms), how soon hashing
           stops once the openers are killed, verity-tree bytes and daemon RSS
  model    behaviour models (benchlib/model.py): cost per event of a learning and an
           enforcing model, one process opening 2,000 small files (300 with --quick, 100
           with --smoke) in a child namespace of a mount of their own, against the same
           without a model, under plain appraisal (the files signed) and an empty policy;
           decide_chain alone in-process
  notice   the delay before a change behind the mount is noticed (EIO on the next read
           of the changed block, all pages cached): write(2), a shared-mapping write
           with its mtime put back (a mount of its own), and the stat pass alone

Method
  * Every timed run of a FUSE mode starts on a fresh mount (the mount is not timed): no
    dentries, attributes or pages of the mount are cached in the kernel or the daemon,
    so every lookup, open and read of the run reaches the daemon. The backing files are
    in the page cache (read natively before each run) except for b-cold, where the cache
    is dropped after mounting. That is "a container's first run after mount", the case
    the overlay's costs show in; a second run on the same mount is mostly served by the
    kernel's caches (keep_cache) and is not measured here.
  * Integrity modes: state "cold" means a fresh --state directory for every mount;
    "warm" means one --state directory per workload, primed by an untimed run, then
    remounted for every timed run (digests cached in LMDB, daemon memory empty).
  * The time is the median of --reps runs of the whole subprocess (start-up included,
    the same in every mode). Each run's output is checked (byte and file counts; the
    rootfs's tar size must be the same in every mode). After each run of an integrity
    mode, the engine's counters (control file ``stats``: files hashed, digest cache
    hits) and the measurement list's length are read (untimed) and reported; a warm
    run that hashed files gets a note.

The code is in scripts/benchlib/ (its __init__ says which module holds what); adding a
mode is one entry in benchlib/modes.py:MODES. A mode that cannot mount (an engine
feature not there yet) is reported as "n/a (reason)" and the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchlib, beside this file

from benchlib import DEFAULT_ROOTFS, REPO, RUN_DIR  # noqa: E402
from benchlib.modes import MODES, PIN_CHOICES, select_modes  # noqa: E402
from benchlib.mounts import mounts_under  # noqa: E402
from benchlib.plot import plot  # noqa: E402
from benchlib.report import markdown, print_tables  # noqa: E402
from benchlib.results import load_json, machine_info, to_json  # noqa: E402
from benchlib.rootfs import rootfs_problem  # noqa: E402
from benchlib.run import Bench  # noqa: E402
from benchlib.runs import FULL, QUICK, SMOKE  # noqa: E402
from benchlib.workloads import select_workloads, workloads  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Modes: " + ", ".join(m.name for m in MODES)
                                + " (integrity-off: another name of overlay, c of passthrough-c). Workloads: a, b "
                                "(b-cold and b-warm), c, d, e, f; with --rootfs r-true, r-dpkg, "
                                "r-apt, r-ls, r-tar (r for all); measurements: hash, ns, dl, attack, "
                                "model, notice.")
    p.add_argument("--reps", type=int, default=3, help="timed runs per workload and mode (median)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke test (500 files, 32 MiB, 50 execs, 200 creates, "
                        "50 rootfs execs)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, for the test suite's run of every mode (implies --quick)")
    p.add_argument("--only", metavar="a,b,...",
                   help="workloads and measurements to run (default all; the r-* only with "
                        "--rootfs)")
    p.add_argument("--modes", metavar="native,overlay,...",
                   help=f"modes to run (default all: {','.join(m.name for m in MODES)})")
    p.add_argument("--pin", choices=PIN_CHOICES, default="off",
                   help="run each mode's daemon and workload pinned to CPU 0 (taskset -c 0): "
                        "off (default), on (pinned only), both (each mode unpinned and pinned, "
                        "as MODE and MODE-pinned; pinned ratios are to pinned references)")
    p.add_argument("--rootfs", metavar="DIR", nargs="?", const=DEFAULT_ROOTFS,
                   help="also run the r-* workloads on a copy of this root filesystem "
                        f"(default {DEFAULT_ROOTFS}, built by scripts/rootfs.sh)")
    p.add_argument("--markdown", metavar="FILE", default=str(REPO / "bench" / "results.md"),
                   help="markdown report (default bench/results.md)")
    p.add_argument("--plot", metavar="FILE",
                   help="PNG bar chart of ratios to integrity off (default: the markdown file "
                        "with .png; 'none' for no plot)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--workdir", metavar="DIR", default="/var/tmp",
                   help="where to create the temporary tree (default /var/tmp); removed afterwards")
    p.add_argument("--keep", action="store_true", help="keep the temporary tree")
    p.add_argument("--timeout", type=float, default=600, help="limit per timed run, seconds")
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: write the tables, markdown and plot again from a --json file")
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error("--reps must be at least 1")
    return a

def report(bench: "Bench", info: dict, args) -> None:
    print(f"\nimafs benchmark — {info['date']} — {info['nproc']} CPUs, Linux {info['kernel']}, "
          f"Python {info['python']}, imafs {info['imafs_commit']}")
    print_tables(bench)
    md_path = Path(args.markdown)
    plot_path = None
    if args.plot != "none":
        plot_path = Path(args.plot) if args.plot else md_path.with_suffix(".png")
        if not plot(bench, plot_path):
            plot_path = None
    plot_rel = None
    if plot_path is not None:
        plot_rel = os.path.relpath(plot_path.resolve(), md_path.resolve().parent)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(bench, info, plot_rel))
    print(f"\nbench: wrote {md_path}" + (f" and {plot_path}" if plot_path else ""))
    if args.json and not args.from_json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(to_json(bench, info), indent=2) + "\n")
        print(f"bench: wrote {args.json}")


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        bench, info = load_json(args.from_json, args)
        report(bench, info, args)
        return 0
    if args.rootfs is not None:
        args.rootfs = os.path.abspath(args.rootfs)
        problem = rootfs_problem(args.rootfs)
        if problem:
            print(problem, file=sys.stderr)
            return 2
    if args.smoke:
        args.quick = True
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    modes = select_modes(args.modes, args.pin)
    wls, micro = select_workloads(workloads(sizes), args.only, args.rootfs is not None)
    if os.geteuid() != 0 and any(not m.native for m in modes):
        print("bench: warning: not root; mounts may fail", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    load_start = os.getloadavg()[0]
    if load_start > 0.5 * len(os.sched_getaffinity(0)):
        print(f"bench: warning: load average {load_start:.2f}: other work on this machine "
              "will make the times noisy", file=sys.stderr)
    run_dir_existed = os.path.isdir(RUN_DIR)
    os.makedirs(args.workdir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="imafs-bench-", dir=args.workdir))
    os.chmod(work, 0o755)
    bench = Bench(args, sizes, modes, wls, work, micro)
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # a second Ctrl-C or a TERM must not cut the unmount and removal short: SIGINT
        # ignored (by the umount commands run now, too: they inherit that), TERM and HUP
        # kept for after
        pending: list[int] = []
        old = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
        for s in (signal.SIGTERM, signal.SIGHUP):
            old[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
        try:
            bench.cleanup()
            left = mounts_under(work)
            if left:
                print(f"bench: {', '.join(left)} still mounted; leaving {work}", file=sys.stderr)
            elif args.keep:
                print(f"bench: kept {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
            if not run_dir_existed:   # created by our daemons: remove it if they left it empty
                with contextlib.suppress(OSError):
                    os.rmdir(RUN_DIR)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if pending:
            raise SystemExit(128 + pending[0])
    if interrupted:
        print("bench: interrupted; unmounted and removed the work directory, no report",
              file=sys.stderr)
        return 128 + signal.SIGINT
    info = machine_info(Path(args.workdir), load_start)
    report(bench, info, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
