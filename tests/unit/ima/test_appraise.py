"""security.ima parsing, building and appraisal (imafs.ima.appraise)."""
from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imafs.ima import appraise as ap
from imafs.ima import hashing as H
from imafs.ima.keys import Keyring, keyid_of

from helpers import testkeys as tk

DATA = b"hello\n"
SHA256 = hashlib.sha256(DATA).digest()
# sha256("hello\n"), as `evmctl ima_hash` and sha256sum print it
assert SHA256.hex() == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"


def digests(data=DATA):
    calls = []

    def digest_for(algo):
        calls.append(algo)
        h = ap.new_hash(algo)
        h.update(data)
        return h.digest()
    digest_for.calls = calls
    return digest_for


def verity_of(data=DATA):
    # any stable function of the data stands in for the fs-verity digest here
    return lambda algo: hashlib.new(ap.hash_algo(algo).hashlib_name, b"verity" + data).digest()


@pytest.fixture(scope="module")
def ring():
    r = Keyring()
    for kind in ("rsa", "ec"):
        r.add(tk.der(tk.cert(tk.key(kind))))
    return r


def kid(kind="rsa", n=0):
    return keyid_of(tk.cert(tk.key(kind, n)))


# --- algorithm table -------------------------------------------------------------


def test_algorithm_ids_match_the_kernel():
    ids = {a.name: a.ima_id for a in H.HASH_ALGOS.values()}
    assert ids["md5"] == 1 and ids["sha1"] == 2 and ids["sha256"] == 4
    assert ids["sha384"] == 5 and ids["sha512"] == 6 and ids["sha224"] == 7
    assert ids["sm3"] == 17 and ids["sha3-256"] == 20
    assert [a.ima_id for a in H.HASH_ALGOS.values()] == list(range(H.HASH_ALGO__LAST))
    for a in H.HASH_ALGOS.values():
        if a.available:
            assert ap.new_hash(a.name).digest_size == a.digest_size


def test_algorithm_lookup():
    assert ap.hash_algo("SHA256").ima_id == 4
    assert ap.hash_algo(17).name == "sm3"
    assert ap.hash_algo("sm3-256").name == "sm3"
    with pytest.raises(ap.UnsupportedHashError, match="unknown hash algorithm 'sha999'"):
        ap.hash_algo("sha999")
    with pytest.raises(ap.UnsupportedHashError, match="id 99"):
        ap.hash_algo(99)
    with pytest.raises(ap.UnsupportedHashError, match="wp512.*no implementation"):
        ap.new_hash("wp512")


# --- parsing ---------------------------------------------------------------------


def test_parse_ng_digest():
    x = ap.parse_ima_xattr(b"\x04\x04" + SHA256)
    assert (x.type, x.algo, x.digest, x.is_signature) == (4, "sha256", SHA256, False)
    assert x.describe() == f"hash sha256:{SHA256.hex()}"
    assert x.type_name == "IMA_XATTR_DIGEST_NG"


def test_parse_legacy_digests():
    sha1 = hashlib.sha1(DATA).digest()
    md5 = hashlib.md5(DATA).digest()
    assert ap.parse_ima_xattr(b"\x01" + sha1).algo == "sha1"
    x = ap.parse_ima_xattr(b"\x01" + md5)
    assert (x.algo, x.digest, x.padded_md5) == ("md5", md5, False)
    x = ap.parse_ima_xattr(b"\x01" + md5 + b"\0" * 4)  # md5 in the old 20-byte slot
    assert (x.algo, x.digest, x.padded_md5) == ("md5", md5, True)
    assert "legacy 0x01" in x.describe()


def test_parse_signature_header():
    v = bytes.fromhex("03 02 04 12345678 0003 aabbcc")
    x = ap.parse_ima_xattr(v)
    assert (x.type, x.version, x.algo, x.keyid, x.signature) == (3, 2, "sha256", 0x12345678,
                                                                  b"\xaa\xbb\xcc")
    assert x.describe() == "sigv2 sha256 keyid 12345678 (3-byte signature)"
    x = ap.parse_ima_xattr(bytes.fromhex("06 03 06 0000abcd 0001 ff"))
    assert (x.type, x.version, x.algo, x.keyid) == (6, 3, "sha512", 0xABCD)
    assert x.describe().startswith("sigv3 fs-verity sha512 keyid 0000abcd")


