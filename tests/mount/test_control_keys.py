"""The ``keys`` control file through a real mount: every certificate written through
one open is loaded at close (PEM bundles, concatenated DER, one path per line), or a
write is refused and nothing of that open is applied; ``remove KEYID [SHA256]`` takes
a key out, and what it signed is refused at its next open."""
from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import testkeys as tk
from helpers.mounts import IMAFS, REPO, readable
from imafs.ima.keys import keyid_of

pytestmark = pytest.mark.mount

# only files owned by uid 4242 are appraised: nothing else of the mount is in the way
APPRAISE = "appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig fowner=4242\n"


def certs(n: int, kind: str = "ec", base: int = 0):
    """n distinct, valid certificates: (private key, certificate)."""
    out = []
    for i in range(n):
        priv = tk.key(kind, 100 + base + i)
        out.append((priv, tk.cert(priv, cn=f"bundle {base + i}")))
    return out


def write(path: Path, *chunks: bytes) -> int:
    """Write each chunk with one write(2) through one open; 0 or the first errno."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for c in chunks:
            assert os.write(fd, c) == len(c)
        return 0
    except OSError as e:
        return e.errno
    finally:
        try:
            os.close(fd)
        except OSError as e:
            return e.errno


def ids(m) -> list[str]:
    return [line.split()[0] for line in m.ctl("keys").read_text().splitlines()]


def kid(c) -> str:
    return f"{keyid_of(tk.der(c)):08x}"


def rejected(m) -> list[str]:
    return [r["error"] for r in map(json.loads, (m.state / "audit.log").read_text()
                                    .splitlines()) if r["type"] == "key_rejected"]


def test_pem_bundle_and_concatenated_der_load_every_certificate(make_mount, world_tmp):
    """cat of a 4-certificate PEM bundle loads 4 keys (it loaded 3); 5 DER
    certificates in one write() add 5; a PEM bundle with text around its blocks (as
    ``openssl x509 -text`` and CA bundles have); a certificate cut across writes."""
    m = make_mount()
    four = certs(4)
    bundle = world_tmp / "bundle.pem"
    bundle.write_bytes(b"".join(tk.pem(c) for _, c in four))
    r = subprocess.run(["sh", "-c", f'cat {bundle} > {m.ctl("keys")}'], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(ids(m)) == sorted(kid(c) for _, c in four)

    m2 = make_mount()
    five = certs(5, base=10)
    assert write(m2.ctl("keys"), b"".join(tk.der(c) for _, c in five)) == 0
    assert sorted(ids(m2)) == sorted(kid(c) for _, c in five)

    m3 = make_mount()
    three = certs(3, base=20)
    text = b"".join(f"# {i}\nsubject=CN=bundle {i}\nCertificate:\n    Data:\n".encode()
                    + tk.pem(c) + b"\n" for i, (_, c) in enumerate(three))
    assert write(m3.ctl("keys"), text) == 0
    assert sorted(ids(m3)) == sorted(kid(c) for _, c in three)
    # a DER certificate and a PEM one, each cut in two writes, DER and PEM mixed
    two = certs(2, base=30)
    d, p = tk.der(two[0][1]), tk.pem(two[1][1])
    assert write(m3.ctl("keys"), d[:100], d[100:] + p[:50], p[50:]) == 0
    assert sorted(ids(m3)) == sorted(kid(c) for _, c in three + two)


def test_paths_one_per_line(make_mount, world_tmp):
    """Several paths in one write: each file is loaded (a file may itself be a PEM
    bundle); one missing path refuses the write, names it, and nothing of that open is
    added -- also when the good path came in an earlier write (bash's printf writes
    line by line)."""
    b = world_tmp / "backing1"
    (b / "certs").mkdir(parents=True)
    six = certs(6, base=40)
    for i, (_, c) in enumerate(six[:4]):
        (b / "certs" / f"{i}.der").write_bytes(tk.der(c))
    (b / "certs" / "pair.pem").write_bytes(tk.pem(six[4][1]) + tk.pem(six[5][1]))
    m = make_mount(backing=b)
    lines = b"".join(f"/certs/{i}.der\n".encode() for i in range(3)) + b"/certs/pair.pem\n"
    assert write(m.ctl("keys"), lines) == 0
    want = [kid(c) for _, c in six[:3] + six[4:]]
    assert sorted(ids(m)) == sorted(want)
    # shell echo of several lines
    r = subprocess.run(["bash", "-c", f"printf '/certs/3.der\\n/nonexist1\\n' > {m.ctl('keys')}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert sorted(ids(m)) == sorted(want)             # /certs/3.der was not added
    assert re.search(r"key write to namespace / rejected \(pid \d+\): /nonexist1: No such "
                     r"file or directory", m.log_text())
    # a last line without a newline is taken at close
    assert write(m.ctl("keys"), b"/certs/3.der") == 0
    assert kid(six[3][1]) in ids(m)


def test_one_bad_certificate_refuses_the_whole_write(make_mount, world_tmp):
    """A bundle with an expired certificate in third place: EINVAL, the log and audit
    log say which and why, and none of the bundle is added (not even the first
    two); the same certificates without it load."""
    m = make_mount()
    good = certs(3, base=50)
    priv = tk.key("ec", 59)
    expired = tk.cert(priv, cn="expired", not_before=tk.NOW - dt.timedelta(days=60),
                      not_after=tk.NOW - dt.timedelta(days=1))
    bundle = [tk.pem(good[0][1]), tk.pem(good[1][1]), tk.pem(expired), tk.pem(good[2][1])]
    assert write(m.ctl("keys"), b"".join(bundle)) == errno.EINVAL
    assert ids(m) == []
    assert re.search(r"rejected \(pid \d+\): certificate has expired \(notAfter [^)]+\) "
                     r"\(certificate 3 of 4 in this write\); nothing written through this open is "
                     r"applied",
                     m.log_text()), m.log_text()[-2000:]
    assert rejected(m)[-1].startswith("certificate has expired")
    # concatenated DER, garbage after the last certificate: none either
    assert write(m.ctl("keys"), tk.der(good[0][1]) + tk.der(good[1][1]) + b"junk\n") \
        == errno.EINVAL
    assert ids(m) == []
    assert write(m.ctl("keys"), b"".join(bundle[:2] + bundle[3:])) == 0
    assert sorted(ids(m)) == sorted(kid(c) for _, c in good)
    # a certificate left incomplete at close is refused then: at release (the mount
    # answers no FLUSH; close(2) succeeds as the kernel's securityfs release), logged,
    # and before the next open is answered
    assert write(m.ctl("keys"), tk.der(certs(1, base=58)[0][1])[:200]) == 0
    assert sorted(ids(m)) == sorted(kid(c) for _, c in good)
    assert "truncated DER certificate (200 of" in m.log_text()


def keygen(d: Path) -> Path:
    subprocess.run(IMAFS + ["keygen", "--out", str(d), "--type", "ec"], check=True,
                   capture_output=True, cwd=REPO)
    return d


def sign(keyfile: Path, cert: Path | None, *paths: Path) -> None:
    subprocess.run(IMAFS + ["sign", "-q", "--key", str(keyfile)]
                   + (["--cert", str(cert)] if cert else []) + [str(p) for p in paths],
                   check=True, capture_output=True, cwd=REPO)


def test_remove_key_refuses_what_it_signed(make_mount, world_tmp):
    """``remove KEYID``: the key is gone from the listing, the audit log says so, and a
    file it signed -- readable a moment before, its verdict cached -- is refused at
    its next open; adding the key again lets it through again. An unknown key id is
    EINVAL with a reason."""
    k = keygen(world_tmp / "k")
    other = keygen(world_tmp / "other")
    b = world_tmp / "backing1"
    (b / "certs").mkdir(parents=True)
    (b / "certs" / "k.der").write_bytes((k / "signing_cert.der").read_bytes())
    (b / "certs" / "other.der").write_bytes((other / "signing_cert.der").read_bytes())
    (b / "signed").write_bytes(os.urandom(3000))
    sign(k / "signing_key.pem", None, b / "signed")
    os.chown(b / "signed", 4242, 4242)
    pol = world_tmp / "policy"
    pol.write_text(APPRAISE)
    m = make_mount(["--policy", str(pol)], backing=b)
    kf = m.ctl("keys")
    assert not readable(m.mnt / "signed")
    assert write(kf, b"/certs/k.der\n/certs/other.der\n") == 0
    assert readable(m.mnt / "signed") and readable(m.mnt / "signed")   # cached verdict
    k_id = f"{keyid_of((k / 'signing_cert.der').read_bytes()):08x}"
    o_id = f"{keyid_of((other / 'signing_cert.der').read_bytes()):08x}"
    r = subprocess.run(["bash", "-c", f"echo remove {k_id} > {kf}"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert ids(m) == [o_id]
    assert not readable(m.mnt / "signed")
    recs = [json.loads(x) for x in (m.state / "audit.log").read_text().splitlines()]
    assert any(x["type"] == "key_removed" and x["keyid"] == k_id for x in recs)
    assert any(x["type"] == "appraise" and x["path"] == "/signed" and x["result"] != "pass"
               for x in recs)
    assert f"key {k_id} removed" in m.log_text()
    # unknown id (just removed), malformed id: EINVAL, with the reason
    r = subprocess.run(["bash", "-c", f"echo remove {k_id} > {kf}"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert f"remove {k_id}: no such key in namespace /" in m.log_text()
    assert write(kf, b"remove 12345\n") == errno.EINVAL
    assert "bad key id '12345'" in m.log_text()
    # a removal and an unknown removal in one write: nothing happens
    assert write(kf, f"remove {o_id}\nremove {k_id}\n".encode()) == errno.EINVAL
    assert ids(m) == [o_id]
    # back again
    assert write(kf, b"/certs/k.der\n") == 0
    assert readable(m.mnt / "signed")


def test_remove_one_of_colliding_key_ids(make_mount, world_tmp):
    """Two certificates whose key ids collide (the same last 4 bytes of their
    subjectKeyIdentifier): ``remove ID SHA256`` removes only the one with that
    fingerprint (hex, colons allowed, as openssl prints it); ``remove ID``
    removes both."""
    skid = bytes(16) + b"\xca\xfe\xf0\x0d"
    pa, pb = tk.key("ec", 201), tk.key("ec", 202)
    ca, cb = tk.cert(pa, cn="a", ski=skid), tk.cert(pb, cn="b", ski=skid)
    b = world_tmp / "backing1"
    b.mkdir()
    for n, priv, c in (("a", pa, ca), ("b", pb, cb)):
        (world_tmp / f"{n}.pem").write_bytes(tk.key_pem(priv))
        (world_tmp / f"{n}.der").write_bytes(tk.der(c))
        (b / n).write_bytes(os.urandom(2000))
        sign(world_tmp / f"{n}.pem", world_tmp / f"{n}.der", b / n)
        os.chown(b / n, 4242, 4242)
    pol = world_tmp / "policy"
    pol.write_text(APPRAISE)
    m = make_mount(["--policy", str(pol)], backing=b)
    kf = m.ctl("keys")
    assert write(kf, tk.der(ca) + tk.der(cb)) == 0
    assert ids(m) == ["cafef00d", "cafef00d"]
    assert readable(m.mnt / "a") and readable(m.mnt / "b")
    fp = hashlib.sha256(tk.der(ca)).hexdigest().upper()
    colons = ":".join(fp[i:i + 2] for i in range(0, 64, 2))
    assert write(kf, f"remove cafef00d {colons}\n".encode()) == 0
    assert [line.split()[3] for line in kf.read_text().splitlines()] == ["CN=b"]
    assert not readable(m.mnt / "a") and readable(m.mnt / "b")
    assert write(kf, f"remove cafef00d {fp}\n".encode()) == errno.EINVAL  # gone already
    assert write(kf, tk.der(ca)) == 0
    assert write(kf, b"remove CAFEF00D\n") == 0
    assert ids(m) == []
    assert not readable(m.mnt / "a") and not readable(m.mnt / "b")
