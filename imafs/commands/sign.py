"""``imafs sign``: write ``security.ima`` as evmctl ima_sign does -- a signature v2
(``03 02 ...``), an fs-verity signature v3 (``06 03 ...``, --verity) or the hash form
(``01 <digest>`` for md4, md5 and sha1, else ``04 <algo> <digest>``, --hash-only) -- to
regular files, refusing anything else with one message each; with --evm, then
``security.evm`` as evmctl sign does: a signature of the file's metadata (``03 02 ...``,
or ``05 02 ...`` with --portable).
"""
from __future__ import annotations

import argparse
import os
import sys

from imafs.commands import CommandError
from imafs.commands._files import (add_evm_options, evm_config, evm_metadata, open_regular,
                                   progress, walk, xattr_name)
from imafs.ima import appraise as ap
from imafs.ima import hashing
from imafs.ima.verity import fsverity_digest_fd
from imafs.ima import keys as km


def _load_private_key(path: str, pass_file: str | None):
    from cryptography.hazmat.primitives import serialization
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CommandError(f"--key {path}: {e.strerror}")
    password = None
    if pass_file:
        try:
            with open(pass_file, "rb") as f:
                password = f.read().rstrip(b"\r\n")
        except OSError as e:
            raise CommandError(f"--pass-file {pass_file}: {e.strerror}")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=password)
        else:
            key = serialization.load_der_private_key(data, password=password)
    except TypeError as e:
        raise CommandError(f"--key {path}: {e} (encrypted keys need --pass-file)")
    except ValueError as e:
        raise CommandError(f"--key {path}: not a usable private key ({e})")
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise CommandError(f"--key {path}: {type(key).__name__.lstrip('_')} keys cannot make IMA "
              "signatures (use RSA or ECDSA)")
    return key, data


def _signing_keyid(args, key, key_data: bytes) -> int:
    from cryptography.hazmat.primitives import serialization

    def same_key(cert) -> bool:
        f = serialization.PublicFormat.SubjectPublicKeyInfo
        e = serialization.Encoding.DER
        return cert.public_key().public_bytes(e, f) == key.public_key().public_bytes(e, f)

    if args.keyid is not None:
        return args.keyid
    if args.cert:
        try:
            with open(args.cert, "rb") as f:
                cert = km.parse_certificate(f.read())
        except OSError as e:
            raise CommandError(f"--cert {args.cert}: {e.strerror}")
        except km.KeyringError as e:
            raise CommandError(f"--cert {args.cert}: {e}")
        if not same_key(cert):
            raise CommandError(f"--cert {args.cert} does not hold the public key of --key {args.key}")
        return km.keyid_of(cert)
    # like evmctl: a PEM certificate in the key file names the key; else hash the key
    if b"-----BEGIN CERTIFICATE-----" in key_data:
        try:
            blob = key_data[key_data.index(b"-----BEGIN CERTIFICATE-----"):]
            cert = km.parse_certificate(blob[:blob.index(b"-----END CERTIFICATE-----") + 25])
            if same_key(cert):
                return km.keyid_of(cert)
        except (km.KeyringError, ValueError):
            pass
    return km.keyid_of_public_key(key.public_key())


def cmd_sign(args) -> int:
    try:
        a = hashing.hash_algo(args.hash)
        a.new()
    except hashing.HashAlgoError as e:
        raise CommandError(f"--hash {args.hash}: {e}")
    algo = a.name
    if args.verity and a.verity_id is None:
        raise CommandError(f"--verity needs --hash {' or '.join(hashing.VERITY_ALGOS)}, "
                           f"not {algo}")
    key = keyid = None
    if args.evm and args.xattr != "security":
        raise CommandError("--evm signs security.evm, which covers security.ima: not with "
                           "--xattr user")
    if not args.evm and (args.portable or args.m32 or args.smack or args.uuid is not False):
        raise CommandError("--portable, --uuid, --m32 and --smack go with --evm")
    if not args.hash_only or args.evm:
        if not args.key:
            raise CommandError("--key is required to sign (or use --hash-only)")
        key, key_data = _load_private_key(args.key, args.pass_file)
        keyid = _signing_keyid(args, key, key_data)
        try:
            ap.sign_v2(key, algo, bytes(a.digest_size), keyid)
        except Exception as e:  # e.g. a hash the key type cannot sign with
            raise CommandError(f"cannot sign {algo} digests with this key: {e}")
    name = xattr_name(args.xattr)
    todo = list(walk(args.paths, args.recursive, args.skip_special))
    refused = 0
    printed: dict[str, bytes] = {}      # -n: the security.ima value printed per file
    with progress(len(todo), args.quiet) as bar:
        def say(msg, err=True):
            bar.write(msg, file=sys.stderr if err else sys.stdout)
        for path, why in todo:
            bar.update(1)
            if why is None:
                why = _sign_one(path, name, algo, key, keyid, args, say, printed)
            if why is None and args.evm:
                why = _sign_evm(path, algo, key, keyid, args, say, printed.pop(path, None))
            if why:
                refused += 1
                say(f"imafs sign: {path}: {why}")
    if refused:
        print(f"imafs sign: {refused} of {len(todo)} file(s) not signed", file=sys.stderr)
        return 1
    return 0


