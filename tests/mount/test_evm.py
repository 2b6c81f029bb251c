"""EVM (security.evm) through real mounts: a signed binary whose metadata changes behind
the mount (set-uid bit, owner, security.capability) is refused at its next exec with
EACCES and an audit record, and runs again once its metadata matches; HMACs written
by the daemon (fix mode, then after every permitted change through the mount), and
a change behind the mount caught; the kernel's refusals of metadata changes through
the mount (EPERM); the ``evm`` control file; ``--evm log``; the mount's refusals of
bad HMAC key files; ``query``. Signatures are made by ``imafs sign --evm`` (evmctl's
are in tests/interop/test_evm.py)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO, run_as

pytestmark = pytest.mark.mount

EXEC_POLICY = "appraise func=BPRM_CHECK appraise_type=imasig\n"
HASH_POLICY = "appraise func=BPRM_CHECK\n"
CAPS = bytes.fromhex("0100000200200000000000000000000000000000")   # cap_net_raw+ep
PROG = shutil.which("true") or "/bin/true"


def sh(*argv, check=True):
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    if check and p.returncode:
        raise AssertionError(f"{argv}: rc {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    d = tmp_path_factory.mktemp("evm-key") / "ec"
    sh(*IMAFS, "keygen", "--out", d, "--type", "ec")
    return d


def sign(key: Path, path, *extra):
    sh(*IMAFS, "sign", "-q", "--evm", "--portable", "--key", key / "signing_key.pem",
       "--cert", key / "signing_cert.der", *extra, path)


def runs(path) -> int:
    """0 when the program ran, else the errno of the refused exec."""
    try:
        subprocess.run([str(path)], check=True, timeout=30)
        return 0
    except OSError as e:
        return e.errno


def policy(world_tmp: Path, text: str) -> list[str]:
    p = world_tmp / f"policy{abs(hash(text))}"
    p.write_text(text)
    return ["--policy", str(p)]


def hmac_key(world_tmp: Path, name: str = "evm.key", data: bytes | None = None) -> Path:
    p = world_tmp / name
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data if data is not None else os.urandom(64))
    return p


def records(m, kind: str, path: str) -> list[dict]:
    return [r for r in m.audit() if r["type"] == kind and r.get("path") == path]


def evm_value(path) -> bytes | None:
    try:
        return os.getxattr(path, "security.evm")
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return None


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
        return 0
    except OSError as e:
        return e.errno


def write_ctl(m, name: str, data: bytes) -> int:
    fd = os.open(m.ctl(name), os.O_WRONLY)
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


# ---------------------------------------------------------------- signatures, behind
def test_metadata_changed_behind_the_mount_fails_the_next_exec(make_mount, world_tmp, key):
    b = world_tmp / "backing"
    b.mkdir()
    prog = b / "prog"
    shutil.copy(PROG, prog)
    sign(key, prog)
    assert evm_value(prog)[0] == 0x05
    m = make_mount(["--evm", "enforce", "--key", str(key / "signing_cert.der")]
                   + policy(world_tmp, EXEC_POLICY), backing=b)
    mp = m.mnt / "prog"
    assert runs(mp) == 0
    changes = [
        ("set-uid bit", lambda: os.chmod(prog, 0o4755), lambda: os.chmod(prog, 0o755)),
        ("owner", lambda: os.chown(prog, 4242, -1), lambda: os.chown(prog, 0, -1)),
        ("security.capability", lambda: os.setxattr(prog, "security.capability", CAPS),
         lambda: os.removexattr(prog, "security.capability")),
    ]
    for what, change, undo in changes:
        before = len(records(m, "appraise_metadata", "/prog"))
        change()
        assert runs(mp) == errno.EACCES, what
        new = records(m, "appraise_metadata", "/prog")[before:]
        assert [(r["status"], r["cause"], r["result"]) for r in new] == [
            ("INTEGRITY_FAIL_IMMUTABLE", "invalid-signature", "fail_immutable")], what
        assert records(m, "appraise", "/prog")[-1]["cause"] == "invalid-fail-immutable"
        undo()
        assert runs(mp) == 0, f"{what} undone: the same metadata again"
    # the same changes, EVM logging only: the exec runs, the failure is recorded
    m.restart(["--evm", "log", "--key", str(key / "signing_cert.der")]
              + policy(world_tmp, EXEC_POLICY))
    os.chmod(prog, 0o4755)
    assert runs(mp) == 0
    r = records(m, "appraise_metadata", "/prog")[-1]
    assert (r["status"], r["mode"]) == ("INTEGRITY_FAIL_IMMUTABLE", "log")
    # and without EVM the change goes unnoticed (what EVM is for)
    m.restart(["--key", str(key / "signing_cert.der")] + policy(world_tmp, EXEC_POLICY))
    assert runs(mp) == 0
    assert m.ctl("evm").read_text() == "0"
    assert write_ctl(m, "evm", b"2") == errno.EPERM


def test_portable_signature_protects_against_changes_through_the_mount(make_mount,
                                                                     world_tmp, key):
    """evm_inode_setattr: a file whose portable signature verifies cannot have its
    metadata changed (EPERM; it could never verify again); one whose signature fails
    already can (nothing left to protect); a change that changes nothing is allowed."""
    b = world_tmp / "backing"
    b.mkdir()
    prog = b / "prog"
    shutil.copy(PROG, prog)
    sign(key, prog)
    m = make_mount(["--evm", "enforce", "--key", str(key / "signing_cert.der")]
                   + policy(world_tmp, EXEC_POLICY), backing=b)
    mp = m.mnt / "prog"
    assert errno_of(os.chmod, mp, 0o4755) == errno.EPERM
    assert errno_of(os.chown, mp, 4242, -1) == errno.EPERM
    assert errno_of(os.setxattr, mp, "security.capability", CAPS) == errno.EPERM
    r = [x for x in m.audit() if x["type"] == "appraise_metadata"][-1]
    assert (r["status"], r["error"], r["change"]) == (
        "INTEGRITY_PASS_IMMUTABLE", "EPERM", "setxattr security.capability")
    assert errno_of(os.chmod, mp, 0o755) == 0                  # no change
    assert stat.S_IMODE(prog.stat().st_mode) == 0o755 and runs(mp) == 0
    os.chown(prog, 4242, -1)                                    # behind: now it fails
    assert errno_of(os.chmod, mp, 0o700) == 0                   # FAIL_IMMUTABLE: allowed
    assert evm_value(prog)[0] == 0x05                           # never rewritten
    assert runs(mp) == errno.EACCES
    # an HMAC written from user space is refused (only the daemon computes them)
    assert errno_of(os.setxattr, mp, "security.evm", b"\x02" + bytes(20)) == errno.EPERM
    assert errno_of(os.setxattr, mp, "security.evm", b"\x05\x02") == errno.EINVAL
    q = m.query("/prog")["namespaces"][0]
    assert q["evm"]["status"] == "INTEGRITY_FAIL_IMMUTABLE"
    assert q["evm"]["cause"] == "invalid-signature"


# ---------------------------------------------------------------- HMACs
def test_hmacs_follow_changes_through_the_mount(make_mount, world_tmp):
    b = world_tmp / "backing"
    b.mkdir()
    prog = b / "prog"
    shutil.copy(PROG, prog)
    k = hmac_key(world_tmp)
    # fix mode labels: security.ima, then the HMAC (the kernel's post-setxattr hook)
    m = make_mount(["--appraise", "fix", "--evm", "enforce", "--evm-key", str(k)]
                   + policy(world_tmp, HASH_POLICY), backing=b)
    mp = m.mnt / "prog"
    assert runs(mp) == 0
    h0 = evm_value(prog)
    assert h0 is not None and len(h0) == 21 and h0[0] == 0x02
    assert m.ctl("evm").read_text() == "3"        # EVM_INIT_HMAC | EVM_INIT_X509
    assert write_ctl(m, "evm", b"4") == errno.EPERM   # setup complete
    m.restart(["--evm", "enforce", "--evm-key", str(k)] + policy(world_tmp, HASH_POLICY))
    assert runs(mp) == 0
    # permitted changes through the mount: the daemon recomputes the HMAC
    os.chmod(mp, 0o750)
    h1 = evm_value(prog)
    assert h1 not in (None, h0) and runs(mp) == 0
    os.chown(mp, 4242, 4243)
    os.setxattr(mp, "security.capability", CAPS)
    h2 = evm_value(prog)
    assert h2 != h1 and runs(mp) == 0
    assert m.query("/prog")["namespaces"][0]["evm"]["status"] == "INTEGRITY_PASS"
    # behind the mount: caught at the next exec
    os.chmod(prog, 0o755)
    assert runs(mp) == errno.EACCES
    r = records(m, "appraise_metadata", "/prog")[-1]
    assert (r["status"], r["cause"]) == ("INTEGRITY_FAIL", "invalid-HMAC")
    assert records(m, "appraise", "/prog")[-1]["cause"] == "invalid-HMAC"
    # and a file that fails is not re-protected through the mount (EPERM)
    assert errno_of(os.chmod, mp, 0o700) == errno.EPERM
    assert errno_of(os.removexattr, mp, "security.capability") == errno.EPERM
    assert evm_value(prog) == h2
    os.chmod(prog, 0o750)                                   # behind, back as it was
    assert runs(mp) == 0
    # security.ima rewritten through the mount: the HMAC follows
    good = os.getxattr(prog, "security.ima")
    os.setxattr(mp, "security.ima", good)
    assert evm_value(prog) == h2 and runs(mp) == 0
    # security.evm removed behind the mount: missing where EVM requires it
    os.removexattr(prog, "security.evm")
    assert runs(mp) == errno.EACCES
    r = records(m, "appraise_metadata", "/prog")[-1]
    assert (r["status"], r["result"]) == ("INTEGRITY_NOLABEL", "no_label")
    assert records(m, "appraise", "/prog")[-1]["cause"] == "missing-HMAC"
    assert m.query("/prog")["namespaces"][0]["evm"]["status"] == "INTEGRITY_NOLABEL"
    os.setxattr(prog, "security.evm", h2)
    assert runs(mp) == 0


def test_new_files_get_hmacs_and_unlabelled_files_are_refused(make_mount, world_tmp):
    """A file created through the mount (IMA_NEW_FILE) is labelled at its last close:
    security.ima, then its HMAC. An existing file with no protected xattr cannot be
    given one through the mount once an HMAC key is in use (the kernel's
    evm_protect_xattr: INTEGRITY_NOXATTRS, audited as update_metadata)."""
    b = world_tmp / "backing"
    b.mkdir()
    (b / "old").write_bytes(b"old\n")
    k = hmac_key(world_tmp)
    m = make_mount(["--evm", "enforce", "--evm-key", str(k)]
                   + policy(world_tmp, "appraise func=FILE_CHECK\n"), backing=b)
    with open(m.mnt / "new", "wb") as f:
        f.write(b"new\n")
    assert m.mnt.joinpath("new").read_bytes() == b"new\n"
    assert evm_value(b / "new")[0] == 0x02
    assert errno_of(os.setxattr, m.mnt / "old", "security.ima",
                    b"\x04\x04" + bytes(32)) == errno.EPERM
    assert records(m, "update_metadata", "/old")[-1]["status"] == "INTEGRITY_NOXATTRS"


# ---------------------------------------------------------------- the evm file, options
def test_evm_control_file(make_mount, world_tmp, key):
    m = make_mount(["--evm", "enforce", "--key", str(key / "signing_cert.der")])
    assert m.ctl("evm").read_text() == "2"             # EVM_INIT_X509
    assert stat.S_IMODE(os.stat(m.ctl("evm")).st_mode) == 0o660
    assert write_ctl(m, "evm", b"1") == errno.ENOENT  # no HMAC key
    assert write_ctl(m, "evm", b"0x10") == errno.EINVAL
    assert write_ctl(m, "evm", b"junk") == errno.EINVAL
    p = run_as(65534, 65534, ["sh", "-c", f"echo 4 > {m.ctl('evm')}"], capture_output=True)
    assert p.returncode != 0
    assert write_ctl(m, "evm", b"4\n") == 0           # EVM_ALLOW_METADATA_WRITES
    assert m.ctl("evm").read_text() == "6"
    assert [r["flags"] for r in m.audit() if r["type"] == "evm_update"] == ["6"]
    # metadata writes allowed: a signed file's mode may change
    shutil.copy(PROG, m.backing / "prog")
    sign(key, m.backing / "prog")
    os.chmod(m.mnt / "prog", 0o700)
    assert write_ctl(m, "evm", b"0x80000000") == 0     # setup complete: read-only
    assert write_ctl(m, "evm", b"2") == errno.EPERM


def test_mount_refuses_bad_hmac_keys(make_mount, world_tmp):
    b = world_tmp / "backing"
    b.mkdir()
    mnt = world_tmp / "mnt"
    mnt.mkdir()

    def mount(*args):
        return sh(*IMAFS, "mount", b, mnt, "--state", world_tmp / "state", *args,
                  check=False)
    inside = hmac_key(b, "key")
    p = mount("--evm", "enforce", "--evm-key", inside)
    assert p.returncode == 2 and "inside the backing tree" in p.stderr
    loose = hmac_key(world_tmp, "loose")
    os.chmod(loose, 0o644)
    p = mount("--evm", "enforce", "--evm-key", loose)
    assert p.returncode == 2 and "chmod 600" in p.stderr
    short = hmac_key(world_tmp, "short", b"x" * 16)
    p = mount("--evm", "enforce", "--evm-key", short)
    assert p.returncode == 2 and "32 to 128 bytes" in p.stderr
    good = hmac_key(world_tmp, "good")
    p = mount("--evm-key", good)
    assert p.returncode == 2 and "--evm-key needs --evm" in p.stderr
    os.chown(good, 4242, -1)
    p = mount("--evm", "log", "--evm-key", good)
    assert p.returncode == 2 and "not root" in p.stderr


# ---------------------------------------------------------------- a child's own key
class Runner:
    """A host shell that runs each command line written to it (prints its status):
    bound to a namespace, its execs and chmods are that namespace's."""

    def __init__(self):
        self.p = subprocess.Popen(["bash", "-c", 'while read -r c; do eval "$c" '
                                   '>/dev/null 2>&1; echo "rc=$?"; done'],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.p.pid

    def run(self, command: str) -> int:
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line.startswith("rc="), line
        return int(line[3:])

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


def test_a_childs_writes_never_change_the_hosts_evm(make_mount, world_tmp):
    """The host and a child namespace each with its own HMAC key. The child labels its
    own view (fix mode: its private security.ima, then its HMAC), then changes the
    file's mode through the mount: its own HMAC follows, the host's security.evm stays
    as it was, so the host -- whose rules apply in the child too -- refuses the file."""
    b = world_tmp / "backing"
    b.mkdir()
    prog = b / "prog"
    shutil.copy(PROG, prog)
    k0, k1 = hmac_key(world_tmp, "host.key"), hmac_key(world_tmp, "child.key")
    host = ["--evm", "enforce", "--evm-key", str(k0)] + policy(world_tmp, HASH_POLICY)
    m = make_mount(["--appraise", "fix"] + host, backing=b)
    mp = m.mnt / "prog"
    assert runs(mp) == 0                        # the host labels its view
    host_evm = evm_value(prog)
    assert host_evm[0] == 0x02
    m.restart(host)
    (world_tmp / "child.policy").write_text(HASH_POLICY)
    r = Runner()
    try:
        bad = sh(*IMAFS, "ns", "create", m.mnt, "bad", "--pid", r.pid,
                 f"evm_key={k1}", check=False)
        assert bad.returncode == 2 and "needs EVM on" in bad.stderr
        out = sh(*IMAFS, "ns", "create", m.mnt, "web", "--pid", r.pid, "evm=enforce",
                 f"evm_key={k1}", "appraise=fix", "--policy", world_tmp / "child.policy")
        nsid = int(re.search(r"\(id (\d+)", out.stdout).group(1))
        ima_name, evm_name = f"security.imafs.ns{nsid}.ima", f"security.imafs.ns{nsid}.evm"
        web = m.ctl("namespaces/web")
        assert (web / "evm").read_text() == "3"
        assert r.run(f"{mp}") == 0              # the child labels its own view
        own = {n: os.getxattr(prog, n) for n in os.listxattr(prog)
               if n.startswith("security.imafs.")}
        assert sorted(own) == [evm_name, ima_name]
        assert r.run(f"chmod 0750 {mp}") == 0
        assert stat.S_IMODE(prog.stat().st_mode) == 0o750
        assert evm_value(prog) == host_evm       # never written from inside the child
        assert os.getxattr(prog, evm_name) != own[evm_name]
        # the host's view changed: refused to the host, and to the child (host rules)
        assert runs(mp) == errno.EACCES
        assert r.run(f"{mp}") != 0
        rec = records(m, "appraise_metadata", "/prog")[-1]
        assert (rec["ns"], rec["cause"]) == ("/", "invalid-HMAC")
        # the child's own view passes; what it learns of the host is the verdict only
        r.run(f"printf 'exec %s' {mp} > {m.ctl('query')}; cat {m.ctl('query')} > "
              f"{world_tmp}/answer")
        ans = json.loads((world_tmp / "answer").read_text())
        mine, host_entry = ans["namespaces"]
        assert mine["evm"]["status"] == "INTEGRITY_PASS"
        assert host_entry == {"namespace": "/", "ancestor": True, "allowed": False}
        # the host sets the mode back behind the mount: its view passes again
        os.chmod(prog, 0o755)
        assert runs(mp) == 0
    finally:
        r.stop()


def oci_hook(conf: Path, state: dict, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run(IMAFS + ["oci-hook", stage, "--config", str(conf)],
                          input=json.dumps(state), capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_oci_hook_profile_gives_a_container_its_own_evm(make_mount, world_tmp):
    """evm= and evm_key= in an OCI hook profile work as from `imafs ns create`: the
    container's namespace has EVM on with its HMAC key (the hook sends the key's path;
    the daemon reads it), labels its own view and never the host's security.evm. In
    an annotation evm_key= names a host file: refused unless the hook's configuration
    allows host paths."""
    b = world_tmp / "backing"
    b.mkdir()
    prog = b / "prog"
    shutil.copy(PROG, prog)
    k0, k1 = hmac_key(world_tmp, "host.key"), hmac_key(world_tmp, "ctr.key")
    host = ["--evm", "enforce", "--evm-key", str(k0)] + policy(world_tmp, HASH_POLICY)
    m = make_mount(["--appraise", "fix"] + host, backing=b)
    assert runs(m.mnt / "prog") == 0                # the host labels its view
    host_evm = evm_value(prog)
    m.restart(host)
    profiles = world_tmp / "profiles"
    (profiles / "evm").mkdir(parents=True)
    (profiles / "evm" / "policy").write_text(HASH_POLICY)
    (profiles / "evm" / "options").write_text(f"evm=enforce\nevm_key={k1}\nappraise=fix\n")
    for d in (world_tmp, profiles, profiles / "evm"):
        os.chmod(d, 0o755)
    conf = world_tmp / "oci-hook.conf"
    conf.write_text(f"profiles = {profiles}\narchive = none\n"
                    f"state_dir = {world_tmp / 'hookstate'}\n")
    bundle = world_tmp / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"root": {"path": str(m.mnt)}}))
    r = Runner()

    def state(cid, status, **ann):
        return {"ociVersion": "1.0.2", "id": cid, "status": status, "pid": r.pid,
                "bundle": str(bundle), "annotations": ann}
    try:
        # an annotation naming the key: a host path, refused (host paths off)
        bad = oci_hook(conf, state("c0", "creating", **{
            "org.imafs.options": f"evm=enforce evm_key={k1}"}), "createRuntime")
        assert bad.returncode == 2 and "evm_key=" in bad.stderr \
            and "allow_host_paths" in bad.stderr, bad.stderr
        assert not m.ctl("namespaces/c0").exists()
        ok = oci_hook(conf, state("c1", "creating", **{"org.imafs.profile": "evm"}),
                      "createRuntime")
        assert ok.returncode == 0, ok.stderr
        ctr = m.ctl("namespaces/c1")
        assert (ctr / "evm").read_text() == "3"     # signatures and its HMAC key
        listed = json.loads(sh(*IMAFS, "ns", "list", m.mnt, "--json").stdout)
        assert [(n["path"], n["evm"]) for n in listed] == [("/c1", "enforce")]
        nsid = listed[0]["id"]
        assert r.run(f"{m.mnt / 'prog'}") == 0      # the container labels its own view
        own = os.getxattr(prog, f"security.imafs.ns{nsid}.evm")
        assert own[0] == 0x02 and evm_value(prog) == host_evm
        assert r.run(f"chmod 0750 {m.mnt / 'prog'}") == 0
        assert os.getxattr(prog, f"security.imafs.ns{nsid}.evm") != own  # its HMAC follows
        assert evm_value(prog) == host_evm          # never the host's
        assert runs(m.mnt / "prog") == errno.EACCES  # the host's view changed
    finally:
        r.stop()
    done = oci_hook(conf, state("c1", "stopped"), "poststop")   # the container is gone
    assert done.returncode == 0, done.stderr
    assert not ctr.exists()
