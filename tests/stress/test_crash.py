"""Crash safety: the daemon is killed with SIGKILL at random moments while processes
exec, read, write, fsync and rename through the mount, ROUNDS times.

Each round starts WORKERS workers (tests/stress/crashworker.py; worker 0 in a new child
namespace of its own, cROUND) and kills the daemon at a random moment 0.15-0.7 s
later, but never before the round has observed MIN_FACTS facts of each kind (ELF
exec, script exec, read, append, rename), each worker MIN_WORKER facts, and its
child worker an ELF exec, a script exec and a read (else the kill waits for them,
up to MIN_WAIT s; a round whose workers did too little fails). After every kill:
``imafs umount`` clears the dead mount with no manual step, a new daemon mounts the
same ``--state``, and

- no list loses or changes an entry, nor records one file version twice on a PCR
  (the scripts of earlier rounds are read and run again): each view of the host's list (binary sha1,
  binary sha256, ascii) begins with exactly what it was after the previous kill, and
  a child's list, once its round is over, stays byte for byte what it was;
- every list replays to the PCR values served with it, in both banks: ListWatch
  replays the new entries of each view into running registers (template hashes
  recomputed, the three views and the count agreeing) every round; imafs's verifier
  replays whole lists from zero every 10th round and in the last one (host, every
  child) and always for this round's child; ``evmctl ima_measurement --pcrs``
  (sha1 and sha256) checks the whole host list and this round's child's list every
  round, and every child's every 10th round, when ``imafs verify-log`` also checks
  the host's and this round's child's;
- every exec and read observed so far, in this round and every earlier one, has its
  entries, for that file version (sha256) and on the PCR of its hook (POLICY): an
  ELF exec its BPRM_CHECK entry on PCR 11, MMAP_CHECK on 12 and CREDS_CHECK on 13; a
  script's exec its BPRM_CHECK entry on 11 (the shell's read of the script is on 10
  and cannot stand in for it); a read its FILE_CHECK entry on 10; in the host's list
  and, for the worker in a child namespace, in that child's list: a measurement is
  committed to LMDB before the open is answered;
- the backing tree holds what the workers wrote up to their last fsync (appends are
  intact prefixes, an fsync'ed file renamed over another is there whole, old or new).

Also: a full --state disk (a small tmpfs) and a full LMDB map fail closed (EIO, the
reason logged) and the daemon measures again when space returns.

Environment: IMAFS_CRASH_ROUNDS (default 20: the suite's time budget; 50 or more
for a release), IMAFS_CRASH_SEED (default: time).
Run time: about 1.4-2 s a round (70-100 s on 2 cores, depending on the machine's
load; the time in each phase is printed); the full-disk tests, 3 s.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO, is_mounted, wait_for
from imafs.ima.templates import parse_ascii, parse_binary
from imafs.ima.verifylog import parse_pcr_file
from stress.crashworker import POLICY  # noqa: E402  (the workers' policy is the host's)
from stress.listcheck import check_list, entry_keys, evmctl_check, read_list


sys.path.insert(0, str(Path(__file__).parent))


pytestmark = [pytest.mark.mount, pytest.mark.slow]


ROUNDS = int(os.environ.get("IMAFS_CRASH_ROUNDS", "20"))


WORKERS = 6


WORKER = Path(__file__).with_name("crashworker.py")


# the PCR each observed fact must have an entry on (POLICY): kind -> PCRs
FACT_PCRS = {"elf": (11, 12, 13), "exec": (11,), "read": (10,)}


KINDS = ("elf", "exec", "read", "append", "replace")


MIN_FACTS = 3                   # per kind and round, all workers together


MIN_CHILD = {"elf": 1, "exec": 1, "read": 1}   # per round, the child worker


MIN_WORKER = 3                  # facts of any kind per round, each worker


MIN_WAIT = 30.0                 # seconds a round may take to reach them


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def daemon_pid(state: Path) -> int:
    return int((state / "daemon.lock").read_text().strip())


def mount(backing, mnt, state, policy, log=None) -> None:
    log = log or state / "imafs.log"
    r = subprocess.run(IMAFS + ["mount", str(backing), str(mnt), "--state", str(state),
                                "--policy", str(policy), "--log-file", str(log)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert is_mounted(str(mnt))


def umount(mnt) -> subprocess.CompletedProcess:
    return subprocess.run(IMAFS + ["umount", str(mnt)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


class ListWatch:
    """One namespace's list, checked after every kill without parsing it all again:
    each view (binary sha1, binary sha256, ascii) must begin with exactly what it was
    at the last check (a list never loses or changes an entry); the entries after
    that are parsed, their template hashes recomputed in both banks (the sha256 view
    and the ascii view must describe the same entries), and extended into running
    PCR registers, which must equal the PCR files served now in both banks; the
    count must be the number of entries, and no file version may be there twice on
    one PCR (violations aside). ``full``: also check_list (imafs's
    verifier replaying the whole list from zero)."""

    VIEWS = ("binary", "binary_sha256", "ascii")

    def __init__(self, what: str):
        self.what = what
        self.prev = dict.fromkeys(self.VIEWS, b"")
        self.pcrs = {"sha1": [bytes(20)] * 24, "sha256": [bytes(32)] * 24}
        self.entries: set[tuple[int, bytes, str]] = set()
        self.seen: set[tuple[int, bytes]] = set()   # (PCR, template hash), once each
        self.n = 0

    def update(self, lst: dict, when: str, full: bool = False) -> set:
        what = f"{when}: {self.what}"
        for v in self.VIEWS:
            assert lst[v].startswith(self.prev[v]), \
                f"{what}: its {v} view lost or changed entries " \
                f"({len(self.prev[v])} bytes before, {len(lst[v])} now)"
        tail1 = list(parse_binary(io.BytesIO(lst["binary"][len(self.prev["binary"]):]), "sha1"))
        tail256 = list(parse_binary(
            io.BytesIO(lst["binary_sha256"][len(self.prev["binary_sha256"]):]), "sha256"))
        tail_a = list(parse_ascii(lst["ascii"][len(self.prev["ascii"]):]))
        assert len(tail1) == len(tail256) == len(tail_a), \
            f"{what}: new entries: {len(tail1)} binary, {len(tail256)} sha256, {len(tail_a)} ascii"
        for i, (a, b, c) in enumerate(zip(tail1, tail256, tail_a)):
            at = f"{what}: entry {self.n + i} ({a.name!r})"
            assert a == b == c, f"{at}: the views differ"
            assert a.recorded_hash == c.recorded_hash, f"{at}: ascii and binary hashes differ"
            if not a.violation:
                assert a.recorded_hash == a.template_hash("sha1"), f"{at}: sha1 template hash"
                assert b.recorded_hash == b.template_hash("sha256"), f"{at}: sha256 template hash"
                assert (a.pcr, a.recorded_hash) not in self.seen, \
                    f"{at}: this file version is on PCR {a.pcr} already"
                self.seen.add((a.pcr, a.recorded_hash))
            for bank, e in (("sha1", a), ("sha256", b)):
                regs = self.pcrs[bank]
                regs[e.pcr] = hashlib.new(bank, regs[e.pcr] + e.extend_value(
                    bank, None if e.violation else e.recorded_hash)).digest()
        for bank in ("sha1", "sha256"):
            served = parse_pcr_file(lst[f"pcrs_{bank}"])
            for idx, value in enumerate(self.pcrs[bank]):
                assert served.get(idx, bytes(len(value))) == value, \
                    f"{what}: {bank} PCR {idx} is {served.get(idx, b'').hex()}, the list " \
                    f"replays to {value.hex()}"
        self.n += len(tail1)
        assert lst["count"] == self.n, f"{what}: count {lst['count']}, {self.n} entries"
        self.prev = {v: lst[v] for v in self.VIEWS}
        self.entries |= entry_keys(tail1)
        if full:
            assert check_list(lst, what) == self.entries, what
        return self.entries


def verify_log_check(lst: dict, tmp: Path) -> None:
    (tmp / "bin").write_bytes(lst["binary"])
    (tmp / "p1").write_text(lst["pcrs_sha1"])
    (tmp / "p256").write_text(lst["pcrs_sha256"])
    v = subprocess.run(IMAFS + ["verify-log", str(tmp / "bin"), "--pcrs", f"sha1,{tmp / 'p1'}",
                                "--pcrs", f"sha256,{tmp / 'p256'}"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert v.returncode == 0, v.stdout + v.stderr


def journal(path: Path) -> list[list[str]]:
    try:
        return [line.split(" ", 3) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def kind_counts(facts: list[list[str]]) -> dict[str, int]:
    out = dict.fromkeys(KINDS, 0)
    for f in facts:
        if f[0] in out:
            out[f[0]] += 1
    return out


def round_short(jps: list[Path], child: Path) -> list[str]:
    """What this round's journals lack of the minimum (empty: enough)."""
    total = dict.fromkeys(KINDS, 0)
    short = []
    for w, jp in enumerate(jps):
        mine = kind_counts(journal(jp))
        for k, v in mine.items():
            total[k] += v
        if sum(mine.values()) < MIN_WORKER:
            short.append(f"worker {w} {sum(mine.values())}/{MIN_WORKER}")
    short += [f"{k} {v}/{MIN_FACTS}" for k, v in total.items() if v < MIN_FACTS]
    facts = journal(child)
    cc = kind_counts(facts)
    if not any(f[0] == "ns" for f in facts):
        short.append("child namespace not entered")
    short += [f"child {k} {cc[k]}/{n}" for k, n in MIN_CHILD.items() if cc[k] < n]
    return short


