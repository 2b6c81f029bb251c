"""``security.ima`` values and appraisal, as the kernel's ima_appraise.c does them.

The value of ``security.ima`` starts with a type byte (security/integrity/integrity.h):

====  =========================  ==============================================
type  kernel name                layout after the type byte
====  =========================  ==============================================
0x01  IMA_XATTR_DIGEST           md5 (16 bytes) or sha1 (20 bytes) digest; an old
                                 md5 form padded with 4 zero bytes to 20 exists
0x03  EVM_IMA_XATTR_DIGSIG       signature v2 header + signature over the file digest
0x04  IMA_XATTR_DIGEST_NG        hash algorithm id (1 byte) + digest
0x06  IMA_VERITY_DIGSIG          signature v3 header + signature over the hash of
                                 an ``ima_file_id`` of the fs-verity digest
====  =========================  ==============================================

Signature header (``struct signature_v2_hdr``, 9 bytes, big-endian fields)::

    type u8 | version u8 | hash_algo u8 | keyid be32 | sig_size be16 | sig[sig_size]

The v2 signature (version 2) is the signer's raw signature of the file digest in
``hash_algo``: RSA PKCS#1 v1.5 (with the DigestInfo of the algorithm) or ECDSA (DER
``SEQUENCE {r, s}``, the kernel's "x962" encoding) — what ``evmctl ima_sign`` writes.
The v3 signature (version 3, type 0x06) signs ``H(type || algo || digest)`` where
``type`` is 0x06, ``algo`` the hash algorithm id and ``digest`` the fs-verity file
digest in that algorithm (``struct ima_file_id`` with only the used part hashed).

:func:`appraise` follows ``ima_appraise_measurement()``/``xattr_verify()``: the same
order of checks, the same ``integrity_status`` results (lower-cased names) and the
same cause strings, so audit records read like the kernel's. Deliberate differences
(all stricter than the kernel, never more lenient):

* the kernel accepts bytes after a digest and falls back to its default algorithm
  for an unknown algorithm id or an odd-sized 0x01 value; here those fail as
  ``invalid-hash``;
* an algorithm this Python cannot compute (no hashlib implementation) gives status
  ``unknown`` with cause ``unavailable-hash-algorithm`` instead of a failed
  measurement;
* a signature v1 (``03 01 ...``, the pre-X.509 digsig format) is not supported:
  status ``unknown`` (the kernel's answer when it has no v1 support).

Nothing here imports FUSE or trio; the engine supplies digests through callbacks.

One concern, over 600 lines by a little: the security.ima formats and the appraisal
decision over them (ima_appraise.c); the decision needs every format it parses.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from imafs.ima import hashing
from imafs.ima.hashing import (HASH_ALGO__LAST, HASH_ALGO_BY_ID, HashAlgo, HashAlgoError,
                               hash_algo, kernel_algo, new_hash)

# --- xattr types (security/integrity/integrity.h) ------------------------------------
IMA_XATTR_DIGEST = 0x01
EVM_XATTR_HMAC = 0x02
EVM_IMA_XATTR_DIGSIG = 0x03
IMA_XATTR_DIGEST_NG = 0x04
EVM_XATTR_PORTABLE_DIGSIG = 0x05
IMA_VERITY_DIGSIG = 0x06

XATTR_TYPE_NAMES = {
    IMA_XATTR_DIGEST: "IMA_XATTR_DIGEST",
    EVM_XATTR_HMAC: "EVM_XATTR_HMAC",
    EVM_IMA_XATTR_DIGSIG: "EVM_IMA_XATTR_DIGSIG",
    IMA_XATTR_DIGEST_NG: "IMA_XATTR_DIGEST_NG",
    EVM_XATTR_PORTABLE_DIGSIG: "EVM_XATTR_PORTABLE_DIGSIG",
    IMA_VERITY_DIGSIG: "IMA_VERITY_DIGSIG",
}

SIG_HDR_SIZE = 9  # sizeof(struct signature_v2_hdr), type byte included

# hash algorithms: imafs.ima.hashing is the one table (hash_algo, new_hash, HashAlgo are
# used from here too); an unknown or uncomputable algorithm raises HashAlgoError
UnsupportedHashError = HashAlgoError


# --- parsing --------------------------------------------------------------------------


class XattrError(ValueError):
    """A malformed ``security.ima`` value; ``offset`` is the byte where it goes wrong."""

    def __init__(self, msg: str, offset: int):
        super().__init__(f"{msg} (at byte {offset})")
        self.msg = msg
        self.offset = offset


@dataclass(frozen=True)
class ImaXattr:
    """A parsed ``security.ima`` value.

    ``digest`` is set for the hash types (0x01, 0x04); ``version``, ``keyid`` and
    ``signature`` for the signature types (0x03, 0x06). ``raw`` is the whole value.
    """
    type: int
    algo: str
    digest: bytes | None = None
    version: int | None = None
    keyid: int | None = None
    signature: bytes | None = None
    raw: bytes = b""
    padded_md5: bool = False  # 0x01 with an md5 digest padded to 20 bytes

    @property
    def type_name(self) -> str:
        return XATTR_TYPE_NAMES.get(self.type, f"0x{self.type:02x}")

    @property
    def is_signature(self) -> bool:
        return self.type in (EVM_IMA_XATTR_DIGSIG, IMA_VERITY_DIGSIG)

    @property
    def algo_id(self) -> int:
        return kernel_algo(self.algo).ima_id

    def describe(self) -> str:
        """One line for logs, e.g. ``sigv2 sha256 keyid 219aa90e (256-byte RSA/ECDSA sig)``."""
        if self.type == IMA_XATTR_DIGEST:
            extra = ", md5 padded to 20 bytes" if self.padded_md5 else ""
            return f"hash {self.algo}:{self.digest.hex()} (legacy 0x01{extra})"
        if self.type == IMA_XATTR_DIGEST_NG:
            return f"hash {self.algo}:{self.digest.hex()}"
        what = "sigv2" if self.type == EVM_IMA_XATTR_DIGSIG else "sigv3 fs-verity"
        return (f"{what} {self.algo} keyid {self.keyid:08x} "
                f"({len(self.signature)}-byte signature)")

    __str__ = describe


def _algo_at(value: bytes, off: int, what: str) -> HashAlgo:
    if len(value) <= off:
        raise XattrError(f"{what}: value ends before the hash algorithm byte", off)
    a = HASH_ALGO_BY_ID.get(value[off])
    if a is None:
        raise XattrError(f"{what}: unknown hash algorithm id {value[off]} "
                         f"(kernel ids are 0..{HASH_ALGO__LAST - 1})", off)
    return a


def _exact_digest(value: bytes, off: int, a: HashAlgo, what: str) -> bytes:
    have = len(value) - off
    size = a.digest_size
    if have < size:
        raise XattrError(f"{what}: {a.name} digest needs {size} bytes, "
                         f"only {have} present", off + have)
    if have > size:
        raise XattrError(f"{what}: {have - size} unexpected byte(s) after the "
                         f"{size}-byte {a.name} digest", off + size)
    return bytes(value[off:])


def parse_ima_xattr(value: bytes) -> ImaXattr:
    """Parse a ``security.ima`` value; every malformed value raises :class:`XattrError`."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"security.ima value must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if not value:
        raise XattrError("empty security.ima value", 0)
    t = value[0]
    if t == IMA_XATTR_DIGEST:
        n = len(value) - 1
        if n == 16:
            return ImaXattr(t, "md5", digest=value[1:], raw=value)
        if n == 20:
            if value[17:21] == b"\0\0\0\0":
                return ImaXattr(t, "md5", digest=value[1:17], raw=value, padded_md5=True)
            return ImaXattr(t, "sha1", digest=value[1:], raw=value)
        raise XattrError(f"type 0x01: digest must be 16 (md5) or 20 (sha1) bytes, "
                         f"got {n}", 1)
    if t == IMA_XATTR_DIGEST_NG:
        a = _algo_at(value, 1, "type 0x04")
        return ImaXattr(t, a.name, digest=_exact_digest(value, 2, a, "type 0x04"), raw=value)
    if t in (EVM_IMA_XATTR_DIGSIG, IMA_VERITY_DIGSIG):
        want = 2 if t == EVM_IMA_XATTR_DIGSIG else 3
        what = f"type 0x{t:02x} signature"
        if len(value) < 2:
            raise XattrError(f"{what}: value ends before the version byte", 1)
        if value[1] != want:
            raise XattrError(f"{what}: version {value[1]}, expected {want}", 1)
        a = _algo_at(value, 2, what)
        if len(value) < SIG_HDR_SIZE:
            raise XattrError(f"{what}: header needs {SIG_HDR_SIZE} bytes, "
                             f"only {len(value)} present", len(value))
        keyid, sig_size = struct.unpack_from(">IH", value, 3)
        if sig_size == 0:
            raise XattrError(f"{what}: signature size is 0", 7)
        have = len(value) - SIG_HDR_SIZE
        if have < sig_size:
            raise XattrError(f"{what}: header says {sig_size} signature bytes, "
                             f"only {have} present (truncated)", len(value))
        if have > sig_size:
            raise XattrError(f"{what}: {have - sig_size} unexpected byte(s) after the "
                             f"{sig_size}-byte signature", SIG_HDR_SIZE + sig_size)
        return ImaXattr(t, a.name, version=value[1], keyid=keyid,
                        signature=value[SIG_HDR_SIZE:], raw=value)
    if t in (EVM_XATTR_HMAC, EVM_XATTR_PORTABLE_DIGSIG):
        raise XattrError(f"type 0x{t:02x} ({XATTR_TYPE_NAMES[t]}) belongs in security.evm, "
                         f"not security.ima", 0)
    raise XattrError(f"unknown security.ima type 0x{t:02x}", 0)


