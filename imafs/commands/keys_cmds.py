"""``imafs keygen``, ``imafs sign`` and ``imafs verify``: IMA keys and file signatures
offline, compatible with evmctl (ima-evm-utils) and the kernel.

keygen  writes a signing key and a self-signed certificate (DER for evmctl, PEM too);
        RSA (--bits: size) or ECDSA (--bits 256/384/521 or --curve: the curve).
sign    writes ``security.ima`` (signature v2, v3 with --verity, or a hash with
        --hash-only).
verify  appraises files with the engine's own :func:`imafs.ima.appraise.appraise`; with
        --policy, as a mount with that root policy would for a read (or exec) by root,
        matching with :meth:`imafs.ima.policy.Policy.match`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import stat
import struct
import sys

from imafs.ima import appraise as ap
from imafs.ima import keys as km

CHUNK = 1 << 20
KEY_NAME, CERT_DER, CERT_PEM = "signing_key.pem", "signing_cert.der", "signing_cert.pem"
CURVES = {"prime256v1": "secp256r1", "secp256r1": "secp256r1", "p256": "secp256r1",
          "secp384r1": "secp384r1", "p384": "secp384r1",
          "secp521r1": "secp521r1", "p521": "secp521r1"}
EC_BITS = {256: "secp256r1", 384: "secp384r1", 521: "secp521r1"}    # keygen --type ec --bits


def _fail(msg: str):
    from imafs.commands import CommandError
    raise CommandError(msg)


# --- streaming digests (private; imafs.ima.hashing is the engine's) ------------------


def _hash_fd(fd: int, algos) -> dict[str, bytes]:
    """Digests of a whole file in one streaming pass."""
    hs = {a: ap.new_hash(a) for a in algos}
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        buf = os.read(fd, CHUNK)
        if not buf:
            break
        for h in hs.values():
            h.update(buf)
    return {a: h.digest() for a, h in hs.items()}


_FSVERITY_ALGS = {"sha256": 1, "sha512": 2}


def _fsverity_digest(fd: int, algo: str = "sha256", block_size: int = 4096,
                     salt: bytes = b"") -> bytes:
    """The fs-verity file digest (hash of the fs-verity descriptor, as ``fsverity
    digest`` prints it), computed by reading the file once."""
    if algo not in _FSVERITY_ALGS:
        raise ap.UnsupportedHashError(f"fs-verity has no {algo} (only sha256, sha512)")
    new = lambda: hashlib.new(algo)  # noqa: E731
    ds = new().digest_size
    prefix = b""
    if salt:
        bs = new().block_size
        prefix = salt + b"\0" * (-len(salt) % bs)

    def h(block: bytes) -> bytes:
        x = new()
        x.update(prefix)
        x.update(block)
        return x.digest()

    os.lseek(fd, 0, os.SEEK_SET)
    size = 0
    level: list[bytes] = []
    pending = b""
    while True:
        buf = os.read(fd, CHUNK)
        if not buf:
            break
        size += len(buf)
        data = pending + buf if pending else buf
        n = len(data) - len(data) % block_size
        for off in range(0, n, block_size):
            level.append(h(data[off:off + block_size]))
        pending = data[n:]
    if pending:
        level.append(h(pending + b"\0" * (block_size - len(pending))))
    per_block = block_size // ds
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level), per_block):
            blk = b"".join(level[i:i + per_block])
            nxt.append(h(blk + b"\0" * (block_size - len(blk))))
        level = nxt
    root = level[0] if size else b"\0" * ds
    desc = struct.pack("<BBBBIQ", 1, _FSVERITY_ALGS[algo], block_size.bit_length() - 1,
                       len(salt), 0, size)
    desc += root.ljust(64, b"\0") + salt.ljust(32, b"\0") + b"\0" * 144
    return hashlib.new(algo, desc).digest()


# --- files --------------------------------------------------------------------------


def _walk(paths, recursive: bool, skip_special: bool):
    """Yield (path, refusal or None) for every candidate file."""
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError as e:
            yield p, e.strerror or str(e)
            continue
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                yield p, "is a directory (use -r)"
                continue
            # os.walk reports a directory it cannot list through onerror, and then
            # goes on (or stops, when it was the last one): report every such error
            # before the next directory's files and once more after the walk, so the
            # last directory visited (or ``p`` itself) is never skipped silently
            errs: list[OSError] = []

            def pending():
                for e in errs:
                    yield (getattr(e, "filename", None) or p,
                           f"cannot list directory: {e.strerror or e}")
                errs.clear()
            for root, dirs, files in os.walk(p, onerror=errs.append):
                dirs.sort()
                yield from pending()
                for name in sorted(files) + sorted(d for d in dirs
                                                   if os.path.islink(os.path.join(root, d))):
                    fp = os.path.join(root, name)
                    why = _kind_refusal(fp)
                    if why and skip_special:
                        continue
                    yield fp, why
            yield from pending()
            continue
        yield p, _kind_refusal(p, st)


def _kind_refusal(path, st=None):
    if st is None:
        try:
            st = os.lstat(path)
        except OSError as e:
            return e.strerror or str(e)
    m = st.st_mode
    if stat.S_ISREG(m):
        return None
    if stat.S_ISLNK(m):
        return "is a symbolic link (sign its target instead)"
    kinds = {stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
             stat.S_ISFIFO: "fifo", stat.S_ISSOCK: "socket", stat.S_ISDIR: "directory"}
    for test, name in kinds.items():
        if test(m):
            return f"is a {name}, not a regular file"
    return "is not a regular file"


def _open_regular(path: str) -> int:
    """An fd on a regular file, never following a symlink nor blocking on a fifo."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(0, _kind_refusal(path, st) or "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _progress(total: int, quiet: bool, unit: str = "file"):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def _xattr_name(which: str) -> str:
    return "user.ima" if which == "user" else "security.ima"