def check_facts(facts: list[list[str]], entries: set, what: str) -> int:
    """Every exec and read in facts has its entries (PCR, name, digest); returns how
    many entries were looked up."""
    n = 0
    for f in facts:
        for pcr in FACT_PCRS.get(f[0], ()):
            key = (pcr, bytes.fromhex(f[1]), f[2])
            assert key in entries, \
                f"{what}: {f[0]} of {key[1]!r} ({f[2][:16]}) succeeded but has no entry on PCR {pcr}"
            n += 1
    return n


def check_backing(backing: Path, facts: list[list[str]], what: str) -> None:
    """Appends are an intact prefix of the backing file; a renamed-over file is one of
    the fsync'ed versions from the last acknowledged one on."""
    appended: dict[str, bytearray] = {}
    versions: dict[str, list[str]] = {}
    for f in facts:
        if f[0] == "append":
            appended.setdefault(f[1], bytearray()).extend(bytes.fromhex(f[2]))
        elif f[0] == "replace":
            versions[f[1]] = [f[2]]
        elif f[0] == "pending":
            versions.setdefault(f[1], []).append(f[2])
    for p, data in appended.items():
        real = (backing / bytes.fromhex(p).decode().lstrip("/")).read_bytes()
        assert real.startswith(bytes(data)), \
            f"{what}: {bytes.fromhex(p).decode()}: {len(real)} bytes, fsync'ed {len(data)}"
    acked = {f[1] for f in facts if f[0] == "replace"}
    for p, shas in versions.items():
        name = bytes.fromhex(p).decode().lstrip("/")
        if p not in acked and not (backing / name).exists():
            continue        # killed before the first rename took effect
        real = hashlib.sha256((backing / name).read_bytes()).hexdigest()
        assert real in shas, f"{what}: {name} is none of the fsync'ed versions"


