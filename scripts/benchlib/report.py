"""The printed tables and the markdown report (bench/results.md), from a Bench's
results (run now, or read back from a --json file)."""
from __future__ import annotations

from benchlib import ROOTFS, TREE
from benchlib.measure import NS_ROWS, hashing_summary
from benchlib.modes import OVERLAY
from benchlib.results import cell_summary, fmt_ratio, issue_targets, target_cells
from benchlib.run import Bench


def print_tables(bench: Bench) -> None:
    res = bench.results
    for w in bench.workloads:
        print(f"\n[{w.key}] {w.title}")
        print(f"  {'mode':21s} {'median s':>9s} {'rate':>14s} {'/int-off':>9s} {'/native':>8s}")
        for m in bench.modes:
            s = cell_summary(res, w.key, m.name)
            if s["median"] is None:
                print(f"  {m.name:21s} n/a ({s['error']})")
                continue
            rate = f"{w.amount / s['median']:,.0f} {w.unit}" if w.amount else ""
            print(f"  {m.name:21s} {s['median']:9.3f} {rate:>14s} "
                  f"{fmt_ratio(s['ratio_overlay']):>9s} {fmt_ratio(s['ratio_native']):>8s}"
                  + (f"  ({s['note']})" if s["note"] else ""))
    hs = bench.micro.get("hashing")
    if hs:
        print(f"\nhashing of the big file ({hs.get('bytes', 0) / 2**20:.0f} MiB)")
        if "error" in hs:
            print(f"  n/a ({hs['error']})")
        for r in hashing_summary(hs):
            print(f"  {r['label']:52s} {r['median']:7.3f} s {r['mib_s']:8,.0f} MiB/s "
                  f"{r['vs_hashlib']:6.2f}x hashlib")
    ns = bench.micro.get("ns_resolution")
    if ns:
        print("\nnamespace resolution per open")
        if "error" in ns:
            print(f"  n/a ({ns['error']})")
        for k, label in NS_ROWS.items():
            if k in ns.get("us", {}):
                print(f"  {label:56s} {ns['us'][k]:6.1f} us")
    if bench.rootfs_info:
        ri = bench.rootfs_info
        print(f"\nrootfs {ri['source']}: {ri['files']:,} files, {ri['bytes'] / 2**20:.0f} MiB; "
              f"cp -a {ri['copy_s']:.1f} s, imafs sign -r {ri['sign_s']:.1f} s")
    tg = [t for t in issue_targets(bench) if t["value"] is not None]
    print("\nissue targets" if tg else "", end="\n" if tg else "")
    for t in tg:
        val, goal, met = target_cells(t)
        print(f"  {t['key']:34s} {val:>8s}  {goal:8s} {met}")
    if bench.elapsed:
        print(f"\nbench: the run took {bench.elapsed / 60:.1f} min")


