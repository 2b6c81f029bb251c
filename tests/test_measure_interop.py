"""A real mount's measurement list and PCRs, checked by real verifiers: evmctl
(ima-evm-utils) and keylime's measurement-list checker, with a runtime policy that
``imafs keylime-policy`` writes from the mount or from the rootfs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from conftest import IMAFS, REPO
from imafs.ima.templates import parse_binary

pytestmark = [pytest.mark.interop, pytest.mark.mount]

EVMCTL = shutil.which("evmctl")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
needs_evmctl = pytest.mark.skipif(EVMCTL is None, reason="evmctl (ima-evm-utils) not installed")
SH = 60

POLICY = """\
measure func=BPRM_CHECK mask=MAY_EXEC
measure func=FILE_CHECK mask=MAY_READ fowner=1000 template=ima-sig
measure func=FILE_CHECK mask=MAY_READ
"""


def populate(b):
    (b / "bin").mkdir(parents=True, exist_ok=True)
    (b / "etc").mkdir(exist_ok=True)
    shutil.copy(BUSYBOX, b / "bin/busybox")
    (b / "etc/hostname").write_text("imafs-test\n")
    (b / "etc/with space.conf").write_text("a = b\n")
    (b / "etc/signed.conf").write_text("signed content\n")
    os.chown(b / "etc/signed.conf", 1000, 1000)


def activity(m):
    r = subprocess.run([str(m.mnt / "bin/busybox"), "cat", str(m.mnt / "etc/hostname")],
                       capture_output=True, text=True, timeout=SH)
    assert r.returncode == 0 and r.stdout == "imafs-test\n", r.stderr
    for name in ("with space.conf", "signed.conf"):
        (m.mnt / "etc" / name).read_bytes()


def mount(make_mount, world_tmp, backing, *extra):
    pol = world_tmp / "policy"
    pol.write_text(POLICY)
    return make_mount(["--policy", str(pol), *extra], backing=backing)


def imafs(*args):
    r = subprocess.run(IMAFS + list(args), capture_output=True, text=True, timeout=SH, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return r


# -- evmctl ---------------------------------------------------------------------

@pytest.fixture
def signing_key(world_tmp):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cnf = world_tmp / "x509.cnf"
    cnf.write_text("[req]\ndistinguished_name=dn\nprompt=no\nx509_extensions=ext\n"
                   "[dn]\nCN=imafs test\n[ext]\nsubjectKeyIdentifier=hash\n"
                   "keyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n")
    key, cert = world_tmp / "key.pem", world_tmp / "cert.der"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-days", "30", "-config", str(cnf), "-outform", "DER",
                    "-out", str(cert)], check=True, capture_output=True, timeout=SH)
    return key, cert


def evmctl(binary, pcr1, pcr256, *extra):
    return subprocess.run([EVMCTL, "ima_measurement", *extra, "--pcrs", f"sha1,{pcr1}",
                           "--pcrs", f"sha256,{pcr256}", str(binary)],
                          capture_output=True, text=True, timeout=SH)


@needs_evmctl
def test_evmctl_replays_the_mount(make_mount, world_tmp, signing_key):
    key, cert = signing_key
    b = world_tmp / "backing1"
    populate(b)
    # signed with sha512 on a sha256 mount: the entry must carry the sha512 digest that
    # the signature covers (the kernel hashes in the xattr's algorithm)
    subprocess.run([EVMCTL, "ima_sign", "--key", str(key), "-a", "sha512",
                    str(b / "etc/signed.conf")], check=True, capture_output=True, timeout=SH)
    m = mount(make_mount, world_tmp, b)
    activity(m)
    ctl = m.ctl()
    r = evmctl(ctl / "binary_runtime_measurements", ctl / "pcrs/sha1", ctl / "pcrs/sha256",
               "-v", "--verify-sig", "--key", str(cert))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "/etc/signed.conf: verification is OK" in out
    assert "verification failed" not in out
    names = [e.name for e in parse_binary((ctl / "binary_runtime_measurements").read_bytes())]
    assert names == [b"boot_aggregate", b"/bin/busybox", b"/etc/hostname",
                     b"/etc/with_space.conf", b"/etc/signed.conf"]

    # one byte of an entry's path flipped: the template hash no longer matches
    blob = (ctl / "binary_runtime_measurements").read_bytes()
    at = blob.index(b"/etc/hostname")
    bad = bytearray(blob)
    bad[at + 5] ^= 0x01
    (world_tmp / "tampered").write_bytes(bytes(bad))
    r = evmctl(world_tmp / "tampered", ctl / "pcrs/sha1", ctl / "pcrs/sha256")
    assert r.returncode != 0, r.stdout + r.stderr
    # an entry dropped: the PCRs no longer match
    recs = list(parse_binary(blob))
    first_two = sum(len(e.binary_record()) for e in recs[:2])
    (world_tmp / "short").write_bytes(blob[:first_two])
    assert evmctl(world_tmp / "short", ctl / "pcrs/sha1", ctl / "pcrs/sha256").returncode != 0

    # a violation: evmctl replays it as the kernel extends it (0xff..)
    with open(m.mnt / "etc/hostname", "ab"):
        (m.mnt / "etc/hostname").read_bytes()
    assert int((ctl / "violations").read_text()) == 1
    r = evmctl(ctl / "binary_runtime_measurements", ctl / "pcrs/sha1", ctl / "pcrs/sha256",
               "--ignore-violations")
    assert r.returncode == 0, r.stdout + r.stderr


# -- keylime ---------------------------------------------------------------------

def _keylime():
    try:
        import gpg  # noqa: F401  keylime.signing imports it; its checker never uses it
    except ImportError:
        sys.modules.setdefault("gpg", types.ModuleType("gpg"))
    try:
        from keylime.common.algorithms import Hash
        from keylime.ima import ima
    except ImportError as e:
        pytest.skip(f"keylime is not importable (pip install keylime and its deps): {e}")
    return ima, Hash


def pcr10(m, bank: str) -> str:
    line = (m.ctl(f"pcrs/{bank}")).read_text().splitlines()[10]
    assert line.startswith("PCR-10: ")
    return line.split()[1]


def keylime_check(m, policy):
    """Replay the mount's ascii list with keylime against both PCR banks; returns the
    failure of the sha1 replay (the sha256 one must agree)."""
    ima, Hash = _keylime()
    lines = m.ctl("ascii_runtime_measurements").read_text().splitlines(True)
    results = []
    for bank, alg in (("sha1", Hash.SHA1), ("sha256", Hash.SHA256)):
        want = pcr10(m, bank)
        running, failure = ima.process_measurement_list(
            None, lines, json.loads(json.dumps(policy)), pcrval=want, hash_alg=alg)
        assert running == want, bank
        assert "ima.pcr_mismatch" not in {e.event_id for e in failure.events}
        results.append({e.event_id for e in failure.events})
    assert results[0] == results[1]
    return results[0]


def test_keylime_accepts_the_mount_with_its_exported_policy(make_mount, world_tmp):
    ima, _ = _keylime()
    b = world_tmp / "backing1"
    populate(b)
    m = mount(make_mount, world_tmp, b, "--attr-timeout", "0")
    activity(m)
    out = world_tmp / "policy.json"
    imafs("keylime-policy", "--mount", str(m.mnt), "--output", str(out))
    policy = json.loads(out.read_text())
    ima.validate_runtime_policy(policy)
    digest = lambda p: __import__("hashlib").sha256((b / p).read_bytes()).hexdigest()  # noqa: E731
    assert policy["digests"] == {
        "boot_aggregate": ["00" * 32],
        "/bin/busybox": [digest("bin/busybox")],
        "/etc/hostname": [digest("etc/hostname")],
        "/etc/with_space.conf": [digest("etc/with space.conf")],
        "/etc/signed.conf": [digest("etc/signed.conf")],
    }
    assert policy["meta"]["version"] == 1 and policy["ima"]["log_hash_alg"] == "sha1"
    # stdout gives the same policy
    same = json.loads(imafs("keylime-policy", "--mount", str(m.mnt)).stdout)
    same["meta"].pop("timestamp"), policy["meta"].pop("timestamp")
    assert same == policy

    assert keylime_check(m, policy) == set()
    # a file the policy does not know, and a file that changed
    (b / "etc/new.conf").write_text("not in the policy\n")
    (m.mnt / "etc/new.conf").read_bytes()
    assert keylime_check(m, policy) == {"ima.validation.ima-ng.not_in_allowlist"}
    (b / "etc/hostname").write_text("changed behind the mount\n")
    (m.mnt / "etc/hostname").read_bytes()
    assert "ima.validation.ima-ng.runtime_policy_hash" in keylime_check(m, policy)
    # a fresh export from the mount allows both versions again
    imafs("keylime-policy", "--mount", str(m.mnt), "--output", str(out))
    policy = json.loads(out.read_text())
    assert len(policy["digests"]["/etc/hostname"]) == 2
    assert keylime_check(m, policy) == set()


def test_keylime_accepts_the_mount_with_a_rootfs_policy(make_mount, world_tmp):
    ima, _ = _keylime()
    b = world_tmp / "backing1"
    populate(b)
    os.symlink("/etc/shadow", b / "etc/link")          # not followed
    out = world_tmp / "rootfs.json"
    imafs("keylime-policy", "--rootfs", str(b), "--algo", "sha256", "--boot-aggregate", "zero",
          "--output", str(out))
    policy = json.loads(out.read_text())
    ima.validate_runtime_policy(policy)
    assert set(policy["digests"]) == {"boot_aggregate", "/bin/busybox", "/etc/hostname",
                                      "/etc/with_space.conf", "/etc/signed.conf"}

    m = mount(make_mount, world_tmp, b)
    activity(m)
    assert keylime_check(m, policy) == set()
    (b / "etc/late.conf").write_text("created after the policy\n")
    (m.mnt / "etc/late.conf").read_bytes()
    assert keylime_check(m, policy) == {"ima.validation.ima-ng.not_in_allowlist"}

    # other algorithms: a sha512 mount against a sha512 rootfs policy
    imafs("keylime-policy", "--rootfs", str(b), "--algo", "sha512", "--boot-aggregate", "zero",
          "--output", str(out))
    policy512 = json.loads(out.read_text())
    ima.validate_runtime_policy(policy512)
    m2 = mount(make_mount, world_tmp, b, "--hash", "sha512")
    activity(m2)
    assert keylime_check(m2, policy512) == set()
    # and the sha256 policy refuses what sha512 recorded
    assert "ima.validation.ima-ng.runtime_policy_hash" in keylime_check(m2, policy)


def test_keylime_policy_refusals(world_tmp):
    r = subprocess.run(IMAFS + ["keylime-policy"], capture_output=True, text=True, timeout=SH,
                       cwd=REPO)
    assert r.returncode == 2 and "--mount" in r.stderr
    r = subprocess.run(IMAFS + ["keylime-policy", "--mount", str(world_tmp)], capture_output=True,
                       text=True, timeout=SH, cwd=REPO)
    assert r.returncode == 2 and "not found" in r.stderr
    r = subprocess.run(IMAFS + ["keylime-policy", "--rootfs", str(world_tmp), "--algo", "md5"],
                       capture_output=True, text=True, timeout=SH, cwd=REPO)
    assert r.returncode == 2 and "--algo" in r.stderr