def test_sigkill_rounds(world_tmp):
    seed = int(os.environ.get("IMAFS_CRASH_SEED", str(time.time_ns() % 10**9)))
    rng = random.Random(seed)
    print(f"IMAFS_CRASH_SEED={seed}")
    backing, mnt, state = world_tmp / "backing", world_tmp / "mnt", world_tmp / "state"
    for d in (backing, mnt):
        d.mkdir()
    jdir = world_tmp / "journals"
    jdir.mkdir()
    policy = world_tmp / "policy"
    policy.write_text(POLICY)
    scratch = world_tmp / "scratch"
    scratch.mkdir()
    mount(backing, mnt, state, policy)
    journals: list[tuple[int, int, Path]] = []
    children: dict[str, Path] = {}      # child namespace -> the journal of its worker
    watches = {"": ListWatch("host list")}     # "" (host) or child name -> its list
    survived = 0
    lookups = 0
    per_round: list[dict[str, int]] = []
    waited = 0
    phases = dict.fromkeys(("work", "workers exit", "umount", "mount", "checks"), 0.0)
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    try:
        for rnd in range(ROUNDS):
            procs = []
            t_start = time.monotonic()
            for w in range(WORKERS):
                jp = jdir / f"r{rnd}-w{w}"
                journals.append((rnd, w, jp))
                argv = [sys.executable, str(WORKER), str(mnt), str(w), str(rnd), str(jp),
                        str(rng.getrandbits(32))]
                if w == 0:      # one worker per round lives in a child namespace
                    argv.append(f"c{rnd}")
                    children[f"c{rnd}"] = jp
                procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, start_new_session=True))
            this_round = [jp for r_, _, jp in journals if r_ == rnd]
            kill_at = t_start + rng.uniform(0.15, 0.7)
            time.sleep(max(0.0, kill_at - time.monotonic()))
            short = round_short(this_round, children[f"c{rnd}"])
            if short:
                waited += 1
                wait_for(lambda: not round_short(this_round, children[f"c{rnd}"]) or
                         any(p.poll() is not None for p in procs), MIN_WAIT, 0.01)
                short = round_short(this_round, children[f"c{rnd}"])
                assert not short, \
                    f"round {rnd}: the workers did too little in {MIN_WAIT} s: {short}; " \
                    f"exited: {[p.returncode for p in procs]}"
                time.sleep(rng.uniform(0, 0.05))
            t_kill = time.monotonic()
            phases["work"] += t_kill - t_start
            pid = daemon_pid(state)
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: not _alive(pid), 10), "daemon survived SIGKILL"
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"round {rnd}: a worker hung on the dead mount")
                assert p.returncode == 0, p.stderr.read().decode()[-2000:]
            t_umount = time.monotonic()
            phases["workers exit"] += t_umount - t_kill
            r = umount(mnt)
            assert r.returncode == 0, f"round {rnd}: imafs umount: {r.stderr}"
            assert not is_mounted(str(mnt)), f"round {rnd}: still mounted"
            t_mount = time.monotonic()
            phases["umount"] += t_mount - t_umount
            mount(backing, mnt, state, policy)
            t_check = time.monotonic()
            phases["mount"] += t_check - t_mount

            # --- what a verifier reads back
            facts = [f for _, _, jp in journals for f in journal(jp)]
            errors = [f for f in facts if f[0] == "error"]
            assert not errors, f"round {rnd}: workers saw errors: {errors[:5]}"
            counts = kind_counts([f for jp in this_round for f in journal(jp)])
            per_round.append(counts)
            assert all(v >= MIN_FACTS for v in counts.values()), (rnd, counts)
            assert all(sum(kind_counts(journal(jp)).values()) >= MIN_WORKER
                       for jp in this_round), rnd

            full = rnd % 10 == 9 or rnd == ROUNDS - 1
            host = read_list(mnt / ".imafs")
            host_entries = watches[""].update(host, f"round {rnd}", full)
            evmctl_check(host, scratch)
            # every fact of every round so far: entries never disappear
            lookups += check_facts(facts, host_entries, f"round {rnd}: host list")

            # every child namespace so far: its own list, its worker's facts. This
            # round's child, and every child every 10th round: the whole list
            # (ListWatch, imafs's verifier, evmctl); the earlier ones in the other
            # rounds: the binary list, re-read, still is what it was
            for ns, jp in children.items():
                cf = journal(jp)
                if not any(f[0] == "ns" for f in cf):
                    assert ns != f"c{rnd}"
                    continue        # killed before it entered the namespace
                d = mnt / ".imafs" / "namespaces" / ns
                w = watches.setdefault(ns, ListWatch(f"list of {ns}"))
                if ns == f"c{rnd}" or full:
                    child = read_list(d)
                    assert ns == f"c{rnd}" or child["binary"] == w.prev["binary"], \
                        f"round {rnd}: the list of {ns} changed after its round"
                    w.update(child, f"round {rnd}", full=True)
                    evmctl_check(child, scratch)
                    if ns == f"c{rnd}" and rnd % 10 == 9:
                        verify_log_check(child, scratch)
                else:
                    binary = (d / "binary_runtime_measurements").read_bytes()
                    assert binary == w.prev["binary"], \
                        f"round {rnd}: the list of {ns} changed after its round " \
                        f"({len(w.prev['binary'])} bytes, now {len(binary)})"
                lookups += check_facts(cf, w.entries, f"round {rnd}: list of {ns}")
                if ns == f"c{rnd}":
                    cc = kind_counts(cf)
                    assert all(cc[k] >= n for k, n in MIN_CHILD.items()), (ns, cc)
            check_backing(backing, facts, f"round {rnd}")
            if rnd % 10 == 9:
                verify_log_check(host, scratch)
            phases["checks"] += time.monotonic() - t_check
            survived += 1
    finally:
        for p in procs:             # a failure leaves no worker (nor its children) behind
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        umount(mnt)
    elapsed = time.monotonic() - t0
    reruns = sum(1 for r_, _, jp in journals for f in journal(jp) if f[0] == "exec"
                 and not bytes.fromhex(f[1]).split(b"/")[-1].startswith(b"x%d_" % r_))
    lo = {k: min(c[k] for c in per_round) for k in KINDS}
    tot = {k: sum(c[k] for c in per_round) for k in KINDS}
    print(f"crash rounds survived: {survived}, {elapsed:.1f} s; facts per kind (total, "
          f"fewest in a round): {', '.join(f'{k} {tot[k]}/{lo[k]}' for k in KINDS)}; "
          f"rounds that waited for the minimum: {waited}; earlier rounds' scripts run "
          f"again: {reruns}; entry look-ups: {lookups}; "
          f"host entries: {host['count']}, child lists: {len(watches) - 1}; time in "
          f"{', '.join(f'{k} {v:.1f} s' for k, v in phases.items())}")
    assert survived == ROUNDS
    assert reruns > 0 or ROUNDS < 10


