"""The printed tables and the markdown report (bench/results.md), from a Bench's
results (run now, or read back from a --json file). Every time comes with its ratio to
integrity off (``overlay``) and, when it ran, to the C limit (``passthrough-c``)."""
from __future__ import annotations

import statistics

from benchlib import ROOTFS, TREE
from benchlib.attack import attack_lines
from benchlib.measure import DL_ROWS, NS_ROWS, hashing_summary
from benchlib.model import model_lines
from benchlib.notice import notice_summary
from benchlib.modes import OVERLAY, PASSTHROUGH_C, reference
from benchlib.results import cell_summary, fmt_ratio, issue_targets, target_cells
from benchlib.run import Bench

# the summaries: (ratio key, reference mode, section title)
SUMMARIES = (("ratio_overlay", OVERLAY, "time, ratio to integrity off"),
             ("ratio_passthrough_c", PASSTHROUGH_C,
              "time, ratio to passthrough-c: libfuse's C passthrough_ll, the limit"))


def _ran(bench: Bench, kind: str) -> bool:
    return any(reference(kind, m.name) == m.name for m in bench.modes)


def _engine(c: dict) -> str:
    e = c.get("engine") or {}
    return " · ".join(f"{e[k]:,}" if isinstance(e.get(k), int) else "?" for k in
                      ("hashed_files", "cache_hits", "done_records", "entries")) if e else ""


def _cells(w, c: dict) -> dict:
    """The figures of one workload's run in one mode (``c``: its cell_summary, with a
    median), formatted alike for the printed and the markdown per-workload tables."""
    return {"median": f"{c['median']:.3f}",
            "rate": f"{w.amount / c['median']:,.0f} {w.unit}" if w.amount else "",
            "/int-off": fmt_ratio(c["ratio_overlay"]),
            "/C": fmt_ratio(c["ratio_passthrough_c"]),
            "/native": fmt_ratio(c["ratio_native"])}


def _print_micro(bench: Bench, key: str, title: str, lines) -> None:
    """A measurement's printed section: its title, then ``lines(result)`` or why it
    is n/a (the markdown's is _micro)."""
    r = bench.micro.get(key)
    if not r:
        return
    print(f"\n{title}")
    if "error" in r:
        print(f"  n/a ({r['error']})")
        return
    for line in lines(r):
        print("  " + line)


def print_tables(bench: Bench) -> None:
    res = bench.results
    width = max([21] + [len(m.name) for m in bench.modes])
    for w in bench.workloads:
        print(f"\n[{w.key}] {w.title}")
        print(f"  {'mode':{width}s} {'median s':>9s} {'rate':>14s} {'/int-off':>9s} "
              f"{'/C':>7s} {'/native':>8s}")
        for m in bench.modes:
            s = cell_summary(res, w.key, m.name)
            if s["median"] is None:
                print(f"  {m.name:{width}s} n/a ({s['error']})")
                continue
            f = _cells(w, s)
            print(f"  {m.name:{width}s} {f['median']:>9s} {f['rate']:>14s} "
                  f"{f['/int-off']:>9s} {f['/C']:>7s} {f['/native']:>8s}"
                  + (f"  ({s['note']})" if s["note"] else ""))
    hs = bench.micro.get("hashing") or {}
    _print_micro(bench, "hashing",
                 f"hashing of the big file ({hs.get('bytes', 0) / 2**20:.0f} MiB)", lambda h: [
                     f"{r['label']:52s} {r['median']:7.3f} s {r['mib_s']:8,.0f} MiB/s "
                     f"{r['vs_hashlib']:6.2f}x hashlib" for r in hashing_summary(h)])
    _print_micro(bench, "ns_resolution", "namespace resolution per open", lambda ns: [
        f"{label:56s} {ns['us'][k]:6.1f} us" for k, label in NS_ROWS.items()
        if k in ns.get("us", {})])
    _print_micro(bench, "digest_list", "digest list", lambda d: [
        f"load of {d['digests']:,} digests ({d['bytes'] / 2**20:.1f} MiB list) "
        f"{statistics.median(d['load_s']):.2f} s, removal "
        f"{statistics.median(d['remove_s']):.2f} s"] + [
        f"{label:56s} {d['us'][k]:6.1f} us" for k, label in DL_ROWS.items()
        if k in d.get("us", {})])
    _print_micro(bench, "attack", "hashing attack (issue 14): root's cold small-file opens",
                 attack_lines)
    _print_micro(bench, "model", "behaviour models (issue 18): cost per event", model_lines)
    _print_micro(bench, "notice", "delay before a change behind the mount is noticed (EIO)",
                 lambda nt: [f"{r['label']:62s} {r['median'] * 1e3:7.1f} ms median "
                             f"{r['max'] * 1e3:7.1f} ms max" for r in notice_summary(nt)])
    if bench.rootfs_info:
        ri = bench.rootfs_info
        print(f"\nrootfs {ri['source']}: {ri['files']:,} files, {ri['bytes'] / 2**20:.0f} MiB; "
              f"cp -a {ri['copy_s']:.1f} s, imafs sign -r {ri['sign_s']:.1f} s")
    tg = [t for t in issue_targets(bench) if t["value"] is not None]
    if tg:
        print("\nissue targets")
        kw = max(len(t["key"]) for t in tg)
    for t in tg:
        val, goal, met = target_cells(t)
        print(f"  {t['key']:{kw}s} {val:>8s}  {goal:8s} {met}")
    if bench.elapsed:
        print(f"\nbench: the run took {bench.elapsed / 60:.1f} min")