@pytest.mark.parametrize("value, offset, text", [
    (b"", 0, "empty"),
    (b"\x07abc", 0, "unknown security.ima type 0x07"),
    (b"\x02" + b"x" * 20, 0, "belongs in security.evm"),
    (b"\x05\x02", 0, "belongs in security.evm"),
    (b"\x01" + b"x" * 19, 1, "16 (md5) or 20 (sha1)"),
    (b"\x04", 1, "before the hash algorithm byte"),
    (b"\x04\x63" + b"x" * 32, 1, "unknown hash algorithm id 99"),
    (b"\x04\x04" + b"x" * 31, 33, "needs 32 bytes, only 31"),
    (b"\x04\x04" + b"x" * 35, 34, "3 unexpected byte(s) after the 32-byte sha256"),
    (b"\x03", 1, "before the version byte"),
    (b"\x03\x01\x04", 1, "version 1, expected 2"),
    (b"\x06\x02\x04", 1, "version 2, expected 3"),
    (b"\x03\x02\x2a" + b"\0" * 6, 2, "unknown hash algorithm id 42"),
    (b"\x03\x02\x04\0\0\0\1\0", 8, "header needs 9 bytes, only 8"),
    (b"\x03\x02\x04\0\0\0\1\0\0", 7, "signature size is 0"),
    (b"\x03\x02\x04\0\0\0\1\0\x05abc", 12, "header says 5 signature bytes, only 3 present"),
    (b"\x03\x02\x04\0\0\0\1\0\x02abc", 11, "1 unexpected byte(s) after the 2-byte signature"),
])
def test_parse_errors_say_what_and_where(value, offset, text):
    with pytest.raises(ap.XattrError) as ei:
        ap.parse_ima_xattr(value)
    assert ei.value.offset == offset
    assert text in str(ei.value) and f"(at byte {offset})" in str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert "malformed security.ima" in ap.describe_xattr(value)


def test_describe_never_raises():
    assert ap.describe_xattr(None) == "no security.ima"
    assert ap.describe_xattr(b"\x04\x04" + SHA256).startswith("hash sha256:")


@pytest.mark.parametrize("value, algo", [
    (None, None), (b"", None), (b"\x04", None),
    (b"\x04\x05" + b"x" * 48, "sha384"), (b"\x04\x63xx", None),
    (b"\x01" + b"x" * 20, "sha1"), (b"\x01" + b"x" * 16 + b"\0" * 4, "md5"),
    (b"\x01" + b"x" * 16, "md5"), (b"\x01" + b"x" * 32, None),
    (bytes.fromhex("03 02 06 00000001 0001 aa"), "sha512"),
    (bytes.fromhex("03 02 06 00000001 00"), None),         # header only
    (bytes.fromhex("03 01 06 00000001 0001 aa"), None),    # v1
    (bytes.fromhex("06 03 05 00000001 0001 aa"), "sha384"),
    (bytes.fromhex("06 02 05 00000001 0001 aa"), None),
    (b"\x09\x04", None),
])
def test_needed_algo_mirrors_ima_get_hash_algo(value, algo):
    assert ap.needed_algo(value) == algo


# --- building values -------------------------------------------------------------


def test_hash_xattr_forms():
    assert ap.hash_xattr("sha256", SHA256) == b"\x04\x04" + SHA256   # evmctl ima_hash
    sha1 = hashlib.sha1(DATA).digest()
    assert ap.hash_xattr("sha1", sha1) == b"\x01" + sha1              # kernel fix mode
    assert ap.hash_xattr("md5", b"m" * 16) == b"\x01" + b"m" * 16
    assert ap.hash_xattr("sha512", b"s" * 64)[:2] == b"\x04\x06"
    with pytest.raises(ValueError, match="32 bytes, got 31"):
        ap.hash_xattr("sha256", SHA256[:31])
    for a in ("sha1", "sha256", "sha384", "sm3"):
        d = hashlib.new(ap.hash_algo(a).hashlib_name, DATA).digest()
        assert ap.parse_ima_xattr(ap.hash_xattr(a, d)).digest == d