def md(text) -> str:
    """Text for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(bench: Bench, info: dict, plot_rel: str | None) -> str:
    res = bench.results
    a = bench.args
    s = bench.sizes
    cmd = "scripts/bench.py" + (" --quick" if a.quick else "") + f" --reps {a.reps}" + \
        (" --rootfs" if getattr(a, "rootfs", None) else "")
    took = f" — run took {bench.elapsed / 60:.1f} min" if bench.elapsed else ""
    out = ["# imafs benchmark", "",
           f"{info['date']} — `{cmd}` — imafs `{info['imafs_commit']}` "
           f"(worktree: {info['imafs_worktree']}){took}", "",
           f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, "
           f"Linux {info['kernel']}, Python {info['python']}, pyfuse3 {info['pyfuse3']}, "
           f"backing directory on {info['workdir_fs']}; load average {info['loadavg_start']:.2f} "
           f"at the start, {info['loadavg_end']:.2f} at the end.", "",
           f"Times are the median of {a.reps} runs, each FUSE run on a fresh mount (mount not "
           "timed; backing files in the page cache except for b-cold). The headline ratio is "
           "to **integrity off** (the `overlay` mode: `imafs mount --no-integrity`, the same "
           "FUSE overlay without the engine); the per-workload tables also give the ratio to "
           "the native directory. Lower is better.", ""]
    if plot_rel:
        out += [f"![ratio to integrity off]({plot_rel})", ""]
    tg = [t for t in issue_targets(bench) if t["value"] is not None]   # those this run has
    if tg:
        out += ["## Issue targets", "", "| figure | measured | target | |",
                "|---|---:|---:|---|"]
        for t in tg:
            val, goal, met = target_cells(t)
            out.append(f"| {md(t['what'])} | {val} | {goal} | {met} |")
        out.append("")
    names = [m.name for m in bench.modes]
    for target in (TREE, ROOTFS):
        wls = bench.workloads_of(target)
        if not wls:
            continue
        title = "Summary" if target == TREE else "Summary: real root filesystem"
        out += [f"## {title} (time, ratio to integrity off)", "",
                "| workload | " + " | ".join(names) + " |",
                "|---|" + "---:|" * len(names)]
        for w in wls:
            row = []
            for n in names:
                c = cell_summary(res, w.key, n)
                if c["median"] is None:
                    row.append(f"n/a ({md(c['error'])})")
                elif n == OVERLAY or c["ratio_overlay"] is None:
                    row.append(f"{c['median']:.3f} s")
                else:
                    row.append(f"{c['median']:.3f} s ({fmt_ratio(c['ratio_overlay'])})")
            out.append(f"| **{w.key}** {md(w.title)} | " + " | ".join(row) + " |")
        out.append("")
    out += ["Modes:", ""]
    has_rootfs = bool(bench.workloads_of(ROOTFS))
    for m in bench.modes:
        st = "" if m.native or not m.integrity else f" — state {m.state}"
        pol = ""
        if m.policies:
            pol = f" — policy: {m.policies[0]}" + \
                (f" (rootfs: {m.policies[1]})" if has_rootfs else "")
        out.append(f"- **{m.name}**: {m.title}{st}{pol}")
    notes = sorted({(m.name, res[w.key][m.name].note) for w in bench.workloads
                    for m in bench.modes if res[w.key].get(m.name) and res[w.key][m.name].note})
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}: {t}" for n, t in notes]
    out.append("")
    hs = bench.micro.get("hashing")
    if hs:
        out += ["## Hashing", "",
                f"imafs's own hashing (`imafs.ima.hashing.hash_fd`, as the engine calls it) of "
                f"the {hs.get('bytes', 0) / 2**20:.0f} MiB file of workload b, against "
                "`hashlib.sha256` over the same bytes already in memory, on this machine "
                f"(median of {len(hs.get('times', {}).get('hashlib', [])) or a.reps}).", ""]
        if "error" in hs:
            out += [f"n/a ({md(hs['error'])})", ""]
        else:
            out += ["| | median | runs (s) | speed | / hashlib |", "|---|---:|---|---:|---:|"]
            for r in hashing_summary(hs):
                runs = ", ".join(f"{t:.3f}" for t in r["times"])
                out.append(f"| {r['label']} | {r['median']:.3f} s | {runs} | "
                           f"{r['mib_s']:,.0f} MiB/s | {r['vs_hashlib']:.2f}x |")
            out.append("")
    ns = bench.micro.get("ns_resolution")
    if ns:
        out += ["## Namespace resolution per open", "",
                "What the engine pays on each open to find the caller's integrity namespace "
                "(`CgroupBinder`, the process's cgroup; measured in-process).", ""]
        if "error" in ns:
            out += [f"n/a ({md(ns['error'])})", ""]
        else:
            out += ["| caller | per open |", "|---|---:|"]
            out += [f"| {label} | {ns['us'][k]:.1f} µs |" for k, label in NS_ROWS.items()
                    if k in ns["us"]]
            out.append("")
    if has_rootfs:
        ri = bench.rootfs_info
        out += ["## Real root filesystem", ""]
        if ri:
            out += [f"`{ri['source']}`" + (f" ({md(ri['built'])})" if ri.get("built") else "")
                    + f": {ri['files']:,} regular files, {ri['bytes'] / 2**20:.0f} MiB, copied "
                    f"into the work directory with `cp -a` ({ri['copy_s']:.1f} s) and every file "
                    f"signed with `imafs sign -r --skip-special` ({ri['sign_s']:.1f} s). Each "
                    "command runs as `chroot ROOT /bin/sh -c CMD` (ROOT: the copy for native, "
                    "the mount otherwise: the loader and libraries are read through it), "
                    "as root.", ""]
        else:
            out += ["The rootfs could not be prepared (see the cells).", ""]
    out += ["## Per workload", ""]
    for w in bench.workloads:
        out += [f"### {w.key}: {w.title}", "",
                "| mode | median | runs (s) | rate | / integrity off | / native "
                "| hashed · cache hits · done records · list entries |",
                "|---|---:|---|---:|---:|---:|---:|"]
        for m in bench.modes:
            c = cell_summary(res, w.key, m.name)
            if c["median"] is None:
                out.append(f"| {m.name} | n/a ({md(c['error'])}) | | | | | |")
                continue
            rate = f"{w.amount / c['median']:,.0f} {w.unit}" if w.amount else ""
            runs = ", ".join(f"{t:.3f}" for t in c["times"])
            e = c.get("engine") or {}
            eng = " · ".join(f"{e[k]:,}" if isinstance(e.get(k), int) else "?" for k in
                             ("hashed_files", "cache_hits", "done_records", "entries")) if e else ""
            out.append(f"| {m.name} | {c['median']:.3f} s | {runs} | {rate} | "
                       f"{fmt_ratio(c['ratio_overlay'])} | {fmt_ratio(c['ratio_native'])} "
                       f"| {eng} |")
        out.append("")
    out += ["Sizes: " + ", ".join(f"{k}={v}" for k, v in s.__dict__.items()) + ".", ""]
    return "\n".join(out)