def describe_value(value: bytes | None, name: str, parse, error: type) -> str:
    """A log-friendly description of any value of the xattr ``name`` (never raises):
    ``parse(value).describe()``, or the start of the bytes and why ``parse`` refused
    them (``error``)."""
    if value is None:
        return f"no {name}"
    try:
        return parse(value).describe()
    except error as e:
        head = bytes(value[:16]).hex()
        more = "..." if len(value) > 16 else ""
        return f"malformed {name} {head}{more} ({len(value)} bytes): {e}"


def describe_xattr(value: bytes | None) -> str:
    """A log-friendly description of any security.ima value (never raises)."""
    return describe_value(value, "security.ima", parse_ima_xattr, XattrError)


def needed_algo(value: bytes | None) -> str | None:
    """The algorithm the file must be hashed in to appraise ``value``.

    Mirrors the kernel's ``ima_get_hash_algo()``: None where the kernel would use its
    default algorithm (no value, unknown type, malformed header).
    """
    if not value or len(value) < 2:
        return None
    t = value[0]
    if t in (EVM_IMA_XATTR_DIGSIG, IMA_VERITY_DIGSIG):
        want = 2 if t == EVM_IMA_XATTR_DIGSIG else 3
        if value[1] != want or len(value) <= SIG_HDR_SIZE:
            return None
        a = HASH_ALGO_BY_ID.get(value[2])
        return a.name if a else None
    if t == IMA_XATTR_DIGEST_NG:
        a = HASH_ALGO_BY_ID.get(value[1])
        return a.name if a else None
    if t == IMA_XATTR_DIGEST:
        if len(value) == 21:
            return "md5" if value[17:21] == b"\0\0\0\0" else "sha1"
        if len(value) == 17:
            return "md5"
    return None


