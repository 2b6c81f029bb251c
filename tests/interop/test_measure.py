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

from helpers.mounts import IMAFS, REPO
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


def pcr10(m, bank: str, ns: str = "") -> str:
    line = (m.ctl(f"{ns}pcrs/{bank}")).read_text().splitlines()[10]
    assert line.startswith("PCR-10: ")
    return line.split()[1]


def keylime_keyrings(policy):
    """What keylime's verifier checks ima-sig signatures with: the policy's
    verification-keys as its tenant keyring (keylime.cloud_verifier_common)."""
    _keylime()
    from keylime.ima import file_signatures
    rings = file_signatures.ImaKeyrings()
    rings.set_tenant_keyring(file_signatures.ImaKeyring.from_string(
        policy.get("verification-keys") or ""))
    return rings


def keylime_check(m, policy, ns: str = "", keys: bool = False):
    """Replay the mount's ascii list (``ns``: "namespaces/NAME/" for a namespace's)
    with keylime against both PCR banks; returns the failure of the sha1 replay (the
    sha256 one must agree). ``keys``: check signatures with the policy's
    verification-keys, as keylime's verifier does."""
    ima, Hash = _keylime()
    ima.validate_runtime_policy(policy)
    lines = m.ctl(f"{ns}ascii_runtime_measurements").read_text().splitlines(True)
    results = []
    for bank, alg in (("sha1", Hash.SHA1), ("sha256", Hash.SHA256)):
        want = pcr10(m, bank, ns)
        running, failure = ima.process_measurement_list(
            None, lines, json.loads(json.dumps(policy)), pcrval=want, hash_alg=alg,
            ima_keyrings=keylime_keyrings(policy) if keys else None)
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


NS_POLICY = "measure func=FILE_CHECK mask=MAY_READ\n"


def ns_activity(m):
    """A shell enters namespace web (and a child web/inner) and reads files there."""
    mnt = m.mnt
    script = (f"echo web > {mnt}/.imafs/ns-create && printf '{NS_POLICY}' > {mnt}/.imafs/policy"
              f" && cat {mnt}/etc/hostname {mnt}/etc/signed.conf >/dev/null"
              f" && {mnt}/bin/busybox true"
              f" && echo inner > {mnt}/.imafs/ns-create"
              f" && printf '{NS_POLICY}' > {mnt}/.imafs/policy"
              f" && cat '{mnt}/etc/with space.conf' >/dev/null")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=SH)
    assert r.returncode == 0, r.stderr


def keygen(d, kind="rsa"):
    imafs("keygen", "--out", str(d), "--type", kind)
    return d


def signed_world(make_mount, world_tmp):
    """A rootfs whose busybox is signed with an RSA key and signed.conf with an EC key,
    mounted with ima-sig everywhere; the host and namespaces web, web/inner active."""
    b = world_tmp / "backing1"
    populate(b)
    rsa, ec = keygen(world_tmp / "rsa"), keygen(world_tmp / "ec", "ec")
    imafs("sign", "-q", "--key", str(rsa / "signing_key.pem"), str(b / "bin/busybox"))
    imafs("sign", "-q", "--key", str(ec / "signing_key.pem"), str(b / "etc/signed.conf"))
    m = mount(make_mount, world_tmp, b, "--template", "ima-sig", "--attr-timeout", "0")
    activity(m)
    ns_activity(m)
    return b, m, rsa, ec


def test_keylime_policy_of_a_namespace(make_mount, world_tmp):
    """--mount MNT --ns NAME: the policy of a namespace's list (a/b: a grandchild);
    keylime accepts each list with its own policy, not with the host's."""
    ima, _ = _keylime()
    b, m, _, _ = signed_world(make_mount, world_tmp)
    web = json.loads(imafs("keylime-policy", "--mount", str(m.mnt), "--ns", "web").stdout)
    inner = json.loads(imafs("keylime-policy", "--mount", str(m.mnt), "--ns", "web/inner").stdout)
    host = json.loads(imafs("keylime-policy", "--mount", str(m.mnt)).stdout)
    for p in (web, inner, host):
        ima.validate_runtime_policy(p)
    # inner's read is web's too (every ancestor's rules apply)
    assert set(web["digests"]) == {"boot_aggregate", "/etc/hostname", "/etc/signed.conf",
                                   "/etc/with_space.conf"}
    assert set(web["ima-buf"]) == {"ns-init", "ns-create"}          # its own, and inner's
    assert set(inner["digests"]) == {"boot_aggregate", "/etc/with_space.conf"}
    assert set(inner["ima-buf"]) == {"ns-init"}
    assert set(host["ima-buf"]) == {"ns-create"}
    # web's ns-init is the host's ns-create, inner's ns-init web's ns-create
    assert web["ima-buf"]["ns-init"] == host["ima-buf"]["ns-create"]
    assert inner["ima-buf"]["ns-init"] == web["ima-buf"]["ns-create"]
    assert keylime_check(m, web, "namespaces/web/") == set()
    assert keylime_check(m, inner, "namespaces/web/namespaces/inner/") == set()
    assert keylime_check(m, host) == set()
    # another namespace's policy does not fit: without the default excludes, web's
    # ns-init is in no host policy (with them, namespace events are left to
    # imafs verify-log --child, and the host's files are web's too)
    strict = json.loads(imafs("keylime-policy", "--mount", str(m.mnt),
                              "--no-default-excludes").stdout)
    assert keylime_check(m, strict, "namespaces/web/") != set()
    assert keylime_check(m, strict) == set()
    assert "^(ns-create|ns-init|ns-remove|ns-join|ns-join-failed)$" in host["excludes"]
    assert strict["excludes"] == []


