"""Containers as an OCI runtime starts them (issue 15): Debian's runc 1.1.5 over an
imafs mount of the suite's Debian rootfs (an overlay of it: the shared rootfs is never
changed), with ``imafs oci-hook`` in the bundle's createRuntime and poststop hooks,
run through the command ``scripts/install`` puts in place.

One mount and one bundle for the module; each test writes the bundle's config.json,
starts containers with ``runc run -d`` and deletes them with ``runc delete -f`` in a
finally block. runc exec lands in the container's namespace (the hook binds the
container's pid namespace), and a child appraises the image's own security.ima
against its own keyring."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers.escape import build_escape
from helpers.mounts import IMAFS, REPO, Mount, is_mounted, force_unmount, wait_for
from imafs.ima.keys import keyid_of
from imafs.ima.nsevents import parse_event
from imafs.ima.templates import parse_ascii

pytestmark = [pytest.mark.interop, pytest.mark.mount, pytest.mark.timeout(600),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(shutil.which("runc") is None,
                                 reason="runc is not installed (IMAFS_APT_PACKAGES)")]

HOST_POLICY = "measure func=BPRM_CHECK\n"
WEB_POLICY = "measure func=BPRM_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ\n"
SIGNED_POLICY = "measure func=BPRM_CHECK\nappraise func=BPRM_CHECK appraise_type=imasig\n"


def imafs(*args, ok=True) -> subprocess.CompletedProcess:
    r = subprocess.run(IMAFS + [str(a) for a in args], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    if ok:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


class Runc:
    """The module's mount, bundle, profiles, hook configuration and installed imafs."""

    def __init__(self, work: Path, rootfs: Path):
        self.work, self.lower = work, rootfs
        self.merged, self.mnt = work / "merged", work / "mnt"
        self.bundle, self.runc_root = work / "bundle", work / "runc"
        self.profiles, self.archive = work / "profiles", work / "archive"
        self.hookstate, self.conf = work / "hookstate", work / "oci-hook.conf"
        self.mount: Mount | None = None
        self.overlay = False

    def setup(self) -> None:
        w = self.work
        for d in ("upper", "ovl", "merged", "mnt", "bundle", "prefix"):
            (w / d).mkdir()
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={self.lower},upperdir={w / 'upper'},"
                            f"workdir={w / 'ovl'}", str(self.merged)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"no overlayfs here: {r.stderr.strip()}")
        self.overlay = True
        imafs("keygen", "--out", w / "hostkeys", "--type", "ec")
        imafs("keygen", "--out", w / "imagekeys", "--type", "ec", "--cn", "image key")
        # the image's signatures (the overlay copies these files up): a program and
        # the loader it needs, signed with the image's key
        imafs("sign", "-q", "--key", w / "imagekeys" / "signing_key.pem",
              self.merged / "usr/bin/true",
              self.merged / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        r = imafs("verify", "--require-sig", "--keys", w / "imagekeys",
                  self.merged / "usr/bin/true")      # the signature is the image key's
        assert r.stdout.endswith(": pass\n"), r.stdout
        (w / "host.policy").write_text(HOST_POLICY)
        self.mount = Mount(self.merged, self.mnt, w / "state",
                           ["--policy", str(w / "host.policy"), "--keys", str(w / "hostkeys")])
        self.mount.start()
        r = subprocess.run([str(REPO / "scripts" / "install"), str(w / "prefix")],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, IMAFS_PYTHON=sys.executable))
        assert r.returncode == 0, r.stderr
        self.hook = w / "prefix" / "bin" / "imafs"
        self.profile("web", WEB_POLICY, "template=ima-ng\n")
        self.profile("signed", SIGNED_POLICY, "appraise=enforce\n")
        self.conf.write_text(f"profiles = {self.profiles}\narchive = {self.archive}\n"
                             f"state_dir = {self.hookstate}\nremove_wait = 30\n")
        subprocess.run(["runc", "spec", "--bundle", str(self.bundle)], check=True)
        self.spec = json.loads((self.bundle / "config.json").read_text())

    def profile(self, name: str, policy: str | None, options: str = "",
                keys: bool = True) -> Path:
        p = self.profiles / name
        p.mkdir(parents=True)
        os.chmod(self.profiles, 0o755)
        if policy is not None:
            (p / "policy").write_text(policy)
        if options:
            (p / "options").write_text(options)
        if keys:
            (p / "keys").mkdir()
            shutil.copy(self.work / "imagekeys" / "signing_cert.der", p / "keys" / "image.der")
        return p

    def config(self, args, *, profile="web", readonly=False, root=None, annotations=None,
               hooks=True) -> None:
        c = json.loads(json.dumps(self.spec))
        c["root"] = {"path": str(root or self.mnt), "readonly": readonly}
        c["process"]["terminal"] = False
        c["process"]["args"] = list(args)
        ann = {} if profile is None else {"org.imafs.profile": profile}
        ann.update(annotations or {})
        c["annotations"] = ann
        if hooks:
            h = {"path": str(self.hook), "args": ["imafs", "oci-hook", "--config",
                                                  str(self.conf)]}
            c["hooks"] = {"createRuntime": [h], "poststop": [h]}
        (self.bundle / "config.json").write_text(json.dumps(c, indent=1))

    def runc(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run(["runc", "--root", str(self.runc_root), *map(str, args)],
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.bundle)

    def run_d(self, cid: str) -> subprocess.CompletedProcess:
        """``runc run -d``: the container inherits runc's stdio, so runc's own output
        goes to a file (a pipe would stay open as long as the container runs)."""
        with tempfile.TemporaryFile("w+") as err:
            r = subprocess.run(["runc", "--root", str(self.runc_root), "run", "-d",
                                "--bundle", str(self.bundle), cid], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=err, text=True, timeout=120,
                               cwd=self.bundle)
            err.seek(0)
            return subprocess.CompletedProcess(r.args, r.returncode, "", err.read())

    def delete(self, cid: str) -> subprocess.CompletedProcess:
        return self.runc("delete", "-f", cid)

    def init_pid(self, cid: str) -> int:
        r = self.runc("state", cid)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["pid"]

    def namespaces(self) -> list[dict]:
        return json.loads(imafs("ns", "list", self.mnt, "--json").stdout)

    def ctl(self, name: str = "") -> Path:
        return self.mnt / ".imafs" / name

    def host_entries(self) -> list:
        return list(parse_ascii(self.ctl("ascii_runtime_measurements").read_bytes()))

    def close(self) -> None:
        if self.runc_root.exists():
            r = self.runc("list", "-q")
            for cid in r.stdout.split():
                self.delete(cid)
        if self.mount is not None:
            self.mount.stop()
            force_unmount(str(self.mnt))
        if self.overlay:
            subprocess.run(["umount", str(self.merged)], capture_output=True)
            if is_mounted(str(self.merged)):
                subprocess.run(["umount", "-l", str(self.merged)], capture_output=True)


@pytest.fixture(scope="module")
def rt(debian_rootfs):
    work = Path(tempfile.mkdtemp(prefix="imafs-runc-", dir="/tmp"))
    os.chmod(work, 0o755)
    r = Runc(work, debian_rootfs)
    try:
        r.setup()
        yield r
    finally:
        r.close()
        if not is_mounted(str(r.mnt)) and not is_mounted(str(r.merged)):
            shutil.rmtree(work, ignore_errors=True)


def child_names(rt, name: str) -> list[bytes]:
    return [e.name for e in parse_ascii(
        rt.ctl(f"namespaces/{name}/ascii_runtime_measurements").read_bytes())]


def cid_of(prefix: str) -> str:
    """A container id of the full 64 characters (runc's are 64 hex digits too)."""
    return (prefix + secrets.token_hex(32))[:64]


def test_hook_namespace_with_a_writable_root(rt):
    """createRuntime: the namespace is made from the host before the container's code
    runs, with the profile's policy and key, its init bound; the container works;
    poststop archives its list (which replays with evmctl and ties to the host's list)
    and removes it."""
    cid = cid_of("web")
    rt.config(["sh", "-c", "cat /etc/debian_version >/dev/null; exec sleep 600"])
    try:
        r = rt.run_d(cid)
        assert r.returncode == 0, r.stderr
        (ns,) = rt.namespaces()
        assert ns["name"] == cid and ns["origin"] == "host" and ns["processes"] >= 1
        kid = f"{keyid_of((rt.work / 'imagekeys' / 'signing_cert.der').read_bytes()):08x}"
        assert ns["keys"] == [kid]
        assert rt.ctl(f"namespaces/{cid}/policy").read_text().split() == WEB_POLICY.split()
        # the init's pid namespace is bound: the whole container, and runc exec later
        assert f"(init pid {rt.init_pid(cid)}) bound to namespace {ns['id']}" in \
            rt.mount.log_text()
        # its own policy is in force: its reads are in its list (the host measures execs)
        assert wait_for(lambda: b"/etc/debian_version" in child_names(rt, cid), 10)
        assert b"/etc/debian_version" not in [e.name for e in rt.host_entries()]
        create = [e for e in rt.host_entries() if e.name == b"ns-create"][-1]
        f = parse_event(create.get("buf"))
        assert f["name"] == f"/{cid}" and f["origin"] == "host" and f["keys"] == kid
        r = rt.runc("exec", cid, "sh", "-c", "echo written > /tmp/f && cat /tmp/f")
        assert r.returncode == 0 and r.stdout == "written\n", r.stderr
        assert list(rt.hookstate.iterdir())
    finally:
        d = rt.delete(cid)
    assert d.returncode == 0, d.stderr
    assert rt.namespaces() == [] and not list(rt.hookstate.iterdir())
    arch = rt.archive / f"{cid}.{ns['id']}"
    info = json.loads((arch / "namespace.json").read_text())
    assert info["uuid"] == ns["uuid"] and info["name"] == cid
    names = [e.name for e in parse_ascii((arch / "ascii_runtime_measurements").read_bytes())]
    assert names[:2] == [b"boot_aggregate", b"ns-init"] and b"/etc/debian_version" in names
    r = subprocess.run(["evmctl", "ima_measurement", "--pcrs", f"sha1,{arch}/pcrs/sha1",
                        "--pcrs", f"sha256,{arch}/pcrs/sha256",
                        str(arch / "binary_runtime_measurements")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    host = rt.work / "host.bin"
    host.write_bytes(rt.ctl("binary_runtime_measurements").read_bytes())
    r = imafs("verify-log", host, "--child", arch)
    assert "its length and PCR 10 match" in r.stdout
    assert [e.name for e in rt.host_entries()][-1] == b"ns-remove"


def test_runc_exec_lands_in_the_containers_namespace(rt):
    """runc exec enters the container's pid namespace, which the hook bound: what it
    runs is measured by the container's own rules (issue 15 item 4)."""
    cid = cid_of("exec")
    rt.config(["sleep", "600"])
    try:
        assert rt.run_d(cid).returncode == 0
        r = rt.runc("exec", cid, "cat", "/etc/hostname")
        assert r.returncode == 0, r.stderr
        # measured by the container's own FILE_CHECK rule only if exec is inside it
        assert wait_for(lambda: b"/etc/hostname" in child_names(rt, cid), 10)
    finally:
        rt.delete(cid)


def test_hook_namespace_with_a_read_only_root(rt):
    """root.readonly=true: the hook goes through the socket, not the mount; inside,
    the control files are read-only as everything else."""
    cid = cid_of("ro")
    rt.config(["sleep", "600"], readonly=True)
    try:
        r = rt.run_d(cid)
        assert r.returncode == 0, r.stderr
        (ns,) = rt.namespaces()
        assert ns["name"] == cid and ns["processes"] >= 1
        r = rt.runc("exec", cid, "sh", "-c", f"echo x > /.imafs/ns-create")
        assert r.returncode != 0 and "Read-only file system" in r.stderr
        r = rt.runc("exec", cid, "sh", "-c", "echo x > /tmp/f")
        assert r.returncode != 0 and "Read-only file system" in r.stderr
    finally:
        rt.delete(cid)
    assert rt.namespaces() == []


def _model_records(rt, cid: str, name: str) -> list[dict]:
    return [json.loads(line) for line in
            rt.ctl(f"namespaces/{cid}/model/{name}").read_text().splitlines()]


def _paths(records: list[dict], etype: str) -> list[str]:
    return [r[etype]["path"]["pathname"] for r in records if r["event"]["type"] == etype]


def test_hook_annotation_model_learn_then_a_profiles_model(rt):
    """Issue 18 through runc: annotation org.imafs.model=learn gives the container a
    learning behaviour model from its first exec; exported from the host, it is the
    model file of a profile, and a second container with that profile starts from it
    (sealed, the same state): the same commands are in the model, a new read goes to
    forensics."""
    script = "cat /etc/debian_version >/dev/null; exec sleep 600"
    cid = cid_of("learn")
    rt.config(["sh", "-c", script], annotations={"org.imafs.model": "learn"})
    out = rt.work / "learned.model"
    try:
        r = rt.run_d(cid)
        assert r.returncode == 0, r.stderr
        (ns,) = rt.namespaces()
        assert ns["name"] == cid and ns["model"] == "learn"
        # the init's run ends with the exec of sleep and its loader's opens: then
        # the trajectory stops growing
        assert wait_for(lambda: "/usr/bin/sleep" in _paths(
            _model_records(rt, cid, "trajectory"), "bprm_check"), 10)
        tr = []
        for _ in range(20):
            time.sleep(1.0)
            now = _model_records(rt, cid, "trajectory")
            if len(now) == len(tr):
                break
            tr = now
        assert {"/usr/bin/dash", "/usr/bin/cat"} <= set(_paths(tr, "bprm_check"))   # sh
        assert "/etc/debian_version" in _paths(tr, "file_open")
        state = rt.ctl(f"namespaces/{cid}/model/state").read_text().strip()
        imafs("model", "export", rt.mnt, "--ns", cid, "-o", out)
        assert f"state {state}\n" in out.read_text()
        imafs("model", "check", out)
    finally:
        d = rt.delete(cid)
    assert d.returncode == 0, d.stderr
    assert rt.namespaces() == []
    prof = rt.profile("modelled", WEB_POLICY)
    (prof / "model").write_text(out.read_text())
    # the same commands: all in the model, the same state; one more read: forensics,
    # allowed (sealed), and the state moves (an outside coefficient is part of it)
    for extra, outside in (("", []), ("cat /etc/hostname >/dev/null; ", ["/etc/hostname"])):
        cid = cid_of("model")
        rt.config(["sh", "-c", extra + script], profile="modelled")
        ctl = rt.ctl(f"namespaces/{cid}/model")
        try:
            r = rt.run_d(cid)
            assert r.returncode == 0, r.stderr
            (ns,) = rt.namespaces()
            assert ns["model"] == "sealed"
            # the exec of sleep, the last event, is in the model
            assert wait_for(lambda: json.loads((ctl / "stats").read_text())
                            .get("in-model", 0) >= len(tr), 10), (ctl / "stats").read_text()
            forensics = [json.loads(x) for x in (ctl / "forensics").read_text().splitlines()]
            assert _paths(forensics, "file_open") == outside, forensics
            assert all(x["reason"] == "out-of-model" for x in forensics)
            st = json.loads((ctl / "stats").read_text())
            assert st["mode"] == "sealed" and st.get("out-of-model", 0) == len(forensics)
            now = (ctl / "state").read_text().strip()
            assert (now == state) == (not outside), (now, state)
        finally:
            d = rt.delete(cid)
        assert d.returncode == 0, d.stderr


def test_image_signatures_enforce_inside(rt):
    """The container's own policy appraises execs with its own key (the image's):
    /usr/bin/true, signed in the image (its own security.ima), runs (issue 15 item 2:
    a child read only its private attribute)."""
    cid = cid_of("sig")
    rt.config(["/usr/bin/true"], profile="signed")
    try:
        r = rt.runc("run", "--bundle", rt.bundle, cid)
        assert r.returncode == 0, r.stderr
    finally:
        rt.delete(cid)


def test_the_containers_own_policy_refuses_an_unsigned_program(rt):
    """Profile "signed" appraises execs in the container's namespace (the host's policy
    only measures): an unsigned program is refused, and its attempt is in the
    container's archived list; the host's list does not hold a refusal of its own."""
    cid = cid_of("unsig")
    rt.config(["/usr/bin/id"], profile="signed")
    try:
        r = rt.runc("run", "--bundle", rt.bundle, cid)
        assert r.returncode != 0 and "permission denied" in r.stderr.lower(), r.stderr
    finally:
        rt.delete(cid)
    assert rt.namespaces() == []
    (arch,) = [d for d in rt.archive.iterdir() if d.name.startswith(cid)]
    names = [e.name for e in parse_ascii((arch / "ascii_runtime_measurements").read_bytes())]
    assert b"/usr/bin/id" in names
    audit = [json.loads(line) for line in (rt.work / "state" / "audit.log").read_text()
             .splitlines()]
    assert any(a.get("path") == "/usr/bin/id" and a.get("ns") == f"/{cid}" for a in audit
               if a["type"].startswith("appraise")), audit[-5:]


def _kv(r) -> dict[str, str]:
    """key=value lines a container printed."""
    return dict(x.partition("=")[::2] for x in r.stdout.splitlines() if "=" in x)


ATTACK = """
echo 'measure func=FILE_CHECK uid=4242' > /.imafs/policy; echo policy=$?
echo 'remove {kid}' > /.imafs/keys; echo keys=$?
echo {name} > /.imafs/ns-remove; echo remove=$?
echo {sibling} > /.imafs/ns-join; echo join=$?
cat /.imafs/namespaces/{sibling}/ascii_runtime_measurements >/dev/null; echo sibling=$?
echo $$ > /sys/fs/cgroup/cgroup.procs; echo cgroup=$?
setsid sh -c '(sleep 1; cat /etc/issue.net >/dev/null) &' </dev/null >/dev/null 2>&1
echo forked=$?
"""


def test_a_runc_container_cannot_change_its_namespace_read_a_sibling_or_leave(rt):
    """issue 15's attacks as runc starts containers (runc's default capabilities, no
    CAP_SYS_ADMIN), through runc exec: in its hook-made namespace the container writes
    its host-given policy, removes its key, removes or leaves its namespace, reads its
    sibling container's list, writes its cgroup, double-forks with setsid, and runs a
    signed static helper that breaks out of a chroot and looks for the binding's
    hierarchy and writes the keys and policy it finds: each fails (EACCES, logged),
    the namespace keeps its policy and key, and what the forked and escaped processes
    read afterwards is measured in the container's list. A container started without
    the hook (the root namespace) writes the host's policy and keys and reads the
    namespaces' lists: refused too. Before: uid 0 wrote all of them (item 1)."""
    a, b = cid_of("atk"), cid_of("sib")
    kid = f"{keyid_of((rt.work / 'imagekeys' / 'signing_cert.der').read_bytes()):08x}"
    esc = rt.merged / "usr" / "local" / "bin" / "imafs-escape"
    build_escape(esc, rt.work)
    imafs("sign", "-q", "--key", rt.work / "imagekeys" / "signing_key.pem", esc)
    hier = re.findall(r"cgroup hierarchy name=(imafs\.\w+) mounted nowhere",
                      rt.mount.log_text())[-1]
    host_policy, host_keys = rt.ctl("policy").read_text(), rt.ctl("keys").read_text()
    rt.config(["sleep", "600"])
    try:
        assert rt.run_d(b).returncode == 0
        assert rt.run_d(a).returncode == 0
        policy = rt.ctl(f"namespaces/{a}/policy").read_text()
        keys = rt.ctl(f"namespaces/{a}/keys").read_text()
        assert kid in keys
        r = rt.runc("exec", a, "sh", "-c", ATTACK.format(kid=kid, name=a, sibling=b))
        out = _kv(r)
        assert all(out.get(k) not in (None, "0")
                   for k in ("policy", "keys", "remove", "join", "sibling")), r
        assert r.stderr.count("Permission denied") >= 4, r.stderr
        assert out["cgroup"] != "0" and out["forked"] == "0", r
        # the forked grandchild, reparented and in a session of its own, is still in
        # the container's namespace: its read is in the container's list
        assert wait_for(lambda: b"/etc/issue.net" in child_names(rt, a), 10)
        # runc's default set has no CAP_SYS_CHROOT; Docker's has: give it, as there
        r = rt.runc("exec", "--cap", "CAP_SYS_CHROOT", a, "/usr/local/bin/imafs-escape",
                    "/", "/etc/hostname", hier)
        out = _kv(r)
        assert r.returncode == 0 and out["escaped"] == "1", (r.stdout, r.stderr)
        assert out["tried"] == "0" and out["moved"] == "0", r.stdout
        assert out["mount"] == "errno1" and "mounted" not in out, r.stdout
        assert out["keys"] == out["policy"] == "errno13", r.stdout
        assert rt.ctl(f"namespaces/{a}/policy").read_text() == policy
        assert rt.ctl(f"namespaces/{a}/keys").read_text() == keys
        assert {n["name"] for n in rt.namespaces()} == {a, b}
        log = rt.mount.log_text()
        assert f"may not write policy of namespace /{a}: it was made from the host" in log
        assert "may not write ns-remove" in log and "may not write ns-join" in log
    finally:
        rt.delete(a)
        rt.delete(b)
    # no hook: the container is in the root namespace, and is not the host
    c = cid_of("nohook")
    rt.config(["sleep", "600"], hooks=False, profile=None)
    holder = subprocess.Popen(["sleep", "600"])
    try:
        imafs("ns", "create", rt.mnt, "other", "--pid", holder.pid)
        assert rt.run_d(c).returncode == 0
        r = rt.runc("exec", c, "sh", "-c", ATTACK.format(kid=kid, name="other",
                                                        sibling="other"))
        out = _kv(r)
        assert all(out.get(k) not in (None, "0")
                   for k in ("policy", "keys", "remove", "sibling")), r
        assert r.stderr.count("Permission denied") >= 4, r.stderr
        assert rt.ctl("policy").read_text() == host_policy
        assert rt.ctl("keys").read_text() == host_keys
        assert "is in the root namespace but not the host" in rt.mount.log_text()
    finally:
        rt.delete(c)
        holder.kill()
        holder.wait()
        assert wait_for(lambda: imafs("ns", "remove", rt.mnt, "other", ok=False).returncode == 0,
                        30, 0.2)
    assert rt.namespaces() == []


def _spoil_profile(rt, name: str, how: str) -> None:
    p = rt.profile(name, "measure func=NOPE\n" if how == "policy" else WEB_POLICY)
    if how == "key":
        (p / "keys" / "image.der").write_bytes(b"0\x82\x00\x05hello")
    if how == "writable":
        os.chmod(p, 0o777)


@pytest.mark.parametrize("case,why", [
    ("not-imafs", "is a overlay mount, not an imafs mount"),
    ("no-profile", "no profile 'nope'"),
    ("bad-policy", "line 1, column 9"),
    ("bad-key", "is unusable"),
    ("writable-profile", "is writable by group or others"),
    ("host-path", "names a host file"),
    ("name-exists", "namespace /taken exists"),
])
def test_the_hook_fails_closed(rt, case, why):
    """Each bad input: runc fails the container, the hook's one line says why, and
    nothing is left: no namespace, no hook state, no container, nothing in the host's
    list (a taken name's owner keeps its namespace)."""
    cid = cid_of(case.replace("-", "")[:8])
    kw = {}
    if case == "not-imafs":
        kw["root"] = rt.merged
    elif case == "no-profile":
        kw["profile"] = "nope"
    elif case in ("bad-policy", "bad-key", "writable-profile"):
        name = f"p-{case}"
        _spoil_profile(rt, name, {"bad-policy": "policy", "bad-key": "key",
                                  "writable-profile": "writable"}[case])
        kw["profile"] = name
    elif case == "host-path":
        kw["annotations"] = {"org.imafs.options": "policy=/etc/passwd"}
    elif case == "name-exists":
        kw["annotations"] = {"org.imafs.namespace": "taken"}
    holder = None
    if case == "name-exists":
        holder = subprocess.Popen(["sleep", "600"])
        imafs("ns", "create", rt.mnt, "taken", "--pid", holder.pid)
    before = len(rt.host_entries())
    rt.config(["sleep", "600"], **kw)
    try:
        r = rt.run_d(cid)
        assert r.returncode != 0
        assert f"imafs oci-hook: " in r.stderr and why in r.stderr, r.stderr
        # the hook's stderr (runc quotes it: a newline shows as \n) is one line
        assert r.stderr.split("stderr: ", 1)[1].count("\\n") == 1, r.stderr
        assert rt.runc("list", "-q").stdout.split() == []
        assert not rt.hookstate.exists() or not list(rt.hookstate.iterdir())
        left = rt.namespaces()
        if case == "name-exists":
            assert [n["name"] for n in left] == ["taken"] and left[0]["processes"] == 1
            assert len(rt.host_entries()) == before
        else:
            assert left == [] and len(rt.host_entries()) == before
    finally:
        rt.delete(cid)
        if holder is not None:
            holder.kill()
            holder.wait()
            assert wait_for(lambda: imafs("ns", "remove", rt.mnt, "taken", ok=False).returncode
                            == 0, 30, 0.2)


def test_a_hand_made_container_still_works(rt):
    """unshare + chroot + ns-create on the same mount: made from inside (origin
    inside), removable from the host; and `imafs ns create --pid` binds a hand-made
    container's process from the host."""
    r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid",
                        f"--mount-proc={rt.mnt}/proc", "chroot", str(rt.mnt), "/bin/sh", "-c",
                        "echo 'byhand appraise=log' > /.imafs/ns-create && "
                        "cat /etc/hostname >/dev/null && echo in"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout == "in\n", r.stderr
    (ns,) = rt.namespaces()
    assert ns["name"] == "byhand" and ns["origin"] == "inside"
    imafs("ns", "remove", rt.mnt, "byhand")
    p = subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid",
                          f"--mount-proc={rt.mnt}/proc", "chroot", str(rt.mnt),
                          "/usr/bin/sleep", "600"])
    try:
        assert wait_for(lambda: _child_of_child(p.pid) is not None, 10)
        pid = _child_of_child(p.pid)
        imafs("ns", "create", rt.mnt, "bound", "--pid", pid, "--profile", "web",
              "--profiles", rt.profiles)
        (ns,) = rt.namespaces()
        assert ns["origin"] == "host" and ns["processes"] == 1
        assert f"(init pid {pid}) bound to namespace {ns['id']}" in rt.mount.log_text()
    finally:
        p.kill()
        p.wait()
    assert wait_for(lambda: imafs("ns", "remove", rt.mnt, "bound", ok=False).returncode == 0,
                    10)


def _child_of_child(pid: int) -> int | None:
    """unshare --fork's child (the container's pid 1) of process ``pid``."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not kids:
            return None
        grand = Path(f"/proc/{kids[0]}/task/{kids[0]}/children").read_text().split()
        return int(grand[0]) if grand else int(kids[0])
    except OSError:
        return None
