"""``imafs keygen``: an IMA signing key and its self-signed X.509 certificate, as
evmctl and the kernel's keyrings take them.

RSA (--bits: size) or ECDSA (--bits 256/384/521 or --curve: the curve); the key in
PEM (PKCS#8), the certificate in DER (for evmctl and the kernel) and PEM.
"""
from __future__ import annotations

import datetime as dt
import os

from imafs.commands import CommandError
from imafs.commands._files import write_whole
from imafs.ima import keys as km

KEY_NAME, CERT_DER, CERT_PEM = "signing_key.pem", "signing_cert.der", "signing_cert.pem"
CURVES = {"prime256v1": "secp256r1", "secp256r1": "secp256r1", "p256": "secp256r1",
          "secp384r1": "secp384r1", "p384": "secp384r1",
          "secp521r1": "secp521r1", "p521": "secp521r1"}
EC_BITS = {256: "secp256r1", 384: "secp384r1", 521: "secp521r1"}    # --type ec --bits


def cmd_keygen(args) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    if args.type == "rsa":
        if args.curve is not None:
            raise CommandError("--curve applies to EC keys (--type ec)")
        bits = args.bits if args.bits is not None else 2048
        if bits < km.MIN_RSA_BITS or bits > 16384:
            raise CommandError(f"--bits {bits}: RSA keys must have "
                               f"{km.MIN_RSA_BITS}..16384 bits")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        curve = None
        if args.curve is not None:
            curve = CURVES.get(args.curve.lower())
            if curve is None:
                raise CommandError(f"--curve {args.curve}: choose one of {', '.join(CURVES)}")
        if args.bits is not None:
            by_bits = EC_BITS.get(args.bits)
            if by_bits is None:
                raise CommandError(f"--bits {args.bits}: EC keys have 256 (P-256), "
                                   "384 (P-384) or 521 (P-521) bits")
            if curve is not None and curve != by_bits:
                raise CommandError(f"--bits {args.bits} is {by_bits}, but --curve "
                                   f"{args.curve} is {curve}")
            curve = by_bits
        key = ec.generate_private_key({"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1(),
                                       "secp521r1": ec.SECP521R1()}[curve or "secp256r1"])
    if args.days < 1:
        raise CommandError("--days must be at least 1")
    out = args.out
    os.makedirs(out, mode=0o700, exist_ok=True)
    targets = [os.path.join(out, n) for n in (KEY_NAME, CERT_DER, CERT_PEM)]
    if not args.force:
        present = [t for t in targets if os.path.lexists(t)]
        if present:
            raise CommandError(f"{present[0]} exists; use --force to replace the key")

    pub = key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.cn)])
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(pub)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=args.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_whole(targets[0], key_pem, 0o600)
    write_whole(targets[1], cert.public_bytes(serialization.Encoding.DER), 0o644)
    write_whole(targets[2], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    print(f"key id {km.keyid_of(cert):08x}: wrote {targets[0]} (private), "
          f"{targets[1]}, {targets[2]}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("keygen", help="create an IMA signing key and X.509 certificate",
                       description="Write DIR/signing_key.pem (private, mode 0600), "
                       "DIR/signing_cert.der (for evmctl and the kernel) and "
                       "DIR/signing_cert.pem: a self-signed certificate with "
                       "subjectKeyIdentifier=hash, keyUsage=digitalSignature, CA:FALSE.")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--type", choices=("rsa", "ec"), default="rsa")
    p.add_argument("--bits", type=int, help="key size: RSA 1024..16384 (default 2048); "
                   "EC 256 (P-256, default), 384 (P-384) or 521 (P-521)")
    p.add_argument("--curve", help="EC curve, instead of --bits: prime256v1 (default), "
                   "secp384r1 or secp521r1")
    p.add_argument("--cn", default="imafs signing key", help="certificate common name")
    p.add_argument("--days", type=int, default=365, help="validity (default 365)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_keygen)
