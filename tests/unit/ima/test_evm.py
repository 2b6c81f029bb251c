"""imafs.ima.evm without a mount: the security.evm parser, the metadata digest's
layout (xattr order, struct h_misc, UUID), HMACs, signatures, the statuses of
evm_verify_hmac, HMAC updates and the securityfs ``evm`` flags."""
from __future__ import annotations

import errno
import hashlib
import hmac
import os
import stat
import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import testkeys as tk
from imafs.ima import appraise as ap
from imafs.ima import evm
from imafs.ima.keys import Keyring, keyid_of

UUID = bytes.fromhex("0123456789abcdef0123456789abcdef")
KEY = bytes(range(1, 33))
IMA = ap.hash_xattr("sha256", bytes(range(32)))
CAPS = bytes.fromhex("0100000200200000000000000000000000000000")


def meta(**kw):
    d = dict(xattrs={"security.ima": IMA}, uid=1000, gid=100, mode=0o100755,
             ino=2167414, generation=646131921, fs_uuid=UUID)
    d.update(kw)
    return evm.FileMetadata(**d)


def ring(*privs):
    r = Keyring()
    for p in privs:
        r.add(tk.der(tk.cert(p)))
    return r


def kid(priv):
    return keyid_of(tk.cert(priv))


# --- struct h_misc and the digest layout ------------------------------------------------


def test_h_misc_matches_evmctl_bytes():
    # what `evmctl -v sign --uuid=... ` printed for inode 2167414, generation
    # 646131921, root-owned, mode 0100644 (hmac_misc (24): ...)
    m = meta(uid=0, gid=0, mode=0o100644)
    assert evm.h_misc(evm.EVM_IMA_XATTR_DIGSIG, m).hex() == \
        "7612210000000000d13083260000000000000000a4810000"
    # portable: ino and generation zero, the rest as it is
    assert evm.h_misc(evm.EVM_XATTR_PORTABLE_DIGSIG, m).hex() == \
        "0000000000000000000000000000000000000000a4810000"


def test_h_misc_other_abis():
    m = meta(uid=1, gid=2, mode=0o100600)
    m32 = evm.h_misc(evm.EVM_XATTR_HMAC, m, evm.EvmConfig(bits=32))
    assert m32 == struct.pack("<IIIIH2x", m.ino, m.generation, 1, 2, 0o100600)
    assert len(m32) == 20
    be = evm.h_misc(evm.EVM_XATTR_HMAC, m, evm.EvmConfig(byteorder="big"))
    assert be == struct.pack(">QIIIH2x", m.ino, m.generation, 1, 2, 0o100600)
    with pytest.raises(evm.EvmError, match="32-bit"):
        evm.h_misc(evm.EVM_XATTR_HMAC, meta(ino=1 << 40), evm.EvmConfig(bits=32))
    with pytest.raises(ValueError):
        evm.EvmConfig(bits=16)


def _expected(algo, values, misc, uuid=None):
    h = hashlib.new(algo)
    for v in values:
        h.update(v)
    h.update(misc)
    if uuid:
        h.update(uuid)
    return h.digest()


def test_digest_covers_enabled_xattrs_in_kernel_order_then_misc_then_uuid():
    # given in an order unlike the kernel's: the digest follows the kernel's list
    xs = {"security.capability": CAPS, "security.ima": IMA, "security.apparmor": b"prof",
          "security.SMACK64": b"_", "security.selinux": b"system_u:object_r:bin_t:s0\0",
          "user.other": b"ignored", "security.SMACK64EXEC": b"disabled"}
    m = meta(xattrs=xs)
    order = [xs["security.selinux"], b"_", b"prof", IMA, CAPS]
    t3 = evm.EVM_IMA_XATTR_DIGSIG
    assert evm.evm_calc_hash(t3, m, "sha256") == _expected(
        "sha256", order, evm.h_misc(t3, m), UUID)
    # portable: SMACK64EXEC (listed, not enabled) is hashed too; no UUID
    t5 = evm.EVM_XATTR_PORTABLE_DIGSIG
    porder = [xs["security.selinux"], b"_", b"disabled", b"prof", IMA, CAPS]
    assert evm.evm_calc_hash(t5, m, "sha512") == _expected(
        "sha512", porder, evm.h_misc(t5, m))
    # with CONFIG_EVM_EXTRA_SMACK_XATTRS the extra SMACK xattr is enabled everywhere
    cfg = evm.EvmConfig.with_smack_extras()
    assert evm.evm_calc_hash(t3, m, "sha256", cfg) == _expected(
        "sha256", porder, evm.h_misc(t3, m), UUID)
    # without EVM_ATTR_FSUUID no UUID, and none is needed
    cfg = evm.EvmConfig(fsuuid=False)
    assert evm.evm_calc_hash(t3, meta(xattrs=xs, fs_uuid=None), "sha256", cfg) == \
        _expected("sha256", order, evm.h_misc(t3, m))