def test_file_id_hash_is_hash_of_type_algo_digest():
    d = b"\x11" * 32
    assert ap.file_id_hash("sha256", d) == hashlib.sha256(b"\x06\x04" + d).digest()
    d = b"\x22" * 64
    assert ap.file_id_hash("sha512", d) == hashlib.sha512(b"\x06\x06" + d).digest()


@pytest.mark.parametrize("kind", ["rsa", "ec", "p384"])
def test_sign_v2_layout_and_verify(kind):
    priv = tk.key(kind)
    v = ap.sign_v2(priv, "sha256", SHA256, 0xCAFEF00D)
    assert v[:7] == bytes.fromhex("030204cafef00d")
    (n,) = struct.unpack(">H", v[7:9])
    assert n == len(v) - 9
    if kind == "rsa":
        assert n == 256
    else:
        assert v[9] == 0x30   # DER SEQUENCE {r, s}
    x = ap.parse_ima_xattr(v)
    assert ap.verify_signature(priv.public_key(), "sha256", SHA256, x.signature) is None
    assert ap.verify_signature(priv.public_key(), "sha256", b"\0" * 32, x.signature) \
        == "signature does not match"
    assert "does not match sha384" in ap.verify_signature(priv.public_key(), "sha384",
                                                          SHA256, x.signature)


def test_sign_refuses_bad_input():
    with pytest.raises(ValueError, match="32 bytes"):
        ap.sign_v2(tk.key("rsa"), "sha256", b"short", 1)
    with pytest.raises(ValueError, match="32 bits"):
        ap.sign_v2(tk.key("rsa"), "sha256", SHA256, 1 << 32)
    from cryptography.hazmat.primitives.asymmetric import ed25519
    with pytest.raises(TypeError, match="RSA or ECDSA"):
        ap.sign_v2(ed25519.Ed25519PrivateKey.generate(), "sha256", SHA256, 1)


def test_verify_signature_garbage_is_a_reason_not_an_exception():
    pub = tk.key("ec").public_key()
    assert ap.verify_signature(pub, "sha256", SHA256, b"\x30\x00") is not None
    assert ap.verify_signature(pub, "rmd128", SHA256, b"x") is not None
    assert ap.verify_signature(object(), "sha256", SHA256, b"x").startswith("unsupported")


# --- appraisal: no value -----------------------------------------------------------


def test_missing_value():
    d = digests()
    r = ap.appraise(None, d, None, require_sig=False)
    assert (r.status, r.cause, r.algo) == ("nolabel", "missing-hash", "sha256")
    assert not r.passed and d.calls == []   # no need to hash the file
    assert ap.appraise(b"", d, None, require_sig=False).cause == "missing-hash"
    r = ap.appraise(None, d, None, require_sig=True)
    assert (r.status, r.cause) == ("nolabel", "IMA-signature-required")
    r = ap.appraise(None, d, None, require_sig=True, verity_required=True,
                    verity_digest=verity_of())
    assert r.cause == "verity-signature-required"


def test_new_files_pass_without_a_label():
    d = digests()
    assert ap.appraise(None, d, None, require_sig=False, new_file=True).passed
    assert ap.appraise(None, d, None, require_sig=True, new_file=True, file_size=0).passed
    r = ap.appraise(None, d, None, require_sig=True, new_file=True, file_size=3)
    assert r.cause == "IMA-signature-required"


# --- appraisal: hashes ----------------------------------------------------------------


def test_hash_pass_and_fail():
    r = ap.appraise(b"\x04\x04" + SHA256, digests(), None, require_sig=False)
    assert (r.status, r.cause, r.algo) == ("pass", None, "sha256") and r.passed
    r = ap.appraise(b"\x04\x04" + SHA256, digests(b"tampered"), None, require_sig=False)
    assert (r.status, r.cause) == ("fail", "invalid-hash")
    assert SHA256.hex() in r.detail
    assert str(r).startswith("fail (invalid-hash): security.ima has sha256:")


