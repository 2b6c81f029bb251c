"""Crash safety: the daemon is killed with SIGKILL at random moments while processes
exec, read, write, fsync and rename through the mount, ROUNDS times.

After every kill: ``imafs umount`` clears the dead mount with no manual step, a new
daemon mounts the same ``--state``, and

- every list (host and child namespaces) replays to the PCR values served with it
  (imafs.ima.verifylog, and ``evmctl ima_measurement`` on the binary list; ``imafs
  verify-log`` every 10 rounds), its ascii and binary views and its count agree;
- every exec and read a worker saw succeed has its entry (path and digest) in the
  host's list, and in its child namespace's list for a worker in one: a measurement
  is committed to LMDB before the open is answered;
- the backing tree holds what the workers wrote up to their last fsync (appends are
  intact prefixes, an fsync'ed file renamed over another is there whole, old or new).

Also: a full --state disk (a small tmpfs) and a full LMDB map fail closed (EIO, the
reason logged) and the daemon measures again when space returns.

Environment: IMAFS_CRASH_ROUNDS (default 50), IMAFS_CRASH_SEED (default: time).
Run time: about 1-2 s a round (50-100 s on 2 cores); the full-disk tests, 3 s.
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

from conftest import IMAFS, REPO, _is_mounted, wait_for
from imafs.ima.templates import parse_ascii, parse_binary
from imafs.ima.verifylog import parse_pcr_file, verify

pytestmark = [pytest.mark.mount, pytest.mark.slow]

ROUNDS = int(os.environ.get("IMAFS_CRASH_ROUNDS", "50"))
WORKERS = 6
WORKER = Path(__file__).with_name("_crashworker.py")
POLICY = "measure func=BPRM_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ\n"


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
    assert _is_mounted(str(mnt))


def umount(mnt) -> subprocess.CompletedProcess:
    return subprocess.run(IMAFS + ["umount", str(mnt)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def read_list(d: Path) -> dict:
    """Everything a verifier reads from one namespace's control directory."""
    return {
        "binary": (d / "binary_runtime_measurements").read_bytes(),
        "binary_sha256": (d / "binary_runtime_measurements_sha256").read_bytes(),
        "ascii": (d / "ascii_runtime_measurements").read_bytes(),
        "pcrs_sha1": (d / "pcrs" / "sha1").read_text(),
        "pcrs_sha256": (d / "pcrs" / "sha256").read_text(),
        "count": int((d / "runtime_measurements_count").read_text()),
    }


def check_list(lst: dict, what: str) -> set[tuple[bytes, str]]:
    """The list replays to its PCRs in both banks, its views agree; returns the
    (name, sha256 hex) of its entries."""
    expected = {"sha1": parse_pcr_file(lst["pcrs_sha1"]),
                "sha256": parse_pcr_file(lst["pcrs_sha256"])}
    entries = list(parse_binary(io.BytesIO(lst["binary"]), "sha1"))
    rep = verify(iter(entries), bank="sha1", banks=("sha1", "sha256"), expected=expected)
    assert rep.ok, f"{what}: {[str(p) for p in rep.problems]}"
    rep256 = verify(parse_binary(io.BytesIO(lst["binary_sha256"]), "sha256"), bank="sha256",
                    banks=("sha1", "sha256"), expected=expected)
    assert rep256.ok, f"{what} (sha256 view): {[str(p) for p in rep256.problems]}"
    asc = list(parse_ascii(lst["ascii"]))
    assert len(entries) == len(asc) == rep256.entries == lst["count"], what
    assert [e.recorded_hash for e in asc] == [e.recorded_hash for e in entries], what
    out = set()
    for e in entries:
        fd = e.file_digest
        if fd is not None and e.name is not None:
            out.add((e.name, fd[2].hex()))
    return out


