"""Interoperability of security.ima values with evmctl (ima-evm-utils), openssl and
fsverity-utils: each side verifies what the other signs."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess

import pytest

from imafs.cli import main
from imafs.commands import verify
from imafs.ima import appraise as ap
from imafs.ima.verity import fsverity_digest_fd
from imafs.ima.keys import Keyring, keyid_of

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not shutil.which("evmctl") or not shutil.which("openssl"),
                                 reason="needs evmctl and openssl")]

OPENSSL_CNF = """\
[ req ]
distinguished_name = dn
prompt = no
string_mask = utf8only
x509_extensions = exts
[ dn ]
CN = openssl test key
[ exts ]
basicConstraints = critical,CA:FALSE
keyUsage = digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def sh(*argv, check=True):
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check and p.returncode:
        raise AssertionError(f"{argv}: rc {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


class Key:
    def __init__(self, name, key, der):
        self.name, self.key, self.der = name, key, der

    def ring(self):
        r = Keyring()
        r.add(self.der.read_bytes())
        return r

    def __repr__(self):
        return self.name


def _openssl_key(d, newkey_args):
    d.mkdir()
    (d / "x.cnf").write_text(OPENSSL_CNF)
    sh("openssl", "req", "-x509", "-new", "-nodes", "-utf8", "-sha256", "-days", "30",
       "-batch", "-config", d / "x.cnf", "-outform", "DER", "-out", d / "cert.der",
       "-keyout", d / "key.pem", *newkey_args)
    return d / "key.pem", d / "cert.der"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("interop-keys")
    out = {}
    for name, extra in [("imafs-rsa", []), ("imafs-ec", ["--type", "ec"]),
                        ("imafs-p384", ["--type", "ec", "--curve", "secp384r1"]),
                        ("imafs-p384-bits", ["--type", "ec", "--bits", "384"]),
                        ("imafs-p521", ["--type", "ec", "--bits", "521"])]:
        assert main(["keygen", "--out", str(base / name), *extra]) == 0
        out[name] = Key(name, base / name / "signing_key.pem", base / name / "signing_cert.der")
    out["openssl-rsa"] = Key("openssl-rsa", *_openssl_key(base / "o-rsa", ["-newkey", "rsa:2048"]))
    out["openssl-ec"] = Key("openssl-ec", *_openssl_key(
        base / "o-ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]))
    return out


KEYS = ["imafs-rsa", "imafs-ec", "imafs-p384", "imafs-p384-bits", "imafs-p521", "openssl-rsa",
        "openssl-ec"]


def offline(path, ring, **kw):
    return verify.verify_file(str(path), ring, **kw)


@pytest.fixture
def f(tmp_path):
    p = tmp_path / "file"
    p.write_bytes(b"interop payload\n" * 300)
    return p


def test_key_ids_agree_with_evmctl(keys, f):
    for k in keys.values():
        p = sh("evmctl", "ima_verify", "-v", "--key", k.der, f, check=False)
        m = re.search(r"key 1: ([0-9a-f]+) ", p.stdout + p.stderr)
        assert m, p.stdout + p.stderr
        assert int(m.group(1), 16) == keyid_of(k.der.read_bytes()), k


@pytest.mark.parametrize("name", KEYS)
def test_evmctl_signatures_pass_our_appraisal(keys, f, name):
    k = keys[name]
    sh("evmctl", "ima_sign", "--key", k.key, "-a", "sha256", f)
    r = offline(f, k.ring(), require_sig=True)
    assert (r.status, r.cause, r.keyid) == ("pass", None, keyid_of(k.der.read_bytes())), r
    # wrong key: another key of the set
    other = keys[KEYS[(KEYS.index(name) + 1) % len(KEYS)]]
    r = offline(f, other.ring(), require_sig=True)
    assert (r.status, r.cause) == ("fail", "invalid-signature") and "no key with id" in r.detail
    # truncated signature
    v = os.getxattr(f, "security.ima")
    os.setxattr(f, "security.ima", v[:-1])
    r = offline(f, k.ring(), require_sig=True)
    assert (r.status, r.cause) == ("fail", "invalid-signature") and "truncated" in r.detail
    # tampered file
    os.setxattr(f, "security.ima", v)
    with open(f, "ab") as fh:
        fh.write(b"!")
    r = offline(f, k.ring(), require_sig=True)
    assert (r.status, r.cause) == ("fail", "invalid-signature")
    assert "signature does not match" in r.detail


@pytest.mark.parametrize("algo", ["sha1", "sha384", "sha512", "sha224"])
def test_evmctl_signatures_other_algorithms(keys, f, algo):
    k = keys["openssl-rsa"]
    sh("evmctl", "ima_sign", "--key", k.key, "-a", algo, f)
    assert ap.needed_algo(os.getxattr(f, "security.ima")) == algo
    r = offline(f, k.ring(), require_sig=True)
    assert r.passed and r.algo == algo, r


def test_evmctl_user_xattr(keys, f, capsys):
    k = keys["imafs-ec"]
    sh("evmctl", "ima_sign", "--xattr-user", "--key", k.key, "-a", "sha256", f)
    assert main(["verify", "--xattr", "user", "--key", str(k.der), str(f)]) == 0
    assert capsys.readouterr().out == f"{f}: pass\n"


@pytest.mark.parametrize("name", KEYS)
def test_our_signatures_pass_evmctl(keys, f, name, capsys):
    k = keys[name]
    assert main(["sign", "--key", str(k.key), str(f)]) == 0
    p = sh("evmctl", "ima_verify", "--key", k.der, f, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verification is OK" in p.stdout + p.stderr
    with open(f, "ab") as fh:
        fh.write(b"!")
    assert sh("evmctl", "ima_verify", "--key", k.der, f, check=False).returncode != 0
    assert main(["verify", "--key", str(k.der), str(f)]) == 1
    assert capsys.readouterr().out.endswith("fail (invalid-signature)\n")


@pytest.mark.parametrize("algo", ["sha1", "sha384", "sha512"])
def test_our_signatures_other_algorithms_pass_evmctl(keys, f, algo):
    k = keys["imafs-rsa"]
    assert main(["sign", "-a", algo, "--key", str(k.key), "--cert", str(k.der), str(f)]) == 0
    p = sh("evmctl", "ima_verify", "-a", algo, "--key", k.der, f, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_rsa_signature_is_byte_identical_to_evmctl(keys, f, capsys):
    k = keys["openssl-rsa"]
    p = sh("evmctl", "ima_sign", "-n", "--key", k.key, "-a", "sha256", f)
    theirs = re.search(r"^(0302[0-9a-f]+)$", p.stdout, re.M).group(1)
    assert main(["sign", "-n", "--key", str(k.key), str(f)]) == 0
    ours = capsys.readouterr().out.split(": ")[1].strip()
    assert ours == theirs


@pytest.mark.parametrize("algo", ["sha256", "sha1", "sha512"])
def test_evmctl_hash_values(f, algo, capsys):
    sh("evmctl", "ima_hash", "-a", algo, f)
    v = os.getxattr(f, "security.ima")
    digest = hashlib.new(algo, f.read_bytes()).digest()
    assert v == ap.hash_xattr(algo, digest)
    r = offline(f, None)
    assert (r.status, r.algo) == ("pass", algo)
    assert offline(f, None, require_sig=True).cause == "IMA-signature-required"
    assert main(["sign", "--hash-only", "-a", algo, "-n", str(f)]) == 0
    assert capsys.readouterr().out.split(": ")[1].strip() == v.hex()
    with open(f, "ab") as fh:
        fh.write(b"!")
    r = offline(f, None)
    assert (r.status, r.cause) == ("fail", "invalid-hash")


@pytest.mark.skipif(not shutil.which("fsverity"), reason="needs fsverity-utils")
@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 300000])
def test_fsverity_digest_matches_fsverity_utils(tmp_path, size):
    p = tmp_path / "v"
    p.write_bytes(os.urandom(size))
    fd = os.open(p, os.O_RDONLY)
    try:
        for algo in ("sha256", "sha512"):
            out = sh("fsverity", "digest", f"--hash-alg={algo}", p).stdout.split()[0]
            assert out == f"{algo}:{fsverity_digest_fd(fd, algo).hex()}"
    finally:
        os.close(fd)


# --- signature v3 (fs-verity), checked without imafs's own code ---------------------
# Debian's evmctl 1.4 cannot make or verify v3 signatures, so this checks them from
# first principles: `fsverity digest` gives the fs-verity digest; the signed data is
# the kernel's struct ima_file_id {u8 hash_type = IMA_VERITY_DIGSIG (0x06); u8
# hash_algorithm; u8 hash[digest size]} (only the used part, as calc_file_id_hash()
# in security/integrity/ima/ima_appraise.c hashes it), which `openssl dgst` hashes with
# the signature's algorithm and checks the signature over.

KERNEL_ALGO_ID = {"sha256": 4, "sha512": 6}         # include/uapi/linux/hash_info.h


def _openssl_verify(tmp_path, der, algo, data: bytes, sig: bytes):
    pub = tmp_path / "pub.pem"
    pub.write_text(sh("openssl", "x509", "-inform", "DER", "-in", der, "-pubkey",
                      "-noout").stdout)
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "sig").write_bytes(sig)
    return sh("openssl", "dgst", f"-{algo}", "-verify", pub, "-signature", tmp_path / "sig",
              tmp_path / "data", check=False)


def _file_id(path, algo) -> bytes:
    out = sh("fsverity", "digest", f"--hash-alg={algo}", path).stdout.split()[0]
    name, hexdigest = out.split(":")
    assert name == algo
    return bytes([0x06, KERNEL_ALGO_ID[algo]]) + bytes.fromhex(hexdigest)


@pytest.mark.skipif(not shutil.which("fsverity"), reason="needs fsverity-utils")
@pytest.mark.parametrize("algo", ["sha256", "sha512"])
@pytest.mark.parametrize("name", ["imafs-rsa", "imafs-ec", "imafs-p384", "openssl-rsa",
                                  "openssl-ec"])
def test_verity_signature_verified_by_openssl(keys, f, tmp_path, name, algo):
    k = keys[name]
    assert main(["sign", "-q", "--verity", "-a", algo, "--key", str(k.key), "--cert",
                 str(k.der), str(f)]) == 0
    v = os.getxattr(f, "security.ima")
    # struct signature_v2_hdr: type 0x06, version 3, hash algo, key id, size, signature
    t, version, algo_id, keyid, size = struct.unpack(">BBBIH", v[:9])
    assert (t, version, algo_id) == (0x06, 3, KERNEL_ALGO_ID[algo])
    assert keyid == keyid_of(k.der.read_bytes()) and size == len(v) - 9
    sig = v[9:]
    file_id = _file_id(f, algo)
    assert len(file_id) == 2 + hashlib.new(algo).digest_size
    r = _openssl_verify(tmp_path, k.der, algo, file_id, sig)
    assert r.returncode == 0 and "Verified OK" in r.stdout, r.stdout + r.stderr
    # what it must not verify: the file id of a v2 type byte, the other algorithm's
    # digest, a changed file
    assert offline(f, k.ring(), require_sig=True).passed      # imafs's verify agrees
    assert _openssl_verify(tmp_path, k.der, algo, b"\x03" + file_id[1:], sig).returncode != 0
    other = "sha512" if algo == "sha256" else "sha256"
    assert _openssl_verify(tmp_path, k.der, algo, _file_id(f, other), sig).returncode != 0
    with open(f, "ab") as fh:
        fh.write(b"!")
    assert _openssl_verify(tmp_path, k.der, algo, _file_id(f, algo), sig).returncode != 0
    r = offline(f, k.ring(), require_sig=True)
    assert (r.status, r.cause) == ("fail", "invalid-verity-signature"), r
