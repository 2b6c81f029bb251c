"""What a behaviour model costs per event (``--only model``, issue 18): one process
(the host's ``cat``) opens and reads N small files through a mount of their own, in a
child namespace, without a model, with a learning model and with an enforcing one.

Each configuration runs on a fresh mount: an untimed first run (every file hashed,
verdicts kept, the kernel's dentries and pages filled), then ``reps`` timed runs. A
learning run is a namespace of its own (every event a new coefficient); an enforcing
run joins the namespace the first run learned (every event in the model). Every open
is one model event (``cat`` itself is the host's: its exec and libraries are not in
the mount). The cost per event, two ways: the difference of the medians divided by N,
on top of the same workload in a namespace without a model (wall clock: noisy on a
busy machine); and the daemon's own account (``stats``: ``model_us`` over
``model_events``, the time its model step took: who acts, the digest, the decision).
Both under plain appraisal (every file signed by ``imafs sign -r``, a policy
appraising every read's signature: the digest is IMA's, the model adds its decision)
and under an empty policy (the model then hashes every file itself, once per version;
and since the engine's open hooks are off while no policy has rules and no model
exists, the difference to the run without a model there is the whole engine's open
path, not the model's step alone).
Also the model's decision alone, in-process (``decide_chain`` over a prepared event:
learned, and in the model)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchlib import IMAFS, REPO, env, import_imafs

# the baseline each model runs against: plain appraisal (signed files) and no policy
POLICIES = {"appraise": "appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig\n",
            "empty": ""}
POLICY_TITLES = {"appraise": "plain appraise (signatures on every read)",
                 "empty": "empty policy (without a model no open reaches the engine; "
                          "with one, the engine's open path and the model's own hashing)"}
if TYPE_CHECKING:
    from benchlib.run import Bench

TSEM_AGENT_US = 170      # TSEM's user-space agent, as reported (issue 18)


def _mount(backing: Path, mnt: Path, state: Path, policy: Path, cert: Path) -> None:
    args = ["--policy", str(policy), "--key", str(cert)] if policy.read_text() else []
    subprocess.run(IMAFS + ["mount", str(backing), str(mnt), "--state", str(state)] + args,
                   check=True, env=env(), cwd=REPO, timeout=120, capture_output=True)


def _umount(mnt: Path) -> None:
    subprocess.run(IMAFS + ["umount", str(mnt)], env=env(), cwd=REPO, timeout=120,
                   capture_output=True)


def _run(mnt: Path, first: str) -> float:
    """``first`` written to its control file, then ``cat`` of every file: seconds."""
    ctl = mnt / ".imafs"
    script = (f'{first} && cd "$0"/tree && exec cat d*/f* > /dev/null')
    t = time.perf_counter()
    subprocess.run(["sh", "-c", script.replace("CTL", str(ctl)), str(mnt)], check=True,
                   env=env(), timeout=600)
    return time.perf_counter() - t


def _stats(mnt: Path, ns: str | None = None) -> dict:
    """A namespace's model stats, or (None) the engine's."""
    p = mnt / ".imafs" / ("stats" if ns is None else f"namespaces/{ns}/model/stats")
    return json.loads(p.read_text())


def _config(work: Path, backing: Path, cert: Path, policy: str, kind: str,
            reps: int) -> dict:
    """One configuration (``kind``: none, learn, enforce) on a fresh mount."""
    mnt, state = work / "model-mnt", work / f"model-state-{policy}-{kind}"
    mnt.mkdir(exist_ok=True)
    pfile = work / f"model-policy-{policy}"
    pfile.write_text(POLICIES[policy])
    _mount(backing, mnt, state, pfile, cert)
    try:
        opt = "" if kind == "none" else " model=learn"
        _run(mnt, f'echo "prime{opt}" > CTL/ns-create')
        events = None
        if kind == "enforce":
            for cmd in ("seal", "enforce"):
                (mnt / ".imafs/namespaces/prime/model/control").write_text(cmd + "\n")
        before = _stats(mnt)
        times = []
        for i in range(reps):
            if kind == "enforce":
                times.append(_run(mnt, "echo prime > CTL/ns-join"))
            else:
                times.append(_run(mnt, f'echo "r{i}{opt}" > CTL/ns-create'))
        if kind == "learn":
            events = _stats(mnt, "r0")["events"]
        elif kind == "enforce":
            st = _stats(mnt, "prime")
            if st.get("out-of-model") or st.get("untrusted"):
                raise RuntimeError(f"enforcing runs left the model: {st}")
            events = (st["events"] - st["learned"]) // reps
        after = _stats(mnt)
        n = after["model_events"] - before["model_events"]
        daemon = (after["model_us"] - before["model_us"]) / n if n else None
        # files the daemon hashed (IMA's collect step or the model's own pass): every
        # file once, in the untimed first run, wherever a policy or a model asks
        return {"times": times, "median": statistics.median(times), "events": events,
                "daemon_us": daemon, "hashed_files": after["hashed_files"]}
    finally:
        _umount(mnt)


def _decide_micro(n: int) -> dict:
    """Microseconds per decide_chain (one model) of a file_open: a new coefficient
    (learn), and one in the model."""
    import_imafs()
    from imafs.ima import model as M
    from imafs.ima import modelmap as mm
    m = M.Model()
    actor = M.Actor((1, 1), None, mm.Coe())
    inode = mm.Inode(0, 0, 0o100644)
    evs = [mm.file_open(f"/tree/d{i % 50:02d}/f{i:05d}".encode(), inode,
                        bytes(32), mm.MAY_READ, key=(1, i)) for i in range(n)]
    out = {}
    for label in ("learn", "in-model"):
        t = time.perf_counter()
        for ev in evs:
            M.decide_chain([m], actor, ev)
        out[label] = (time.perf_counter() - t) / n * 1e6
    return out


def model_micro(bench: "Bench") -> dict:
    """The measurement: ``bench`` gives the work directory, the sizes (``--quick``),
    the repetitions and the signing key."""
    work, reps = bench.work, max(1, bench.args.reps)
    files = 100 if bench.args.smoke else 300 if bench.args.quick else 2000
    backing = work / "model-backing"
    for i in range(files):
        d = backing / "tree" / f"d{i % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(os.urandom(4096))
    bench.imafs(bench.sign_args() + [str(backing / "tree")])
    cert = bench.signing_key() / "signing_cert.der"
    out = {"files": files, "reps": reps,
           "decide_us": _decide_micro(files * 10)}
    for policy in POLICIES:
        base = _config(work, backing, cert, policy, "none", reps)
        row = {"none": base}
        for kind in ("learn", "enforce"):
            c = _config(work, backing, cert, policy, kind, reps)
            c["us_per_event"] = (c["median"] - base["median"]) / files * 1e6
            row[kind] = c
        out[policy] = row
    return out


def model_lines(r: dict) -> list[str]:
    """The figures as lines (printed tables and the markdown report)."""
    out = [f"{r['files']} files of 4 KiB opened and read by one cat, median of {r['reps']} "
           f"runs after a first one; per event: the difference to the run without a model"]
    for policy, title in POLICY_TITLES.items():
        row = r.get(policy)
        if row is None:      # a run made before this baseline existed
            continue
        out.append(f"{title}: no model {row['none']['median'] * 1000:.0f} ms; "
                   + "; ".join(f"{k} {row[k]['median'] * 1000:.0f} ms "
                               f"({row[k]['us_per_event']:+.1f} us/event by the clock, "
                               f"{row[k]['daemon_us']:.1f} us/event in the daemon)"
                               for k in ("learn", "enforce")))
    d = r["decide_us"]
    out.append(f"decide_chain alone, one model: learn {d['learn']:.1f} us, in the model "
               f"{d['in-model']:.1f} us per event (TSEM's user-space agent: about "
               f"{TSEM_AGENT_US} us)")
    return out