# --- keygen -------------------------------------------------------------------------


def cmd_keygen(args) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    if args.type == "rsa":
        if args.curve is not None:
            _fail("--curve applies to EC keys (--type ec)")
        bits = args.bits if args.bits is not None else 2048
        if bits < km.MIN_RSA_BITS or bits > 16384:
            _fail(f"--bits {bits}: RSA keys must have {km.MIN_RSA_BITS}..16384 bits")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        curve = None
        if args.curve is not None:
            curve = CURVES.get(args.curve.lower())
            if curve is None:
                _fail(f"--curve {args.curve}: choose one of {', '.join(CURVES)}")
        if args.bits is not None:
            by_bits = EC_BITS.get(args.bits)
            if by_bits is None:
                _fail(f"--bits {args.bits}: EC keys have 256 (P-256), 384 (P-384) or "
                      "521 (P-521) bits")
            if curve is not None and curve != by_bits:
                _fail(f"--bits {args.bits} is {by_bits}, but --curve {args.curve} is {curve}")
            curve = by_bits
        key = ec.generate_private_key({"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1(),
                                       "secp521r1": ec.SECP521R1()}[curve or "secp256r1"])
    if args.days < 1:
        _fail("--days must be at least 1")
    out = args.out
    os.makedirs(out, mode=0o700, exist_ok=True)
    targets = [os.path.join(out, n) for n in (KEY_NAME, CERT_DER, CERT_PEM)]
    if not args.force:
        present = [t for t in targets if os.path.lexists(t)]
        if present:
            _fail(f"{present[0]} exists; use --force to replace the key")

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
    _write(targets[0], key_pem, 0o600)
    _write(targets[1], cert.public_bytes(serialization.Encoding.DER), 0o644)
    _write(targets[2], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    print(f"key id {km.keyid_of(cert):08x}: wrote {targets[0]} (private), "
          f"{targets[1]}, {targets[2]}")
    return 0


def _write(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --- sign ---------------------------------------------------------------------------


def _load_private_key(path: str, pass_file: str | None):
    from cryptography.hazmat.primitives import serialization
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        _fail(f"--key {path}: {e.strerror}")
    password = None
    if pass_file:
        try:
            with open(pass_file, "rb") as f:
                password = f.read().rstrip(b"\r\n")
        except OSError as e:
            _fail(f"--pass-file {pass_file}: {e.strerror}")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=password)
        else:
            key = serialization.load_der_private_key(data, password=password)
    except TypeError as e:
        _fail(f"--key {path}: {e} (encrypted keys need --pass-file)")
    except ValueError as e:
        _fail(f"--key {path}: not a usable private key ({e})")
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        _fail(f"--key {path}: {type(key).__name__.lstrip('_')} keys cannot make IMA "
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
            _fail(f"--cert {args.cert}: {e.strerror}")
        except km.KeyringError as e:
            _fail(f"--cert {args.cert}: {e}")
        if not same_key(cert):
            _fail(f"--cert {args.cert} does not hold the public key of --key {args.key}")
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
        algo = ap.hash_algo(args.hash).name
        ap.new_hash(algo)
    except ap.UnsupportedHashError as e:
        _fail(f"--hash {args.hash}: {e}")
    if args.verity and algo not in _FSVERITY_ALGS:
        _fail(f"--verity needs --hash sha256 or sha512, not {algo}")
    key = keyid = None
    if not args.hash_only:
        if not args.key:
            _fail("--key is required to sign (or use --hash-only)")
        key, key_data = _load_private_key(args.key, args.pass_file)
        keyid = _signing_keyid(args, key, key_data)
        try:
            ap.sign_v2(key, algo, b"\0" * ap.hash_algo(algo).size, keyid)
        except Exception as e:  # e.g. a hash the key type cannot sign with
            _fail(f"cannot sign {algo} digests with this key: {e}")
    name = _xattr_name(args.xattr)
    todo = list(_walk(args.paths, args.recursive, args.skip_special))
    refused = 0
    with _progress(len(todo), args.quiet) as bar:
        def say(msg, err=True):
            bar.write(msg, file=sys.stderr if err else sys.stdout)
        for path, why in todo:
            bar.update(1)
            if why is None:
                why = _sign_one(path, name, algo, key, keyid, args, say)
            if why:
                refused += 1
                say(f"imafs sign: {path}: {why}")
    if refused:
        print(f"imafs sign: {refused} of {len(todo)} file(s) not signed", file=sys.stderr)
        return 1
    return 0


def _sign_one(path, name, algo, key, keyid, args, say) -> str | None:
    try:
        fd = _open_regular(path)
    except IsADirectoryError as e:
        return e.strerror
    except OSError as e:
        return f"cannot open: {e.strerror or e}"
    try:
        try:
            if args.hash_only:
                value = ap.hash_xattr(algo, _hash_fd(fd, [algo])[algo])
            elif args.verity:
                value = ap.sign_v3(key, algo, _fsverity_digest(fd, algo), keyid)
            else:
                value = ap.sign_v2(key, algo, _hash_fd(fd, [algo])[algo], keyid)
        except OSError as e:
            return f"cannot read: {e.strerror or e}"
        if args.print_only:
            say(f"{path}: {value.hex()}", err=False)
            return None
        try:
            os.setxattr(fd, name, value)
        except OSError as e:
            return f"cannot write {name}: {e.strerror or e}"
    finally:
        os.close(fd)
    return None


# --- verify -------------------------------------------------------------------------


def _keyring(args) -> km.Keyring:
    ring = km.Keyring()
    for d in args.keys or ():
        if not os.path.isdir(d):
            _fail(f"--keys {d}: not a directory")
        loaded, refused = ring.load_dir(d)
        for path, why in refused:
            print(f"imafs verify: ignoring {path}: {why}", file=sys.stderr)
    for c in args.key or ():
        try:
            with open(c, "rb") as f:
                ring.add(f.read())
        except OSError as e:
            _fail(f"--key {c}: {e.strerror}")
        except km.KeyringError as e:
            _fail(f"--key {c}: {e}")
    return ring


def _load_policy(value: str):
    from imafs.ima.policy import Policy, PolicyError, load_policy_arg
    try:
        return Policy(load_policy_arg(value))
    except PolicyError as e:
        _fail(f"--policy: {e}")


_FS_FIELDS = frozenset({"fsmagic", "fsname", "fsuuid"})
# root, as the engine sees a root caller (imafs.ima.engine.Subject.ids)
_ROOT_IDS = {"uid": 0, "euid": 0, "suid": 0, "gid": 0, "egid": 0, "sgid": 0,
             "cap_setuid": True, "cap_setgid": True}


def _root_events(policy, path: str, fd: int, st, exec_: bool, fs_cache: dict | None = None):
    """The access events the mount derives from a read-only open by root of this file
    (``exec_``: an exec by root that runs it), following the engine's hook mapping
    (imafs.ima.engine.Engine._events, with its own helpers): a read is FILE_CHECK
    MAY_READ, and for an ELF file, when a rule can match an mmap hook, also the
    dynamic loader's MMAP_CHECK_REQPROT and MMAP_CHECK; an exec is FILE_CHECK and
    BPRM_CHECK, and for an ELF file CREDS_CHECK (with the credentials the exec gives:
    set-id bits) and the mmap hooks. (The ELF interpreter's own open, FILE_CHECK and
    mmap hooks without BPRM_CHECK, is not asked about.)"""
    from imafs.ima import binfmt
    from imafs.ima import policy as pm
    from imafs.ima.engine import _has_func, hook_ids, open_hooks

    def elf() -> bool:
        try:
            return st.st_size >= 4 and binfmt.is_elf(os.pread(fd, 4, 0))
        except OSError:
            return False
    role = ("elf" if elf() else "other") if exec_ else None
    library = not exec_ and _has_func(policy, "MMAP_CHECK") and elf()
    hooks = open_hooks(pm.MAY_READ, exec_, role, library)
    fs = {}
    if policy.needs & _FS_FIELDS:
        # the file system the mount sees is the backing file's (run verify on the
        # backing tree, not through the mount): the mount's own fs_info, once per device
        fs = fs_cache.get(st.st_dev) if fs_cache is not None else None
        if fs is None:
            from imafs.fs.integrity import fs_info
            info = fs_info(fd, st.st_dev)
            fs = {"fsmagic": info.magic, "fsname": info.name, "fs_subtype": info.subtype,
                  "fsuuid": info.uuid}
            if fs_cache is not None:
                fs_cache[st.st_dev] = fs
    out = []
    for func, mask in hooks:
        who = hook_ids(func, exec_, _ROOT_IDS, st, role)
        out.append(pm.AccessEvent(func=func, mask=mask, fowner=st.st_uid, fgroup=st.st_gid,
                                  path=path, **who, **fs))
    return out


def verify_file(path: str, ring, *, xattr_name: str = "security.ima",
                require_sig: bool = False, default_algo: str = "sha256",
                policy=None, exec_: bool = False,
                fs_cache: dict | None = None) -> ap.AppraiseResult | None:
    """Offline appraisal of one file.

    Without ``policy``: as an ``appraise`` rule without options (``require_sig``:
    ``appraise_type=imasig``), except that a signature v3 is checked against the
    file's fs-verity digest, as a ``digest_type=verity`` rule would.

    With ``policy`` (an imafs.ima.policy.Policy): the verdict the mount, in enforce
    mode, gives a read-only open of the file by root (``exec_``: an exec by root):
    every hook of that access that the policy appraises is appraised with its
    decision's appraise_type, appraise_algos and digest_type; the first failure is
    the verdict, else the pass (its detail names the rule). None when no rule
    appraises the access (the mount allows it unappraised). ``fs_cache``: a dict
    that keeps the file-system facts (fsmagic, ...) per device across calls."""
    fd = _open_regular(path)
    try:
        try:
            value = os.getxattr(fd, xattr_name)
        except OSError as e:
            import errno
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
            value = None
        cache: dict[str, bytes] = {}

        def digest_for(a: str) -> bytes:
            if a not in cache:
                cache.update(_hash_fd(fd, [a]))
            return cache[a]

        def verity(a: str):
            try:
                return _fsverity_digest(fd, a)
            except ap.UnsupportedHashError:
                return None

        if policy is None:
            is_v3 = bool(value) and value[0] == ap.IMA_VERITY_DIGSIG
            return ap.appraise(value, digest_for, ring, require_sig=require_sig,
                               verity_digest=verity, verity_required=is_v3,
                               default_algo=default_algo)
        import dataclasses
        verdict = None
        seen: dict = {}
        for ev in _root_events(policy, path, fd, os.fstat(fd), exec_, fs_cache):
            d = policy.match(ev)       # all pairs: digest_type is OR-ed, as the engine's
            if not d.appraise:
                continue
            flags = (d.appraise_type, d.appraise_algos, d.digest_type)
            if flags not in seen:
                seen[flags] = ap.appraise(
                    value, digest_for, ring,
                    require_sig=d.appraise_type in ("imasig", "imasig|modsig"),
                    allowed_algos=d.appraise_algos, verity_digest=verity,
                    sigv3_required=d.appraise_type == "sigv3",
                    verity_required=d.digest_type == "verity", default_algo=default_algo)
            r = seen[flags]
            r = dataclasses.replace(r, detail=f"{r.detail}; {ev.func} rule "
                                    f"'{str(d.appraise_rule).rstrip()}'".lstrip("; "))
            if not r.passed:
                return r
            verdict = verdict or r
        return verdict
    finally:
        os.close(fd)


def cmd_verify(args) -> int:
    policy = None
    if args.policy is not None:
        if args.require_sig:
            _fail("--require-sig and --policy: the policy's appraise_type decides")
        policy = _load_policy(args.policy)
    elif args.exec_:
        _fail("--exec needs --policy")
    ring = _keyring(args)
    try:
        default = ap.hash_algo(args.hash).name
    except ap.UnsupportedHashError as e:
        _fail(f"--hash {args.hash}: {e}")
    name = _xattr_name(args.xattr)
    todo = list(_walk(args.paths, args.recursive, args.skip_special))
    bad = 0
    fs_cache: dict = {}
    with _progress(len(todo), args.quiet) as bar:
        for path, why in todo:
            bar.update(1)
            if why is None:
                try:
                    r = verify_file(path, ring, xattr_name=name, require_sig=args.require_sig,
                                    default_algo=default, policy=policy, exec_=args.exec_,
                                    fs_cache=fs_cache)
                except IsADirectoryError as e:
                    why = e.strerror
                except OSError as e:
                    why = e.strerror or str(e)
                except ValueError as e:     # a rule tests what could not be learnt
                    why = str(e)
            if why is not None:
                bad += 1
                bar.write(f"{path}: error ({why})")
                continue
            if r is None:                   # --policy: no rule appraises this access
                if not args.failures_only:
                    bar.write(f"{path}: not appraised")
                continue
            if r.passed:
                if not args.failures_only:
                    bar.write(f"{path}: pass" + (f" ({r.detail})" if args.verbose else ""))
            else:
                bad += 1
                bar.write(f"{path}: fail ({r.cause})"
                          + (f" [{r.status}: {r.detail}]" if args.verbose else ""))
    return 1 if bad else 0


# --- argparse -----------------------------------------------------------------------


def _keyid_arg(s: str) -> int:
    try:
        v = int(s, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a hex key id") from None
    if not 0 <= v <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{s} does not fit in 32 bits")
    return v


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
                   help="write the hash form (04 <algo> <digest>) instead")
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
    p.set_defaults(func=cmd_sign, hash_only=False)

    p = sub.add_parser(
        "verify", help="appraise files offline against keys",
        description="Print 'PATH: pass' or 'PATH: fail (cause)' per file, causes as the "
        "kernel names them ('PATH: error (reason)' when a file or directory cannot be "
        "read). Without --policy every file is appraised as by a rule 'appraise' without "
        "options: a hash (01, 04) must equal the file's digest in the algorithm it names "
        "(with --require-sig it fails, IMA-signature-required); a signature v2 (03) must "
        "verify, with a key of --keys/--key, over the file's digest in its algorithm; a "
        "signature v3 (06) is checked as by digest_type=verity, over the file's fs-verity "
        "digest (4096-byte blocks, no salt) in its algorithm; any algorithm is accepted "
        "(no appraise_algos); no value fails (missing-hash, or IMA-signature-required "
        "with --require-sig). With --policy the verdict is the one a mount with that "
        "policy gives in enforce mode to a read-only open by root (FILE_CHECK MAY_READ; "
        "for an ELF file also the loader's MMAP_CHECK_REQPROT and MMAP_CHECK when a rule "
        "can match them) or, with --exec, to an exec by root that runs the file "
        "(FILE_CHECK and BPRM_CHECK, MAY_EXEC; for an ELF file also CREDS_CHECK with the "
        "set-id credentials, and the mmap hooks): the matching appraise rule's "
        "appraise_type, appraise_algos and digest_type decide what is checked, and a file "
        "no rule appraises prints 'PATH: not appraised' (the mount allows it). Run it on "
        "the backing tree: fsmagic/fsname/fsuuid are those of the files' file system. "
        "Exit 0 when no file fails, else 1.")
    p.add_argument("--keys", action="append", metavar="DIR",
                   help="directory of certificates (*.der, *.pem, *.crt, *.x509, *.cer)")
    p.add_argument("--key", action="append", metavar="CERT", help="one certificate")
    p.add_argument("--require-sig", action="store_true",
                   help="hashes do not pass, only signatures (appraise_type=imasig); "
                   "not with --policy")
    p.add_argument("--policy", metavar="FILE|tcb|appraise_tcb",
                   help="answer as a mount with this root policy would (see above)")
    p.add_argument("--exec", dest="exec_", action="store_true",
                   help="with --policy: the verdict for an exec (BPRM_CHECK), not a read")
    p.add_argument("-a", "--hash", default="sha256",
                   help="algorithm for files without a value naming one: the mount's "
                   "--hash (default sha256)")
    p.add_argument("--xattr", choices=("security", "user"), default="security")
    p.add_argument("-r", "--recursive", action="store_true")
    p.add_argument("--skip-special", action="store_true")
    p.add_argument("--failures-only", action="store_true",
                   help="print only failures and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="add status and detail")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_verify)