def _sign_one(path, name, algo, key, keyid, args, say, printed: dict) -> str | None:
    try:
        fd = open_regular(path)
    except IsADirectoryError as e:
        return e.strerror
    except OSError as e:
        return f"cannot open: {e.strerror or e}"
    try:
        try:
            if args.verity:
                value = ap.sign_v3(key, algo, fsverity_digest_fd(fd, algo), keyid)
            else:
                digest = hashing.hash_fd(fd, [algo])[algo]
                value = (ap.hash_xattr(algo, digest) if args.hash_only
                         else ap.sign_v2(key, algo, digest, keyid))
        except OSError as e:
            return f"cannot read: {e.strerror or e}"
        if args.print_only:
            say(f"{path}: {value.hex()}", err=False)
            printed[path] = value
            return None
        try:
            os.setxattr(fd, name, value)
        except OSError as e:
            return f"cannot write {name}: {e.strerror or e}"
    finally:
        os.close(fd)
    return None


def _sign_evm(path, algo, key, keyid, args, say, ima: bytes | None) -> str | None:
    """security.evm over the metadata as it is now (security.ima written first; with
    -n, ``ima`` is the value just printed): a portable (05) or type-3 (03)
    signature."""
    from imafs.ima import evm
    try:
        fd = open_regular(path)
    except OSError as e:
        return f"cannot open: {e.strerror or e}"
    try:
        over = {evm.XATTR_NAME_IMA: ima} if ima is not None else {}
        try:
            meta = evm_metadata(fd, args, evm_config(args), over)
            value = evm.sign_evm(key, keyid, meta, algo=algo, portable=args.portable,
                                 config=evm_config(args))
        except evm.EvmError as e:
            return f"cannot sign security.evm: {e}"
        except OSError as e:
            return f"cannot read its metadata: {e.strerror or e}"
        if args.print_only:
            say(f"{path}: security.evm {value.hex()}", err=False)
            return None
        try:
            os.setxattr(fd, evm.XATTR_NAME_EVM, value)
        except OSError as e:
            return f"cannot write security.evm: {e.strerror or e}"
    finally:
        os.close(fd)
    return None


def _keyid_arg(s: str) -> int:
    try:
        v = int(s, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a hex key id") from None
    if not 0 <= v <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{s} does not fit in 32 bits")
    return v


def register(sub) -> None:
    p = sub.add_parser("sign", help="write security.ima signatures (like evmctl ima_sign)",
                       description="Sign regular files: security.ima = 03 02 <algo> <keyid> "
                       "<len> <sig>. Symlinks, devices, fifos, sockets and unreadable files "
                       "are refused with one message each; the exit status is 1 if any was.")
    p.add_argument("--key", metavar="KEY", help="private key (PEM or DER)")
    p.add_argument("--pass-file", metavar="FILE", help="password of an encrypted key")
    p.add_argument("--cert", metavar="CERT", help="certificate whose subjectKeyIdentifier "
                   "gives the key id (default: as evmctl, from the key)")
    p.add_argument("--keyid", type=_keyid_arg, metavar="HEX", help="override the key id")
    p.add_argument("-a", "--hash", default="sha256", help="hash algorithm (default sha256)")
    p.add_argument("--xattr", choices=("security", "user"), default="security",
                   help="write security.ima (default) or user.ima")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--imasig", dest="hash_only", action="store_false",
                   help="write a signature (default)")
    g.add_argument("--hash-only", dest="hash_only", action="store_true",
                   help="write the hash form instead: 01 <digest> for md4, md5 and "
                   "sha1, else 04 <algo> <digest> (as fix mode and evmctl ima_hash)")
    g.add_argument("--verity", action="store_true",
                   help="write an fs-verity signature v3 (06 03 ...) over the file's "
                   "fs-verity digest (sha256 or sha512, 4096-byte blocks, no salt)")
    p.add_argument("-r", "--recursive", action="store_true")
    p.add_argument("--skip-special", action="store_true", help="with -r, skip symlinks "
                   "and special files silently instead of refusing them")
    p.add_argument("-n", "--print", dest="print_only", action="store_true",
                   help="print the values (hex) instead of writing them")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--evm", action="store_true",
                   help="then sign the file's metadata into security.evm, as evmctl sign: "
                   "security.ima, the other security xattrs, owner, group, mode and (not "
                   "--portable) inode, generation and file system UUID")
    p.add_argument("--portable", action="store_true",
                   help="with --evm: a portable signature (05), without inode, generation "
                   "and UUID, which survives a copy (evmctl --portable)")
    add_evm_options(p)
    p.set_defaults(func=cmd_sign, hash_only=False)
