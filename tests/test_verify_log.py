"""imafs verify-log: template hashes, replay, signatures, first bad entry."""
import hashlib
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imafs.ima import verifylog
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.templates import build_entry
from imafs.store import Store


@pytest.fixture
def mlist(tmp_path):
    s = Store(str(tmp_path / "lmdb"), sync=False)
    ml = MeasurementList(s, 0, tpm_pcr_dir=str(tmp_path / "no-tpm"))
    for i in range(20):
        ml.add(build_entry("ima-ng", name=f"/usr/bin/f{i}", digest=hashlib.sha256(b"%d" % i).digest(),
                           pcr=10 if i % 3 else 11))
    ml.add_violation("ima-ng", "/etc/passwd")
    yield ml
    s.close()


def expected(ml):
    return {b: dict(enumerate(ml.pcrs(b))) for b in ("sha1", "sha256")}


@pytest.mark.parametrize("view,bank", [("binary", "sha1"), ("binary_sha256", "sha256"),
                                       ("ascii", "sha1"), ("ascii_sha256", "sha1")])
def test_good_list_replays(mlist, view, bank):
    data = mlist.read(view, 0, mlist.size(view))
    rep = verifylog.verify_bytes(data, bank=bank, expected=expected(mlist))
    assert rep.ok, rep.problems
    assert rep.entries == mlist.count and rep.violations == 1
    assert rep.pcrs["sha256"][11] == mlist.pcr("sha256", 11)


def test_first_bad_entry_reported(mlist):
    data = bytearray(mlist.read("binary", 0, mlist.size("binary")))
    i = data.find(b"/usr/bin/f7")
    data[i + 5] ^= 0x20
    rep = verifylog.verify_bytes(bytes(data), expected=expected(mlist))
    assert not rep.ok
    p = rep.problems[0]
    assert p.kind == "template-hash" and p.entry == 8 and p.name == "/usr/Bin/f7"


def test_pcr_mismatch_and_dropped_entry(mlist):
    exp = expected(mlist)
    exp["sha1"][10] = b"\x11" * 20
    rep = verifylog.verify_bytes(mlist.read("ascii", 0, mlist.size("ascii")), expected=exp)
    assert [p.kind for p in rep.problems] == ["pcr-mismatch"]
    lines = mlist.read("ascii", 0, mlist.size("ascii")).splitlines(True)
    rep = verifylog.verify_bytes(b"".join(lines[:5] + lines[6:]), expected=expected(mlist))
    assert any(p.kind == "pcr-mismatch" for p in rep.problems)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_garbage_never_crashes(data):
    rep = verifylog.verify_bytes(data)
    assert rep.ok or rep.problems


def test_signatures_checked(tmp_path):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives.asymmetric import ec
    from imafs.ima import appraise as ap
    subprocess.run([sys.executable, "-m", "imafs", "keygen", "--out", str(tmp_path / "k"),
                    "--type", "ec"], check=True, capture_output=True)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    key = load_pem_private_key((tmp_path / "k" / "signing_key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ring = Keyring(require_digsig=False)
    info = ring.add((tmp_path / "k" / "signing_cert.der").read_bytes())
    digest = hashlib.sha256(b"payload").digest()
    sig = ap.sign_v2(key, "sha256", digest, info.keyid)
    s = Store(str(tmp_path / "lmdb"), sync=False)
    ml = MeasurementList(s, 0, tpm_pcr_dir=str(tmp_path / "x"))
    ml.add(build_entry("ima-sig", name="/good", digest=digest, xattr=sig))
    ml.add(build_entry("ima-sig", name="/bad", digest=hashlib.sha256(b"other").digest(), xattr=sig))
    data = ml.read("binary", 0, ml.size("binary"))
    rep = verifylog.verify_bytes(data, keyring=ring, all_problems=True)
    assert [p.entry for p in rep.problems] == [2] and rep.problems[0].kind == "signature"
    assert rep.signatures_checked == 2


def test_cli(mlist, tmp_path):
    lst = tmp_path / "list"
    lst.write_bytes(mlist.read("binary", 0, mlist.size("binary")))
    p1 = tmp_path / "p1"
    p1.write_text(mlist.pcrs_text("sha1"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "imafs", "verify-log", *a],
                                    capture_output=True, text=True)
    r = run(str(lst), "--pcrs", f"sha1,{p1}")
    assert r.returncode == 0 and "OK: 22 entries (1 violations)" in r.stdout, r.stderr
    assert "sha1 PCR 10, 11 match" in r.stdout
    r = run(str(lst), "--pcr", "sha1:10=" + "00" * 20)
    assert r.returncode == 1 and "pcr-mismatch" in r.stderr
    r = run(str(lst), "--pcrs", "sha1")
    assert r.returncode == 2 and "BANK,FILE" in r.stderr
    r = run(str(tmp_path / "missing"))
    assert r.returncode == 2 and "No such file" in r.stderr