def md(text) -> str:
    """Text for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(bench: Bench, info: dict, plot_rel: str | None) -> str:
    out = _head(bench, info, plot_rel) + _targets(bench)
    for key, kind, title in SUMMARIES:
        if kind == OVERLAY or _ran(bench, kind):   # the headline ratio's even where n/a
            for target in (TREE, ROOTFS):
                out += _summary(bench, target, key, kind, title)
    out += (_modes(bench) + _hashing(bench) + _ns(bench) + _digest_list(bench) + _attack(bench)
            + _model(bench) + _notice(bench) + _rootfs(bench) + _per_workload(bench))
    out += ["Sizes: " + ", ".join(f"{k}={v}" for k, v in bench.sizes.__dict__.items()) + ".",
            ""]
    return "\n".join(out)


def _head(bench: Bench, info: dict, plot_rel: str | None) -> list[str]:
    a = bench.args
    pin = getattr(a, "pin", "off")
    cmd = "scripts/bench.py" + (" --quick" if a.quick else "") + f" --reps {a.reps}" + \
        (" --rootfs" if getattr(a, "rootfs", None) else "") + \
        (f" --pin {pin}" if pin != "off" else "")
    took = f" — run took {bench.elapsed / 60:.1f} min" if bench.elapsed else ""
    c_limit = ("; the summaries and the per-workload tables also give the ratio to "
               "**passthrough-c** (libfuse's own C `passthrough_ll`, the FUSE limit of this "
               "machine) and to the native directory") if _ran(bench, PASSTHROUGH_C) else \
        "; the per-workload tables also give the ratio to the native directory"
    pinned = (" A mode named `-pinned` ran its daemon and its workload under "
              "`taskset -c 0` (one CPU, no cross-CPU wake-ups); its ratios are to the "
              "pinned reference modes.") if any(m.pinned for m in bench.modes) else ""
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
           f"FUSE overlay without the engine){c_limit}. Lower is better.{pinned}", ""]
    if plot_rel:
        out += [f"![ratio to integrity off]({plot_rel})", ""]
    return out


def _targets(bench: Bench) -> list[str]:
    tg = [t for t in issue_targets(bench) if t["value"] is not None]   # those this run has
    if not tg:
        return []
    out = ["## Issue targets", "", "| figure | measured | target | |", "|---|---:|---:|---|"]
    for t in tg:
        val, goal, met = target_cells(t)
        out.append(f"| {md(t['what'])} | {val} | {goal} | {met} |")
    return out + [""]


def _summary(bench: Bench, target: str, key: str, kind: str, title: str) -> list[str]:
    """One table: a row per workload, a column per mode, each time with its ratio
    (``key``) to the reference mode ``kind`` (pinned alike)."""
    wls = bench.workloads_of(target)
    if not wls:
        return []
    names = [m.name for m in bench.modes]
    where = "Summary" if target == TREE else "Summary: real root filesystem"
    out = [f"## {where} ({title})", "", "| workload | " + " | ".join(names) + " |",
           "|---|" + "---:|" * len(names)]
    for w in wls:
        row = []
        for n in names:
            c = cell_summary(bench.results, w.key, n)
            if c["median"] is None:
                row.append(f"n/a ({md(c['error'])})")
            elif n == reference(kind, n) or c[key] is None:
                row.append(f"{c['median']:.3f} s")
            else:
                row.append(f"{c['median']:.3f} s ({fmt_ratio(c[key])})")
        out.append(f"| **{w.key}** {md(w.title)} | " + " | ".join(row) + " |")
    return out + [""]


def _modes(bench: Bench) -> list[str]:
    res = bench.results
    out = ["Modes:", ""]
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
    return out + [""]


def _micro(bench: Bench, key: str, title: str, intro: str, table) -> list[str]:
    """The section of a measurement without a mount: its intro, then its table (from
    ``table(result)``) or why it is n/a."""
    r = bench.micro.get(key)
    if not r:
        return []
    out = [f"## {title}", "", intro, ""]
    if "error" in r:
        return out + [f"n/a ({md(r['error'])})", ""]
    return out + table(r) + [""]


def _hashing(bench: Bench) -> list[str]:
    hs = bench.micro.get("hashing") or {}
    reps = len(hs.get("times", {}).get("hashlib", [])) or bench.args.reps
    intro = (f"imafs's own hashing (`imafs.ima.hashing.hash_fd`, as the engine calls it) of "
             f"the {hs.get('bytes', 0) / 2**20:.0f} MiB file of workload b, against "
             "`hashlib.sha256` over the same bytes already in memory, on this machine "
             f"(median of {reps}).")
    return _micro(bench, "hashing", "Hashing", intro, lambda h: [
        "| | median | runs (s) | speed | / hashlib |", "|---|---:|---|---:|---:|"] + [
        f"| {r['label']} | {r['median']:.3f} s | {', '.join(f'{t:.3f}' for t in r['times'])} | "
        f"{r['mib_s']:,.0f} MiB/s | {r['vs_hashlib']:.2f}x |" for r in hashing_summary(h)])


def _ns(bench: Bench) -> list[str]:
    intro = ("What the engine pays on each open to find the caller's integrity namespace "
             "(`Binder`: the process's pid namespace and cgroup; measured in-process).")
    return _micro(bench, "ns_resolution", "Namespace resolution per open", intro, lambda ns: [
        "| caller | per open |", "|---|---:|"] + [
        f"| {label} | {ns['us'][k]:.1f} µs |" for k, label in NS_ROWS.items() if k in ns["us"]])


def _digest_list(bench: Bench) -> list[str]:
    d = bench.micro.get("digest_list") or {}
    intro = (f"A digest list of {d.get('digests', 0):,} sha256 digests in 1,000 packages "
             f"({d.get('bytes', 0) / 2**20:.1f} MiB), as `digest_list_add` handles it once "
             "the list itself is measured and appraised: parsed and loaded into the "
             "namespace's LMDB index (one synchronous transaction), then removed (median of "
             f"{len(d.get('load_s', [])) or bench.args.reps}); and what a lookup costs, "
             "the step a cold open's decision adds per namespace whose rule says "
             "`digest_cache=` (issue 17's goals: a load under 2 s, a few µs per open).")
    return _micro(bench, "digest_list", "Digest lists", intro, lambda r: [
        "| | median | runs |", "|---|---:|---|",
        f"| load | {statistics.median(r['load_s']):.2f} s | "
        f"{', '.join(f'{t:.2f}' for t in r['load_s'])} |",
        f"| removal | {statistics.median(r['remove_s']):.2f} s | "
        f"{', '.join(f'{t:.2f}' for t in r['remove_s'])} |"] + [
        f"| {label} | {r['us'][k]:.1f} µs | |" for k, label in DL_ROWS.items()
        if k in r["us"]])


def _attack(bench: Bench) -> list[str]:
    intro = ("Issue 14 item 3: uid 1000 opens ten big sparse ELF-magic files read-only "
             "(policy: measure MMAP_CHECK and FILE_CHECK reads, --verify-reads on), each "
             "hashed whole with its verity tree; meanwhile root opens and reads small files "
             "it never opened before (each one a hashing pass of its own). Goal: p99 under "
             "100 ms during the attack.")
    return _micro(bench, "attack", "Hashing attack", intro, attack_lines)


def _model(bench: Bench) -> list[str]:
    intro = ("Issue 18: one process opens and reads small files in a child namespace, "
             "without a behaviour model, learning (every event new) and enforcing (every "
             "event in the model); the cost per event two ways: the difference of the medians "
             "(wall clock) and the daemon's own account of its model step (`stats`: "
             "`model_us` / `model_events`). Goal: under 20 µs per event on top of the "
             "overlay.")
    return _micro(bench, "model", "Behaviour models", intro,
                  lambda r: [f"- {md(line)}" for line in model_lines(r)])


def _notice(bench: Bench) -> list[str]:
    intro = ("How long a change behind the mount takes to be noticed while a verified "
             "handle holds the file open and all its pages are cached: from the change "
             "to the EIO of a read of the changed block, polled every millisecond "
             "(`scripts/benchlib/notice.py`; docs/read-verification.md). Until then the "
             "reads return the measured bytes (checked).")
    return _micro(bench, "notice", "Changes behind the mount", intro, lambda nt: [
        "| change | median | max | runs |", "|---|---:|---:|---|"] + [
        f"| {r['label']} | {r['median'] * 1e3:.1f} ms | {r['max'] * 1e3:.1f} ms | "
        f"{len(r['times'])} |" for r in notice_summary(nt)])


def _rootfs(bench: Bench) -> list[str]:
    if not bench.workloads_of(ROOTFS):
        return []
    ri = bench.rootfs_info
    if not ri:
        return ["## Real root filesystem", "", "The rootfs could not be prepared (see the cells).",
                ""]
    return ["## Real root filesystem", "",
            f"`{ri['source']}`" + (f" ({md(ri['built'])})" if ri.get("built") else "")
            + f": {ri['files']:,} regular files, {ri['bytes'] / 2**20:.0f} MiB, copied "
            f"into the work directory with `cp -a` ({ri['copy_s']:.1f} s) and every file "
            f"signed with `imafs sign -r --skip-special` ({ri['sign_s']:.1f} s). Each "
            "command runs as `chroot ROOT /bin/sh -c CMD` (ROOT: the copy for native, "
            "the mount otherwise: the loader and libraries are read through it), "
            "as root.", ""]


def _per_workload(bench: Bench) -> list[str]:
    out = ["## Per workload", ""]
    for w in bench.workloads:
        out += [f"### {w.key}: {w.title}", "",
                "| mode | median | runs (s) | rate | / integrity off | / passthrough-c "
                "| / native | hashed · cache hits · done records · list entries |",
                "|---|---:|---|---:|---:|---:|---:|---:|"]
        for m in bench.modes:
            c = cell_summary(bench.results, w.key, m.name)
            if c["median"] is None:
                out.append(f"| {m.name} | n/a ({md(c['error'])}) | | | | | | |")
                continue
            f = _cells(w, c)
            runs = ", ".join(f"{t:.3f}" for t in c["times"])
            out.append(f"| {m.name} | {f['median']} s | {runs} | {f['rate']} | "
                       f"{f['/int-off']} | {f['/C']} | {f['/native']} | {_engine(c)} |")
        out.append("")
    return out
