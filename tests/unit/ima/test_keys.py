"""Key ids and keyrings (imafs.ima.keys)."""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from imafs.ima import keys as km
from imafs.store import Store

from helpers import testkeys as tk


LINE = re.compile(r"^([0-9a-f]{8}) (rsa|ecdsa-nist-p\d+) (\d+) (.+) "
                  r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$")


# --- key ids ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_keyid_is_the_tail_of_the_ski(kind):
    c = tk.cert(tk.key(kind), ski=b"\x01\x02\x03\x04\x05\x06\xde\xad\xbe\xef")
    assert km.keyid_of(c) == 0xDEADBEEF
    assert km.keyid_of(tk.der(c)) == 0xDEADBEEF and km.keyid_of(tk.pem(c)) == 0xDEADBEEF


def test_public_key_bits():
    rsa_pub = tk.key("rsa").public_key()
    assert km.public_key_bits(rsa_pub) == rsa_pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    ec_pub = tk.key("ec").public_key()
    assert km.public_key_bits(ec_pub) == ec_pub.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_keyid_without_ski_is_evmctls_calc_keyid_v2(kind):
    pub = tk.key(kind).public_key()
    want = struct.unpack(">I", hashlib.sha1(km.public_key_bits(pub)).digest()[-4:])[0]
    assert km.keyid_of_public_key(pub) == want
    assert km.keyid_of(tk.cert(tk.key(kind), ski=False)) == want
    assert km.keyid_of(tk.cert(tk.key(kind), ski=b"\x01\x02")) == want   # too short
    # subjectKeyIdentifier=hash holds the same SHA-1, so both agree
    assert km.keyid_of(tk.cert(tk.key(kind))) == want


# --- adding keys -----------------------------------------------------------------
@pytest.mark.parametrize("kind, algo, bits", [("rsa", "rsa", 2048),
                                              ("ec", "ecdsa-nist-p256", 256),
                                              ("p384", "ecdsa-nist-p384", 384)])
def test_add_describes_the_key(kind, algo, bits):
    ring = km.Keyring()
    c = tk.cert(tk.key(kind), cn="Build key")
    info = ring.add(tk.der(c))
    assert (info.algo, info.bits, info.subject) == (algo, bits, "CN=Build key")
    assert info.keyid == km.keyid_of(c)
    assert info.fingerprint == hashlib.sha256(tk.der(c)).digest()
    assert info.der == tk.der(c)
    assert ring.lookup(info.keyid) == [info] and info.keyid in ring and len(ring) == 1
    assert ring.lookup(info.keyid ^ 1) == []
    m = LINE.match(ring.list_text().rstrip("\n"))
    assert m and m.group(1) == f"{info.keyid:08x}" and m.group(2) == algo
    assert m.group(4) == "CN=Build key"
    assert m.group(5) == info.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_add_pem_and_duplicates_keep_the_epoch():
    ring = km.Keyring()
    c = tk.cert(tk.key("ec"))
    assert ring.epoch == 0
    a = ring.add(tk.pem(c))
    assert ring.epoch == 1
    assert ring.add(tk.der(c)) is a and ring.epoch == 1


def _refusal(data, **kw):
    with pytest.raises(km.KeyringError) as ei:
        km.Keyring().add(data, **kw)
    assert isinstance(ei.value, KeyError)
    assert "\n" not in str(ei.value) and not str(ei.value).startswith("'")
    return str(ei.value)


def test_refusals():
    now = tk.NOW
    k = tk.key("rsa")
    assert "expired" in _refusal(tk.der(tk.cert(k, not_after=now - dt.timedelta(hours=1))))
    assert "not valid yet" in _refusal(
        tk.der(tk.cert(k, not_before=now + dt.timedelta(days=1))))
    assert "no keyUsage" in _refusal(tk.der(tk.cert(k, digsig=None)))
    assert "lacks digitalSignature" in _refusal(tk.der(tk.cert(k, digsig=False)))
    assert "not an X.509 certificate" in _refusal(b"\x30\x03garbage")
    assert "not an X.509 certificate" in _refusal(b"")
    assert "no CERTIFICATE block (found: PRIVATE KEY)" in _refusal(tk.key_pem(k))
    assert "holds 2 certificates" in _refusal(tk.pem(tk.cert(k)) + tk.pem(tk.cert(k)))
    assert "unparseable PEM" in _refusal(b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                         b"-----END CERTIFICATE-----\n")
    assert "unsupported elliptic curve secp256k1" in _refusal(tk.der(tk.cert(tk.key("k1"))))
    ed = ed25519.Ed25519PrivateKey.generate()
    assert "unsupported key type Ed25519" in _refusal(tk.der(tk.cert(ed, signer=k)))


def test_validity_is_checked_at_the_given_time():
    c = tk.der(tk.cert(tk.key("rsa")))
    later = tk.NOW + dt.timedelta(days=365)
    assert "expired" in _refusal(c, now=later)
    assert km.Keyring().add(c, now=tk.NOW.replace(tzinfo=None))  # naive means UTC


def test_digital_signature_check_can_be_relaxed():
    c = tk.der(tk.cert(tk.key("rsa"), digsig=None))
    assert km.Keyring(require_digsig=False).add(c).algo == "rsa"


# --- lookup, removal, collisions ---------------------------------------------------
def test_collisions_and_removal():
    ring = km.Keyring()
    same = b"\x99" * 16 + b"\x12\x34\x56\x78"
    a = ring.add(tk.der(tk.cert(tk.key("rsa"), ski=same)))
    b = ring.add(tk.der(tk.cert(tk.key("ec"), ski=same)))
    assert a.keyid == b.keyid == 0x12345678
    assert {k.fingerprint for k in ring.lookup(0x12345678)} == {a.fingerprint, b.fingerprint}
    assert len(ring.list_text().splitlines()) == 2
    e = ring.epoch
    assert ring.remove(0x12345678, b.fingerprint) == 1 and ring.epoch == e + 1
    assert ring.lookup(0x12345678) == [a]
    assert ring.remove(0xFFFFFFFF) == 0 and ring.epoch == e + 1
    assert ring.remove(0x12345678) == 1 and ring.epoch == e + 2
    assert len(ring) == 0 and ring.list_text() == ""


# --- load_dir ----------------------------------------------------------------------
def test_load_dir(tmp_path):
    r, e, p = tk.cert(tk.key("rsa")), tk.cert(tk.key("ec")), tk.cert(tk.key("p384"))
    (tmp_path / "a.der").write_bytes(tk.der(r))
    (tmp_path / "b.pem").write_bytes(tk.pem(e))
    (tmp_path / "c.crt").write_bytes(tk.pem(r))                     # duplicate of a.der
    (tmp_path / "d.x509").write_bytes(tk.pem(p) + tk.pem(e))        # a bundle
    (tmp_path / "signing_key.pem").write_bytes(tk.key_pem(tk.key("rsa")))  # skipped
    (tmp_path / "e.der").write_bytes(b"junk")
    (tmp_path / "f.der").write_bytes(tk.der(tk.cert(tk.key("rsa", 1), digsig=False)))
    (tmp_path / "notes.txt").write_bytes(b"ignored")
    (tmp_path / "sub.pem").mkdir()
    ring = km.Keyring()
    loaded, refused = ring.load_dir(str(tmp_path))
    assert len(ring) == 3 and len(loaded) == 5
    assert [(p_.rsplit("/", 1)[1], why.split(" ")[0]) for p_, why in refused] == \
        [("e.der", "not"), ("f.der", "certificate")]


# --- persistence -------------------------------------------------------------------
def test_keys_survive_a_remount(tmp_path):
    state = str(tmp_path / "state")
    store = Store(state, sync=False)
    ring = km.Keyring(store, ns_id=7)
    a = ring.add(tk.der(tk.cert(tk.key("rsa"))))
    b = ring.add(tk.der(tk.cert(tk.key("ec"))))
    km.Keyring(store, ns_id=8).add(tk.der(tk.cert(tk.key("p384"))))
    ring.remove(b.keyid)
    epoch = ring.epoch
    with store.begin(db="keys") as txn:
        assert txn.get(struct.pack(">II", 7, a.keyid) + a.fingerprint) == a.der
        assert txn.get(struct.pack(">II", 7, b.keyid) + b.fingerprint) is None
    store.close()

    store = Store(state, sync=False)
    again = km.Keyring(store, ns_id=7)
    assert [k.fingerprint for k in again] == [a.fingerprint]
    assert again.epoch == epoch and again.persistent
    again.add(tk.der(tk.cert(tk.key("ec"))))
    assert again.epoch == epoch + 1
    assert len(km.Keyring(store, ns_id=8)) == 1 and len(km.Keyring(store, ns_id=9)) == 0
    store.close()


def test_expired_stored_keys_are_not_loaded(tmp_path):
    store = Store(str(tmp_path), sync=False)
    old = tk.cert(tk.key("rsa"), not_before=tk.NOW - dt.timedelta(days=10),
                  not_after=tk.NOW - dt.timedelta(days=5))
    km.Keyring(store).add(tk.der(old), now=tk.NOW - dt.timedelta(days=7))
    ring = km.Keyring(store)
    assert len(ring) == 0
    assert len(ring.load_errors) == 1 and "expired" in ring.load_errors[0][1]
    store.close()


def test_persist_writes_keys_added_before(tmp_path):
    ring = km.Keyring()
    ring.add(tk.der(tk.cert(tk.key("rsa"))))
    with pytest.raises(ValueError):
        ring.persist()
    store = Store(str(tmp_path), sync=False)
    ring.store = store
    assert ring.persist() == 1
    assert len(km.Keyring(store)) == 1
    store.close()


def test_read_only_store_without_keys(tmp_path):
    Store(str(tmp_path), sync=False).close()
    store = Store(str(tmp_path), readonly=True)
    assert len(km.Keyring(store)) == 0
    store.close()


def test_pem_with_leading_text():
    c = tk.cert(tk.key("ec"))
    text = b"Certificate:\n" + b"    some openssl -text output\n" * 300 + tk.pem(c)
    assert km.Keyring().add(text).fingerprint == hashlib.sha256(tk.der(c)).digest()


# --- the root namespace's keyring: per mount ------------------------------------------
def _stored(store, ns_id):
    prefix = struct.pack(">I", ns_id)
    with store.begin(db="keys") as txn:
        return [bytes(k) for k, _ in txn.cursor() if bytes(k).startswith(prefix)]


def test_per_mount_keyring_forgets_and_deletes_stored_keys(tmp_path):
    """persist_keys=False (the root namespace's keyring): nothing is loaded from the
    store, keys stored by earlier mounts are deleted, nothing added is stored, and the
    epoch still only moves forward, across remounts too."""
    store = Store(str(tmp_path), sync=False)
    old = km.Keyring(store, 0)                       # as earlier mounts stored them
    a = old.add(tk.der(tk.cert(tk.key("rsa"))))
    old.add(tk.der(tk.cert(tk.key("ec"))))
    child = km.Keyring(store, 5)
    c = child.add(tk.der(tk.cert(tk.key("p384"))))
    e0 = old.epoch
    assert len(_stored(store, 0)) == 2

    ring = km.Keyring(store, 0, persist_keys=False)
    assert len(ring) == 0 and ring.lookup(a.keyid) == [] and ring.purged == 2
    assert not ring.persistent and ring.epoch > e0
    assert _stored(store, 0) == []
    assert [k.fingerprint for k in km.Keyring(store, 5)] == [c.fingerprint]   # untouched
    e1 = ring.epoch
    b = ring.add(tk.der(tk.cert(tk.key("ec", 1))))
    assert ring.lookup(b.keyid) == [b] and ring.epoch == e1 + 1
    assert _stored(store, 0) == [] and ring.persist() == 0
    assert ring.remove(b.keyid) == 1 and ring.epoch == e1 + 2 and len(ring) == 0
    e2 = ring.epoch
    store.close()

    store = Store(str(tmp_path), sync=False)
    again = km.Keyring(store, 0, persist_keys=False)          # the next mount
    assert len(again) == 0 and again.purged == 0 and again.epoch > e2
    # a persistent keyring of the same namespace (an older imafs) finds nothing either
    assert len(km.Keyring(store, 0)) == 0
    store.close()


def test_per_mount_keyring_on_a_read_only_store(tmp_path):
    store = Store(str(tmp_path), sync=False)
    km.Keyring(store, 0).add(tk.der(tk.cert(tk.key("rsa"))))
    epoch = km.Keyring(store, 0).epoch
    store.close()
    store = Store(str(tmp_path), readonly=True)
    ring = km.Keyring(store, 0, persist_keys=False)
    assert len(ring) == 0 and ring.epoch == epoch and ring.purged == 0
    store.close()
    Store(str(tmp_path / "empty"), sync=False).close()
    store = Store(str(tmp_path / "empty"), readonly=True)
    assert len(km.Keyring(store, 0, persist_keys=False)) == 0
    store.close()


# --- removal (the keys control file's ``remove KEYID``) --------------------------------
@pytest.mark.parametrize("persist", [True, False])
def test_remove_by_id_and_fingerprint_through_a_store(tmp_path, persist):
    store = Store(str(tmp_path), sync=False)
    ring = km.Keyring(store, 3, persist_keys=persist)
    same = b"\x42" * 16 + b"\xca\xfe\xf0\x0d"
    a = ring.add(tk.der(tk.cert(tk.key("rsa"), ski=same)))
    b = ring.add(tk.der(tk.cert(tk.key("ec"), ski=same)))
    c = ring.add(tk.der(tk.cert(tk.key("p384"))))
    e = ring.epoch
    assert ring.remove(0xCAFEF00D, b"\x00" * 32) == 0 and ring.epoch == e   # no such key
    assert ring.remove(c.keyid ^ 1 if c.keyid ^ 1 != 0xCAFEF00D else 1) == 0
    assert ring.remove(0xCAFEF00D, a.fingerprint) == 1 and ring.epoch == e + 1
    assert ring.lookup(0xCAFEF00D) == [b] and 0xCAFEF00D in ring
    assert ring.remove(0xCAFEF00D) == 1 and ring.epoch == e + 2
    assert 0xCAFEF00D not in ring and [k.keyid for k in ring] == [c.keyid]
    assert ring.list_text().startswith(f"{c.keyid:08x} ecdsa-nist-p384 384 ")
    store.close()
    store = Store(str(tmp_path), sync=False)
    again = km.Keyring(store, 3)
    assert [k.fingerprint for k in again] == ([c.fingerprint] if persist else [])
    assert again.epoch == e + 2
    store.close()
