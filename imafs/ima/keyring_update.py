"""What a write to a namespace's ``keys`` file asks for, and applying it to the keyring
all at once: the certificate input and the keyring transaction of one open (the
control file itself -- who may write, errors, log and audit lines -- is
ima/securityfs_write.py; the keyring, one certificate's parsing and checks: keys.py).

Input (:func:`key_items`)
    Certificates in DER (several in a row, each cut by its length header; at most
    ``MAX_KEY_BYTES`` each) or PEM (a bundle of several, also after text as ``openssl
    x509 -text`` prints it); lines ``/PATH`` (a certificate file inside the mount, which
    may hold several); lines ``remove KEYID [SHA256]``. Bytes arrive in pieces (the
    kernel cuts a large ``write(2)``, shells write line by line): an item cut across
    writes is taken once it is complete, what is still incomplete at the end is refused.

Transaction (:class:`KeyringUpdate`)
    Each item is checked as it comes, against the keyring as the open's earlier items
    leave it (:meth:`KeyringUpdate.stage`); at close everything is checked again against
    the keyring as it is then and applied, all of it or nothing: a store failure half-way
    undoes what was applied (:meth:`KeyringUpdate.commit`). Refusals are
    :class:`KeyInput` with the message the keys file reports and its errno.
"""
from __future__ import annotations

import errno
import os
from typing import Callable

from imafs.ima.keys import KeyInfo, Keyring, KeyringError, check_certificate, parse_certificate

MAX_KEY_BYTES = 64 * 1024       # one certificate (or an unfinished one waiting for more)
MAX_KEYS_WRITE = 1 << 20        # what one open of keys may write (FUSE's largest write)
NOTHING = "; nothing written through this open is applied"
_PEM_BEGIN, _PEM_END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
_SPACE = b" \t\r\n\v\f"


class KeyInput(ValueError):
    """Bytes written to keys that are no certificate, path or command, or a change the
    keyring refuses; ``errno`` is how the write (or close) fails."""

    def __init__(self, msg: str, err: int = errno.EINVAL):
        super().__init__(msg)
        self.errno = err


# --------------------------------------------------------------------------- input

def key_items(data: bytes, final: bool, *, commands: bool = True):
    """Cut what was written to keys into items: ("cert", DER or PEM bytes), ("path",
    bytes) and ("remove", (keyid, sha256 fingerprint or None)); returns (items, the
    incomplete rest). ``final``: nothing more will come (close), so an incomplete item
    is an error; ``commands``: path and remove lines are allowed (not in a file)."""
    items = []
    pos, n = 0, len(data)
    while True:
        while pos < n and data[pos] in _SPACE:
            pos += 1
        if pos >= n:
            return items, b""
        c = data[pos]
        if c == 0x30:                                  # DER: a SEQUENCE
            total = der_total(data, pos)
            if total is not None and total > MAX_KEY_BYTES:
                raise KeyInput(f"a DER certificate of {total} bytes (at most "
                               f"{MAX_KEY_BYTES})", errno.EFBIG)
            if total is None or pos + total > n:
                if final:
                    have = n - pos
                    raise KeyInput("truncated DER certificate" +
                                   (f" ({have} of {total} bytes)" if total else ""))
                return items, data[pos:]
            items.append(("cert", data[pos:pos + total]))
            pos += total
            continue
        if commands and (c == 0x2F or (data.startswith(b"remove", pos) and (
                pos + 6 == n or data[pos + 6] in _SPACE))):
            nl = data.find(b"\n", pos)
            if nl < 0 and not final:
                return items, data[pos:]
            line = data[pos:nl if nl >= 0 else n].strip()
            pos = nl + 1 if nl >= 0 else n
            items.append(("path", line) if c == 0x2F else ("remove", parse_remove(line)))
            continue
        # PEM, maybe after text (``openssl x509 -text``) or other PEM blocks
        b = data.find(_PEM_BEGIN, pos)
        if b < 0:
            rest = data[pos:]
            if b"-----END " in rest or final or b"\n" in rest or not _texty(rest):
                kinds = sorted({ln.strip()[11:-5].decode("ascii", "replace")
                                for ln in rest.splitlines() if ln.startswith(b"-----BEGIN ")})
                if kinds:
                    raise KeyInput(f"PEM data holds no CERTIFICATE block (found: "
                                   f"{', '.join(kinds)})")
                raise KeyInput("expected a DER or PEM certificate" +
                               (", the path of one, or 'remove KEYID [SHA256]'"
                                if commands else ""))
            return items, rest
        e = data.find(_PEM_END, b)
        if e < 0:
            if final:
                raise KeyInput("incomplete PEM certificate (no END CERTIFICATE line)")
            return items, data[pos:]
        stop = e + len(_PEM_END)
        items.append(("cert", data[b:stop] + b"\n"))
        pos = stop


