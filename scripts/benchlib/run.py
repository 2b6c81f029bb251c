"""Bench: one run of the benchmark. It builds the synthetic tree (and the rootfs's copy),
then runs every workload in every mode: each timed run on a fresh mount, the median of
--reps runs, the engine's counters read after each run of an integrity mode."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import DROP_CACHES, IMAFS, REPO, ROOTFS, TREE, drop_page_cache, env
from benchlib.measure import digest_list_micro, hashing_micro, ns_resolution_micro
from benchlib.notice import notice_micro
from benchlib import passthrough_c
from benchlib.modes import IMAFS_DAEMON, PIN, Mode
from benchlib.mounts import (CPassthroughMount, ImafsMount, MountFailed, daemon_cpu,
                             force_unmount)
from benchlib.rootfs import build_rootfs
from benchlib.runs import Cell, Sizes, Workload
from benchlib.workloads import reset_out


class Bench:
    def __init__(self, args, sizes: Sizes, modes: list[Mode], wls: list[Workload], work: Path,
                 micro: list[str] | tuple[str, ...] = ()):
        self.args, self.sizes, self.modes, self.workloads = args, sizes, modes, wls
        self.micro_keys = list(micro)
        self.work = work
        self.backing = work / "backing"
        self.rootfs = work / "rootfs"
        self.mnt = work / "mnt"
        self.control_name = ".imafs"
        self.results: dict[str, dict[str, Cell]] = {w.key: {} for w in wls}
        self.micro: dict[str, dict] = {}      # "hashing", "ns_resolution"
        self.rootfs_info: dict = {}
        self.refs: dict[str, int] = {}        # outputs that must be the same in every run
        self.elapsed: float | None = None
        self._states = 0
        self._tree_signed = False
        self._passthrough_ll: Path | None = None
        self.mount: ImafsMount | CPassthroughMount | None = None
        self.last_cpu: float | None = None   # the daemon's CPU time in the last timed run

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def backing_of(self, target: str) -> Path:
        return self.rootfs if target == ROOTFS else self.backing

    def workloads_of(self, target: str) -> list[Workload]:
        return [w for w in self.workloads if w.target == target]

    # ---- the tree
    def build_tree(self) -> None:
        s = self.sizes
        t0 = time.monotonic()
        tree = self.backing / "tree"
        for d in range(s.dirs):
            (tree / f"d{d:02d}").mkdir(parents=True)
        for i in range(s.files):
            (tree / f"d{i % s.dirs:02d}" / f"f{i:05d}").write_bytes(os.urandom(s.file_size))
        (self.backing / "bin").mkdir()
        shutil.copy2(self.busybox(), self.backing / "bin" / "busybox")
        (self.backing / "big").mkdir()
        with open(self.backing / "big" / "file", "wb") as f:
            for _ in range(s.big_mib):
                f.write(os.urandom(1 << 20))
        os.sync()
        self.log(f"bench: tree ready in {time.monotonic() - t0:.1f} s ({self.backing})")

    @staticmethod
    def busybox() -> str:
        for p in ("/bin/busybox", "/usr/bin/busybox"):
            if os.path.exists(p):
                out = subprocess.run(["file", "-L", p], capture_output=True, text=True).stdout \
                    if shutil.which("file") else "statically linked"
                if "statically linked" in out or "static-pie" in out:
                    return p
        raise SystemExit("bench: needs a static busybox (apt-get install busybox-static)")

    # ---- keys and signatures
    def signing_key(self) -> Path:
        """An ``imafs keygen`` key pair, made once per run."""
        key = self.work / "signing-key"
        if not (key / "signing_cert.der").exists():
            self.imafs(["keygen", "--out", str(key)])
        return key

    def imafs(self, cmd: list[str], timeout: float = 1800) -> None:
        p = subprocess.run(IMAFS + cmd, capture_output=True, text=True, cwd=REPO, env=env(),
                           stdin=subprocess.DEVNULL, timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"imafs {cmd[0]}: {(p.stderr or p.stdout).strip()[-200:]}")

    def sign_args(self) -> list[str]:
        key = self.signing_key()
        return ["sign", "-q", "--key", str(key / "signing_key.pem"),
                "--cert", str(key / "signing_cert.der"), "-r"]

    def sign_tree(self) -> Path:
        """Every file of the backing signed (once: tree, big file, busybox); the
        certificate."""
        if not self._tree_signed:
            self.imafs(self.sign_args() + [str(self.backing / d) for d in ("tree", "big", "bin")])
            self._tree_signed = True
        return self.signing_key() / "signing_cert.der"

    # ---- mounts
    def passthrough_ll(self) -> Path:
        """libfuse's passthrough_ll, built in the work directory (once per run)."""
        if self._passthrough_ll is None:
            self._passthrough_ll = passthrough_c.build(self.work / "passthrough_ll")
        return self._passthrough_ll

    def new_state(self, mode: Mode) -> Path | None:
        """A fresh --state directory for an imafs mount (None for the other modes)."""
        if mode.native or mode.daemon != IMAFS_DAEMON:
            return None
        self._states += 1
        st = self.work / f"state-{mode.name}-{self._states}"
        return st

    @contextlib.contextmanager
    def mounted(self, mode: Mode, extra: list[str], state: Path | None, target: str = TREE):
        """Yields the root to run in: the backing directory or a fresh mount."""
        backing = self.backing_of(target)
        if mode.native:
            yield backing
            return
        log = self.work / f"{mode.daemon}-{mode.name}-{target}.log"
        pin = PIN if mode.pinned else []
        if mode.daemon == IMAFS_DAEMON:
            assert state is not None
            m = ImafsMount(backing, self.mnt, state, log, list(mode.args) + extra, pin)
        else:
            m = CPassthroughMount(self.passthrough_ll(), backing, self.mnt, log, pin)
        self.mount = m
        try:
            m.start()
            yield self.mnt
        finally:
            m.stop()
            self.mount = None

    # ---- one timed run
    def run_once(self, mode: Mode, w: Workload, root: Path) -> float:
        r = w.make(self, root)
        argv = (PIN if mode.pinned else []) + (mode.wrap(self, root) if mode.wrap else []) \
            + r.argv
        if w.cold:
            drop_page_cache()
        else:
            os.sync()
        pid = self.mount.daemon_pid() if self.mount is not None else None
        c0 = daemon_cpu(pid)
        t0 = time.perf_counter()
        p = subprocess.run(argv, cwd=r.cwd, capture_output=True, text=True,
                           env=r.env if r.env is not None else env(),
                           stdin=subprocess.DEVNULL, timeout=self.args.timeout)
        dt = time.perf_counter() - t0
        c1 = daemon_cpu(pid)
        self.last_cpu = c1 - c0 if c0 is not None and c1 is not None else None
        if p.returncode != 0:
            err = (p.stderr or p.stdout).strip().splitlines()
            raise RuntimeError(f"exit status {p.returncode}" + (f": {err[0]}" if err else ""))
        problem = r.check(p)
        if problem:
            raise RuntimeError(problem)
        return dt

    def engine_stats(self, root: Path) -> dict | None:
        """The engine's counters (control file stats: files hashed, cache hits, ...)
        and the length of the root namespace's measurement list, after a run (untimed):
        what the mode made the engine do."""
        ctl = root / self.control_name
        try:
            out = json.loads((ctl / "stats").read_text())
            with open(ctl / "ascii_runtime_measurements", "rb") as f:
                out["entries"] = sum(b.count(b"\n") for b in iter(lambda: f.read(1 << 16), b""))
            return out
        except (OSError, ValueError):
            return None

    def prepare(self, w: Workload) -> None:
        if w.reset:
            w.reset(self)
        if w.warm:
            w.warm(self)

    def run_mode(self, mode: Mode, target: str = TREE) -> None:
        wls = self.workloads_of(target)
        if not wls:
            return
        self.log(f"bench: mode {mode.name} ({target}): {mode.title}")
        extra: list[str] = []
        if mode.setup:
            try:
                extra = mode.setup(self, target)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.mode_na(mode, f"setup failed: {e}", target)
                return
        if any(w.cold for w in wls) and not os.access(DROP_CACHES, os.W_OK):
            for w in wls:
                if w.cold:
                    self.results[w.key][mode.name] = Cell(error=f"cannot write {DROP_CACHES} (not root)")
        for w in wls:
            cell = self.results[w.key].setdefault(mode.name, Cell())
            if cell.error:
                continue
            warm_state = self.new_state(mode) if mode.state == "warm" else None
            try:
                if warm_state is not None:   # prime the digest cache (untimed)
                    self.prepare(w)
                    with self.mounted(mode, extra, warm_state, target) as root:
                        self.run_once(mode, w, root)
                for rep in range(self.args.reps):
                    self.prepare(w)
                    state = warm_state or self.new_state(mode)
                    with self.mounted(mode, extra, state, target) as root:
                        if mode.integrity and not (root / self.control_name).is_dir():
                            cell.note = "no control directory: engine not active in this build"
                        cell.times.append(self.run_once(mode, w, root))
                        if self.last_cpu is not None:
                            cell.cpu.append(self.last_cpu)
                        if mode.integrity:
                            cell.engine = self.engine_stats(root)
                            hashed = (cell.engine or {}).get("hashed_files")
                            if mode.state == "warm" and hashed:
                                cell.note = f"the warm run hashed {hashed} files"
                    if state is not None and state is not warm_state:
                        shutil.rmtree(state, ignore_errors=True)
            except MountFailed as e:
                self.mode_na(mode, f"mount failed: {e}", target)
                return
            except subprocess.TimeoutExpired:
                cell.error = f"timed out after {self.args.timeout:g} s"
            except Exception as e:  # noqa: BLE001 - one cell n/a, the run goes on
                cell.error = str(e) or type(e).__name__
            finally:
                if warm_state is not None:
                    shutil.rmtree(warm_state, ignore_errors=True)
            med = cell.median
            cpu = (f"; daemon CPU {statistics.median(cell.cpu):.3f} s"
                   if cell.cpu and med is not None else "")
            self.log(f"bench:   {w.key:7s} {mode.name:21s} "
                     + (f"{med:8.3f} s  (runs: {', '.join(f'{t:.3f}' for t in cell.times)}"
                        f"{cpu})" if med is not None else f"n/a ({cell.error})"))
        if target == TREE:
            reset_out(self)

    def mode_na(self, mode: Mode, reason: str, target: str = TREE) -> None:
        self.log(f"bench:   {mode.name}: n/a ({reason})")
        for w in self.workloads_of(target):
            c = self.results[w.key].get(mode.name)
            if c is None or c.median is None:
                self.results[w.key][mode.name] = Cell(error=reason)

    def run_micro(self) -> None:
        if "hash" in self.micro_keys:
            self.log("bench: hashing speed (hash_fd against hashlib)")
            try:
                self.micro["hashing"] = hashing_micro(self.backing / "big" / "file",
                                                      self.args.reps)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.micro["hashing"] = {"error": str(e) or type(e).__name__}
        if "ns" in self.micro_keys:
            self.log("bench: namespace resolution per open")
            try:
                us = ns_resolution_micro(5000 if self.args.quick else 20000)
                self.micro["ns_resolution"] = {"us": us}
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.micro["ns_resolution"] = {"error": str(e) or type(e).__name__}
        if "dl" in self.micro_keys:
            self.log("bench: digest list: load of 100,000 digests, lookup per open")
            try:
                self.micro["digest_list"] = digest_list_micro(
                    10_000 if self.args.quick else 100_000, self.args.reps)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.micro["digest_list"] = {"error": str(e) or type(e).__name__}
        if "attack" in self.micro_keys:
            self.log("bench: hashing attack (issue 14): root's small-file opens meanwhile")
            try:
                from benchlib.attack import attack_micro
                self.micro["attack"] = attack_micro(self.work, self.args.quick)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.micro["attack"] = {"error": str(e) or type(e).__name__}
        if "model" in self.micro_keys:
            self.log("bench: behaviour models, cost per event (issue 18)")
            try:
                from benchlib.model import model_micro
                self.micro["model"] = model_micro(self)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.micro["model"] = {"error": str(e) or type(e).__name__}
        if "notice" in self.micro_keys:
            self.log("bench: delay before a change behind the mount is noticed")
            try:
                self.micro["notice"] = notice_micro(5 if self.args.quick else 20)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.micro["notice"] = {"error": str(e) or type(e).__name__}
        for k, v in self.micro.items():
            self.log(f"bench:   {k}: " + (f"n/a ({v['error']})" if "error" in v else "done"))

    def run(self) -> None:
        t0 = time.monotonic()
        self.mnt.mkdir(exist_ok=True)
        try:
            if self.workloads_of(TREE) or "hash" in self.micro_keys:
                self.build_tree()
            self.run_micro()
            for mode in self.modes:
                self.run_mode(mode, TREE)
            if self.workloads_of(ROOTFS):
                try:
                    self.rootfs_info = build_rootfs(self)
                except Exception as e:  # noqa: BLE001 - the rootfs cells n/a
                    for mode in self.modes:
                        self.mode_na(mode, f"rootfs setup failed: {e}", ROOTFS)
                else:
                    for mode in self.modes:
                        self.run_mode(mode, ROOTFS)
        finally:
            self.elapsed = time.monotonic() - t0

    def cleanup(self) -> None:
        if self.mount is not None:
            self.mount.stop()
        force_unmount(str(self.mnt))
