"""The lists this module writes, checked by real verifiers: evmctl and keylime."""
import hashlib
import shutil
import subprocess
import sys
import types

import pytest

from imafs.ima.measurelog import MeasurementList
from imafs.ima.templates import build_entry, buf_entry, parse_binary
from imafs.store import Store

pytestmark = pytest.mark.interop

EVMCTL = shutil.which("evmctl")
needs_evmctl = pytest.mark.skipif(EVMCTL is None, reason="evmctl (ima-evm-utils) not installed")


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state"), sync=False)
    yield s
    s.close()


def fill(ml, n=30, template="ima-ng"):
    for i in range(n):
        ml.add(build_entry(template, name=f"/usr/bin/tool {i}",
                           digest=hashlib.sha256(b"%d" % i).digest(), pcr=10 if i % 5 else 11))
    ml.add(buf_entry("kernel_version", b"6.1.0-imafs"))


def dump(ml, d, binary=None, pcr1=None, pcr256=None):
    (d / "bin").write_bytes(binary if binary is not None else ml.read("binary", 0, 1 << 30))
    (d / "p1").write_text(pcr1 if pcr1 is not None else ml.pcrs_text("sha1"))
    (d / "p256").write_text(pcr256 if pcr256 is not None else ml.pcrs_text("sha256"))


def evmctl_measurement(d, *extra):
    return subprocess.run([EVMCTL, "ima_measurement", *extra, "--pcrs", f"sha1,{d / 'p1'}",
                           "--pcrs", f"sha256,{d / 'p256'}", str(d / "bin")],
                          capture_output=True, text=True, timeout=60)


