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

from benchlib import REPO, ROOTFS, TREE
from benchlib.measure import hashing_summary
from benchlib.modes import (IMAFS_DAEMON, NATIVE, OVERLAY, PASSTHROUGH_C, PIN_SUFFIX, Mode,
                            reference)
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
    """A cell's times and its ratios to native, to integrity off (overlay) and to the C
    limit (passthrough-c), each reference pinned as the mode is."""
    c = res[wkey].get(mname, Cell(error="not run"))
    med = c.median

    def to(kind: str) -> float | None:
        return ratio(med, _median(res, wkey, reference(kind, mname)))
    return {
        "times": c.times, "median": med, "error": c.error, "note": c.note, "engine": c.engine,
        "daemon_cpu": c.cpu,
        "ratio_native": to(NATIVE), "ratio_overlay": to(OVERLAY),
        "ratio_passthrough_c": to(PASSTHROUGH_C),
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


# issue 16's goals against libfuse's C passthrough_ll: on the small-file workloads and
# every rootfs workload, integrity off and measuring + appraising with a warm state
C_LIMIT_WORKLOADS = ("a", "d", "f")
C_LIMIT_GOALS = ((OVERLAY, 1.20), ("appraise-warm", 1.50), ("measure-appraise-warm", 1.50))


def _pair(res, wkey: str, num: str, den: str, sfx: str, what: str, limit=None) -> dict:
    """A target that is the ratio of two cells of one workload (modes pinned alike)."""
    return {"key": f"{wkey} {num}{sfx}/{den}{sfx}", "what": what,
            "value": ratio(_median(res, wkey, num + sfx), _median(res, wkey, den + sfx)),
            "op": None if limit is None else "<=", "limit": limit}


def issue_targets(bench: Bench) -> list[dict]:
    """The figures the project's issues set targets for (and some for comparison),
    from this run's results; value None when a part was not run. With pinned modes,
    each figure between modes is given for the pinned ones too."""
    res = bench.results
    sfxs = [""] + ([PIN_SUFFIX] if any(m.pinned for m in bench.modes) else [])
    pin = {"": "", PIN_SUFFIX: " (pinned)"}
    hashing = {r["key"]: r for r in hashing_summary(bench.micro.get("hashing"))}
    hashlib_s = hashing["hashlib"]["median"] if "hashlib" in hashing else None
    out = []
    for sfx in sfxs:
        p = pin[sfx]
        out += [
            _pair(res, "a", "appraise-warm", OVERLAY, sfx,
                  "a: warm small-file opens with signature appraisal (appraise-warm) "
                  f"/ integrity off (overlay){p}", 1.10),
            _pair(res, "b-cold", "verified", "measure", sfx,
                  "b-cold: cold read of the big file with verified reads (verified) "
                  f"/ the same without verification (measure){p}", 1.15),
            _pair(res, "b-cold", "verified-warm", "measure-warm", sfx,
                  f"b-cold, warm state: verified-warm / measure-warm (for comparison){p}"),
            {"key": f"b-warm hashlib/measure{sfx}",
             "what": "b-warm: first read of the measured big file through the mount (measure: "
                     "open, read to EOF, backing file cached), throughput / hashlib.sha256's "
                     f"over the same bytes in memory{p}",
             "value": ratio(hashlib_s, _median(res, "b-warm", "measure" + sfx)),
             "op": ">=", "limit": 0.80},
        ]
        for w in bench.workloads:
            if w.key in C_LIMIT_WORKLOADS or w.target == ROOTFS:
                out += [_pair(res, w.key, m, PASSTHROUGH_C, sfx,
                              f"{w.key}: {m} / libfuse's C passthrough_ll{p}", lim)
                        for m, lim in C_LIMIT_GOALS]
    out += [
        {"key": "hash_fd/hashlib cold",
         "what": "hash_fd sha256 of the big file, page cache dropped: speed / hashlib.sha256 "
                 "in memory",
         "value": hashing["hash_fd"]["vs_hashlib"] if "hash_fd" in hashing else None,
         "op": ">=", "limit": 0.80},
        {"key": "hash_fd+verity/hashlib cold",
         "what": "hash_fd sha256 + fs-verity tree, cold: speed / hashlib.sha256 (for comparison)",
         "value": hashing["hash_fd+verity"]["vs_hashlib"] if "hash_fd+verity" in hashing
         else None,
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
                 "rootfs": getattr(bench.args, "rootfs", None),
                 "pin": getattr(bench.args, "pin", "off")},
        "elapsed_s": bench.elapsed,
        "sizes": dict(bench.sizes.__dict__),
        "modes": [{"name": m.name, "title": m.title, "native": m.native, "daemon": m.daemon,
                   "args": list(m.args), "state": m.state, "integrity": m.integrity,
                   "policies": list(m.policies) if m.policies else None, "pinned": m.pinned}
                  for m in bench.modes],
        "workloads": {w.key: {"title": w.title, "unit": w.unit, "amount": w.amount,
                              "target": w.target,
                              "modes": {m.name: cell_summary(bench.results, w.key, m.name)
                                        for m in bench.modes}}
                      for w in bench.workloads},
        "targets": issue_targets(bench),
        "hashing": (dict(bench.micro["hashing"], summary=hashing_summary(bench.micro["hashing"]))
                    if "hashing" in bench.micro else None),
        "ns_resolution": bench.micro.get("ns_resolution"),
        "digest_list": bench.micro.get("digest_list"),
        "model": bench.micro.get("model"),
        "notice": bench.micro.get("notice"),
        "rootfs": bench.rootfs_info or None,
    }


def _from_json_only(b: Bench, root: Path) -> Run:
    raise RuntimeError("a workload read from a --json file does not run")


def load_json(path: str, args) -> tuple[Bench, dict]:
    """A Bench (not to be run) holding the results of an earlier --json file."""
    data = json.loads(Path(path).read_text())
    # the modes as they were in that run (a mode's name may mean other arguments now)
    modes = [Mode(m["name"], m["title"], native=m["native"], args=tuple(m["args"]),
                  daemon=m.get("daemon", IMAFS_DAEMON), state=m["state"],
                  integrity=m["integrity"], pinned=m.get("pinned", False),
                  policies=tuple(m["policies"]) if m.get("policies") else None)
             for m in data["modes"]]
    wls = [Workload(k, w["title"], _from_json_only, w["amount"], w["unit"],
                    target=w.get("target", TREE))
           for k, w in data["workloads"].items()]
    args.reps, args.quick = data["args"]["reps"], data["args"]["quick"]
    args.rootfs = data["args"].get("rootfs")
    args.pin = data["args"].get("pin", "off")
    known = set(Sizes.__dataclass_fields__)
    bench = Bench(args, Sizes(**{k: v for k, v in data["sizes"].items() if k in known}),
                  modes, wls, Path("/nonexistent"))
    for k, w in data["workloads"].items():
        for name, c in w["modes"].items():
            bench.results[k][name] = Cell(times=list(c["times"]), error=c["error"], note=c["note"],
                                          engine=c.get("engine"),
                                          cpu=list(c.get("daemon_cpu") or []))
    if data.get("hashing"):
        bench.micro["hashing"] = {k: v for k, v in data["hashing"].items() if k != "summary"}
    if data.get("ns_resolution"):
        bench.micro["ns_resolution"] = data["ns_resolution"]
    if data.get("digest_list"):
        bench.micro["digest_list"] = data["digest_list"]
    if data.get("model"):
        bench.micro["model"] = data["model"]
    if data.get("notice"):
        bench.micro["notice"] = data["notice"]
    bench.rootfs_info = dict(data.get("rootfs") or {})
    if "built" in bench.rootfs_info:   # a file written before results kept suite and date only
        bench.rootfs_info["built"] = built_record(bench.rootfs_info["built"])
    bench.elapsed = data.get("elapsed_s")
    return bench, data["machine"]
