"""Keys and certificates for the appraisal and keyring tests (not a test module)."""
from __future__ import annotations

import datetime as dt
import functools

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

NOW = dt.datetime.now(dt.timezone.utc)


def key(kind: str = "rsa", n: int = 0):
    """A cached private key; ``n`` distinguishes keys of the same kind."""
    return _key(kind, n)


@functools.lru_cache(maxsize=None)
def _key(kind: str, n: int):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    curves = {"ec": ec.SECP256R1(), "p384": ec.SECP384R1(), "k1": ec.SECP256K1()}
    return ec.generate_private_key(curves[kind])


def cert(priv, *, cn: str = "imafs test", ski: bytes | None | bool = True,
         digsig: bool | None = True, not_before: dt.datetime | None = None,
         not_after: dt.datetime | None = None, signer=None) -> x509.Certificate:
    """A self-signed certificate. ``ski``: True (hash), False (none) or raw bytes;
    ``digsig``: True, False (keyUsage without digitalSignature) or None (no keyUsage)."""
    pub = priv.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before or NOW - dt.timedelta(days=1))
         .not_valid_after(not_after or NOW + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if digsig is not None:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=digsig, content_commitment=False, key_encipherment=not digsig,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
    if ski is True:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    elif ski:
        b = b.add_extension(x509.SubjectKeyIdentifier(ski), critical=False)
    signer = signer or priv
    algo = None if hasattr(signer, "sign") and signer.__class__.__name__.startswith("Ed") \
        else hashes.SHA256()
    return b.sign(signer, algo)


def der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def key_pem(priv) -> bytes:
    return priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
