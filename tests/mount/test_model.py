"""Behaviour models through a real mount (issue 18): an overlay of the suite's Debian
rootfs mounted with a measuring policy (and a POLICY_CHECK signature rule: model
files must be signed), workloads run as containers (``unshare --pid`` + ``chroot``)
in namespaces created with ``model=learn`` or a model file.

- learn a workload (dpkg -l, apt-get --version, a script that runs programs in
  parallel and writes, renames, links and removes files), seal, enforce, run it
  again: nothing refused, the same state; three learning runs from scratch: the same
  state each time, the measurement following each run's order of first occurrences;
- under enforce: a file never read, a new program, a known program from another
  parent, a chmod: EPERM with a forensics record; the task that left the model and a
  child it starts are refused even for events of the model;
- export -> load into a fresh namespace (control ``load`` and ns-create
  ``model=PATH``) -> the same state, the workload runs; an unsigned or tampered model
  refused; a learning namespace inside an enforcing one gains nothing;
- the state recomputed from ``trajectory`` here, without imafs's code;
- the ``events`` stream, and a waiting read ended by a signal;
- a sealed model kept across a remount.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers.model_ref import v_coefficient, v_measurement, v_state
from helpers.mounts import IMAFS, REPO, Mount, is_mounted, force_unmount, run_as, wait_for

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.timeout(600)]

POLICY = ("measure func=BPRM_CHECK\n"
          "measure func=FILE_CHECK mask=MAY_READ uid=0\n"
          "appraise func=POLICY_CHECK appraise_type=imasig\n")

WORKLOAD = r"""#!/bin/sh
# a workload to model: the package lists, apt's version, programs run one after the
# other and two at a time, files written, read, renamed, linked and removed.
# "workload probe CMDS": CMDS run by this script's task instead (tests of the model)
if [ "${1:-}" = probe ]; then shift; eval "$*"; exit; fi
set -e
read host < /etc/hostname
dpkg -l > /dev/null
apt-get --version > /dev/null
mkdir -p /tmp/work
for n in 1 2 3; do echo "line $n" > /tmp/work/f$n; done
chmod 600 /tmp/work/f3
ln /tmp/work/f3 /tmp/work/f3.hard
cat /tmp/work/f1 /tmp/work/f2 | sort | uniq > /tmp/work/sorted
ls -l /etc > /tmp/work/etc.txt
printf '%s\n' /etc/hostname /etc/os-release /etc/debian_version /etc/issue \
    /etc/issue.net /etc/host.conf /etc/nsswitch.conf /etc/adduser.conf \
    | xargs -P 2 -n 1 md5sum > /tmp/work/sums