def _texty(data: bytes) -> bool:
    """Printable ASCII and white space only (text that a PEM block may follow)."""
    return all(32 <= c < 127 or c in _SPACE for c in data)


def parse_remove(line: bytes) -> tuple[int, bytes | None]:
    """``remove KEYID [SHA256]``: the key id as the keys file prints it (8 hex digits),
    optionally the sha256 fingerprint of the certificate (64 hex digits, colons
    allowed, as ``openssl x509 -fingerprint -sha256`` prints it)."""
    words = line.split()
    usage = "expected 'remove KEYID [SHA256]' (KEYID: 8 hex digits, SHA256: 64)"
    if len(words) not in (2, 3) or words[0] != b"remove":
        raise KeyInput(usage)
    kid = words[1].lower()
    if kid.startswith(b"id:"):
        kid = kid[3:]
    if len(kid) != 8 or any(ch not in b"0123456789abcdef" for ch in kid):
        raise KeyInput(f"remove: bad key id {words[1].decode('ascii', 'replace')!r}; "
                       + usage)
    fp = None
    if len(words) == 3:
        raw = words[2].lower().replace(b":", b"")
        if raw.startswith(b"sha256="):
            raw = raw[7:]
        if len(raw) != 64 or any(ch not in b"0123456789abcdef" for ch in raw):
            raise KeyInput(f"remove: bad sha256 fingerprint "
                           f"{words[2].decode('ascii', 'replace')!r}; " + usage)
        fp = bytes.fromhex(raw.decode())
    return int(kid, 16), fp


def der_total(data: bytes, pos: int = 0) -> int | None:
    """Total length of the DER element at data[pos:] (None while its header is not
    all there yet); KeyInput for a length no certificate has."""
    if len(data) < pos + 2:
        return None
    first = data[pos + 1]
    if first < 0x80:        # short form: under 128 bytes, no certificate is that small
        raise KeyInput(f"not a DER certificate (an element of {first} bytes)")
    k = first & 0x7F
    if k == 0 or k > 4:
        raise KeyInput("not a DER certificate (bad length in its header)")
    if len(data) < pos + 2 + k:
        return None
    return 2 + k + int.from_bytes(data[pos + 2:pos + 2 + k], "big")


def certs_of_file(path: str, data: bytes) -> list[tuple[bytes, str]]:
    """The certificates of a file named in a keys write (DER, several DER, PEM or a
    PEM bundle), each with where it came from; refusals (EINVAL) name the file."""
    try:
        items, _ = key_items(data, True, commands=False)
    except KeyInput as e:
        raise KeyInput(f"{path}: {e}") from None
    if not items:
        raise KeyInput(f"{path}: no certificate in it")
    if len(items) == 1:
        return [(items[0][1], f" ({path})")]
    return [(v, f" ({path}, certificate {i} of {len(items)})")
            for i, (_, v) in enumerate(items, 1)]


# --------------------------------------------------------------------------- changes

