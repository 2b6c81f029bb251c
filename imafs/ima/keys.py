"""Keyrings of X.509 certificates, with the kernel's IMA key ids.

Key id
    A ``security.ima`` signature names its key by a 32-bit id: the last 4 bytes of the
    certificate's subjectKeyIdentifier (the kernel looks the key up as ``id:%08x``,
    which matches the tail of the SKID). Without a usable SKID (absent or shorter than
    4 bytes) the id is the last 4 bytes of SHA-1 over the subjectPublicKey bit string,
    which is what ``evmctl`` computes (``calc_keyid_v2``) and what a
    ``subjectKeyIdentifier=hash`` SKID holds anyway.

What a keyring accepts (:meth:`Keyring.add`)
    One X.509 certificate, DER or PEM, that is valid now (notBefore <= now <= notAfter),
    has a keyUsage extension with digitalSignature (Linux 6.4+ restricts the .ima
    keyring to such keys) and an RSA (>= 1024 bits) or ECDSA P-192/P-256/P-384/P-521
    key, the key types the kernel verifies IMA signatures with. Refusals raise
    :class:`KeyringError` (a KeyError) with a one-line reason. No CA chain is checked:
    whoever may write a namespace's ``keys`` file is trusted to add keys.

``list_text()`` format
    One line per key, sorted by key id then fingerprint, fields separated by one space::

        <keyid, 8 hex digits> <algo> <bits> <subject, RFC 4514> <notAfter, YYYY-MM-DDTHH:MM:SSZ>

    ``algo`` is ``rsa`` or ``ecdsa-nist-p256`` / ``-p384`` / ``-p192`` / ``-p521``
    (the kernel's names). The subject may contain spaces; notAfter is the last field.

Persistence
    ``Keyring(store, ns_id)`` loads the namespace's keys from the store's ``keys``
    database and writes every add/remove through, keyed by
    ``ns_id (be32) || keyid (be32) || sha256(cert DER)`` with the DER as value, so keys
    survive a remount. Keys that are no longer valid when loaded stay in the store but
    are not used; they are listed in ``load_errors``.

    ``Keyring(store, ns_id, persist_keys=False)`` is a keyring for one mount only, as
    the kernel's ``.ima`` keyring is for one boot (the root namespace's: its keys come
    from the command line at each mount). It loads no key from the store and deletes
    the namespace's keys stored by earlier mounts (counted in ``purged``), so a
    certificate taken out of ``--keys DIR`` is untrusted at the next mount, and neither
    an older imafs nor a tool reading the state finds it there; keys added later
    (``add``) last as long as the object. The store still keeps its ``epoch``.

``epoch`` changes on every add and remove, and when a per-mount keyring is made (it
is kept in the store's ``meta`` database when there is a store, so it never goes back
across remounts); a verdict cache includes it in its key.

Verified signatures (:class:`VerifiedSignatures`)
    A keyring may carry ``verified``, a memo of the signatures its keys verified:
    ``sha256(key fingerprint || algo || signed digest || signature)``, in memory and in
    an LMDB cache (db ``sigs``), so a remount does not redo the public-key operation for
    a file whose signature was checked before (20-90 us each: RSA-2048 or P-256).
    Only successes are remembered; the key must still be in the keyring to be asked.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import struct
import threading
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

MIN_RSA_BITS = 1024
EC_CURVES = {"secp192r1": "ecdsa-nist-p192", "secp256r1": "ecdsa-nist-p256",
             "secp384r1": "ecdsa-nist-p384", "secp521r1": "ecdsa-nist-p521"}
CERT_SUFFIXES = (".der", ".pem", ".crt", ".x509", ".cer")
KEYS_DB = "keys"


class KeyringError(KeyError):
    """A certificate the keyring refuses; ``str()`` is the plain reason."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.msg = msg

    def __str__(self) -> str:
        return self.msg


# --- key ids ----------------------------------------------------------------------