def evmctl_check(lst: dict, tmp: Path) -> None:
    (tmp / "bin").write_bytes(lst["binary"])
    (tmp / "p1").write_text(lst["pcrs_sha1"])
    (tmp / "p256").write_text(lst["pcrs_sha256"])
    r = subprocess.run(["evmctl", "ima_measurement", "--pcrs", f"sha1,{tmp / 'p1'}",
                        "--pcrs", f"sha256,{tmp / 'p256'}", str(tmp / "bin")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def journal(path: Path) -> list[list[str]]:
    try:
        return [line.split(" ", 3) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


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
    children: dict[str, list[Path]] = {}      # child namespace -> journals of its worker
    survived = 0
    facts_checked = 0
    t0 = time.monotonic()
    try:
        for rnd in range(ROUNDS):
            procs = []
            for w in range(WORKERS):
                jp = jdir / f"r{rnd}-w{w}"
                journals.append((rnd, w, jp))
                argv = [sys.executable, str(WORKER), str(mnt), str(w), str(rnd), str(jp),
                        str(rng.getrandbits(32))]
                if w == 0:      # one worker per round lives in a child namespace
                    argv.append(f"c{rnd}")
                    children[f"c{rnd}"] = [jp]
                procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE))
            time.sleep(rng.uniform(0.15, 0.7))
            pid = daemon_pid(state)
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: not _alive(pid), 10), "daemon survived SIGKILL"
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    pytest.fail(f"round {rnd}: a worker hung on the dead mount")
                assert p.returncode == 0, p.stderr.read().decode()[-2000:]
            r = umount(mnt)
            assert r.returncode == 0, f"round {rnd}: imafs umount: {r.stderr}"
            assert not _is_mounted(str(mnt)), f"round {rnd}: still mounted"
            mount(backing, mnt, state, policy)

            # --- what a verifier reads back
            host = read_list(mnt / ".imafs")
            host_entries = check_list(host, f"round {rnd}: host list")
            evmctl_check(host, scratch)
            facts = [f for _, _, jp in journals if _ <= rnd for f in journal(jp)]
            errors = [f for f in facts if f[0] == "error"]
            assert not errors, f"round {rnd}: workers saw errors: {errors[:5]}"
            this_round = [jp for r_, _, jp in journals if r_ == rnd]
            for jp in this_round:
                for f in journal(jp):
                    if f[0] in ("exec", "read"):
                        key = (bytes.fromhex(f[1]), f[2])
                        assert key in host_entries, \
                            f"round {rnd}: {f[0]} of {key[0]!r} succeeded but is not in the list"
                        facts_checked += 1
            # the child namespace of this round: its own list, and the host's record
            ns = f"c{rnd}"
            if any(f[0] == "ns" for f in journal(children[ns][0])):
                child = read_list(mnt / ".imafs" / "namespaces" / ns)
                child_entries = check_list(child, f"round {rnd}: list of {ns}")
                for f in journal(children[ns][0]):
                    if f[0] in ("exec", "read"):
                        assert (bytes.fromhex(f[1]), f[2]) in child_entries, \
                            f"round {rnd}: {f[0]} in {ns} missing from its list"
                        facts_checked += 1
            check_backing(backing, facts, f"round {rnd}")
            if rnd % 10 == 9:
                (scratch / "bin").write_bytes(host["binary"])
                (scratch / "p1").write_text(host["pcrs_sha1"])
                (scratch / "p256").write_text(host["pcrs_sha256"])
                v = subprocess.run(IMAFS + ["verify-log", str(scratch / "bin"), "--pcrs",
                                            f"sha1,{scratch / 'p1'}", "--pcrs",
                                            f"sha256,{scratch / 'p256'}"],
                                   capture_output=True, text=True, timeout=120, cwd=REPO)
                assert v.returncode == 0, v.stdout + v.stderr
            survived += 1
    finally:
        umount(mnt)
    elapsed = time.monotonic() - t0
    print(f"crash rounds survived: {survived}, facts checked: {facts_checked}, "
          f"host entries: {host['count']}, {elapsed:.1f} s")
    assert survived == ROUNDS
    assert facts_checked > ROUNDS       # the workers did get work done between kills


# ------------------------------------------------------------------ a full disk

def _fill(path: Path) -> None:
    """Fill the file system holding path until ENOSPC."""
    with open(path, "wb") as f:
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
                assert (f"/f{i}".encode(), digest) in names
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
    from imafs.ima.engine import AccessDenied, Engine, FileRef, Subject
    from imafs.ima.keys import Keyring
    from imafs.ima.measurelog import MeasurementList
    from imafs.ima.namespaces import Namespace, NamespaceTree
    from imafs.ima.policy import Policy, parse_policy
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
            engine.file_open(Subject(os.getpid(), 0, 0), f, readable=True, writable=False,
                             append=False, exec_=False)
        assert ei.value.errno == errno.EIO and "MDB_MAP_FULL" in ei.value.reason
        assert ml.count == count
        assert '"type": "measurement_failed"' in (tmp_path / "audit.log").read_text()
    finally:
        os.close(fd)
        audit.close()
        store.close()