def test_hash_uses_the_values_algorithm():
    d = digests()
    v = ap.hash_xattr("sha384", hashlib.sha384(DATA).digest())
    r = ap.appraise(v, d, None, require_sig=False)
    assert r.passed and r.algo == "sha384" and d.calls == ["sha384"]
    sha1 = b"\x01" + hashlib.sha1(DATA).digest()
    assert ap.appraise(sha1, digests(), None, require_sig=False).algo == "sha1"
    md5 = b"\x01" + hashlib.md5(DATA).digest() + b"\0" * 4
    assert ap.appraise(md5, digests(), None, require_sig=False).passed


def test_hash_when_a_signature_is_required():
    v = b"\x04\x04" + SHA256
    r = ap.appraise(v, digests(), None, require_sig=True)
    assert (r.status, r.cause) == ("fail", "IMA-signature-required")
    r = ap.appraise(v, digests(), None, sigv3_required=True, require_sig=False,
                    verity_digest=verity_of())
    assert r.cause == "verity-signature-required"
    # an EVM portable signature (pass_immutable) vouches for the hash
    assert ap.appraise(v, digests(), None, require_sig=True, evm_status="pass_immutable").passed


@pytest.mark.parametrize("value, why", [
    (b"\x04\x04" + SHA256 + b"xx", "unexpected byte"),      # kernel would ignore the tail
    (b"\x04\x04" + SHA256[:20], "only 20 present"),
    (b"\x01" + SHA256, "16 (md5) or 20 (sha1)"),
    (b"\x04\x63" + SHA256, "unknown hash algorithm id 99"),
])
def test_malformed_hash_is_invalid_hash(value, why):
    r = ap.appraise(value, digests(), None, require_sig=False)
    assert (r.status, r.cause) == ("fail", "invalid-hash") and why in r.detail


def test_unknown_type():
    r = ap.appraise(b"\x02" + b"\0" * 20, digests(), None, require_sig=False)
    assert (r.status, r.cause) == ("unknown", "unknown-ima-data")
    r = ap.appraise(b"\xffjunk", digests(), None, require_sig=True)
    assert (r.status, r.cause) == ("unknown", "unknown-ima-data")


def test_evm_results():
    v = b"\x04\x04" + SHA256
    for evm, status, cause in [("nolabel", "nolabel", "missing-HMAC"),
                               ("noxattrs", "noxattrs", "missing-HMAC"),
                               ("fail", "fail", "invalid-HMAC"),
                               ("fail_immutable", "fail_immutable", "invalid-fail-immutable")]:
        r = ap.appraise(v, digests(), None, require_sig=False, evm_status=evm)
        assert (r.status, r.cause) == (status, cause)
    assert ap.appraise(v, digests(), None, require_sig=False, evm_status="pass").passed
    with pytest.raises(ValueError):
        ap.appraise(v, digests(), None, require_sig=False, evm_status="bogus")


def test_allowed_algorithms():
    v = b"\x04\x04" + SHA256
    r = ap.appraise(v, digests(), None, require_sig=False, allowed_algos={"sha512"})
    assert (r.status, r.cause) == ("fail", "denied-hash-algorithm")
    assert ap.appraise(v, digests(), None, require_sig=False,
                       allowed_algos={"sha256", "sha512"}).passed
    # checked once appraisal passed, as in the kernel: other failures keep their cause
    r = ap.appraise(b"\x04\x04" + b"x" * 32, digests(), None, require_sig=False,
                    allowed_algos={"sha512"})
    assert r.cause == "invalid-hash"
    r = ap.appraise(None, digests(), None, require_sig=False, allowed_algos={"sha512"})
    assert r.cause == "missing-hash"
    # a new file without a label is judged by the default algorithm
    r = ap.appraise(None, digests(), None, require_sig=False, allowed_algos={"sha512"},
                    new_file=True)
    assert r.cause == "denied-hash-algorithm"


def test_algorithm_without_implementation():
    v = b"\x04\x08" + b"x" * 16            # rmd128: a kernel id with no hashlib support
    d = digests()
    r = ap.appraise(v, d, None, require_sig=False)
    assert (r.status, r.cause, r.algo) == ("unknown", "unavailable-hash-algorithm", "rmd128")
    assert "no implementation" in r.detail and d.calls == []