def test_hmac_is_hmac_sha1_with_the_key_padded_to_128_bytes():
    m = meta(xattrs={"security.ima": IMA, "security.capability": CAPS})
    want = hmac.new(KEY.ljust(128, b"\0"),
                    IMA + CAPS + evm.h_misc(evm.EVM_XATTR_HMAC, m) + UUID, "sha1").digest()
    key = evm.HmacKey(KEY)
    assert evm.evm_calc_hmac(key, m) == want
    assert evm.hmac_xattr(key, m) == b"\x02" + want
    # not the same as HMAC with the unpadded key (HMAC hashes a key over 64 bytes)
    assert want != hmac.new(KEY, IMA + CAPS + evm.h_misc(2, m) + UUID, "sha1").digest()


def test_empty_value_counts_as_present():
    m = meta(xattrs={"security.selinux": b""})
    assert evm.evm_calc_hash(3, m) == _expected("sha256", [], evm.h_misc(3, m), UUID)


def test_digest_refusals():
    with pytest.raises(evm.EvmError, match="none of the protected"):
        evm.evm_calc_hash(3, meta(xattrs={"user.x": b"1"}))
    with pytest.raises(evm.EvmError, match="must cover security.ima"):
        evm.evm_calc_hash(5, meta(xattrs={"security.capability": CAPS}))
    with pytest.raises(evm.EvmError, match="UUID is unknown"):
        evm.evm_calc_hash(3, meta(fs_uuid=None))
    evm.evm_calc_hash(5, meta(fs_uuid=None))        # portable: no UUID needed
    with pytest.raises(ValueError):
        evm.evm_calc_hash(2, meta())


@pytest.mark.parametrize("field,value", [("uid", -1), ("uid", 1 << 32), ("mode", 1 << 16),
                                         ("ino", 1 << 64), ("generation", 1 << 32),
                                         ("fs_uuid", b"short"), ("uid", True)])
def test_metadata_checks_its_fields(field, value):
    with pytest.raises(ValueError):
        meta(**{field: value})


def test_collect_reads_every_listed_name():
    asked = []

    def gx(name):
        asked.append(name)
        return {"security.ima": IMA, "security.SMACK64MMAP": b"m"}.get(name)
    st_ = os.stat_result((0o100644, 7, 0, 1, 5, 6, 0, 0, 0, 0))
    m = evm.FileMetadata.collect(gx, st_, generation=9, fs_uuid=UUID)
    assert asked == list(evm.DEFAULT_CONFIG.names)
    assert m.xattrs == {"security.ima": IMA, "security.SMACK64MMAP": b"m"}
    assert (m.ino, m.uid, m.gid, m.mode, m.generation) == (7, 5, 6, 0o100644, 9)


def test_is_protected_only_enabled_names():
    c = evm.DEFAULT_CONFIG
    assert c.is_protected("security.ima") and c.is_protected("security.capability")
    assert not c.is_protected("security.SMACK64EXEC")
    assert not c.is_protected("security.evm") and not c.is_protected("ima")
    assert evm.EvmConfig.with_smack_extras().is_protected("security.SMACK64EXEC")


# --- the HMAC key -----------------------------------------------------------------------


def test_hmac_key_sizes():
    for n in (0, 31, 129):
        with pytest.raises(evm.HmacKeyError, match="32 to 128"):
            evm.HmacKey(b"k" * n)
    assert evm.HmacKey(b"k" * 32) == evm.HmacKey(b"k" * 32)
    assert evm.HmacKey(b"k" * 32) != evm.HmacKey(b"k" * 33)


def test_hmac_key_never_in_repr():
    k = evm.HmacKey(b"S3cr3t-" * 6)
    assert "S3cr3t" not in repr(k) and k.fingerprint.hex() in repr(k)