t=$(mktemp /tmp/work/tmp.XXXXXX)
echo "$host" > "$t"
mv "$t" /tmp/work/final
ln -s final /tmp/work/link
grep -c . /tmp/work/sums /tmp/work/link > /dev/null
rm -rf /tmp/work
echo done
"""
# the container's own shell reads a file, then runs the workload
RUN = "read h < /etc/hostname\n/usr/local/bin/workload\n"


class World:
    def __init__(self, work: Path, lower: Path):
        self.work, self.lower = work, lower
        self.merged = work / "merged"
        self.mount: Mount | None = None
        self.overlay = False

    def setup(self) -> None:
        w = self.work
        for d in ("upper", "ovl", "merged", "mnt"):
            (w / d).mkdir()
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={self.lower},upperdir={w / 'upper'},"
                            f"workdir={w / 'ovl'}", str(self.merged)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"no overlayfs here: {r.stderr.strip()}")
        self.overlay = True
        wl = self.merged / "usr/local/bin/workload"
        wl.write_text(WORKLOAD)
        wl.chmod(0o755)
        (self.merged / "models").mkdir()
        imafs("keygen", "--out", w / "keys", "--type", "ec")
        (w / "policy").write_text(POLICY)
        self.mount = Mount(self.merged, w / "mnt", w / "state",
                           ["--policy", str(w / "policy"), "--keys", str(w / "keys")])
        self.mount.start()

    def close(self) -> None:
        if self.mount is not None:
            self.mount.stop()
            force_unmount(str(self.mount.mnt))
        if self.overlay:
            subprocess.run(["umount", str(self.merged)], capture_output=True)
            if is_mounted(str(self.merged)):
                subprocess.run(["umount", "-l", str(self.merged)], capture_output=True)

    # ------------------------------------------------------------------ helpers
    def container(self, first: str, script: str, timeout: float = 120):
        """``script`` under the rootfs's /bin/sh, pid 1 of a new pid namespace chrooted
        into the mount, after ``first`` (an ns-create or ns-join line)."""
        m = self.mount
        return subprocess.run(["unshare", "--fork", "--kill-child", "--pid",
                               f"--mount-proc={m.mnt}/proc", "chroot", str(m.mnt),
                               "/bin/sh", "-c", f"{first} || exit 99\n{script}"],
                              capture_output=True, text=True, timeout=timeout,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})

    def create(self, name: str, option: str = "learn", script: str = RUN):
        return self.container(f'echo "{name} model={option}" > /.imafs/ns-create', script)

    def join(self, name: str, script: str = RUN):
        return self.container(f"echo {name} > /.imafs/ns-join", script)

    def model(self, ns: str) -> Path:
        return self.mount.ctl(f"namespaces/{ns}/model")

    def read(self, ns: str, name: str) -> str:
        return (self.model(ns) / name).read_text()

    def state(self, ns: str) -> str:
        return self.read(ns, "state").strip()

    def stats(self, ns: str) -> dict:
        return json.loads(self.read(ns, "stats"))

    def records(self, ns: str, name: str) -> list[dict]:
        return [json.loads(line) for line in self.read(ns, name).splitlines()]

    def control(self, ns: str, text: str) -> None:
        with open(self.model(ns) / "control", "w") as f:
            f.write(text + "\n")

    def sign(self, path: Path) -> None:
        keys = self.work / "keys"
        imafs("sign", "-q", "--key", keys / "signing_key.pem", "--cert",
              keys / "signing_cert.der", path)


def imafs(*args):
    r = subprocess.run(IMAFS + [str(a) for a in args], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def ok(r, what=""):
    assert r.returncode == 0 and r.stdout.endswith("done\n"), (what, r.returncode,
                                                               r.stdout[-2000:],
                                                               r.stderr[-2000:])


@pytest.fixture(scope="module")
def world(debian_rootfs):
    if os.geteuid() != 0:
        pytest.skip("needs root (overlayfs, chroot, unshare)")
    work = Path(tempfile.mkdtemp(prefix="imafs-model-", dir="/tmp"))
    os.chmod(work, 0o755)
    w = World(work, debian_rootfs)
    try:
        w.setup()
        yield w
    finally:
        w.close()
        subprocess.run(["rm", "-rf", str(work)])


@pytest.fixture(scope="module")
def learned(world):
    """Namespace ``w`` with the workload learned, then sealed and enforced: its
    state as learned."""
    ok(world.create("w"), "learn")
    state = world.state("w")
    assert world.stats("w")["mode"] == "learn"
    world.control("w", "seal")
    world.control("w", "enforce")
    assert world.stats("w")["mode"] == "enforce"
    assert world.state("w") == state
    return state


# ---------------------------------------------------------------------- learn, enforce

def test_learned_workload_runs_again_under_enforce_same_state(world, learned):
    trajectory = world.records("w", "trajectory")
    kinds = {r["event"]["type"] for r in trajectory}
    assert kinds >= {"file_open", "bprm_check", "mmap_file", "inode_create", "inode_mkdir",
                     "inode_unlink", "inode_rmdir", "inode_rename", "inode_link",
                     "inode_symlink", "inode_setattr"}, kinds
    # files the workload created are named by instance, their digest left out
    created = [r for r in trajectory if r["event"]["type"] == "inode_create"]
    assert created and all("instance" in r["inode_create"]["path"] for r in created)
    before = world.stats("w")
    r = world.join("w")
    ok(r, "enforce")
    assert world.state("w") == learned
    assert world.records("w", "forensics") == []
    st = world.stats("w")
    assert "out-of-model" not in st and "untrusted" not in st, st
    events = st["events"] - before["events"]          # every one of them in the model
    assert events > 200 and st["in-model"] - before.get("in-model", 0) == events, st


def test_three_learning_runs_same_state(world, learned):
    states, measurements, orders = [], [], []
    for i in range(3):
        ok(world.create(f"p{i}"), f"learning run {i}")
        states.append(world.state(f"p{i}"))
        measurements.append(world.read(f"p{i}", "measurement").strip())
        recs = sorted(world.records(f"p{i}", "trajectory"), key=lambda r: r["number"])
        orders.append([r["coefficient"] for r in recs])
        # the measurement: each new coefficient extended in order of first occurrence
        assert v_measurement(bytes(32), orders[-1]).hex() == measurements[-1]
    assert states == [learned] * 3
    # scheduling decides the order, and the order the measurement
    for i in range(3):
        for j in range(3):
            assert (measurements[i] == measurements[j]) == (orders[i] == orders[j])


def test_independent_recomputation_of_the_state(world, learned):
    """From ``trajectory`` with docs/models.md's layouts (tests/helpers/model_ref.py): every
    coefficient, every identity change, and the state."""
    recs = world.records("p0", "trajectory")
    points = []
    for r in recs:
        c = v_coefficient(r)
        assert c.hex() == r["coefficient"], r
        points.append(c)
    assert v_state(bytes(32), points).hex() == world.state("p0") == learned


# ---------------------------------------------------------------------- out of model

def forensics_of(world, ns: str) -> list[tuple]:
    out = []
    for r in world.records(ns, "forensics"):
        t = r["event"]["type"]
        cell = r[t]
        p = cell.get("path") or cell.get("old_path")
        out.append((r["reason"], t, r["event"]["comm"], p and p["pathname"]))
    return out


def test_out_of_model_events_refused_and_recorded(world, learned):
    mode = os.stat(world.merged / "etc/hostname").st_mode
    # run by the workload's task: what it runs and reads is in the model
    probe = ("cat /etc/shells; echo cat=$?; "               # a file never read
             "tac /etc/hostname; echo tac=$?; "             # a program never run
             "echo /etc/hostname | xargs cat; echo xargs=$?; "  # cat run by xargs
             "chmod 644 /etc/hostname; echo chmod=$?; "     # chmod of another file
             "ls -l /etc > /dev/null; echo ls=$?")          # all in the model
    r = world.join("w", f"/usr/local/bin/workload probe '{probe}'\n")
    out = dict(line.split("=", 1) for line in r.stdout.split() if "=" in line)
    assert out == {"cat": "1", "tac": "126", "xargs": "126", "chmod": "1",
                   "ls": "0"}, (r.stdout, r.stderr)
    assert r.stderr.count("Operation not permitted") >= 4, r.stderr
    f = forensics_of(world, "w")
    assert ("out-of-model", "file_open", "cat", "/etc/shells") in f, f
    assert ("out-of-model", "bprm_check", "workload", "/usr/bin/tac") in f, f
    assert ("out-of-model", "bprm_check", "xargs", "/usr/bin/cat") in f, f
    assert ("out-of-model", "inode_setattr", "chmod", "/etc/hostname") in f, f
    assert os.stat(world.merged / "etc/hostname").st_mode == mode   # chmod never done


def test_task_and_its_child_untrusted_after_leaving_the_model(world, learned):
    script = ("read x < /etc/shells; echo first=$?\n"       # out of model: untrusted
              "read h < /etc/hostname; echo second=$?\n"    # in the model, refused
              "/usr/local/bin/workload; echo child=$?\n")   # its child, refused
    r = world.join("w", script)
    out = dict(line.split("=", 1) for line in r.stdout.split() if "=" in line)
    assert out == {"first": "2", "second": "2", "child": "126"}, (r.stdout, r.stderr)
    f = forensics_of(world, "w")
    assert ("out-of-model", "file_open", "sh", "/etc/shells") in f, f
    assert ("untrusted", "file_open", "sh", "/etc/hostname") in f, f
    assert ("untrusted", "bprm_check", "sh", "/usr/local/bin/workload") in f, f
    assert world.stats("w")["untrusted_tasks"] >= 2
    # another task of the namespace is not affected
    ok(world.join("w"), "a trusted run after")


def test_learning_child_inside_an_enforcing_namespace_gains_nothing(world, learned):
    r = world.join("w", 'echo "inner model=learn" > /.imafs/ns-create || exit 98\n'
                        "tac /etc/hostname; echo tac=$?\n"
                        "/usr/local/bin/workload; echo run=$?\n")
    assert "tac=126" in r.stdout and "run=0" in r.stdout, (r.stdout, r.stderr)
    f = forensics_of(world, "w")
    assert sum(1 for x in f if x[1:] == ("bprm_check", "sh", "/usr/bin/tac")) >= 1
    # the child learned what its parent's model allowed, not the refused program
    inner = [r["bprm_check"]["path"]["pathname"]
             for r in world.records("w/namespaces/inner", "trajectory")
             if r["event"]["type"] == "bprm_check"]
    assert "/usr/local/bin/workload" in inner and "/usr/bin/tac" not in inner


def test_control_needs_root_and_modes_only_go_forward(world, learned):
    r = run_as(1000, 1000, ["sh", "-c", f"echo seal > {world.model('w') / 'control'}"],
               capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    with pytest.raises(OSError) as e:
        world.control("w", "seal")      # enforce -> sealed: never back
    assert e.value.errno == 22
    with pytest.raises(OSError) as e:
        world.control("w", "frobnicate")
    assert e.value.errno == 22
    rejected = [a for a in world.mount.audit() if a["type"] == "model_rejected"]
    assert len(rejected) >= 3, rejected


# ---------------------------------------------------------------------- model files

def test_export_load_same_state_and_workload_runs(world, learned):
    out = world.work / "w.model"
    r = imafs("model", "export", world.mount.mnt, "--ns", "w", "-o", out)
    assert "(from control socket)" in r.stderr
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == "aggregate " + "0" * 64 and lines[-2:] == ["seal", "end"]
    assert f"state {learned}" in lines
    assert sum(1 for ln in lines if ln.startswith("coefficient ")) == world.stats("w")["points"]
    assert text == world.read("w", "export")
    dst = world.merged / "models/w.model"
    dst.write_text(text)
    world.sign(dst)
    # ns-create model=PATH: loaded (sealed) before anyone runs in it
    r = world.create("copy", "/models/w.model", "exit 0\n")
    assert r.returncode == 0, r.stderr
    assert world.state("copy") == learned and world.stats("copy")["mode"] == "sealed"
    world.control("copy", "enforce")
    ok(world.join("copy"), "loaded model enforced")
    assert world.state("copy") == learned
    assert world.records("copy", "forensics") == []
    # from the host: imafs ns create ... model=FILE (a host file, sent as text)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        imafs("ns", "create", world.mount.mnt, "fromhost", "--pid", sleeper.pid,
              f"model={out}")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert world.state("fromhost") == learned and world.stats("fromhost")["mode"] == "sealed"
    listed = json.loads(imafs("ns", "list", world.mount.mnt, "--json").stdout)
    assert {n["name"]: n["model"] for n in listed}["fromhost"] == "sealed"
    world.control("fromhost", "enforce")
    ok(world.join("fromhost"), "a host-made namespace's model enforced")
    assert world.state("fromhost") == learned
    # load through control, into a learning namespace
    r = world.create("loaded", "learn", "exit 0\n")
    assert r.returncode == 0, r.stderr
    world.control("loaded", "load /models/w.model")
    assert world.state("loaded") == learned and world.stats("loaded")["mode"] == "sealed"


def test_unsigned_tampered_or_malformed_model_refused(world, learned):
    text = world.read("w", "export")
    unsigned = world.merged / "models/unsigned.model"
    unsigned.write_text(text)
    tampered = world.merged / "models/tampered.model"
    tampered.write_text(text)
    world.sign(tampered)
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("coefficient "))
    lines.pop(i)                        # one coefficient fewer, signature unchanged
    with open(tampered, "r+") as f:     # in place: keeps security.ima
        f.write("\n".join(lines) + "\n")
        f.truncate()
    bad = world.merged / "models/bad.model"
    bad.write_text(text.replace("seal\n", "seal\nseal\n"))
    world.sign(bad)
    r = world.create("fresh", "learn", "exit 0\n")
    assert r.returncode == 0
    for path, err in (("/models/unsigned.model", 13), ("/models/tampered.model", 13),
                      ("/models/bad.model", 22)):
        with pytest.raises(OSError) as e:
            world.control("fresh", f"load {path}")
        assert e.value.errno == err, (path, e.value)
        r = world.create("never", path, "exit 0\n")
        assert r.returncode == 99, (path, r.stderr)
        assert not (world.mount.ctl("namespaces") / "never").exists()
    assert world.stats("fresh")["points"] == 0 and world.stats("fresh")["mode"] == "learn"
    assert "model file line" in world.mount.log_text()


# ---------------------------------------------------------------------- events, xattrs

def test_events_stream_and_a_waiting_read_ended_by_a_signal(world, learned):
    r = world.create("ev", "learn", "exit 0\n")
    assert r.returncode == 0
    path = world.model("ev") / "events"
    fd = os.open(path, os.O_RDONLY)
    try:
        r = world.join("ev", "cat /etc/hostname > /dev/null\n")
        assert r.returncode == 0, r.stderr
        data = b""
        while data.count(b"\n") < 5:
            data += os.read(fd, 65536)
        lines = [json.loads(x) for x in data.splitlines()]
        assert {x["event"]["type"] for x in lines} >= {"bprm_check", "file_open"}
        assert all(x["decision"] == "allowed" and x["reason"] == "learned" for x in lines)
        assert any(x.get("file_open", {}).get("path", {}).get("pathname") == "/etc/hostname"
                   for x in lines)
    finally:
        os.close(fd)
    # nobody reads: dropped and counted, the workload never waits
    before = world.stats("ev")["stream_dropped"]
    assert world.join("ev", "cat /etc/hostname > /dev/null\n").returncode == 0
    assert world.stats("ev")["stream_dropped"] > before
    # a read waiting for events ends with the signal that ends its reader
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
        time.sleep(1.0)
        assert p.poll() is None             # waiting
        t = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=10)
        assert time.monotonic() - t < 8     # the daemon answers the interrupt


def test_xattr_events_by_a_process_that_joined(world, learned):
    """setxattr/removexattr through the mount by a host program that joined a
    learning namespace (the rootfs has no setfattr)."""
    r = world.create("x", "learn", "exit 0\n")
    assert r.returncode == 0
    f = world.mount.mnt / "tmp" / "xattr-target"
    f.write_text("x")
    r = subprocess.run(["sh", "-c", f"echo x > {world.mount.ctl('ns-join')} && "
                                    f"setfattr -n user.k -v v1 {f} && setfattr -x user.k {f}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kinds = [x["event"]["type"] for x in world.records("x", "trajectory")]
    assert "inode_setxattr" in kinds and "inode_removexattr" in kinds
    for rec in world.records("x", "trajectory"):
        assert v_coefficient(rec).hex() == rec["coefficient"]


def test_pseudonym_keeps_a_mutable_file_in_the_model(world, learned):
    """``pseudonym PATH`` in control: the file's digest is left out of its events, so
    a file that changes between runs stays in the model; another file that changed is
    out of it (EPERM under enforce)."""
    tmp = world.mount.mnt / "tmp"
    (tmp / "state.txt").write_text("v1\n")
    (tmp / "other.txt").write_text("v1\n")
    script = ("read a < /tmp/state.txt; echo a=$?\n"
              "read b < /tmp/other.txt; echo b=$?\n")
    r = world.create("ps", "learn", "exit 0\n")
    assert r.returncode == 0, r.stderr
    world.control("ps", "pseudonym /tmp/state.txt")
    r = world.join("ps", script)
    assert "a=0" in r.stdout and "b=0" in r.stdout, (r.stdout, r.stderr)
    opens = {rec["file_open"]["path"]["pathname"]: rec["file_open"]["digest"]
             for rec in world.records("ps", "trajectory")
             if rec["event"]["type"] == "file_open"}
    assert opens["/tmp/state.txt"] == "0" * 64 and opens["/tmp/other.txt"] != "0" * 64
    assert world.stats("ps")["pseudonyms"] == 1
    world.control("ps", "enforce")
    # both files change (written from the host, through the mount)
    (tmp / "state.txt").write_text("v2, longer\n")
    (tmp / "other.txt").write_text("v2, longer\n")
    r = world.join("ps", script)
    assert "a=0" in r.stdout and "b=2" in r.stdout, (r.stdout, r.stderr)
    assert [x[1:] for x in forensics_of(world, "ps")] == [
        ("file_open", "sh", "/tmp/other.txt")]
    assert "pseudonym " in world.read("ps", "export")


# ---------------------------------------------------------------------- remount

def test_sealed_model_kept_across_a_remount(world, learned):
    """Last: a remount keeps an enforcing model (its in-model coefficients; not its
    forensic ones, tasks or records) and still refuses."""
    points = world.stats("w")["points"]
    world.mount.restart()
    st = world.stats("w")
    assert st["mode"] == "enforce" and st["points"] == points
    assert world.state("w") == learned
    r = world.join("w", "tac /etc/hostname; echo tac=$?\n")
    assert "tac=126" in r.stdout, (r.stdout, r.stderr)
    ok(world.join("w"), "after the remount")