# --- building values ----------------------------------------------------------------


def hash_xattr(algo: str, digest: bytes) -> bytes:
    """The hash form of ``security.ima`` the kernel's fix mode (and ``evmctl ima_hash``)
    writes: ``01 <digest>`` for md4/md5/sha1, ``04 <algo id> <digest>`` otherwise."""
    a = _checked(algo, digest)
    if a.ima_id <= kernel_algo("sha1").ima_id:
        return bytes([IMA_XATTR_DIGEST]) + bytes(digest)
    return bytes([IMA_XATTR_DIGEST_NG, a.ima_id]) + bytes(digest)


def _checked(algo: str, digest: bytes) -> HashAlgo:
    a = hash_algo(algo)
    if len(digest) != a.digest_size:
        raise ValueError(f"{a.name} digest must be {a.digest_size} bytes, got {len(digest)}")
    return a


def file_id_hash(algo: str, digest: bytes, xattr_type: int = IMA_VERITY_DIGSIG) -> bytes:
    """The digest a v3 signature signs: ``H(ima_file_id)``, hashing only the used part
    of ``struct ima_file_id {u8 hash_type; u8 hash_algorithm; u8 hash[]}``."""
    a = _checked(algo, digest)
    return a.new(bytes([xattr_type, a.ima_id]) + bytes(digest)).digest()


