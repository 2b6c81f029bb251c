"""keylime's running verifier, registrar, tenant and agent attest an imafs host (issue 21).

One setup for the module (tests/interop/keylime_services.py): a busybox rootfs whose
executables are signed, mounted with ``--template ima-sig --tpm`` on swtpm, keylime's
servers and agent on loopback, the agent reading the mount's list.  Each test adds
the agent with a runtime policy that ``imafs keylime-policy`` writes (the files from
the tree, the boot aggregate and buffer entries from the mount's list, the signing
certificate as verification key) and reads the verifier's verdict from its REST API.
The quote interval is 1 s.  The PCR test breaks the TPM for good: it runs last.
The demo's keylime step runs first, with services of its own (keylime_demo.py).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from helpers.mounts import IMAFS, REPO, Mount, is_mounted, force_unmount
from . import keylime_services as ks

pytestmark = [pytest.mark.interop, pytest.mark.mount, pytest.mark.timeout(900)]
_why = ks.missing()
if _why:
    pytestmark.append(pytest.mark.skip(reason=_why))

QUOTE = 1.0
POLICY = ("measure func=BPRM_CHECK\n"
          "measure func=MMAP_CHECK mask=MAY_EXEC\n"
          "measure func=FILE_CHECK mask=MAY_READ uid=0\n"
          "appraise func=BPRM_CHECK appraise_type=imasig\n")
SCRIPT = "#!/bin/sh\necho {}\n"


def imafs(*args: str) -> str:
    r = subprocess.run(IMAFS + list(args), capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


class Host:
    """The attested host: its rootfs, mount, keys and the keylime loop."""

    def __init__(self, work: Path):
        self.work = work
        self.root, self.keys = work / "rootfs", work / "keys"
        self.loop: ks.KeylimeLoop | None = None
        self.mount: Mount | None = None
        self.policy_file: Path | None = None
        self.tpm_tainted = False
        self.n = 0
        self.hook: Path | None = None

    def build(self) -> None:
        r = self.root
        for d in ("bin", "usr/bin", "etc", "proc", "tmp", "dev", "sys", "var/lib/dpkg"):
            (r / d).mkdir(parents=True)
        (r / "var/lib/dpkg/status").write_text("Package: hello\nStatus: install ok "
                                                "installed\n")
        shutil.copy("/bin/busybox", r / "bin/busybox")
        for a in ("sh", "cat", "echo", "true", "ls"):
            (r / "bin" / a).symlink_to("busybox")
        for name in ("hello", "tampered"):
            (r / "usr/bin" / name).write_text(SCRIPT.format(name))
            (r / "usr/bin" / name).chmod(0o755)
        (r / "etc/motd").write_text("attested by keylime\n")
        imafs("keygen", "--out", str(self.keys), "--cn", "keylime loop test key")
        self.sign(r / "bin/busybox", r / "usr/bin/hello", r / "usr/bin/tampered")
        (self.work / "policy").write_text(POLICY)

    def sign(self, *paths: Path) -> None:
        imafs("sign", "--quiet", "--key", str(self.keys / "signing_key.pem"),
              "--cert", str(self.keys / "signing_cert.der"), *map(str, paths))

    @property
    def mnt(self) -> Path:
        return self.mount.mnt

    def host_list(self) -> list[list[str]]:
        text = (self.mnt / ".imafs" / "ascii_runtime_measurements").read_text()
        return [line.split(" ") for line in text.splitlines()]

    def run(self, *argv: str, ok: bool = True) -> subprocess.CompletedProcess:
        """argv in a chroot into the mount (so through imafs)."""
        r = subprocess.run(["chroot", str(self.mnt), *argv], capture_output=True, text=True,
                           timeout=60)
        if ok:
            assert r.returncode == 0, (argv, r.stdout, r.stderr)
        return r

    def container(self, name: str, *commands: str) -> str:
        """A container made by hand: new pid namespace, chroot into the mount, its
        own integrity namespace (ns-create), then ``commands``."""
        script = " && ".join([f"echo {name} > /.imafs/ns-create", *commands])
        r = subprocess.run(["unshare", "--fork", "--kill-child", "--pid", "--mount-proc",
                            "chroot", str(self.mnt), "/bin/sh", "-c", script],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (script, r.stdout, r.stderr)
        assert (self.mnt / ".imafs" / "namespaces" / name).is_dir()
        return r.stdout

    def runc_container(self, name: str) -> str:
        """A container as runc starts it: the bundle's root is the mount, the hook
        (installed by scripts/install) makes its namespace at createRuntime and, when
        the container has run /usr/bin/hello and exited, archives and removes it at
        poststop."""
        if self.hook is None:
            self._runc_setup()
        c = json.loads(json.dumps(self.spec))
        c["root"] = {"path": str(self.mnt), "readonly": False}
        c["process"]["terminal"] = False
        c["process"]["args"] = ["/usr/bin/hello"]
        c["annotations"] = {"org.imafs.profile": "web"}
        h = {"path": str(self.hook), "args": ["imafs", "oci-hook", "--config",
                                              str(self.work / "oci-hook.conf")]}
        c["hooks"] = {"createRuntime": [h], "poststop": [h]}
        (self.work / "bundle" / "config.json").write_text(json.dumps(c))
        r = subprocess.run(["runc", "--root", str(self.work / "runc"), "run", "--bundle",
                            str(self.work / "bundle"), name], capture_output=True, text=True,
                           timeout=60)
        subprocess.run(["runc", "--root", str(self.work / "runc"), "delete", "-f", name],
                       capture_output=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def _runc_setup(self) -> None:
        w = self.work
        r = subprocess.run([str(REPO / "scripts" / "install"), str(w / "prefix")],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, IMAFS_PYTHON=sys.executable))
        assert r.returncode == 0, r.stderr
        (w / "profiles" / "web").mkdir(parents=True)
        (w / "profiles" / "web" / "policy").write_text("measure func=BPRM_CHECK\n")
        (w / "oci-hook.conf").write_text(f"profiles = {w / 'profiles'}\n"
                                         f"archive = {w / 'archive'}\n"
                                         f"state_dir = {w / 'hookstate'}\n")
        (w / "bundle").mkdir()
        subprocess.run(["runc", "spec", "--bundle", str(w / "bundle")], check=True)
        self.spec = json.loads((w / "bundle" / "config.json").read_text())
        self.hook = w / "prefix" / "bin" / "imafs"

    def keylime_policy(self, *extra: str) -> tuple[Path, dict]:
        """``imafs keylime-policy`` as a user writes it for this host (or with
        ``extra`` options instead of the defaults below)."""
        self.n += 1
        out = self.work / f"runtime-policy-{self.n}.json"
        args = extra or ("--rootfs", str(self.root), "--mount", str(self.mnt),
                         "--keys", str(self.keys))
        imafs("keylime-policy", *args, "--output", str(out))
        return out, json.loads(out.read_text())

    def attest(self, policy: Path) -> dict:
        """The agent added with this policy (removed first if the verifier has it),
        attested once: the verifier's record."""
        if self.tpm_tainted:
            pytest.skip("the PCR test extended PCR 10 behind imafs; the TPM is no longer "
                        "the list's")
        if self.loop.known():
            self.loop.delete()
        self.loop.add(policy)
        self.policy_file = policy
        return self.loop.status()

    def round_period(self, rounds: int = 3) -> float:
        """Seconds per attestation round, as the verifier runs them now."""
        t0 = time.monotonic()
        self.loop.wait_pass(rounds)
        return (time.monotonic() - t0) / rounds