def test_keylime_policy_rootfs_with_the_lists_buffers_and_keys(make_mount, world_tmp):
    """--rootfs DIR with --mount MNT [--ns NAME]: files from the tree, the boot
    aggregate and ns-create/ns-init from the list; --keys/--key fill verification-keys
    in keylime's own format, so keylime verifies the ima-sig signatures."""
    ima, _ = _keylime()
    b, m, rsa, ec = signed_world(make_mount, world_tmp)
    tree = {"/bin/busybox", "/etc/hostname", "/etc/with_space.conf", "/etc/signed.conf"}
    # the tree alone: keylime knows no boot aggregate and no ns-create (the issue)
    alone = json.loads(imafs("keylime-policy", "--rootfs", str(b)).stdout)
    assert keylime_check(m, alone) == {"ima.validation.ima-ng.not_in_allowlist"}

    out = world_tmp / "host.json"
    imafs("keylime-policy", "--rootfs", str(b), "--mount", str(m.mnt), "--keys", str(rsa),
          "--key", str(ec / "signing_cert.pem"), "--output", str(out))
    host = json.loads(out.read_text())
    ima.validate_runtime_policy(host)
    assert set(host["digests"]) == tree | {"boot_aggregate"}
    assert host["digests"]["boot_aggregate"] == ["00" * 32]
    assert set(host["ima-buf"]) == {"ns-create"}
    keys = json.loads(host["verification-keys"])
    from imafs.ima.keys import keyid_of
    assert sorted(keys["keyids"]) == sorted(
        keyid_of((d / "signing_cert.der").read_bytes()) for d in (rsa, ec))
    assert keylime_check(m, host) == set()
    assert keylime_check(m, host, keys=True) == set()

    web = json.loads(imafs("keylime-policy", "--rootfs", str(b), "--mount", str(m.mnt),
                           "--ns", "web", "--keys", str(rsa), "--keys", str(ec)).stdout)
    ima.validate_runtime_policy(web)
    assert set(web["digests"]) == tree | {"boot_aggregate"}
    assert set(web["ima-buf"]) == {"ns-init", "ns-create"}
    assert keylime_check(m, web, "namespaces/web/", keys=True) == set()
    inner = json.loads(imafs("keylime-policy", "--rootfs", str(b), "--mount", str(m.mnt),
                             "--ns", "web/inner").stdout)
    assert keylime_check(m, inner, "namespaces/web/namespaces/inner/") == set()

    # the keys are what keylime checks signatures with: without the signed files'
    # digests the signed entries pass only with verification-keys, and only the
    # right ones
    no_signed = json.loads(json.dumps(host))
    del no_signed["digests"]["/bin/busybox"], no_signed["digests"]["/etc/signed.conf"]
    assert keylime_check(m, no_signed, keys=True) == set()
    assert keylime_check(m, no_signed) == {"ima.validation.ima-ng.not_in_allowlist"}
    other = keygen(world_tmp / "other")
    wrong = json.loads(imafs("keylime-policy", "--rootfs", str(b), "--mount", str(m.mnt),
                             "--keys", str(other)).stdout)
    del wrong["digests"]["/bin/busybox"], wrong["digests"]["/etc/signed.conf"]
    assert keylime_check(m, wrong, keys=True) == {"ima.validation.ima-ng.not_in_allowlist"}

    # a file changed behind the mount: its new digest comes from the list, which
    # with --rootfs never adds file digests; the tree's (old) one does not match
    imafs("keylime-policy", "--rootfs", str(b), "--mount", str(m.mnt), "--output", str(out))
    before = json.loads(out.read_text())
    (b / "etc/hostname").write_text("changed behind the mount\n")
    (m.mnt / "etc/hostname").read_bytes()
    assert "ima.validation.ima-ng.runtime_policy_hash" in keylime_check(m, before)
    # re-made from the changed tree it passes again: the tree is the reference
    after = json.loads(imafs("keylime-policy", "--rootfs", str(b), "--mount", str(m.mnt)).stdout)
    assert after["digests"]["/etc/hostname"] != before["digests"]["/etc/hostname"]
    assert len(after["digests"]["/etc/hostname"]) == 1


def test_keylime_policy_ns_and_key_refusals(make_mount, world_tmp):
    b, m, rsa, _ = signed_world(make_mount, world_tmp)

    def refused(*args):
        r = subprocess.run(IMAFS + ["keylime-policy", *args], capture_output=True, text=True,
                           timeout=SH, cwd=REPO)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
        return r.stderr
    assert "--ns NAME needs --mount" in refused("--rootfs", str(b), "--ns", "web")
    assert "--ns nope" in refused("--mount", str(m.mnt), "--ns", "nope")
    assert "not found" in refused("--mount", str(m.mnt), "--ns", "web/nope")
    assert "not a namespace name" in refused("--mount", str(m.mnt), "--ns", "../web")
    assert "--key" in refused("--rootfs", str(b), "--key", str(rsa / "signing_key.pem"))
    assert "--key" in refused("--rootfs", str(b), "--key", str(world_tmp / "missing.der"))
    empty = world_tmp / "nokeys"
    empty.mkdir()
    assert "no usable certificate" in refused("--rootfs", str(b), "--keys", str(empty))