def _raw_sign(private_key, algo: str, digest: bytes) -> bytes:
    ch = hash_algo(algo).crypto_hash()
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(digest, padding.PKCS1v15(), Prehashed(ch))
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(digest, ec.ECDSA(Prehashed(ch)))
    raise TypeError(f"cannot sign with a {type(private_key).__name__}; "
                    "IMA signatures use RSA or ECDSA keys")


def _sig_value(xattr_type: int, version: int, a: HashAlgo, keyid: int, sig: bytes) -> bytes:
    if not 0 <= keyid <= 0xFFFFFFFF:
        raise ValueError(f"key id {keyid} does not fit in 32 bits")
    if len(sig) > 0xFFFF:
        raise ValueError(f"signature of {len(sig)} bytes does not fit the header")
    return struct.pack(">BBBIH", xattr_type, version, a.ima_id, keyid, len(sig)) + sig


def sign_v2(private_key, algo: str, digest: bytes, keyid: int) -> bytes:
    """The full ``security.ima`` value ``03 02 ...`` signing ``digest`` (the file's
    digest in ``algo``), as ``evmctl ima_sign`` writes it."""
    a = _checked(algo, digest)
    return _sig_value(EVM_IMA_XATTR_DIGSIG, 2, a, keyid, _raw_sign(private_key, a.name, digest))


def sign_v3(private_key, algo: str, verity_digest: bytes, keyid: int) -> bytes:
    """The full ``security.ima`` value ``06 03 ...`` for a file whose fs-verity digest
    in ``algo`` is ``verity_digest``: the signature is over ``file_id_hash()``, the
    hash of the kernel's ``struct ima_file_id`` (as ``calc_file_id_hash()`` in
    security/integrity/ima/ima_appraise.c computes it). Debian's evmctl 1.4 can neither
    write nor check such values; tests/interop/test_appraise.py checks them with
    ``fsverity digest`` and ``openssl dgst``."""
    a = hash_algo(algo)
    return _sig_value(IMA_VERITY_DIGSIG, 3, a, keyid,
                      _raw_sign(private_key, a.name, file_id_hash(a.name, verity_digest)))


def verify_signature(public_key, algo: str, digest: bytes, signature: bytes) -> str | None:
    """Check a raw IMA signature; None when it verifies, else the reason (never raises)."""
    try:
        ch = hash_algo(algo).crypto_hash()
        if len(digest) != ch.digest_size:
            return f"digest of {len(digest)} bytes does not match {algo}"
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, digest, padding.PKCS1v15(), Prehashed(ch))
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, digest, ec.ECDSA(Prehashed(ch)))
        else:
            return f"unsupported key type {type(public_key).__name__}"
    except InvalidSignature:
        return "signature does not match"
    except (UnsupportedAlgorithm, UnsupportedHashError) as e:
        return f"unsupported: {e}"
    except (ValueError, TypeError, OverflowError) as e:
        return f"unusable signature: {e}"
    return None


# --- appraisal ----------------------------------------------------------------------

# enum integrity_status, lower-cased
PASS = "pass"
PASS_IMMUTABLE = "pass_immutable"
FAIL = "fail"
FAIL_IMMUTABLE = "fail_immutable"
NOLABEL = "nolabel"
NOXATTRS = "noxattrs"
UNKNOWN = "unknown"
STATUSES = (PASS, PASS_IMMUTABLE, FAIL, FAIL_IMMUTABLE, NOLABEL, NOXATTRS, UNKNOWN)

# causes (kernel strings); the EVM ones only occur when an evm_status is given
CAUSES = (
    "missing-hash", "invalid-hash", "IMA-signature-required", "verity-signature-required",
    "invalid-signature", "invalid-signature-version", "invalid-verity-signature",
    "sigv3-hashing-error", "unknown-ima-data", "missing-HMAC", "invalid-HMAC",
    "invalid-fail-immutable", "no-verity-digest", "denied-hash-algorithm",
    "unavailable-hash-algorithm", "unknown",
)


