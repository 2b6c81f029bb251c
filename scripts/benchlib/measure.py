"""The measurements outside the workloads (``--only`` keys ``hash``, ``ns``, ``dl`` and
``notice``): imafs's own hashing against hashlib, the per-open cost of finding the
caller's namespace, a digest list's load time and per-open lookup cost (all three
without a mount), and the delay before a change behind the mount is noticed
(notice.py: a mount of its own)."""
from __future__ import annotations

import hashlib
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import drop_page_cache, import_imafs, read_files

MICRO = ("hash", "ns", "dl", "attack", "model", "notice")   # attack, model, notice: their modules


def hashing_micro(path: Path, reps: int) -> dict:
    """Seconds to hash ``path`` with imafs.ima.hashing.hash_fd (sha256; sha256 and the
    fs-verity tree in one pass), page cache dropped ("cold") and cached, and with
    hashlib.sha256 over the same bytes in memory; every digest is checked. The variants
    take turns within each of the ``reps`` rounds (at least 3), so that a change of the
    machine's load hits them alike."""
    import_imafs()
    from imafs.ima.hashing import hash_fd
    from imafs.ima.verity import VeritySpec
    size = path.stat().st_size
    data = path.read_bytes()
    ref = hashlib.sha256(data).digest()
    variants = (("hash_fd", False, True), ("hash_fd cached", False, False),
                ("hash_fd+verity", True, True), ("hash_fd+verity cached", True, False))
    rows: dict[str, list[float]] = {"hashlib": []}
    rows.update((key, []) for key, _, _ in variants)
    for _ in range(max(3, reps)):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        rows["hashlib"].append(time.perf_counter() - t0)
        for key, verity, cold in variants:
            if cold:
                drop_page_cache()
            else:
                read_files(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                t0 = time.perf_counter()
                d = hash_fd(fd, ("sha256",), verity=VeritySpec() if verity else None)
                rows[key].append(time.perf_counter() - t0)
            finally:
                os.close(fd)
            if d["sha256"] != ref or d.size != size or (verity and d.tree is None):
                raise RuntimeError(f"{key}: wrong digest or size")
    return {"bytes": size, "times": rows}


HASH_ROWS = {   # key: (label, cold)
    "hashlib": ("hashlib.sha256 over the bytes in memory", False),
    "hash_fd": ("hash_fd sha256, page cache dropped (cold)", True),
    "hash_fd cached": ("hash_fd sha256, file cached", False),
    "hash_fd+verity": ("hash_fd sha256 + fs-verity tree, one pass, cold", True),
    "hash_fd+verity cached": ("hash_fd sha256 + fs-verity tree, one pass, cached", False),
}


def hashing_summary(h: dict | None) -> list[dict]:
    """One row per HASH_ROWS key: median, MiB/s and speed relative to hashlib."""
    if not h or "error" in h:
        return []
    size = h["bytes"]
    base = statistics.median(h["times"]["hashlib"])
    out = []
    for key, (label, _) in HASH_ROWS.items():
        ts = h["times"].get(key)
        if not ts:
            continue
        med = statistics.median(ts)
        out.append({"key": key, "label": label, "times": ts, "median": med,
                    "mib_s": size / 2**20 / med, "vs_hashlib": base / med})
    return out


def ns_resolution_micro(n: int = 20000) -> dict[str, float]:
    """Per-open cost of finding the caller's namespace, in microseconds, for a host
    process, one bound by its cgroup and one bound by its pid namespace: Binder.ns_of
    (the engine's call, cached per process) and, "uncached", read_ns (a stat of
    /proc/PID/ns/pid and a read of /proc/PID/cgroup)."""
    import_imafs()
    from imafs.ima.binding import Binder
    b = Binder(f"bench{os.getpid()}")
    child = subprocess.Popen(["sleep", "60"])
    box = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "60"])
    try:
        b.bind(child.pid, 1)
        deadline = time.monotonic() + 5
        inner = None
        while inner is None and time.monotonic() < deadline:
            try:
                with open(f"/proc/{box.pid}/task/{box.pid}/children") as f:
                    inner = int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                time.sleep(0.01)
        b.bind(inner, 2)
        out = {}
        for name, pid, want in (("host", os.getpid(), 0), ("child", child.pid, 1),
                                ("pidns child", inner, 2)):
            for fn, suffix in ((b.ns_of, ""), (b.read_ns, " uncached")):
                assert fn(pid) == want
                t0 = time.perf_counter()
                for _ in range(n):
                    fn(pid)
                out[name + suffix] = (time.perf_counter() - t0) / n * 1e6
        return out
    finally:
        for p in (child, box):
            p.kill()
            p.wait()
        time.sleep(0.1)
        b.close(wait=2.0)


