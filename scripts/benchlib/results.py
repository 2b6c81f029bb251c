"""The results as data: the ratios of each cell, the figures the project's issues set
targets for, the machine the run was made on, and the JSON file (written, and read back
by ``--from-json`` to redraw the reports)."""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

from benchlib import REPO, TREE
from benchlib.measure import hashing_summary
from benchlib.modes import NATIVE, OVERLAY, Mode
from benchlib.rootfs import built_record
from benchlib.run import Bench
from benchlib.runs import Cell, Run, Sizes, Workload


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}x"


def cell_summary(res: dict[str, dict[str, Cell]], wkey: str, mname: str) -> dict:
    c = res[wkey].get(mname, Cell(error="not run"))
    nat = res[wkey].get(NATIVE)
    ovl = res[wkey].get(OVERLAY)
    med = c.median
    return {
        "times": c.times, "median": med, "error": c.error, "note": c.note, "engine": c.engine,
        "ratio_native": ratio(med, nat.median if nat else None),
        "ratio_overlay": ratio(med, ovl.median if ovl else None),
    }


def machine_info(work: Path, load_start: float) -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
                break
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True,
                            text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    try:
        import pyfuse3
        pyfuse3_v = getattr(pyfuse3, "__version__", "?")
    except Exception:  # noqa: BLE001
        pyfuse3_v = "?"
    wt = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "imafs"],
                        capture_output=True, text=True).stdout.splitlines()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu, "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3_v,
        "workdir_fs": fstype,
        "imafs_commit": commit,
        "imafs_worktree": f"{len(wt)} changed or new files under imafs/" if wt else "clean",
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
    }


def _median(res, wkey: str, mname: str) -> float | None:
    c = res.get(wkey, {}).get(mname)
    return c.median if c else None


def issue_targets(bench: Bench) -> list[dict]:
    """The figures the project's issues set targets for (and one for comparison),
    from this run's results; value None when a part was not run."""
    res = bench.results
    out = [
        {"key": "a appraise-warm/overlay",
         "what": "a: warm small-file opens with signature appraisal (appraise-warm) "
                 "/ integrity off (overlay)",
         "value": ratio(_median(res, "a", "appraise-warm"), _median(res, "a", OVERLAY)),
         "op": "<=", "limit": 1.10},
        {"key": "b-cold verified/measure",
         "what": "b-cold: cold read of the big file with verified reads (verified) "
                 "/ the same without verification (measure)",
         "value": ratio(_median(res, "b-cold", "verified"), _median(res, "b-cold", "measure")),
         "op": "<=", "limit": 1.15},
        {"key": "b-cold verified-warm/measure-warm",
         "what": "b-cold, warm state: verified-warm / measure-warm (for comparison)",
         "value": ratio(_median(res, "b-cold", "verified-warm"),
                        _median(res, "b-cold", "measure-warm")),
         "op": None, "limit": None},
    ]
    rows = {r["key"]: r for r in hashing_summary(bench.micro.get("hashing"))}
    out += [
        {"key": "hash_fd/hashlib cold",
         "what": "hash_fd sha256 of the big file, page cache dropped: speed / hashlib.sha256 "
                 "in memory",
         "value": rows["hash_fd"]["vs_hashlib"] if "hash_fd" in rows else None,
         "op": ">=", "limit": 0.80},
        {"key": "hash_fd+verity/hashlib cold",
         "what": "hash_fd sha256 + fs-verity tree, cold: speed / hashlib.sha256 (for comparison)",
         "value": rows["hash_fd+verity"]["vs_hashlib"] if "hash_fd+verity" in rows else None,
         "op": None, "limit": None},
    ]
    for t in out:
        v, lim = t["value"], t["limit"]
        t["met"] = None if v is None or lim is None else (v <= lim if t["op"] == "<=" else v >= lim)
    return out


def target_cells(t: dict) -> tuple[str, str, str]:
    """A target's figure, goal and verdict as printed."""
    v, lim = t["value"], t["limit"]
    # a figure next to its limit (0.7997 against 0.80) gets the decimals that tell them apart
    digits = 4 if lim is not None and v is not None and abs(v - lim) < 0.005 else 2
    val = "not run" if v is None else f"{v:.{digits}f}x"
    goal = "" if t["limit"] is None else f"{'≤' if t['op'] == '<=' else '≥'} {t['limit']:.2f}x"
    met = "" if t["met"] is None else ("met" if t["met"] else "NOT met")
    return val, goal, met


def to_json(bench: Bench, info: dict) -> dict:
    return {
        "machine": info,
        "args": {"reps": bench.args.reps, "quick": bench.args.quick,
                 "rootfs": getattr(bench.args, "rootfs", None)},
        "elapsed_s": bench.elapsed,
        "sizes": dict(bench.sizes.__dict__),
        "modes": [{"name": m.name, "title": m.title, "native": m.native, "args": list(m.args),
                   "state": m.state, "integrity": m.integrity,
                   "policies": list(m.policies) if m.policies else None} for m in bench.modes],
        "workloads": {w.key: {"title": w.title, "unit": w.unit, "amount": w.amount,
                              "target": w.target,
                              "modes": {m.name: cell_summary(bench.results, w.key, m.name)
                                        for m in bench.modes}}
                      for w in bench.workloads},
        "targets": issue_targets(bench),
        "hashing": (dict(bench.micro["hashing"], summary=hashing_summary(bench.micro["hashing"]))
                    if "hashing" in bench.micro else None),
        "ns_resolution": bench.micro.get("ns_resolution"),
        "rootfs": bench.rootfs_info or None,
    }


def _from_json_only(b: Bench, root: Path) -> Run:
    raise RuntimeError("a workload read from a --json file does not run")


def load_json(path: str, args) -> tuple[Bench, dict]:
    """A Bench (not to be run) holding the results of an earlier --json file."""
    data = json.loads(Path(path).read_text())
    # the modes as they were in that run (a mode's name may mean other arguments now)
    modes = [Mode(m["name"], m["title"], native=m["native"], args=tuple(m["args"]),
                  state=m["state"], integrity=m["integrity"],
                  policies=tuple(m["policies"]) if m.get("policies") else None)
             for m in data["modes"]]
    wls = [Workload(k, w["title"], _from_json_only, w["amount"], w["unit"],
                    target=w.get("target", TREE))
           for k, w in data["workloads"].items()]
    args.reps, args.quick = data["args"]["reps"], data["args"]["quick"]
    args.rootfs = data["args"].get("rootfs")
    known = set(Sizes.__dataclass_fields__)
    bench = Bench(args, Sizes(**{k: v for k, v in data["sizes"].items() if k in known}),
                  modes, wls, Path("/nonexistent"))
    for k, w in data["workloads"].items():
        for name, c in w["modes"].items():
            bench.results[k][name] = Cell(times=list(c["times"]), error=c["error"], note=c["note"],
                                          engine=c.get("engine"))
    if data.get("hashing"):
        bench.micro["hashing"] = {k: v for k, v in data["hashing"].items() if k != "summary"}
    if data.get("ns_resolution"):
        bench.micro["ns_resolution"] = data["ns_resolution"]
    bench.rootfs_info = dict(data.get("rootfs") or {})
    if "built" in bench.rootfs_info:   # a file written before results kept suite and date only
        bench.rootfs_info["built"] = built_record(bench.rootfs_info["built"])
    bench.elapsed = data.get("elapsed_s")
    return bench, data["machine"]