@dataclass(frozen=True)
class AppraiseResult:
    """``status``: one of :data:`STATUSES`; ``cause``: the kernel's audit cause (None on
    pass); ``algo``: the hash algorithm the decision used; ``keyid``: the signature's
    key id; ``detail``: a human explanation for logs and the ``query`` file; ``evm``:
    the EVM result (imafs.ima.evm.EvmResult) a caller attached, None without EVM."""
    status: str
    cause: str | None
    algo: str | None = None
    keyid: int | None = None
    detail: str = ""
    evm: object = None

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def __str__(self) -> str:
        if self.passed:
            return f"pass ({self.detail})" if self.detail else "pass"
        s = f"{self.status} ({self.cause})"
        return f"{s}: {self.detail}" if self.detail else s


def _lookup(keyring, keyid: int) -> list:
    if keyring is None:
        return []
    return list(keyring.lookup(keyid))


def _check_sig(keyring, sig: ImaXattr, signed: bytes) -> tuple[bool, str]:
    keys = _lookup(keyring, sig.keyid)
    if not keys:
        return False, f"no key with id {sig.keyid:08x} in the keyring"
    memo = getattr(keyring, "verified", None)   # keys.VerifiedSignatures
    reasons = []
    for k in keys:
        if memo is not None and memo.known(k.fingerprint, sig.algo, signed, sig.signature):
            return True, f"signed by key {sig.keyid:08x} ({k.subject})"
        why = verify_signature(k.public_key, sig.algo, signed, sig.signature)
        if why is None:
            if memo is not None:
                memo.add(k.fingerprint, sig.algo, signed, sig.signature)
            return True, f"signed by key {sig.keyid:08x} ({k.subject})"
        reasons.append(why)
    if len(keys) == 1:
        return False, f"key {sig.keyid:08x}: {reasons[0]}"
    return False, f"none of the {len(keys)} keys with id {sig.keyid:08x} verifies it"


def appraise(xattr: bytes | None,
             digest_for: Callable[[str], bytes],
             keyring,
             *,
             require_sig: bool,
             allowed_algos: Iterable[str] | None = None,
             verity_digest: Callable[[str], bytes | None] | None = None,
             sigv3_required: bool = False,
             verity_required: bool = False,
             default_algo: str = "sha256",
             evm_status: str = UNKNOWN,
             new_file: bool = False,
             file_size: int | None = None) -> AppraiseResult:
    """Appraise one file version the way the kernel's ``ima_appraise_measurement()`` does.

    ``xattr``          the ``security.ima`` value, None (or empty) when absent.
    ``digest_for(a)``  the file's digest in algorithm ``a`` (kernel name). Exceptions it
                       raises (I/O errors) propagate; everything about the value itself
                       is answered with a result, never an exception.
    ``keyring``        an object with ``lookup(keyid) -> [KeyInfo]`` (keys.Keyring), or None.
    ``require_sig``    ``appraise_type=imasig`` (IMA_DIGSIG_REQUIRED).
    ``allowed_algos``  ``appraise_algos=``: names of the algorithms a value may use.
    ``verity_digest(a)`` the fs-verity file digest in ``a``, None when the file has none.
    ``verity_required`` ``digest_type=verity`` (IMA_VERITY_REQUIRED): the digest compared
                       or signed is the fs-verity digest.
    ``sigv3_required`` ``digest_type=verity appraise_type=sigv3``: verity and a signature.
    ``default_algo``   the kernel's ``ima_hash_algo``, used when the value names none.
    ``evm_status``     the result of an EVM check of the file's metadata, if any; the
                       default "unknown" is what the kernel gets when EVM is off.
    ``new_file``/``file_size``  IMA_NEW_FILE handling: a file created by this open may
                       have no label yet.
    """
    if evm_status not in STATUSES:
        raise ValueError(f"evm_status must be one of {STATUSES}, not {evm_status!r}")
    digsig_required = bool(require_sig or sigv3_required)
    verity_req = bool(verity_required or sigv3_required)
    value = bytes(xattr) if xattr else b""

    algo = needed_algo(value) or default_algo
    try:
        algo = hash_algo(algo).name
    except UnsupportedHashError as e:
        return AppraiseResult(UNKNOWN, "unavailable-hash-algorithm", algo, None, str(e))
    keyid = None
    if (len(value) >= SIG_HDR_SIZE and value[0] in (EVM_IMA_XATTR_DIGSIG, IMA_VERITY_DIGSIG)
            and value[1] in (2, 3)):
        keyid = struct.unpack_from(">I", value, 3)[0]

    def result(status, cause, detail=""):
        return AppraiseResult(status, cause, algo, keyid, detail)

    res = _appraise_value(value, algo, result, digest_for, keyring, digsig_required,
                          verity_req, verity_digest, evm_status, new_file, file_size)
    # process_measurement(): once appraisal passed, the digest must also have been made
    # with an algorithm the rule allows (appraise_algos=)
    if res.passed and allowed_algos is not None:
        allowed = set()
        for n in allowed_algos:
            try:
                allowed.add(hash_algo(n).name)
            except UnsupportedHashError:
                pass
        if algo not in allowed:
            return result(FAIL, "denied-hash-algorithm",
                          f"{algo} is not among the allowed algorithms "
                          f"({', '.join(sorted(allowed)) or 'none'})")
    return res