# ------------------------------------------------------------------ a full disk
def _fill(path: Path) -> None:
    """Fill the file system holding path until ENOSPC (unbuffered: no write is left
    over for the close to fail on)."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
        try:
            os.fsync(f.fileno())
        except OSError:
            pass


def test_full_state_disk_fails_closed_and_recovers(world_tmp):
    """--state on a small tmpfs: once it is full, an open that needs a new measurement
    fails with EIO (never succeeds unmeasured), with the reason in the log; an open
    that needs none still works; the daemon lives on, and measures again as soon as
    space returns; the list and its PCRs agree throughout."""
    backing, mnt, state = world_tmp / "backing", world_tmp / "mnt", world_tmp / "state"
    for d in (backing, mnt, state):
        d.mkdir()
    for i in range(8):
        (backing / f"f{i}").write_text(f"file {i}\n")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)], check=True)
    policy = world_tmp / "policy"
    policy.write_text(POLICY)
    log = world_tmp / "imafs.log"      # the log elsewhere: a full disk loses its lines
    try:
        mount(backing, mnt, state, policy, log)
        try:
            assert (mnt / "f0").read_text() == "file 0\n"
            before = read_list(mnt / ".imafs")
            _fill(state / "filler")
            for i in (1, 2, 3):
                with pytest.raises(OSError) as ei:
                    (mnt / f"f{i}").read_text()
                assert ei.value.errno == errno.EIO
            assert (mnt / "f0").read_text() == "file 0\n"      # measured already
            full = read_list(mnt / ".imafs")
            assert full["count"] == before["count"]
            check_list(full, "full disk")
            os.unlink(state / "filler")
            for i in (1, 2, 3):
                assert (mnt / f"f{i}").read_text() == f"file {i}\n"
            after = read_list(mnt / ".imafs")
            names = check_list(after, "after recovery")
            assert after["count"] == before["count"] + 3
            for i in (1, 2, 3):
                digest = hashlib.sha256(f"file {i}\n".encode()).hexdigest()
                assert (10, f"/f{i}".encode(), digest) in names
            evmctl_check(after, world_tmp)
            text = log.read_text(errors="replace")
            assert "cannot record the measurement in namespace /" in text, text[-3000:]
            assert "No space left on device" in text
        finally:
            umount(mnt)
        # and the state is sound for the next mount
        mount(backing, mnt, state, policy, log)
        check_list(read_list(mnt / ".imafs"), "remount")
    finally:
        umount(mnt)
        subprocess.run(["umount", str(state)], capture_output=True)


def test_map_full_fails_closed(tmp_path, monkeypatch):
    """LMDB's map full (MDB_MAP_FULL) surfaces like a full disk: the open that needs
    the measurement is refused with EIO (AccessDenied), the list is unchanged, the
    reason is in the audit log. (How full a map must be for one append to fail
    depends on where its keys land, so the list's append raises what a full map
    raises; the filling itself is shown first.)"""
    import lmdb
    from imafs.ima.audit import AuditLog
    from imafs.ima.engine import AccessDenied, Engine, FileRef, OpenMode, Subject, settle
    from imafs.ima.keys import Keyring
    from imafs.ima.measurelog import MeasurementList
    from imafs.ima.namespaces import Namespace, NamespaceTree
    from imafs.ima.policy import Policy
    from imafs.ima.policy_parse import parse_policy
    from imafs.ima.templates import build_entry
    from imafs.store import Store
    store = Store(str(tmp_path / "lmdb"), map_size=256 << 10)
    ml = MeasurementList(store, 0)
    with pytest.raises(lmdb.MapFullError) as full:
        for i in range(100000):
            ml.add(build_entry("ima-ng", name=f"/{i}", digest=hashlib.sha256(b"%d" % i).digest()))
    root = Namespace(id=0, name="", parent=None, mlist=ml, keyring=Keyring(store, 0),
                     policy=Policy(parse_policy("measure func=FILE_CHECK mask=MAY_READ\n")))
    audit = AuditLog(str(tmp_path / "audit.log"))
    engine = Engine(NamespaceTree(root), store=store, audit=audit)

    def add(entry):
        raise full.value
    monkeypatch.setattr(ml, "add", add)
    p = tmp_path / "file"
    p.write_text("measure me\n")
    fd = os.open(p, os.O_RDONLY)
    try:
        f = FileRef(fd=fd, st=os.fstat(fd), path=b"/file", readable=True,
                    reopen=lambda: os.open(p, os.O_RDONLY), getxattr=lambda n: None,
                    setxattr=lambda n, v: None)
        count = ml.count
        with pytest.raises(AccessDenied) as ei:
            settle(engine.file_open(Subject(os.getpid(), 0, 0), f, OpenMode()))
        assert ei.value.errno == errno.EIO and "MDB_MAP_FULL" in ei.value.reason
        assert ml.count == count
        assert '"type": "measurement_failed"' in (tmp_path / "audit.log").read_text()
    finally:
        os.close(fd)
        audit.close()
        store.close()