def test_hmac_key_file(tmp_path):
    p = tmp_path / "evm-key"
    p.write_bytes(KEY)
    p.chmod(0o600)
    assert evm.HmacKey.from_file(str(p)) == evm.HmacKey(KEY)
    p.chmod(0o640)
    with pytest.raises(evm.HmacKeyError, match="group or others"):
        evm.HmacKey.from_file(str(p))
    assert evm.HmacKey.from_file(str(p), check_mode=False) == evm.HmacKey(KEY)
    p.chmod(0o600)
    os.chown(p, 1234, 0)
    with pytest.raises(evm.HmacKeyError, match="uid 1234"):
        evm.HmacKey.from_file(str(p))
    os.chown(p, 0, 0)
    link = tmp_path / "link"
    link.symlink_to(p)
    with pytest.raises(evm.HmacKeyError, match="cannot open"):
        evm.HmacKey.from_file(str(link))
    with pytest.raises(evm.HmacKeyError, match="regular file"):
        evm.HmacKey.from_file(str(tmp_path))
    p.write_bytes(b"x" * 129)
    with pytest.raises(evm.HmacKeyError, match="at most 128"):
        evm.HmacKey.from_file(str(p))
    with pytest.raises(evm.HmacKeyError, match="cannot open"):
        evm.HmacKey.from_file(str(tmp_path / "missing"))


# --- the parser ---------------------------------------------------------------------------


def test_parse_the_three_types():
    h = evm.parse_evm_xattr(b"\x02" + bytes(range(20)))
    assert (h.type, h.digest, h.is_signature) == (2, bytes(range(20)), False)
    sig = b"\x03\x02\x04\x01\x02\x03\x04\x00\x03abc"
    s = evm.parse_evm_xattr(sig)
    assert (s.type, s.algo, s.keyid, s.signature, s.portable) == \
        (3, "sha256", 0x01020304, b"abc", False)
    p = evm.parse_evm_xattr(b"\x05" + sig[1:])
    assert (p.type, p.portable, p.raw) == (5, True, b"\x05" + sig[1:])
    assert "portable" in str(p) and "01020304" in str(p)


@pytest.mark.parametrize("value,offset,words", [
    (b"", 0, "empty"),
    (b"\x02" + bytes(19), 20, "needs 20"),
    (b"\x02" + bytes(32), 21, "unexpected"),
    (b"\x05", 1, "version"),
    (b"\x05\x01\x04" + bytes(6) + b"\x01a", 1, "version 1"),
    (b"\x03\x02\xff" + bytes(6), 2, "unknown hash algorithm"),
    (b"\x05\x02\x04\x00\x00", 5, "header needs 9"),
    (b"\x05\x02\x04" + bytes(4) + b"\x00\x00", 7, "size is 0"),
    (b"\x03\x02\x04" + bytes(4) + b"\x00\x05ab", 11, "truncated"),
    (b"\x03\x02\x04" + bytes(4) + b"\x00\x01ab", 10, "unexpected"),
    (b"\x04\x04" + bytes(32), 0, "belongs in security.ima"),
    (b"\x07", 0, "unknown security.evm type"),
])
def test_malformed_values_refused_with_offset(value, offset, words):
    with pytest.raises(evm.EvmXattrError) as e:
        evm.parse_evm_xattr(value)
    assert e.value.offset == offset, e.value
    assert words in str(e.value) and f"at byte {offset}" in str(e.value)
    if value[:1] == b"\x05":
        assert "0x05 (portable signature)" in str(e.value)
    assert "malformed security.evm" in evm.describe_evm_xattr(value)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_crashes(value):
    try:
        x = evm.parse_evm_xattr(value)
    except evm.EvmXattrError as e:
        assert 0 <= e.offset <= len(value) and e.msg
    else:
        assert x.raw == value and x.type in evm.EVM_TYPES
        assert x.describe()
    assert evm.describe_evm_xattr(value)


@st.composite
def evm_values(draw):
    t = draw(st.sampled_from(evm.EVM_TYPES))
    if t == evm.EVM_XATTR_HMAC:
        return b"\x02" + draw(st.binary(min_size=20, max_size=20))
    algo = draw(st.sampled_from(range(23)))
    sig = draw(st.binary(min_size=1, max_size=600))
    keyid = draw(st.integers(0, 0xFFFFFFFF))
    return struct.pack(">BBBIH", t, 2, algo, keyid, len(sig)) + sig


@settings(max_examples=300, deadline=None)
@given(evm_values(), st.data())
def test_valid_values_parse_and_every_cut_or_extension_is_refused(value, data):
    x = evm.parse_evm_xattr(value)
    assert x.raw == value
    if x.is_signature:
        assert x.keyid == struct.unpack(">I", value[3:7])[0] and x.signature == value[9:]
    cut = data.draw(st.integers(0, len(value) - 1))
    with pytest.raises(evm.EvmXattrError):
        evm.parse_evm_xattr(value[:cut])
    with pytest.raises(evm.EvmXattrError) as e:
        evm.parse_evm_xattr(value + data.draw(st.binary(min_size=1, max_size=8)))
    assert e.value.offset == len(value)