NS_ROWS = {"host": "host process, ns_of (cached per process)",
           "child": "process bound by its cgroup, ns_of",
           "pidns child": "process bound by its pid namespace, ns_of",
           "host uncached": "host process, read_ns (uncached: /proc/PID/ns/pid, "
                            "/proc/PID/cgroup)",
           "child uncached": "process bound by its cgroup, read_ns (uncached)",
           "pidns child uncached": "process bound by its pid namespace, read_ns (uncached)"}


def digest_list_micro(n: int = 100_000, reps: int = 3, lookups: int = 20_000) -> dict:
    """A digest list of ``n`` sha256 digests (1,000 packages: one block each, with a
    provenance), as digest_list_add handles it after the list's own measurement and
    appraisal: parsed and loaded (one LMDB transaction) into a fresh synchronous store
    (STATE/lmdb is one), then removed; median of ``reps`` (at least 3). Per lookup, in
    microseconds: DigestListIndex.lookup of a digest in the list and of one that is
    not, and digest_cache.lookup, what process_measurement adds to a cold open's
    decision per namespace whose rule says digest_cache= (the file's digest at hand);
    "first": the first lookups after the load, whose LMDB pages this process has not
    mapped yet (a fresh daemon's first opens)."""
    import_imafs()
    import types
    from imafs.ima import digest_cache
    from imafs.ima import digest_lists as dl
    from imafs.ima.digest_index import DigestListIndex
    from imafs.store import Store
    rng = random.Random(17)
    nblocks = 1000
    per = max(1, n // nblocks)
    digests = [rng.randbytes(32) for _ in range(per * nblocks)]
    blocks = tuple(dl.Block.of("file", "sha256", sorted(digests[i * per:(i + 1) * per]))
                   for i in range(nblocks))
    prov = dl.Provenance("debian", packages=tuple(
        dl.Package(f"pkg{i}", "1.0", i, "amd64", per) for i in range(nblocks)))
    data = dl.DigestList(blocks, prov).to_bytes()
    found = rng.sample(digests, min(lookups, len(digests)))
    missing = [rng.randbytes(32) for _ in range(len(found))]
    load, remove, us = [], [], {}
    for rep in range(max(3, reps)):
        with tempfile.TemporaryDirectory(prefix="imafs-bench-dl-", dir="/var/tmp") as d:
            store = Store(d)
            try:
                idx = DigestListIndex(store, 0)
                t0 = time.perf_counter()
                idx.add("bench.list", data, actions=dl.ACTION_MEASURED | dl.ACTION_APPRAISED,
                        parsed=dl.parse(data))
                load.append(time.perf_counter() - t0)
                if idx.count() != len(set(digests)):
                    raise RuntimeError(f"{idx.count()} digests loaded, not {len(digests)}")
                if rep == 0:
                    ns = types.SimpleNamespace(id=0, digest_lists=idx)
                    for key, sample, fn in (
                            ("first", found, lambda dg: idx.lookup("sha256", dg)),
                            ("found", found, lambda dg: idx.lookup("sha256", dg)),
                            ("missing", missing, lambda dg: idx.lookup("sha256", dg)),
                            ("open", found,
                             lambda dg: digest_cache.lookup(ns, lambda a: dg))):
                        t0 = time.perf_counter()
                        hits = sum(fn(dg) is not None for dg in sample)
                        us[key] = (time.perf_counter() - t0) / len(sample) * 1e6
                        if hits != (0 if key == "missing" else len(sample)):
                            raise RuntimeError(f"lookup {key}: {hits} hits")
                t0 = time.perf_counter()
                idx.remove("bench.list")
                remove.append(time.perf_counter() - t0)
            finally:
                store.close()
    return {"digests": len(digests), "bytes": len(data), "load_s": load, "remove_s": remove,
            "us": us}


DL_ROWS = {"first": "DigestListIndex.lookup, in the list, first touch of its pages",
           "found": "DigestListIndex.lookup, digest in the list",
           "missing": "DigestListIndex.lookup, digest in no list",
           "open": "digest_cache.lookup (the per-open step, found)"}
