"""scripts/bench.py runs end to end at smoke-test sizes and writes its reports: every
mode (libfuse's C passthrough_ll included when gcc, pkg-config and libfuse3-dev are
installed) on the small-file and big-file workloads with the hashing and namespace
measurements, pinned and unpinned runs, the behaviour models' cost per event (--only
model), and (when the cached Debian rootfs exists) one real-rootfs command."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.mounts import REPO

BENCH = REPO / "scripts" / "bench.py"
sys.path.insert(0, str(BENCH.parent))   # scripts/benchlib, the bench's parts
from benchlib import DEFAULT_ROOTFS  # noqa: E402
from benchlib.measure import HASH_ROWS, NS_ROWS  # noqa: E402
from benchlib import passthrough_c  # noqa: E402
from benchlib.modes import MODES, PASSTHROUGH_C  # noqa: E402
from benchlib.results import target_cells  # noqa: E402
from benchlib.rootfs import built_record  # noqa: E402
from benchlib.runs import SMOKE  # noqa: E402

NO_C = passthrough_c.missing()   # why passthrough-c cannot be built here, or None
# the digest-list modes run in a test of their own (test_bench_digest_list_modes)
DL_MODES = ("digest-list", "digest-list-warm")
ALL_MODES = [m.name for m in MODES
             if not (NO_C and m.name == PASSTHROUGH_C) and m.name not in DL_MODES]
ROOTFS_CACHE = Path(os.environ.get("IMAFS_ROOTFS_CACHE", DEFAULT_ROOTFS))

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE filesystems as root")


def _run(args, tmp_path, timeout):
    md, js, png = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.png"
    p = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--reps", "1",
         "--markdown", str(md), "--json", str(js), "--plot", str(png),
         "--workdir", str(tmp_path / "work")] + args,
        capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p, json.loads(js.read_text()), md.read_text(), png


def _cleaned_up(tmp_path, png):
    # the temporary tree is gone and nothing is left mounted
    assert list((tmp_path / "work").iterdir()) == []
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cells_ok(data, workloads, modes):
    assert sorted(data["workloads"]) == sorted(workloads)
    assert [m["name"] for m in data["modes"]] == modes
    for w in workloads:
        for m in modes:
            cell = data["workloads"][w]["modes"][m]
            assert cell["error"] is None, (w, m, cell["error"])
            assert isinstance(cell["median"], float) and cell["median"] > 0, (w, m, cell)
            if "overlay" in modes:
                assert cell["ratio_overlay"] > 0
            if "native" in modes:
                assert cell["ratio_native"] > 0
            if PASSTHROUGH_C in modes:
                assert cell["ratio_passthrough_c"] > 0
        if PASSTHROUGH_C in modes:
            assert data["workloads"][w]["modes"][PASSTHROUGH_C]["ratio_passthrough_c"] == \
                pytest.approx(1.0)
        if "native" in modes:
            assert data["workloads"][w]["modes"]["native"]["ratio_native"] == pytest.approx(1.0)
        if "overlay" in modes:
            assert data["workloads"][w]["modes"]["overlay"]["ratio_overlay"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.mount
@needs_root
@pytest.mark.timeout(300)
def test_bench_quick_all_modes(tmp_path):
    workloads = ["a", "b-cold", "b-warm", "f"]
    p, data, text, png = _run(["--only", ",".join(workloads + ["hash", "ns"]),
                               "--modes", ",".join(ALL_MODES)], tmp_path, 290)
    _cells_ok(data, workloads, ALL_MODES)
    assert data["machine"]["nproc"] >= 1 and data["machine"]["kernel"]
    modes = {m["name"]: m for m in data["modes"]}
    # signature appraisal alone does not verify reads; measure+appraise keeps the default
    for m in ("appraise", "appraise-warm"):
        assert "--verify-reads=off" in modes[m]["args"]
    for m in ("verified", "verified-warm"):
        assert "--verify-reads=on" in modes[m]["args"]
    assert not any(a.startswith("--verify-reads") for a in modes["measure-appraise"]["args"])
    assert modes["overlay"]["args"] == ["--no-integrity"]
    # what the engine did (its counters after the run): cold modes hash every file,
    # warm ones none (digests from the state of the priming run)
    a = data["workloads"]["a"]["modes"]
    assert a["overlay"]["engine"] is None
    n = SMOKE.files
    assert a["measure"]["engine"]["hashed_files"] == n
    assert a["measure"]["engine"]["entries"] > n
    for m in ("measure-warm", "appraise-warm", "measure-appraise-warm", "verified-warm"):
        # warm: every file's digests from the cache, or its whole verdict (done record)
        e = a[m]["engine"]
        assert e["hashed_files"] == 0 and e["cache_hits"] + e["done_records"] >= n, \
            (m, a[m]["engine"])

    # the issues' figures, as numbers
    targets = {t["key"]: t for t in data["targets"]}
    keys = ["a appraise-warm/overlay", "b-cold verified/measure", "hash_fd/hashlib cold",
            "b-warm hashlib/measure", "a overlay/passthrough-c", "f appraise-warm/passthrough-c",
            "f measure-appraise-warm/passthrough-c"]
    for k in keys if not NO_C else keys[:4]:
        assert targets[k]["value"] > 0 and targets[k]["met"] in (True, False), targets[k]
    assert targets["a appraise-warm/overlay"]["value"] == pytest.approx(
        a["appraise-warm"]["median"] / a["overlay"]["median"])
    # the first read of a measured file, as throughput against hashlib over its bytes
    bw = data["workloads"]["b-warm"]["modes"]["measure"]
    assert targets["b-warm hashlib/measure"]["value"] == pytest.approx(
        statistics.median(data["hashing"]["times"]["hashlib"]) / bw["median"])
    if not NO_C:
        assert targets["a overlay/passthrough-c"]["value"] == pytest.approx(
            a["overlay"]["median"] / a[PASSTHROUGH_C]["median"])
        assert a[PASSTHROUGH_C]["engine"] is None
        assert "## Summary (time, ratio to passthrough-c: libfuse's C passthrough_ll, " \
            "the limit)" in text
    hs = {r["key"]: r for r in data["hashing"]["summary"]}
    assert set(hs) == set(HASH_ROWS)
    assert all(r["mib_s"] > 0 and r["vs_hashlib"] > 0 for r in hs.values())
    assert hs["hashlib"]["vs_hashlib"] == pytest.approx(1.0)
    assert data["hashing"]["bytes"] == SMOKE.big_mib << 20
    us = data["ns_resolution"]["us"]
    assert set(us) == set(NS_ROWS) and all(v > 0 for v in us.values())

    assert "## Issue targets" in text
    assert "| b-cold: cold read of the big file with verified reads (verified)" in text
    assert "## Summary (time, ratio to integrity off)" in text
    assert "| workload | " + " | ".join(ALL_MODES) + " |" in text
    assert "| mode | median | runs (s) | rate | / integrity off | / passthrough-c | / native " \
        in text
    for w in workloads:
        assert f"| **{w}** " in text
    assert "## Hashing" in text and "| hash_fd sha256, page cache dropped (cold) |" in text
    assert "## Namespace resolution per open" in text
    assert "Linux " in text and "Python " in text
    assert "b-cold verified/measure" in p.stdout and "hash_fd sha256" in p.stdout
    _cleaned_up(tmp_path, png)

    # the report is rebuilt from the JSON alone
    md2 = tmp_path / "again.md"
    q = subprocess.run([sys.executable, str(BENCH), "--from-json", str(tmp_path / "r.json"),
                        "--markdown", str(md2), "--plot", "none"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert q.returncode == 0, q.stderr
    again = md2.read_text()
    for section in ("## Issue targets", "## Hashing", "## Namespace resolution per open"):
        assert section in again
    assert again == text.replace("![ratio to integrity off](r.png)\n\n", "")


@pytest.mark.slow
@pytest.mark.mount
@needs_root
@pytest.mark.timeout(240)
def test_bench_model(tmp_path):
    """--only model: a learning and an enforcing behaviour model against the same
    workload without one, under plain appraisal (the files signed: every file hashed
    for it, and by no model) and an empty policy (every file hashed by the model
    alone); every open one model event, the enforcing runs inside the model; the
    section in the report, and again from the JSON alone."""
    p, data, text, png = _run(["--only", "model"], tmp_path, 230)
    assert data["workloads"] == {} and data["hashing"] is None
    m = data["model"]
    assert "error" not in m, m
    files, reps = m["files"], m["reps"]
    assert files == 100 and reps == 1
    for policy in ("appraise", "empty"):
        row = m[policy]
        for kind in ("none", "learn", "enforce"):
            c = row[kind]
            assert len(c["times"]) == reps and c["median"] > 0, (policy, kind, c)
            # the untimed first run hashed every file once: for the appraisal, or for
            # the model (its own pass) where no policy asks
            want = 0 if (policy, kind) == ("empty", "none") else files
            assert c["hashed_files"] == want, (policy, kind, c)
        assert row["none"]["events"] is None and row["none"]["daemon_us"] is None
        for kind in ("learn", "enforce"):
            c = row[kind]
            assert c["events"] == files, (policy, kind, c)
            assert c["daemon_us"] > 0 and isinstance(c["us_per_event"], float)
    assert m["decide_us"]["learn"] > 0 and m["decide_us"]["in-model"] > 0
    assert "## Behaviour models" in text and "plain appraise" in text
    assert "decide_chain alone" in p.stdout
    assert "mirror" not in text and "http" not in text
    # its mounts and files gone (no workload: no plot)
    assert list((tmp_path / "work").iterdir()) == []
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    md2 = tmp_path / "again.md"
    q = subprocess.run([sys.executable, str(BENCH), "--from-json", str(tmp_path / "r.json"),
                        "--markdown", str(md2), "--plot", "none"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert q.returncode == 0, q.stderr
    assert "## Behaviour models" in md2.read_text()


@pytest.mark.slow
@pytest.mark.mount
@needs_root
@pytest.mark.timeout(120)
def test_bench_pinned_and_unpinned(tmp_path):
    """--pin both: every mode twice, MODE and MODE-pinned, each ratio to the reference
    pinned alike."""
    modes = ["native", "overlay"] + ([] if NO_C else [PASSTHROUGH_C])
    p, data, text, png = _run(["--only", "f", "--modes", ",".join(modes), "--pin", "both"],
                              tmp_path, 110)
    names = modes + [m + "-pinned" for m in modes]
    assert [m["name"] for m in data["modes"]] == names
    assert [m["pinned"] for m in data["modes"]] == [False] * len(modes) + [True] * len(modes)
    assert data["args"]["pin"] == "both"
    f = data["workloads"]["f"]["modes"]
    for n in names:
        assert f[n]["error"] is None and f[n]["median"] > 0, (n, f[n])
    for sfx in ("", "-pinned"):
        assert f["overlay" + sfx]["ratio_overlay"] == pytest.approx(1.0)
        assert f["native" + sfx]["ratio_overlay"] == pytest.approx(
            f["native" + sfx]["median"] / f["overlay" + sfx]["median"])
        if not NO_C:
            assert f["overlay" + sfx]["ratio_passthrough_c"] == pytest.approx(
                f["overlay" + sfx]["median"] / f[PASSTHROUGH_C + sfx]["median"])
    assert "--pin both" in text and "| overlay-pinned |" in text
    _cleaned_up(tmp_path, png)


@pytest.mark.slow
@pytest.mark.mount
@needs_root
@pytest.mark.timeout(120)
def test_bench_rootfs(tmp_path):
    if not (Path(str(ROOTFS_CACHE) + ".complete").is_file() and ROOTFS_CACHE.is_dir()):
        pytest.skip(f"no cached Debian rootfs at {ROOTFS_CACHE} (scripts/rootfs.sh builds it)")
    modes = ["native", "appraise"]
    p, data, text, png = _run(["--rootfs", str(ROOTFS_CACHE), "--only", "r-apt",
                               "--modes", ",".join(modes)], tmp_path, 110)
    _cells_ok(data, ["r-apt"], modes)
    assert data["workloads"]["r-apt"]["target"] == "rootfs"
    assert data["rootfs"]["files"] > 1000 and data["rootfs"]["sign_s"] > 0
    assert data["hashing"] is None and data["ns_resolution"] is None   # not asked for
    assert "## Summary: real root filesystem (time, ratio to integrity off)" in text
    assert "## Real root filesystem" in text and "imafs sign -r --skip-special" in text
    assert "exec+mmap imasig + appraise_tcb" in text
    _cleaned_up(tmp_path, png)


@pytest.mark.slow
@pytest.mark.mount
@needs_root
@pytest.mark.timeout(300)
def test_bench_digest_list_modes(tmp_path):
    """The digest-list modes on the tree: every read and exec passes through the list
    of the tree's files, the measurement list holds the list alone (cold and warm), the
    warm state hashes nothing; and the dl measurement (a list loaded, lookups timed)."""
    modes = ["overlay", *DL_MODES]
    p, data, text, png = _run(["--only", "a,c,dl", "--modes", ",".join(modes)], tmp_path,
                              280)
    _cells_ok(data, ["a", "c"], modes)
    for w in ("a", "c"):
        cells = data["workloads"][w]["modes"]
        for m in DL_MODES:
            # boot aggregate and the list: no file of the tree got an entry of its own
            assert cells[m]["engine"]["entries"] == 2, (w, m, cells[m]["engine"])
        assert cells["digest-list-warm"]["engine"]["hashed_files"] == 0
    d = data["digest_list"]
    assert d["digests"] == 10_000 and len(d["load_s"]) >= 3
    assert set(d["us"]) == {"first", "found", "missing", "open"} and \
        all(v > 0 for v in d["us"].values())
    assert "## Digest lists" in text and "| load |" in text
    _cleaned_up(tmp_path, png)


def test_bench_rootfs_missing(tmp_path):
    p = subprocess.run([sys.executable, str(BENCH), "--rootfs", str(tmp_path / "none"),
                        "--markdown", str(tmp_path / "r.md")],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "scripts/rootfs.sh" in p.stderr, p.stderr
    assert not (tmp_path / "r.md").exists()


def test_target_figures_next_to_their_limit_print_apart():
    """A figure just under its limit must not print as the limit itself (0.7997 as
    "0.80x ... NOT met"); others keep two decimals."""
    def cells(value, op, limit):
        t = {"value": value, "op": op, "limit": limit}
        t["met"] = None if value is None or limit is None else \
            (value <= limit if op == "<=" else value >= limit)
        return target_cells(t)
    assert cells(0.7997, ">=", 0.80) == ("0.7997x", "≥ 0.80x", "NOT met")
    assert cells(0.8003, ">=", 0.80) == ("0.8003x", "≥ 0.80x", "met")
    assert cells(1.7523, "<=", 1.10) == ("1.75x", "≤ 1.10x", "NOT met")
    assert cells(2.616, None, None) == ("2.62x", "", "")
    assert cells(None, "<=", 1.15) == ("not run", "≤ 1.15x", "")


def test_results_record_no_mirror_address(tmp_path):
    """Results keep the Debian suite and date of the rootfs, never the mirror it was
    fetched from (scripts/rootfs.sh writes it into its marker), in a new run and in a
    file redrawn with --from-json; the committed results neither."""
    line = "suite=bookworm mirror=http://mirror.example/debian seconds=30 date=2026-12-01T06:56Z"
    assert built_record(line) == "suite=bookworm date=2026-12-01T06:56Z"
    for f in ("results.md", "results.json"):
        text = (REPO / "bench" / f).read_text()
        assert "mirror" not in text and "http" not in text, f
    old = json.loads((REPO / "bench" / "results.json").read_text())
    old["rootfs"]["built"] = line
    (tmp_path / "old.json").write_text(json.dumps(old))
    p = subprocess.run([sys.executable, str(BENCH), "--from-json", str(tmp_path / "old.json"),
                        "--markdown", str(tmp_path / "r.md"), "--plot", "none"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "r.md").read_text()
    assert "suite=bookworm date=2026-12-01T06:56Z" in text and "mirror" not in text


@pytest.mark.mount
@needs_root
@pytest.mark.timeout(120)
def test_passthrough_ll_from_gzipped_example(tmp_path, monkeypatch):
    """passthrough_ll builds from the example as Debian may ship it (gzipped, with its
    header gzipped too), serves the backing, and is unmounted and ended by stop(); one
    that cannot mount (no such source) is MountFailed with its own message, nothing
    left mounted."""
    if NO_C:
        pytest.skip(NO_C)
    import gzip
    import shutil
    from benchlib.mounts import CPassthroughMount, MountFailed, is_mounted
    examples = tmp_path / "examples"
    examples.mkdir()
    for name in ("passthrough_ll.c", "passthrough_helpers.h"):
        src = passthrough_c.EXAMPLES / name
        if src.is_file():
            (examples / (name + ".gz")).write_bytes(gzip.compress(src.read_bytes()))
        else:
            shutil.copy(str(src) + ".gz", examples)
    monkeypatch.setattr(passthrough_c, "EXAMPLES", examples)
    binary = passthrough_c.build(tmp_path / "build")
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    (backing / "x").write_text("through C\n")
    m = CPassthroughMount(binary, backing, mnt, tmp_path / "log")
    try:
        m.start()
        assert (mnt / "x").read_text() == "through C\n"
        pid = m.proc.pid
    finally:
        m.stop()
    assert not is_mounted(mnt) and m.proc is None
    assert not os.path.exists(f"/proc/{pid}")
    bad = CPassthroughMount(binary, tmp_path / "none", mnt, tmp_path / "log2")
    with pytest.raises(MountFailed, match="passthrough_ll: exit status"):
        bad.start()
    assert not is_mounted(mnt) and bad.proc is None


@pytest.mark.slow
@pytest.mark.mount
@needs_root
@pytest.mark.timeout(200)
def test_bench_notice_delay(tmp_path):
    """The delay before a change behind the mount is noticed: each way measured
    (seconds, at least 5 runs), in the JSON and the markdown report."""
    p, data, text, png = _run(["--only", "notice", "--modes", "native"], tmp_path, 190)
    secs = data["notice"]["seconds"]
    assert sorted(secs) == ["mapping", "stat pass", "write"]
    for way, ts in secs.items():
        assert len(ts) >= 5 and all(0 < t < 30 for t in ts), (way, ts)
    assert "## Changes behind the mount" in text
    assert "(inotify IN_MODIFY)" in text and "stat pass alone" in text