class KeyringUpdate:
    """The changes one open of a namespace's keys file makes: ``ops`` is a list of
    ("add", KeyInfo) and ("remove", keyid, sha256 fingerprint or None), checked as they
    come and applied together by :meth:`commit`."""

    def __init__(self, ring: Keyring, ns_path: str):
        self.ring = ring
        self.ns_path = ns_path
        self.ops: list[tuple] = []

    def __bool__(self) -> bool:
        return bool(self.ops)

    def clear(self) -> None:
        self.ops.clear()

    def stage(self, items, read_file: Callable[[str], bytes]) -> None:
        """Check the items one write completed (``read_file(path)``: a ``/PATH`` item's
        bytes, or OSError); they join the open's changes. KeyInput when the keyring
        would refuse one, a path cannot be read, or a key to remove is not there."""
        certs = sum(1 for kind, _ in items if kind == "cert")
        ops = []
        several = len(items) > 1 or bool(self.ops)
        n = 0
        for kind, val in items:
            if kind == "remove":
                ops.append(("remove", val[0], val[1]))
                continue
            if kind == "cert":
                n += 1
                blobs = [(val, f" (certificate {n} of {certs} in this write)"
                          if certs > 1 else "")]
            else:
                path = os.fsdecode(val)
                try:
                    data = read_file(path)
                except OSError as e:
                    raise KeyInput(f"{path}: {e.strerror}") from None
                blobs = certs_of_file(path, data)
                several = several or len(blobs) > 1
            for blob, where in blobs:
                try:
                    info = check_certificate(parse_certificate(blob),
                                             require_digsig=self.ring.require_digsig)
                except (KeyringError, ValueError) as e:
                    raise KeyInput(f"{e}{where}" + (NOTHING if several else "")) from None
                ops.append(("add", info))
        try:
            self.present(self.ops + ops)
        except KeyInput as e:
            raise KeyInput(str(e) + (NOTHING if several else "")) from None
        self.ops.extend(ops)

    def present(self, ops) -> dict[bytes, KeyInfo]:
        """The namespace's keys (fingerprint -> KeyInfo) once ``ops`` are applied; a
        removal that finds nothing to remove is a KeyInput."""
        present = {k.fingerprint: k for k in self.ring}
        for op in ops:
            if op[0] == "add":
                present[op[1].fingerprint] = op[1]
            else:
                _, keyid, fp = op
                victims = [k for k in present.values() if k.keyid == keyid
                           and (fp is None or k.fingerprint == fp)]
                if not victims:
                    what = f"{keyid:08x}" + (f" with sha256 {fp.hex()}" if fp else "")
                    raise KeyInput(f"remove {what}: no such key in namespace {self.ns_path}")
                for k in victims:
                    del present[k.fingerprint]
        return present

    def commit(self) -> list[tuple]:
        """Apply the open's changes together (the caller holds the lock that keeps
        other opens of this keyring's file out), checked again against the keyring as
        it is now; returns what changed: ("add", KeyInfo) and ("remove", [KeyInfo]).
        A store failure half-way is undone: KeyInput(EIO), the keyring as it was."""
        ops, self.ops = self.ops, []
        if not ops:
            return []
        ring = self.ring
        try:
            self.present(ops)
        except KeyInput as e:      # another open removed it meanwhile
            raise KeyInput(f"{e}" + (NOTHING if len(ops) > 1 else "")) from None
        done: list[tuple] = []
        try:
            for op in ops:
                if op[0] == "add":
                    info = op[1]
                    new = all(k.fingerprint != info.fingerprint
                              for k in ring.lookup(info.keyid))
                    ring.add(info.der)
                    if new:
                        done.append(("add", info))
                else:
                    _, keyid, fp = op
                    gone = [k for k in ring.lookup(keyid)
                            if fp is None or k.fingerprint == fp]
                    if gone:
                        ring.remove(keyid, fp)
                        done.append(("remove", gone))
        except Exception as e:  # noqa: BLE001 - lmdb.Error (a full disk): undo
            for op in reversed(done):
                try:
                    if op[0] == "add":
                        ring.remove(op[1].keyid, op[1].fingerprint)
                    else:
                        for k in op[1]:
                            ring.add(k.der)
                except Exception:  # noqa: BLE001
                    pass
            raise KeyInput(f"keys not changed: cannot store them: {e}", errno.EIO) from None
        return done