@needs_evmctl
def test_evmctl_accepts_list_and_pcrs(store, tmp_path):
    ml = MeasurementList(store, 0, tpm_pcr_dir=str(tmp_path / "none"))
    fill(ml)
    dump(ml, tmp_path)
    r = evmctl_measurement(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Matched per TPM bank" in r.stdout + r.stderr


@needs_evmctl
def test_evmctl_rejects_tampering(store, tmp_path):
    ml = MeasurementList(store, 0, tpm_pcr_dir=str(tmp_path / "none"))
    fill(ml)
    blob = ml.read("binary", 0, 1 << 30)
    # one byte of the 10th entry's file name
    recs = list(parse_binary(blob))
    off = sum(len(e.binary_record()) for e in recs[:10])
    name_at = blob.index(b"/usr/bin/tool_9", off)
    bad = bytearray(blob)
    bad[name_at + 5] ^= 0x01
    dump(ml, tmp_path, binary=bytes(bad))
    r = evmctl_measurement(tmp_path)
    assert r.returncode != 0
    # one byte of a PCR value
    p256 = ml.pcrs_text("sha256").splitlines(True)
    p256[10] = p256[10][:8] + ("0" if p256[10][8] != "0" else "1") + p256[10][9:]
    dump(ml, tmp_path, pcr256="".join(p256))
    assert evmctl_measurement(tmp_path).returncode != 0
    dump(ml, tmp_path)
    assert evmctl_measurement(tmp_path).returncode == 0


@needs_evmctl
def test_evmctl_violations(store, tmp_path):
    ml = MeasurementList(store, 0, tpm_pcr_dir=str(tmp_path / "none"))
    fill(ml, 10)
    ml.add_violation(None, "/etc/shadow")
    fill(ml, 3, "ima-sig")
    dump(ml, tmp_path)
    # evmctl extends violations with 0xff only when told to, as the kernel does
    r = evmctl_measurement(tmp_path, "--ignore-violations")
    assert r.returncode == 0, r.stdout + r.stderr
    assert evmctl_measurement(tmp_path).returncode != 0


@needs_evmctl
def test_evmctl_ima_template(store, tmp_path):
    ml = MeasurementList(store, 0, template="ima", tpm_pcr_dir=str(tmp_path / "none"))
    for i in range(20):
        ml.add(build_entry("ima", name=f"/sbin/x{i}", algo="sha1",
                           digest=hashlib.sha1(b"%d" % i).digest()))
    dump(ml, tmp_path)
    r = evmctl_measurement(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def signing_key(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cnf = tmp_path / "x509.cnf"
    cnf.write_text("[req]\ndistinguished_name=dn\nprompt=no\nx509_extensions=ext\n"
                   "[dn]\nCN=imafs test\n[ext]\nsubjectKeyIdentifier=hash\n"
                   "keyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.der"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-days", "30", "-config", str(cnf), "-outform", "DER",
                    "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return key, cert


@needs_evmctl
def test_evmctl_ima_sig_signature(store, tmp_path, signing_key):
    key, cert = signing_key
    target = tmp_path / "signed-file"
    target.write_bytes(b"signed content\n")
    out = subprocess.run([EVMCTL, "ima_sign", "--key", str(key), "-a", "sha256", "-n",
                          str(target)], capture_output=True, text=True, check=True, timeout=60)
    sig = bytes.fromhex(out.stdout.split()[0])
    assert sig[:2] == b"\x03\x02"
    digest = hashlib.sha256(target.read_bytes()).digest()
    ml = MeasurementList(store, 0, template="ima-sig", tpm_pcr_dir=str(tmp_path / "none"))
    assert ml.add(build_entry("ima-sig", name="/good", digest=digest, xattr=sig))
    bad = bytearray(sig)
    bad[-1] ^= 1
    assert ml.add(build_entry("ima-sig", name="/bad", digest=digest, xattr=bytes(bad)))
    dump(ml, tmp_path)
    r = evmctl_measurement(tmp_path, "-v", "--verify-sig", "--key", str(cert))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "/good: verification is OK" in out
    assert "/bad: verification failed" in out
    assert "/good: verification failed" not in out


# -- keylime ------------------------------------------------------------------

def _keylime():
    try:
        import gpg  # noqa: F401  keylime.signing needs it at import time only
    except ImportError:
        sys.modules.setdefault("gpg", types.ModuleType("gpg"))
    try:
        from keylime.common.algorithms import Hash
        from keylime.ima import ima
    except ImportError as e:
        pytest.skip(f"keylime is not importable: {e}")
    return ima, Hash


def test_keylime_accepts_ascii_list(store, tmp_path):
    ima, Hash = _keylime()
    ml = MeasurementList(store, 0, template="ima-sig", tpm_pcr_dir=str(tmp_path / "none"))
    policy = ima.empty_policy()
    policy["digests"]["boot_aggregate"] = ["00" * 32]
    for i in range(8):
        digest = hashlib.sha256(b"k%d" % i).digest()
        ml.add(build_entry("ima-sig" if i % 2 else "ima-ng", name=f"/usr/bin/k {i}",
                           digest=digest))
        policy["digests"][f"/usr/bin/k_{i}"] = [digest.hex()]
    ml.add(buf_entry("kernel_version", b"6.1.0-imafs"))
    policy["ima-buf"]["kernel_version"] = [hashlib.sha256(b"6.1.0-imafs").hexdigest()]
    ima.validate_runtime_policy(policy)

    lines = ml.read("ascii", 0, 1 << 30).decode().splitlines(True)
    running, failure = ima.process_measurement_list(None, lines, policy,
                                                    pcrval=ml.pcr("sha1", 10).hex())
    assert not failure and running == ml.pcr("sha1", 10).hex()
    running, failure = ima.process_measurement_list(None, lines, policy,
                                                    pcrval=ml.pcr("sha256", 10).hex(),
                                                    hash_alg=Hash.SHA256)
    assert not failure and running == ml.pcr("sha256", 10).hex()

    # a file not in the policy, and a violation: replay still matches, verdicts differ
    ml.add(build_entry("ima-ng", name="/usr/bin/intruder", digest=bytes(32)))
    ml.add_violation(None, "/etc/shadow")
    lines = ml.read("ascii", 0, 1 << 30).decode().splitlines(True)
    running, failure = ima.process_measurement_list(None, lines, policy,
                                                    pcrval=ml.pcr("sha1", 10).hex())
    assert running == ml.pcr("sha1", 10).hex()
    assert failure
    ids = {e.event_id for e in failure.events}
    assert "ima.validation.ima-ng.not_in_allowlist" in ids
    assert "ima.validation.tomtou" in ids
    # a wrong PCR value is a mismatch
    _, failure = ima.process_measurement_list(None, lines, policy, pcrval="11" * 20)
    assert "ima.pcr_mismatch" in {e.event_id for e in failure.events}
