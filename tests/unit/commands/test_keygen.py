"""``imafs keygen`` (in process): the key and certificate files, RSA and EC, and
the refusals."""
from __future__ import annotations

import stat

import pytest
from cryptography import x509

from imafs.commands import sign
from imafs.ima.keys import Keyring, keyid_of, keyid_of_public_key

from helpers.cli import keydir, run  # noqa: F401 (fixtures)


# --- keygen -------------------------------------------------------------------------
def test_keygen_files(keydir, capsys):
    key = keydir / "signing_key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_der_x509_certificate((keydir / "signing_cert.der").read_bytes())
    assert x509.load_pem_x509_certificate((keydir / "signing_cert.pem").read_bytes()) == cert
    ext = cert.extensions
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert cert.subject.rfc4514_string() == "CN=unit test"
    info = Keyring().add((keydir / "signing_cert.der").read_bytes())
    assert info.algo == "rsa" and info.bits == 2048
    assert keyid_of(cert) == keyid_of_public_key(cert.public_key())


def test_keygen_ec_and_refusals(tmp_path, capsys):
    rc, out, _ = run(capsys, "keygen", "--out", tmp_path, "--type", "ec", "--curve",
                     "secp384r1", "--days", "10")
    assert rc == 0 and out.startswith("key id ")
    info = Keyring().add((tmp_path / "signing_cert.der").read_bytes())
    assert info.algo == "ecdsa-nist-p384"
    assert out.split()[2].rstrip(":") == f"{info.keyid:08x}"
    rc, _, err = run(capsys, "keygen", "--out", tmp_path)
    assert rc == 2 and "exists; use --force" in err
    assert run(capsys, "keygen", "--out", tmp_path, "--force", "--type", "ec")[0] == 0
    rc, _, err = run(capsys, "keygen", "--out", tmp_path / "x", "--type", "ec", "--curve", "nope")
    assert rc == 2 and "--curve nope" in err
    rc, _, err = run(capsys, "keygen", "--out", tmp_path / "x", "--bits", "512")
    assert rc == 2 and "1024..16384" in err
    rc, _, err = run(capsys, "keygen", "--out", tmp_path / "x", "--curve", "secp384r1")
    assert rc == 2 and "--curve applies to EC keys" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bits, curve", [(None, "secp256r1"), ("256", "secp256r1"),
                                         ("384", "secp384r1"), ("521", "secp521r1")])
def test_keygen_ec_bits_name_the_curve(tmp_path, capsys, bits, curve):
    argv = ["keygen", "--out", tmp_path, "--type", "ec"] + (["--bits", bits] if bits else [])
    rc, out, err = run(capsys, *argv)
    assert (rc, err) == (0, "")
    cert = x509.load_der_x509_certificate((tmp_path / "signing_cert.der").read_bytes())
    assert cert.public_key().curve.name == curve
    ext = cert.extensions          # what evmctl and the kernel need, as for RSA
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    info = Keyring().add((tmp_path / "signing_cert.der").read_bytes())
    assert info.bits == int(bits or 256) and out.split()[2] == f"{info.keyid:08x}:"
    key = sign._load_private_key(str(tmp_path / "signing_key.pem"), None)[0]
    assert key.curve.name == curve


@pytest.mark.parametrize("argv, want", [
    (["--bits", "512"], "--bits 512: EC keys have 256 (P-256), 384 (P-384) or 521 (P-521) bits"),
    (["--bits", "2048"], "--bits 2048: EC keys have 256"),
    (["--bits", "384", "--curve", "prime256v1"],
     "--bits 384 is secp384r1, but --curve prime256v1 is secp256r1"),
])
def test_keygen_ec_bits_refusals(tmp_path, capsys, argv, want):
    rc, _, err = run(capsys, "keygen", "--out", tmp_path / "k", "--type", "ec", *argv)
    assert rc == 2 and want in err, err
    assert not (tmp_path / "k").exists()
    # the same size through --curve and --bits is fine
    assert run(capsys, "keygen", "--out", tmp_path / "ok", "--type", "ec", "--bits", "384",
               "--curve", "p384")[0] == 0