# --- verification: the kernel's statuses -------------------------------------------------


def verify(value, m, *, key=evm.HmacKey(KEY), keyring=None, config=evm.DEFAULT_CONFIG):
    return evm.evm_verify_hmac(value, m, hmac_key=key, keyring=keyring, config=config)


def test_no_security_evm_nolabel_or_noxattrs():
    r = verify(None, meta())
    assert (r.status, r.cause, r.kernel_name, r.audit_name) == \
        ("nolabel", "missing-evm", "INTEGRITY_NOLABEL", "no_label")
    # a listed but disabled xattr counts (evm_find_protected_xattrs counts them all)
    assert verify(None, meta(xattrs={"security.SMACK64MMAP": b"x"})).status == "nolabel"
    r = verify(None, meta(xattrs={}))
    assert (r.status, r.audit_name, r.cause) == ("noxattrs", "no_xattrs",
                                                 "no-protected-xattrs")


def test_not_initialized_is_unknown():
    r = verify(evm.hmac_xattr(evm.HmacKey(KEY), meta()), meta(), key=None, keyring=None)
    assert (r.kernel_name, r.cause) == ("INTEGRITY_UNKNOWN", "evm-not-initialized")


def test_hmac_pass_and_every_covered_change_fails():
    key = evm.HmacKey(KEY)
    m = meta(xattrs={"security.ima": IMA, "security.selinux": b"l\0"})
    v = evm.hmac_xattr(key, m)
    r = verify(v, m, key=key)
    assert r.passed and r.status == "pass" and r.type == 2
    assert str(r).startswith("INTEGRITY_PASS")
    for changed in (replace(m, uid=0), replace(m, gid=0),
                    replace(m, mode=m.mode | stat.S_ISUID), replace(m, ino=1),
                    replace(m, generation=1), replace(m, fs_uuid=bytes(16)),
                    replace(m, xattrs={**m.xattrs, "security.capability": CAPS}),
                    replace(m, xattrs={**m.xattrs, "security.ima": IMA[:-1] + b"\0"}),
                    replace(m, xattrs={"security.ima": IMA})):
        r = verify(v, changed, key=key)
        assert (r.status, r.cause) == ("fail", "invalid-HMAC"), changed
    # not covered: a disabled SMACK xattr, a user xattr
    assert verify(v, replace(m, xattrs={**m.xattrs, "security.SMACK64EXEC": b"x",
                                       "user.a": b"b"}), key=key).passed
    # another key
    assert verify(v, m, key=evm.HmacKey(KEY[::-1])).cause == "invalid-HMAC"


def test_hmac_statuses():
    key = evm.HmacKey(KEY)
    m = meta()
    v = evm.hmac_xattr(key, m)
    assert verify(b"", m).cause == "empty-evm"
    assert verify(v + b"\0", m).cause == "malformed-evm"
    assert verify(v[:-1], m).status == "fail"
    r = verify(v, m, key=None, keyring=Keyring())
    assert (r.status, r.cause) == ("fail", "no-HMAC-key")
    # the kernel computes first: nothing protected is NOXATTRS
    assert verify(v, meta(xattrs={}), key=key).status == "noxattrs"
    assert verify(v, meta(fs_uuid=None), key=key).cause == "unknown-fs-uuid"
    r = verify(b"\x09abc", m)
    assert (r.status, r.cause) == ("fail", "unknown-evm-type")


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_signatures_pass_and_fail(kind):
    priv = tk.key(kind)
    r = ring(priv)
    m = meta()
    portable = evm.sign_evm(priv, kid(priv), m)
    assert portable[:3] == b"\x05\x02\x04" and portable[3:7] == struct.pack(">I", kid(priv))
    res = verify(portable, m, key=None, keyring=r)
    assert (res.status, res.kernel_name, res.keyid, res.algo) == \
        ("pass_immutable", "INTEGRITY_PASS_IMMUTABLE", kid(priv), "sha256")
    # portable: inode, generation and UUID are not covered; owner and mode are
    assert verify(portable, replace(m, ino=5, generation=6, fs_uuid=None), key=None,
                  keyring=r).passed
    res = verify(portable, replace(m, mode=m.mode | stat.S_ISUID), key=None, keyring=r)
    assert (res.status, res.cause) == ("fail_immutable", "invalid-signature")
    # type 3: inode, generation and UUID are covered
    t3 = evm.sign_evm(priv, kid(priv), m, portable=False, algo="sha512")
    assert t3[:3] == b"\x03\x02\x06"
    assert verify(t3, m, key=None, keyring=r).status == "pass"
    for changed in (replace(m, ino=5), replace(m, generation=6),
                    replace(m, fs_uuid=bytes(16)), replace(m, uid=0)):
        res = verify(t3, changed, key=None, keyring=r)
        assert (res.status, res.cause) == ("fail", "invalid-signature")
    # a keyring without the key
    res = verify(portable, m, key=None, keyring=ring(tk.key("ec", 7)))
    assert res.cause == "invalid-signature" and "no key with id" in res.detail


