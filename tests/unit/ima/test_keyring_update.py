"""imafs.ima.keyring_update: what a write to ``keys`` asks for, cut into items however
the bytes arrive, and the keyring transaction of one open."""
from __future__ import annotations

import errno

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings, strategies as st

from helpers import testkeys as tk
from imafs.ima import keyring_update as ku
from imafs.ima.keys import Keyring, keyid_of

DERS = [tk.der(tk.cert(tk.key("ec", n), cn=f"k{n}")) for n in (21, 22)]
PEM = tk.cert(tk.key("rsa", 23), cn="pem").public_bytes(serialization.Encoding.PEM)
TEXT = b"Certificate:\n    Data:\n        Version: 3 (0x2)\n"


def _feed(data: bytes, cuts: list[int]):
    """The items of ``data`` written in pieces cut at ``cuts``, the incomplete rest of
    each write carried to the next, as the keys file does."""
    items, rest, last = [], b"", 0
    for cut in sorted(set(cuts)) + [len(data)]:
        got, rest = ku.key_items(rest + data[last:cut], False)
        items += got
        last = cut
    got, rest = ku.key_items(rest, True)
    assert rest == b""
    return items + got


INPUT = (DERS[0] + DERS[1] + b"\n" + TEXT + PEM + b"/etc/keys/a.der\n"
         + b"remove 0123abcd\n" + b"remove id:0123ABCD " + b"ab:" * 31 + b"ab\n")


def test_items_of_a_whole_write():
    items = ku.key_items(INPUT, True)[0]
    assert [k for k, _ in items] == ["cert", "cert", "cert", "path", "remove", "remove"]
    assert items[0][1] == DERS[0] and items[1][1] == DERS[1]
    assert items[2][1].startswith(b"-----BEGIN CERTIFICATE-----")
    assert items[3][1] == b"/etc/keys/a.der"
    assert items[4][1] == (0x0123ABCD, None) and items[5][1] == (0x0123ABCD, b"\xab" * 32)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(INPUT)), max_size=6))
def test_items_do_not_depend_on_how_the_bytes_arrive(cuts):
    # (text before a PEM block is taken only in the write that brings its whole BEGIN
    # line: a write of text lines without one is refused as no certificate)
    text = INPUT.index(TEXT)
    begin = INPUT.index(b"-----BEGIN CERTIFICATE-----", text) + 27
    cuts = [c for c in cuts if not text < c < begin]
    assert _feed(INPUT, cuts) == ku.key_items(INPUT, True)[0]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_garbage_is_refused_with_a_reason(data, final):
    try:
        ku.key_items(data, final)
    except ku.KeyInput as e:
        assert str(e) and e.errno in (errno.EINVAL, errno.EFBIG)


@pytest.mark.parametrize("data,final,reason", [
    (DERS[0][:50], True, "truncated DER certificate (50 of"),
    (b"\x30\x05abcde", False, "not a DER certificate (an element of 5 bytes)"),
    (b"\x30\x85" + bytes(10), False, "bad length in its header"),
    (b"\x30\x83\x01\x00\x00", False, "a DER certificate of 65541 bytes"),
    (PEM[:-30], True, "incomplete PEM certificate"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", True,
     "PEM data holds no CERTIFICATE block (found: PRIVATE KEY)"),
    (b"remove 123\n", False, "remove: bad key id '123'"),
    (b"remove 0123abcd abcd\n", False, "remove: bad sha256 fingerprint 'abcd'"),
    (b"hello\n", False, "the path of one, or 'remove KEYID [SHA256]'"),
], ids=lambda v: v if isinstance(v, str) else None if isinstance(v, bool) else "")
def test_refusals_say_what(data, final, reason):
    with pytest.raises(ku.KeyInput) as e:
        ku.key_items(data, final)
    assert reason in str(e.value)


def test_an_incomplete_item_waits_for_more():
    assert ku.key_items(DERS[0][:50], False) == ([], DERS[0][:50])
    assert ku.key_items(b"/etc/a.der", False) == ([], b"/etc/a.der")
    assert ku.key_items(TEXT[:12], False) == ([], TEXT[:12])
    with pytest.raises(ku.KeyInput):                # a whole line, and no PEM yet
        ku.key_items(TEXT, False)


def test_certs_of_a_file_say_where_each_came_from():
    assert ku.certs_of_file("/k", DERS[0]) == [(DERS[0], " (/k)")]
    both = ku.certs_of_file("/k", DERS[0] + DERS[1])
    assert [w for _, w in both] == [" (/k, certificate 1 of 2)", " (/k, certificate 2 of 2)"]
    with pytest.raises(ku.KeyInput, match="^/k: no certificate in it$"):
        ku.certs_of_file("/k", b"\n")
    with pytest.raises(ku.KeyInput, match="^/k: expected a DER or PEM certificate$"):
        ku.certs_of_file("/k", b"/other\n")        # no commands inside a file


def test_a_transaction_is_checked_again_and_applied_together():
    ring = Keyring()
    up = ku.KeyringUpdate(ring, "/")
    up.stage([("cert", DERS[0]), ("cert", DERS[1])], read_file=None)
    assert len(ring) == 0 and up
    done = up.commit()
    assert [op[0] for op in done] == ["add", "add"] and len(ring) == 2 and not up
    kid = keyid_of(DERS[0])
    up.stage([("remove", (kid, None))], read_file=None)
    ring.remove(kid)                               # gone meanwhile
    with pytest.raises(ku.KeyInput, match="no such key in namespace /"):
        up.commit()
    assert [k.keyid for k in ring] == [keyid_of(DERS[1])]


def test_a_path_that_cannot_be_read_names_it():
    up = ku.KeyringUpdate(Keyring(), "/")

    def read_file(path):
        raise OSError(errno.EINVAL, "not a regular file (a FIFO)")
    with pytest.raises(ku.KeyInput) as e:
        up.stage([("path", b"/fifo")], read_file)
    assert str(e.value) == "/fifo: not a regular file (a FIFO)" and not up