def _appraise_value(value, algo, result, digest_for, keyring, digsig_required, verity_req,
                    verity_digest, evm_status, new_file, file_size) -> AppraiseResult:
    try:
        new_hash(algo)
    except UnsupportedHashError as e:
        return result(UNKNOWN, "unavailable-hash-algorithm", str(e))

    # ima_collect_measurement(): with digest_type=verity the digest is the fs-verity one
    file_digest: bytes | None = None
    if verity_req:
        file_digest = verity_digest(algo) if verity_digest is not None else None
        if file_digest is None:
            return result(FAIL, "no-verity-digest", "the file has no fs-verity digest")

    def digest() -> bytes:
        nonlocal file_digest
        if file_digest is None:
            file_digest = digest_for(algo)
        return file_digest

    # no label at all
    if not value:
        if digsig_required:
            cause = "verity-signature-required" if verity_req else "IMA-signature-required"
        else:
            cause = "missing-hash"
        if new_file and (not digsig_required or file_size == 0):
            return result(PASS, None, "new file, not labelled yet")
        return result(NOLABEL, cause, "no security.ima")

    # evm_verifyxattr()
    status = evm_status
    if status in (NOXATTRS, NOLABEL):
        return result(status, "missing-HMAC", "no security.evm protects security.ima")
    if status == FAIL_IMMUTABLE:
        return result(status, "invalid-fail-immutable", "EVM portable signature failed")
    if status == FAIL:
        return result(status, "invalid-HMAC", "security.evm does not match")

    res = _xattr_verify(value, algo, keyring, digest, status, digsig_required, verity_req)
    digsig = res[2]
    res = result(*res[:2], res[3])
    # permit new, still empty files that carry a signature
    if (not res.passed and new_file and file_size == 0 and digsig):
        return result(PASS, None, "new empty file with a signature")
    return res


def _xattr_verify(value: bytes, algo: str, keyring, digest: Callable[[], bytes],
                  status: str, digsig_required: bool, verity_req: bool):
    """xattr_verify(): (status, cause, digsig-bit, detail)."""
    t = value[0]
    if t in (IMA_XATTR_DIGEST, IMA_XATTR_DIGEST_NG):
        if status != PASS_IMMUTABLE and digsig_required:
            cause = "verity-signature-required" if verity_req else "IMA-signature-required"
            return FAIL, cause, False, "security.ima holds a hash, the policy requires a signature"
        digsig = status == PASS_IMMUTABLE
        try:
            x = parse_ima_xattr(value)
        except XattrError as e:
            return FAIL, "invalid-hash", digsig, str(e)
        got = digest()
        if x.digest != got:
            return FAIL, "invalid-hash", digsig, (
                f"security.ima has {x.algo}:{x.digest.hex()}, the file is "
                f"{x.algo}:{got.hex()}")
        return PASS, None, digsig, f"{x.algo} hash matches"

    if t == EVM_IMA_XATTR_DIGSIG:
        if digsig_required and verity_req:
            return FAIL, "verity-signature-required", True, (
                "the policy requires an fs-verity (v3) signature, security.ima has v2")
        version = value[1] if len(value) > 1 else None
        if version is not None and version >= 3:
            return FAIL, "invalid-signature-version", True, (
                f"signature version {version} in a type 0x03 value")
        if version != 2:
            # integrity_digsig_verify(): -EOPNOTSUPP for v1 and unknown versions
            return UNKNOWN, "unknown", True, (
                f"signature version {version} is not supported" if version is not None
                else "signature value ends after its type byte")
        try:
            x = parse_ima_xattr(value)
        except XattrError as e:
            return FAIL, "invalid-signature", True, str(e)
        ok, why = _check_sig(keyring, x, digest())
        return (PASS, None, True, why) if ok else (FAIL, "invalid-signature", True, why)

    if t == IMA_VERITY_DIGSIG:
        if digsig_required and not verity_req:
            return FAIL, "IMA-signature-required", True, (
                "fs-verity (v3) signature, but the policy rule has no digest_type=verity")
        version = value[1] if len(value) > 1 else None
        if version != 3:
            return FAIL, "invalid-signature-version", True, (
                f"signature version {version} in a type 0x06 value, expected 3")
        try:
            x = parse_ima_xattr(value)
        except XattrError as e:
            return FAIL, "invalid-verity-signature", True, str(e)
        try:
            signed = file_id_hash(x.algo, digest())
        except (UnsupportedHashError, ValueError) as e:
            return FAIL, "sigv3-hashing-error", True, str(e)
        ok, why = _check_sig(keyring, x, signed)
        return (PASS, None, True, why) if ok else (FAIL, "invalid-verity-signature", True, why)

    return UNKNOWN, "unknown-ima-data", False, describe_xattr(value)