def test_signature_statuses_in_kernel_order():
    priv = tk.key("ec")
    r = ring(priv)
    m = meta()
    good = evm.sign_evm(priv, kid(priv), m)
    # <= 9 bytes: FAIL, not FAIL_IMMUTABLE (the kernel's length check comes first)
    res = verify(good[:9], m, keyring=r)
    assert (res.status, res.cause) == ("fail", "malformed-evm")
    # nothing protected: NOXATTRS, even before a broken signature body
    assert verify(good[:-1], meta(xattrs={}), keyring=r).status == "noxattrs"
    # a portable signature of a file without security.ima
    res = verify(good, meta(xattrs={"security.capability": CAPS}), keyring=r)
    assert (res.status, res.cause) == ("fail_immutable", "portable-without-ima")
    # a truncated body: FAIL_IMMUTABLE with the parser's reason
    res = verify(good[:-1], m, keyring=r)
    assert (res.status, res.cause) == ("fail_immutable", "malformed-evm")
    assert "truncated" in res.detail
    res = verify(b"\x03" + good[1:-1], m, keyring=r)
    assert (res.status, res.cause) == ("fail", "malformed-evm")
    # an algorithm id the kernel does not know
    res = verify(good[:2] + b"\x40" + good[3:], m, keyring=r)
    assert (res.status, res.cause) == ("fail_immutable", "unavailable-hash-algorithm")
    # the type byte is covered: the same signature as a type 3 fails
    res = verify(b"\x03" + good[1:], replace(m, fs_uuid=None), keyring=r,
                 config=evm.EvmConfig(fsuuid=False))
    assert res.status == "fail"


def test_signature_check_uses_the_keyrings_memo():
    priv = tk.key("rsa")
    r = ring(priv)
    from imafs.ima.keys import VerifiedSignatures
    r.verified = VerifiedSignatures()
    m = meta()
    v = evm.sign_evm(priv, kid(priv), m)
    assert verify(v, m, keyring=r).passed
    assert len(r.verified._mem) == 1
    assert verify(v, m, keyring=r).passed


def test_results_feed_ima_appraisal():
    """appraise() takes the EVM status as the kernel's ima_appraise_measurement does."""
    priv = tk.key("ec")
    r = ring(priv)
    m = meta()
    digest = bytes(range(32))
    cases = {
        verify(None, m).status: "missing-HMAC",
        verify(evm.hmac_xattr(evm.HmacKey(KEY[::-1]), m), m).status: "invalid-HMAC",
        verify(evm.sign_evm(priv, kid(priv), m), replace(m, uid=1), keyring=r).status:
            "invalid-fail-immutable",
    }
    for status, cause in cases.items():
        res = ap.appraise(IMA, lambda a: digest, r, require_sig=False, evm_status=status)
        assert (res.status, res.cause) == (status, cause)
    # a valid portable signature over a hash satisfies appraise_type=imasig
    ok = verify(evm.sign_evm(priv, kid(priv), m), m, keyring=r)
    res = ap.appraise(IMA, lambda a: digest, r, require_sig=True, evm_status=ok.status)
    assert res.passed


# --- updates ------------------------------------------------------


def test_update_evmxattr():
    key = evm.HmacKey(KEY)
    m = meta()
    new = evm.evm_update_evmxattr(None, replace(m, mode=0o100700), key)
    assert verify(new, replace(m, mode=0o100700), key=key).passed
    assert evm.evm_update_evmxattr(new, replace(m, xattrs={}), key) is None
    portable = evm.sign_evm(tk.key("ec"), 1, m)
    with pytest.raises(evm.EvmImmutableError):
        evm.evm_update_evmxattr(portable, m, key)
    # a type-3 signature is replaced, as the kernel does after a permitted change
    t3 = evm.sign_evm(tk.key("ec"), 1, m, portable=False)
    assert evm.evm_update_evmxattr(t3, m, key)[0] == evm.EVM_XATTR_HMAC