# --- appraisal: signatures v2 ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_signature_v2(ring, kind):
    v = ap.sign_v2(tk.key(kind), "sha256", SHA256, kid(kind))
    r = ap.appraise(v, digests(), ring, require_sig=True)
    assert (r.status, r.cause, r.keyid) == ("pass", None, kid(kind)), r.detail
    assert "signed by key" in r.detail
    r = ap.appraise(v, digests(b"tampered"), ring, require_sig=True)
    assert (r.status, r.cause) == ("fail", "invalid-signature")
    r = ap.appraise(v[:-1], digests(), ring, require_sig=True)
    assert (r.status, r.cause) == ("fail", "invalid-signature") and "truncated" in r.detail


def test_signature_v2_other_algorithm(ring):
    d = hashlib.sha512(DATA).digest()
    v = ap.sign_v2(tk.key("rsa"), "sha512", d, kid("rsa"))
    calls = digests()
    r = ap.appraise(v, calls, ring, require_sig=True, allowed_algos={"sha512"})
    assert r.passed and r.algo == "sha512" and calls.calls == ["sha512"]


def test_signature_v2_unknown_or_wrong_key(ring):
    other = tk.key("rsa", 1)
    v = ap.sign_v2(other, "sha256", SHA256, keyid_of(tk.cert(other)))
    r = ap.appraise(v, digests(), ring, require_sig=True)
    assert (r.status, r.cause) == ("fail", "invalid-signature")
    assert "no key with id" in r.detail
    # right key id, wrong key (a forged header)
    v = ap.sign_v2(other, "sha256", SHA256, kid("rsa"))
    r = ap.appraise(v, digests(), ring, require_sig=True)
    assert r.cause == "invalid-signature" and "signature does not match" in r.detail
    r = ap.appraise(v, digests(), None, require_sig=False)
    assert r.cause == "invalid-signature"


def test_signature_v2_key_id_collision():
    class Ring:   # two keys share an id; the right one is second
        def __init__(self, keys):
            self.keys = keys

        def lookup(self, keyid):
            return self.keys

    good = Keyring()
    k_good = good.add(tk.der(tk.cert(tk.key("ec"))))
    k_bad = Keyring().add(tk.der(tk.cert(tk.key("ec", 1))))
    v = ap.sign_v2(tk.key("ec"), "sha256", SHA256, 7)
    assert ap.appraise(v, digests(), Ring([k_bad, k_good]), require_sig=True).passed
    r = ap.appraise(v, digests(), Ring([k_bad, k_bad]), require_sig=True)
    assert "none of the 2 keys" in r.detail


def test_signature_versions(ring):
    v = bytearray(ap.sign_v2(tk.key("rsa"), "sha256", SHA256, kid("rsa")))
    v[1] = 3
    r = ap.appraise(bytes(v), digests(), ring, require_sig=True)
    assert (r.status, r.cause) == ("fail", "invalid-signature-version")
    v[1] = 1
    r = ap.appraise(bytes(v), digests(), ring, require_sig=True)
    assert (r.status, r.cause) == ("unknown", "unknown")
    r = ap.appraise(b"\x03", digests(), ring, require_sig=True)
    assert r.status == "unknown"


def test_v2_signature_where_verity_is_required(ring):
    v = ap.sign_v2(tk.key("rsa"), "sha256", SHA256, kid("rsa"))
    r = ap.appraise(v, digests(), ring, require_sig=False, sigv3_required=True,
                    verity_digest=verity_of())
    assert (r.status, r.cause) == ("fail", "verity-signature-required")