def may_fix(xattr: bytes | None) -> bool:
    """Whether appraise_mode=fix may replace this value with a hash: never over a
    signature, v2 (0x03) or v3 (0x06). The kernel's ima_appraise_measurement() spares
    only 0x03; imafs also keeps fs-verity signatures, as its design says ("never over
    a signature"): a hash written over a v3 signature would lose it for good."""
    return not xattr or xattr[0] not in (EVM_IMA_XATTR_DIGSIG, IMA_VERITY_DIGSIG)


# --- a policy decision -> an appraisal ------------------------------------------------
# The one place that turns what an appraise rule says into the arguments of
# appraise(): the engine (at open and for the query file) and ``imafs verify
# --policy`` call it.

def decision_flags(decision) -> tuple:
    """What an appraisal's result depends on besides the file, its value and the
    keyring: the deciding rule's appraise_type, appraise_algos and digest_type, and
    whether it takes digest lists (digest_cache=: the namespace's lists then count,
    ima/digest_cache.py)."""
    flags = (decision.appraise_type, decision.appraise_algos, decision.digest_type)
    return flags + (True,) if getattr(decision, "digest_cache_appraise", False) else flags


def appraise_decision(xattr: bytes | None, decision, digest_for: Callable[[str], bytes],
                      keyring, *, verity_digest: Callable[[str], bytes | None] | None,
                      default_algo: str = "sha256", new_file: bool = False,
                      file_size: int | None = None,
                      evm_status: str = UNKNOWN) -> AppraiseResult:
    """:func:`appraise` as a policy ``Decision`` asks for it: ``appraise_type=imasig``
    (or ``imasig|modsig``) requires a signature, ``sigv3`` a v3 signature over the
    fs-verity digest, ``digest_type=verity`` the fs-verity digest, ``appraise_algos=``
    limits the algorithms. ``evm_status``: EVM's verdict on the file's metadata
    (imafs.ima.evm_hooks; "unknown" where EVM is off)."""
    return appraise(
        xattr, digest_for, keyring,
        require_sig=decision.appraise_type in ("imasig", "imasig|modsig"),
        allowed_algos=decision.appraise_algos, verity_digest=verity_digest,
        sigv3_required=decision.appraise_type == "sigv3",
        verity_required=decision.digest_type == "verity",
        default_algo=default_algo, new_file=new_file, file_size=file_size,
        evm_status=evm_status)


def get_hash_algo(xattr: bytes | None, default: str) -> str:
    """The algorithm of a measurement (and of an audit record): the one the file's
    ``security.ima`` names, when this Python can compute it (the kernel's
    ima_get_hash_algo(), so a signature in an ima-sig entry covers the recorded
    digest); else ``default`` (the namespace's ``--hash``)."""
    algo = needed_algo(xattr)
    if algo is None or algo == default:
        return default
    try:
        hashing.hash_algo(algo).new()
    except (ValueError, hashing.HashAlgoError):
        return default
    return algo