@pytest.fixture(scope="module")
def host():
    work = Path(tempfile.mkdtemp(prefix="imafs-keylime-", dir="/tmp"))
    os.chmod(work, 0o755)
    h = Host(work)
    try:
        h.build()
        h.loop = ks.KeylimeLoop(work / "keylime", quote_interval=QUOTE)
        tcti = h.loop.start_tpm()
        (work / "mnt").mkdir()
        h.mount = Mount(h.root, work / "mnt", work / "state",
                        ["--policy", str(work / "policy"), "--keys", str(h.keys),
                         "--template", "ima-sig", "--tpm", tcti])
        h.mount.start()
        h.loop.start_servers()
        h.loop.start_agent(h.mnt)
        yield h
    finally:
        if h.loop is not None:
            h.loop.close()               # the agent first: it holds a copy of the mount
        if h.mount is not None:
            h.mount.stop()
            force_unmount(str(work / "mnt"))
        shutil.rmtree(work, ignore_errors=True)


def _demo(keylime: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAFS_DEMO_")}
    env["IMAFS_DEMO_KEYLIME"] = keylime
    return subprocess.run([str(REPO / "scripts/demo")], capture_output=True, text=True,
                          timeout=600, env=env, cwd="/")


def test_demo_keylime_step():
    """``IMAFS_DEMO_KEYLIME=1 ./scripts/demo``: step 8b shows the verifier's PASS, then
    its FAIL naming the tampered binary; the other steps are unchanged, nothing is
    left mounted or on disk.  (Runs before the module's services start.)"""
    r = _demo("1")
    m = re.search(r"files in (/tmp/imafs-demo\.[A-Za-z0-9]+)/rootfs", r.stdout)
    work = m.group(1) if m else None
    for mnt in ("mnt", "mnt-attested"):
        if work and is_mounted(f"{work}/{mnt}"):
            force_unmount(f"{work}/{mnt}")
            pytest.fail(f"the demo left {work}/{mnt} mounted\n{r.stdout}\n{r.stderr}")
    assert r.returncode == 0, r.stdout + r.stderr
    heads = re.findall(r"^== (.*) ==$", r.stdout, re.M)
    assert heads[8] == "8b. keylime's running services attest a mount with a TPM: PASS, then FAIL"
    assert len(heads) == 11 and heads[9].startswith("9. ") and heads[-1] == "10. Unmount"
    step = r.stdout.split("== 8b.", 1)[1].split("== 9.", 1)[0]
    assert re.search(r"^  verifier: PASS \(attestation \d+", step, re.M), step
    assert re.search(r"^  verifier: FAIL .*/usr/bin/tampered", step, re.M), step
    assert "ok: keylime's verifier passed the mount, then failed it for /usr/bin/tampered" in step
    assert "ok: demo complete" in r.stdout
    assert work is not None and not os.path.exists(work)


def test_demo_refuses_a_bad_keylime_switch():
    r = _demo("yes")
    assert r.returncode == 2 and "IMAFS_DEMO_KEYLIME=yes: not 0 or 1" in r.stderr


def test_registered_added_and_passing_while_files_are_used(host):
    """Register (the registrar shows the agent), add with a policy from
    ``imafs keylime-policy``, then PASS round after round while files are read and
    programs run through the mount."""
    assert host.loop.registered()
    # the agent registered with its EK certificate, which the tenant checked against
    # the CA that issued it (require_ek_cert) when it added the agent
    ek = host.loop.registration()["ekcert"]
    issuer = x509.load_pem_x509_certificate(
        (host.loop.work / "tpm_cert_store" / "swtpm-localca-issuer.pem").read_bytes())
    assert x509.load_der_x509_certificate(base64.b64decode(ek)).issuer == issuer.subject
    policy, doc = host.keylime_policy()
    assert "/usr/bin/hello" in doc["digests"] and "boot_aggregate" in doc["digests"]
    st = host.attest(policy)
    assert st["attestation_status"] == "PASS" and st["has_runtime_policy"] == 1
    assert st["hash_alg"] == "sha256"
    before = len(host.host_list())
    for i in range(3):
        assert host.run("/usr/bin/hello").stdout == "hello\n"
        assert host.run("/bin/cat", "/etc/motd").stdout == "attested by keylime\n"
        st = host.loop.wait_pass(1)
        assert st["attestation_status"] == "PASS"
    names = [e[4] for e in host.host_list()[before - 1:]]
    assert "/usr/bin/hello" in names and "/etc/motd" in names


def test_signed_files_pass_without_being_listed(host):
    """ima-sig: a program signed after the policy was written has no digest in it;
    keylime checks its signature with the policy's verification key, and passes."""
    policy, doc = host.keylime_policy()
    assert json.loads(doc["verification-keys"])["keyids"]
    host.attest(policy)
    new = host.root / "usr/bin/signed-later"
    new.write_text(SCRIPT.format("signed after the policy"))
    new.chmod(0o755)
    host.sign(new)
    assert host.run("/usr/bin/signed-later").stdout == "signed after the policy\n"
    entry = [e for e in host.host_list() if e[4] == "/usr/bin/signed-later"]
    assert len(entry) == 1 and entry[0][2] == "ima-sig" and entry[0][5].startswith("03")
    digest = entry[0][3].split(":", 1)[1]
    assert "/usr/bin/signed-later" not in doc["digests"]
    assert digest not in {d for ds in doc["digests"].values() for d in ds}
    host.loop.wait_pass(3)


def test_containers_pass_with_namespace_events_excluded(host):
    """What works today: a policy whose excludes name the namespace-event buffer
    entries (``--exclude-regex '^ns-(create|remove)$'``) keeps passing while
    containers are started and removed between rounds; their entries are in the
    host list and replayed into PCR 10 all the same."""
    policy, doc = host.keylime_policy("--rootfs", str(host.root), "--mount", str(host.mnt),
                                      "--keys", str(host.keys),
                                      "--exclude-regex", "^ns-(create|remove)$")
    host.attest(policy)
    for i in range(3):
        out = host.container(f"excl{i}", "/usr/bin/hello", "cat /etc/motd")
        assert out == "hello\nattested by keylime\n"
        host.loop.wait_pass(1)
    for i in range(3):
        (host.mnt / ".imafs" / "ns-remove").write_text(f"excl{i}\n")
    host.loop.wait_pass(2)
    names = [e[4] for e in host.host_list()]
    assert names.count("ns-create") >= 3 and names.count("ns-remove") >= 3


def test_containers_started_after_the_policy_keep_passing(host):
    """The requirement (issue 15, Attestation): a host that starts containers after
    its keylime runtime policy was written keeps passing, with the policy as
    ``imafs keylime-policy`` writes it (its default excludes: the namespace events,
    and package managers' mutable state, which dpkg rewrites between rounds here).
    Containers made by hand (ns-create) and by runc with ``imafs oci-hook`` come and
    go between rounds; ``imafs verify-log`` then checks the events keylime skipped and
    ties the runc containers' archived lists to the host's list."""
    policy, doc = host.keylime_policy()
    assert "^(ns-create|ns-init|ns-remove|ns-join|ns-join-failed)$" in doc["excludes"]
    assert "/var/lib/dpkg/status" not in doc["digests"]
    host.attest(policy)
    runc = shutil.which("runc") is not None
    for i in range(3):
        host.container(f"web{i}", "/usr/bin/hello")
        (host.mnt / ".imafs" / "ns-remove").write_text(f"web{i}\n")
        if runc:
            assert host.runc_container(f"runc{i}") == "hello\n"
        with open(host.mnt / "var/lib/dpkg/status", "a") as f:     # dpkg at work
            f.write(f"\nPackage: p{i}\nStatus: install ok installed\n")
        host.run("/bin/cat", "/var/lib/dpkg/status")
        host.loop.wait_pass(1)
    names = [e[4] for e in host.host_list()]
    assert names.count("ns-create") >= 3 + 3 * runc and "/var/lib/dpkg/status" in names
    host.loop.wait_pass(2)
    lst = host.work / "host.bin"
    lst.write_bytes((host.mnt / ".imafs" / "binary_runtime_measurements").read_bytes())
    archives = sorted((host.work / "archive").iterdir()) if runc else []
    assert len(archives) == 3 * runc
    r = subprocess.run(IMAFS + ["verify-log", str(lst)] + [
        a for d in archives for a in ("--child", str(d))], capture_output=True, text=True,
        timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("its length and PCR 10 match") == len(archives)


def test_tampered_binary_fails_within_two_rounds(host):
    """A byte appended to a signed program behind the mount: its exec through the
    mount is refused and recorded; the verifier fails the agent within two
    attestation rounds, naming the file."""
    policy, _ = host.keylime_policy()
    host.attest(policy)
    period = host.round_period()
    with open(host.root / "usr/bin/tampered", "a") as f:
        f.write("echo tampered\n")
    t0 = time.monotonic()
    passed = host.loop.status().get("attestation_count") or 0
    r = host.run("/usr/bin/tampered", ok=False)
    assert r.returncode == 126 and "Permission denied" in r.stderr, r
    st, _ = host.loop.wait_fail(timeout=30)
    took = time.monotonic() - t0
    why = host.loop.failure(st)
    assert st["attestation_status"] == "FAIL", why
    # keylime found the signature bad, then the digest not in the policy
    assert st["last_event_id"] == "ima.validation.ima-ng.runtime_policy_hash", why
    assert "/usr/bin/tampered" in why and "ImaSig 1" in why
    # counted in rounds (the verifier counts successful ones only), not seconds: a
    # round already under way when the program ran may still pass, the next one fails
    rounds = (st.get("attestation_count") or 0) - passed
    assert rounds <= 1, (rounds, took, period, why)


def test_pcr_extended_outside_imafs_fails(host):
    """PCR 10 extended behind imafs's back: the list no longer replays to the quoted
    PCR, and the verifier fails the agent (ima.pcr_mismatch).  Runs last: the TPM
    stays apart from the list."""
    policy, _ = host.keylime_policy("--mount", str(host.mnt), "--keys", str(host.keys))
    host.attest(policy)
    host.loop.wait_pass(2)
    env = dict(os.environ, TPM2TOOLS_TCTI=host.loop.tcti)
    r = subprocess.run(["tpm2_pcrextend", "10:sha256=" + "ab" * 32], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    host.tpm_tainted = True
    st, _ = host.loop.wait_fail(timeout=30)
    assert st["last_event_id"] == "ima.pcr_mismatch", host.loop.failure(st)