# --- appraisal: signatures v3 (fs-verity) -----------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_signature_v3(ring, kind):
    vd = verity_of()("sha256")
    v = ap.sign_v3(tk.key(kind), "sha256", vd, kid(kind))
    assert v[:2] == b"\x06\x03"
    r = ap.appraise(v, digests(), ring, require_sig=False, sigv3_required=True,
                    verity_digest=verity_of())
    assert r.passed, r
    r = ap.appraise(v, digests(), ring, require_sig=True, verity_required=True,
                    verity_digest=verity_of(b"tampered"))
    assert (r.status, r.cause) == ("fail", "invalid-verity-signature")
    # without digest_type=verity the kernel checks the file_id of the plain file digest
    r = ap.appraise(v, digests(), ring, require_sig=False)
    assert r.cause == "invalid-verity-signature"
    v_plain = ap.sign_v3(tk.key(kind), "sha256", SHA256, kid(kind))
    assert ap.appraise(v_plain, digests(), ring, require_sig=False).passed


def test_signature_v3_policy_and_version(ring):
    vd = verity_of()("sha256")
    v = ap.sign_v3(tk.key("rsa"), "sha256", vd, kid("rsa"))
    r = ap.appraise(v, digests(), ring, require_sig=True, verity_digest=verity_of())
    assert (r.status, r.cause) == ("fail", "IMA-signature-required")
    bad = b"\x06\x02" + v[2:]
    r = ap.appraise(bad, digests(), ring, require_sig=False, sigv3_required=True,
                    verity_digest=verity_of())
    assert r.cause == "invalid-signature-version"
    r = ap.appraise(v[:-3], digests(), ring, require_sig=False, sigv3_required=True,
                    verity_digest=verity_of())
    assert r.cause == "invalid-verity-signature"


def test_verity_required_without_a_verity_digest(ring):
    v = ap.sign_v3(tk.key("rsa"), "sha256", b"\0" * 32, kid("rsa"))
    for vd in (None, lambda a: None):
        r = ap.appraise(v, digests(), ring, require_sig=False, sigv3_required=True,
                        verity_digest=vd)
        assert (r.status, r.cause) == ("fail", "no-verity-digest")


def test_new_empty_file_with_signature_passes(ring):
    v = ap.sign_v2(tk.key("rsa"), "sha256", SHA256, kid("rsa"))
    r = ap.appraise(v, digests(b""), ring, require_sig=True, new_file=True, file_size=0)
    assert r.passed
    r = ap.appraise(v, digests(b""), ring, require_sig=True, new_file=False, file_size=0)
    assert r.cause == "invalid-signature"


def test_may_fix():
    assert ap.may_fix(None) and ap.may_fix(b"\x04\x04" + SHA256)
    assert not ap.may_fix(b"\x03\x02")
    assert not ap.may_fix(b"\x06\x03")   # the kernel spares only 0x03; imafs also 0x06


# --- fuzzing ----------------------------------------------------------------------------

_headers = st.sampled_from([b"", b"\x01", b"\x03\x02", b"\x03\x02\x04", b"\x04\x04",
                            b"\x06\x03\x04", b"\x03\x01", b"\x06\x03\x06", b"\x04"])


@st.composite
def xattr_values(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    head = draw(_headers)
    if head.startswith((b"\x03", b"\x06")) and len(head) == 3 and draw(st.booleans()):
        head += struct.pack(">I", draw(st.sampled_from([kid("rsa"), kid("ec"), 0])))
        sig = draw(st.binary(max_size=300))
        size = draw(st.sampled_from([len(sig), len(sig) + 1, max(len(sig) - 1, 0)]))
        return head + struct.pack(">H", size) + sig
    return head + draw(st.binary(max_size=80))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parse_arbitrary_bytes_only_raises_xattr_error(value):
    try:
        x = ap.parse_ima_xattr(value)
    except ap.XattrError as e:
        assert 0 <= e.offset <= len(value)
        return
    assert x.raw == value and x.describe()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(xattr_values(), st.booleans(), st.booleans(), st.booleans())
def test_appraise_never_raises(ring, value, require_sig, verity, new_file):
    r = ap.appraise(value, digests(), ring, require_sig=require_sig,
                    verity_required=verity, verity_digest=verity_of(),
                    new_file=new_file, file_size=0 if new_file else 6)
    assert r.status in ap.STATUSES and (r.passed or r.cause in ap.CAUSES)
    assert ap.describe_xattr(value)
    assert ap.needed_algo(value) in (None, *H.HASH_ALGOS)