def _der_item(buf: bytes, off: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER item at ``off``."""
    tag = buf[off]
    n = buf[off + 1]
    off += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[off:off + k], "big")
        off += k
    return tag, off, off + n


def public_key_bits(public_key) -> bytes:
    """The contents of the subjectPublicKey BIT STRING (without the unused-bits byte)."""
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    _, start, _ = _der_item(spki, 0)              # SubjectPublicKeyInfo SEQUENCE
    _, _, alg_end = _der_item(spki, start)         # AlgorithmIdentifier
    tag, bs, be = _der_item(spki, alg_end)        # BIT STRING
    if tag != 0x03:
        raise ValueError("SubjectPublicKeyInfo without a BIT STRING")
    return spki[bs + 1:be]


def keyid_of_public_key(public_key) -> int:
    """evmctl's ``calc_keyid_v2``: last 4 bytes of SHA-1 over the public key bits."""
    return struct.unpack(">I", hashlib.sha1(public_key_bits(public_key)).digest()[-4:])[0]


def keyid_of(cert: x509.Certificate | bytes) -> int:
    """The IMA key id of a certificate (object, DER or PEM)."""
    if not isinstance(cert, x509.Certificate):
        cert = parse_certificate(cert)
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = b""
    except Exception as e:  # noqa: BLE001 - DuplicateExtension etc. are no ValueErrors
        raise KeyringError(f"unparseable certificate extensions: {e}") from None
    if len(ski) >= 4:
        return struct.unpack(">I", ski[-4:])[0]
    try:
        public_key = cert.public_key()
    except Exception as e:  # noqa: BLE001 - unknown algorithms (UnsupportedAlgorithm)
        raise KeyringError(f"unusable public key: {e}") from None
    return keyid_of_public_key(public_key)


# --- certificates -----------------------------------------------------------------


def parse_certificate(data: bytes) -> x509.Certificate:
    """One certificate from DER or PEM bytes, or KeyringError."""
    data = bytes(data)
    if data[:1] != b"\x30" and b"-----BEGIN" in data:    # DER starts with a SEQUENCE
        if b"-----BEGIN CERTIFICATE-----" not in data:
            kinds = sorted({line.strip().decode("ascii", "replace")[11:-5]
                            for line in data.splitlines() if line.startswith(b"-----BEGIN ")})
            raise KeyringError("PEM data holds no CERTIFICATE block"
                               + (f" (found: {', '.join(kinds)})" if kinds else ""))
        try:
            certs = x509.load_pem_x509_certificates(data)
        except Exception as e:  # noqa: BLE001 - ValueError, x509.InvalidVersion, ...
            raise KeyringError(f"unparseable PEM certificate: {e}") from None
        if len(certs) != 1:
            raise KeyringError(f"PEM data holds {len(certs)} certificates; add them one at a time")
        return certs[0]
    try:
        return x509.load_der_x509_certificate(data)
    except Exception as e:  # noqa: BLE001 - ValueError, x509.InvalidVersion (not a ValueError)
        raise KeyringError(f"not an X.509 certificate (DER or PEM): {e}") from None


def _key_kind(public_key) -> tuple[str, int]:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyringError(f"RSA key of {public_key.key_size} bits is too small "
                               f"(minimum {MIN_RSA_BITS})")
        return "rsa", public_key.key_size
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = EC_CURVES.get(public_key.curve.name)
        if name is None:
            raise KeyringError(f"unsupported elliptic curve {public_key.curve.name} "
                               f"(supported: {', '.join(EC_CURVES)})")
        return name, public_key.curve.key_size
    raise KeyringError(f"unsupported key type {type(public_key).__name__.lstrip('_')}: "
                       "IMA signatures use RSA or ECDSA keys")


def _utc(d: _dt.datetime) -> str:
    return d.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class KeyInfo:
    keyid: int
    fingerprint: bytes          # sha256 of the certificate DER
    algo: str                   # "rsa", "ecdsa-nist-p256", ...
    bits: int
    subject: str                # RFC 4514
    not_before: _dt.datetime
    not_after: _dt.datetime
    der: bytes = field(repr=False)
    public_key: object = field(repr=False, compare=False)
    cert: x509.Certificate = field(repr=False, compare=False)

    def line(self) -> str:
        return (f"{self.keyid:08x} {self.algo} {self.bits} {self.subject or '-'} "
                f"{_utc(self.not_after)}")


def check_certificate(cert: x509.Certificate, *, now: _dt.datetime | None = None,
                      require_digsig: bool = True) -> KeyInfo:
    """Validate a certificate for IMA use and describe it, or raise KeyringError."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=_dt.timezone.utc)
    try:
        public_key = cert.public_key()
    except Exception as e:  # unknown algorithms, broken key encodings
        raise KeyringError(f"unusable public key: {e}") from None
    algo, bits = _key_kind(public_key)
    try:
        nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    except Exception as e:  # noqa: BLE001 - times cryptography cannot represent
        raise KeyringError(f"unparseable validity period: {e}") from None
    if now < nb:
        raise KeyringError(f"certificate is not valid yet (notBefore {_utc(nb)})")
    if now > na:
        raise KeyringError(f"certificate has expired (notAfter {_utc(na)})")
    if require_digsig:
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise KeyringError("certificate has no keyUsage extension; IMA keys need "
                               "keyUsage=digitalSignature") from None
        except Exception as e:  # noqa: BLE001 - ValueError, DuplicateExtension, ...
            raise KeyringError(f"unparseable certificate extensions: {e}") from None
        if not ku.digital_signature:
            raise KeyringError("certificate keyUsage lacks digitalSignature")
    try:
        subject = cert.subject.rfc4514_string()
        kid = keyid_of(cert)
    except KeyringError:
        raise
    except Exception as e:  # noqa: BLE001 - ValueError, TypeError (a bad name attribute)
        raise KeyringError(f"unparseable certificate: {e}") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return KeyInfo(keyid=kid, fingerprint=hashlib.sha256(der).digest(), algo=algo,
                   bits=bits, subject=subject, not_before=nb, not_after=na, der=der,
                   public_key=public_key, cert=cert)


# --- the keyring ------------------------------------------------------------------


class VerifiedSignatures:
    """Which (key, algorithm, digest, signature) verified already: a bounded set in
    memory, backed by an LMDB database of a cache store (commits need not be
    synchronous: a lost entry only costs a verification). Thread-safe."""

    MEMORY = 65536

    def __init__(self, store=None):
        self.store = store
        self.db = store.db("sigs") if store is not None else None
        self._mem: set[bytes] = set()
        self._lock = threading.Lock()

    @staticmethod
    def _key(fingerprint: bytes, algo: str, digest: bytes, signature: bytes) -> bytes:
        h = hashlib.sha256(fingerprint)
        h.update(algo.encode() + b"\0")
        h.update(struct.pack(">H", len(digest)) + digest)
        h.update(signature)
        return h.digest()

    def known(self, fingerprint: bytes, algo: str, digest: bytes, signature: bytes) -> bool:
        k = self._key(fingerprint, algo, digest, signature)
        if k in self._mem:
            return True
        if self.db is None:
            return False
        try:
            with self.store.env.begin(db=self.db) as txn:
                hit = txn.get(k) is not None
        except Exception:  # noqa: BLE001 - a cache: verify instead
            return False
        if hit:
            self._remember(k)
        return hit

    def add(self, fingerprint: bytes, algo: str, digest: bytes, signature: bytes) -> None:
        k = self._key(fingerprint, algo, digest, signature)
        self._remember(k)
        if self.db is None:
            return
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                txn.put(k, b"")
        except Exception:  # noqa: BLE001 - a full cache disk only costs a verification
            pass

    def _remember(self, k: bytes) -> None:
        with self._lock:
            if len(self._mem) >= self.MEMORY:
                self._mem.clear()
            self._mem.add(k)



class Keyring:
    """The keys of one namespace. Thread-safe."""

    def __init__(self, store=None, ns_id: int = 0, *, require_digsig: bool = True,
                 persist_keys: bool = True):
        if not 0 <= ns_id <= 0xFFFFFFFF:
            raise ValueError(f"namespace id {ns_id} does not fit in 32 bits")
        self.store = store
        self.ns_id = ns_id
        self.require_digsig = require_digsig
        self.persist_keys = bool(persist_keys)
        self.purged = 0         # stored keys of earlier mounts a per-mount keyring deleted
        self._lock = threading.RLock()
        self._keys: dict[bytes, KeyInfo] = {}      # fingerprint -> key
        self._by_id: dict[int, list[KeyInfo]] = {}
        self._epoch = 0
        self.load_errors: list[tuple[str, str]] = []   # (fingerprint hex, reason)
        self.verified: VerifiedSignatures | None = None  # memo of verified signatures
        if store is not None:
            if self.persist_keys:
                self._load_from_store()
            else:
                self._start_per_mount()

    # -- state
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def persistent(self) -> bool:
        """Whether keys are written to the store (and come back at a remount)."""
        return self.store is not None and self.persist_keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        with self._lock:
            keys = sorted(self._keys.values(), key=lambda k: (k.keyid, k.fingerprint))
        return iter(keys)

    def __contains__(self, keyid: int) -> bool:
        return bool(self._by_id.get(keyid))

    def lookup(self, keyid: int) -> list[KeyInfo]:
        """Every key with this id (ids are 32 bits, so collisions are possible)."""
        with self._lock:
            return list(self._by_id.get(keyid, ()))

    def list_text(self) -> str:
        return "".join(k.line() + "\n" for k in self)

    # -- changes
    def add(self, data: bytes, *, now: _dt.datetime | None = None) -> KeyInfo:
        """Add one certificate (DER or PEM). Adding a certificate already present returns
        the existing entry and leaves the epoch alone."""
        info = check_certificate(parse_certificate(data), now=now,
                                 require_digsig=self.require_digsig)
        with self._lock:
            old = self._keys.get(info.fingerprint)
            if old is not None:
                return old
            if self.store is not None:
                kdb, mdb = self._dbs()
                with self.store.write() as txn:
                    if self.persist_keys:
                        txn.put(self._store_key(info), info.der, db=kdb)
                    self._bump(txn, mdb)
            else:
                self._epoch += 1
            self._insert(info)
        return info

    def remove(self, keyid: int, fingerprint: bytes | None = None) -> int:
        """Remove the keys with this id (only the one with this sha256 fingerprint when
        given), from memory and, for a persistent keyring, from the store. Returns how
        many were removed (0: nothing matched, the epoch is unchanged); otherwise the
        epoch moves on, so verdicts that relied on the key are derived again."""
        with self._lock:
            victims = [k for k in self._by_id.get(keyid, ())
                       if fingerprint is None or k.fingerprint == fingerprint]
            if not victims:
                return 0
            if self.store is not None:
                kdb, mdb = self._dbs()
                with self.store.write() as txn:
                    if self.persist_keys:
                        for k in victims:
                            txn.delete(self._store_key(k), db=kdb)
                    self._bump(txn, mdb)
            else:
                self._epoch += 1
            for k in victims:
                del self._keys[k.fingerprint]
                lst = self._by_id[keyid]
                lst.remove(k)
                if not lst:
                    del self._by_id[keyid]
            return len(victims)

    def load_dir(self, path: str, *, now: _dt.datetime | None = None
                 ) -> tuple[list[KeyInfo], list[tuple[str, str]]]:
        """Add every certificate file (*.der, *.pem, *.crt, *.x509, *.cer) of a
        directory, in name order. PEM bundles are split; PEM files holding only a
        private key (a ``keygen`` directory) are skipped silently.
        Returns (keys added or already present, [(file, reason) refused])."""
        loaded: list[KeyInfo] = []
        refused: list[tuple[str, str]] = []
        for name in sorted(os.listdir(path)):
            if not name.lower().endswith(CERT_SUFFIXES):
                continue
            fp = os.path.join(path, name)
            if not os.path.isfile(fp):
                continue
            try:
                with open(fp, "rb") as f:
                    data = f.read(1 << 20)
            except OSError as e:
                refused.append((fp, e.strerror or str(e)))
                continue
            for blob in _split_pem(data):
                if blob is None:
                    break
                try:
                    loaded.append(self.add(blob, now=now))
                except KeyringError as e:
                    refused.append((fp, str(e)))
        return loaded, refused

    def persist(self) -> int:
        """Write every in-memory key to the store (keys added before a store was
        attached); returns the number written (0 for a per-mount keyring, whose keys
        are never stored)."""
        if self.store is None:
            raise ValueError("this keyring has no store")
        if not self.persist_keys:
            return 0
        kdb, _ = self._dbs()
        with self._lock, self.store.write() as txn:
            for k in self._keys.values():
                txn.put(self._store_key(k), k.der, db=kdb)
            return len(self._keys)

    # -- internals
    def _insert(self, info: KeyInfo) -> None:
        self._keys[info.fingerprint] = info
        self._by_id.setdefault(info.keyid, []).append(info)

    def _store_key(self, info: KeyInfo) -> bytes:
        return struct.pack(">II", self.ns_id, info.keyid) + info.fingerprint

    def _epoch_key(self) -> bytes:
        return b"keys-epoch:" + struct.pack(">I", self.ns_id)

    def _dbs(self):
        # open (or look up) the handles before a write transaction: opening a database
        # inside one would start a second write transaction and wait for ourselves
        return self.store.db(KEYS_DB), self.store.db("meta")

    def _bump(self, txn, meta_db) -> None:
        self._epoch += 1
        txn.put(self._epoch_key(), struct.pack(">Q", self._epoch), db=meta_db)

    def _start_per_mount(self) -> None:
        """A per-mount keyring: the stored epoch, moved on; the namespace's stored keys
        (from mounts before per-mount root keyrings, or a downgrade) deleted."""
        prefix = struct.pack(">I", self.ns_id)
        dbs = self._stored_dbs()
        if dbs is None:
            return
        db, mdb = dbs
        if self.store.env.flags().get("readonly"):
            with self.store.begin() as txn:
                self._epoch = self._stored_epoch(txn, mdb)
            return
        with self.store.write() as txn:
            self._epoch = self._stored_epoch(txn, mdb)
            stale = []
            with txn.cursor(db=db) as cur:
                if cur.set_range(prefix):
                    for k in cur.iternext(values=False):
                        if not k.startswith(prefix):
                            break
                        stale.append(bytes(k))
            for k in stale:
                txn.delete(k, db=db)
            self.purged = len(stale)
            self._bump(txn, mdb)

    def _stored_epoch(self, txn, mdb) -> int:
        raw = txn.get(self._epoch_key(), db=mdb)
        return struct.unpack(">Q", raw)[0] if raw and len(raw) == 8 else 0

    def _stored_dbs(self):
        """(keys db, meta db), or None for a read-only state directory that never had
        keys (the databases cannot be created there)."""
        try:
            return self._dbs()
        except Exception:
            if self.store.env.flags().get("readonly"):
                return None
            raise

    def _load_from_store(self) -> None:
        prefix = struct.pack(">I", self.ns_id)
        dbs = self._stored_dbs()
        if dbs is None:
            return
        db, mdb = dbs
        with self.store.begin() as txn:
            self._epoch = self._stored_epoch(txn, mdb)
            cur = txn.cursor(db=db)
            entries = []
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    entries.append((bytes(k), bytes(v)))
        for k, der in entries:
            try:
                info = check_certificate(parse_certificate(der),
                                         require_digsig=self.require_digsig)
            except KeyringError as e:
                self.load_errors.append((k[8:].hex(), str(e)))
                continue
            self._insert(info)


def _split_pem(data: bytes):
    """The certificates of a file: the DER itself, each PEM CERTIFICATE block, or a
    single None for a PEM file without certificates but with a private key."""
    if b"-----BEGIN" not in data:
        yield data
        return
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    if begin not in data and b"PRIVATE KEY-----" in data:
        yield None
        return
    if data.count(begin) <= 1:
        yield data
        return
    pos = 0
    while True:
        i = data.find(begin, pos)
        if i < 0:
            return
        j = data.find(end, i)
        if j < 0:
            yield data[i:]
            return
        yield data[i:j + len(end)] + b"\n"
        pos = j + len(end)
