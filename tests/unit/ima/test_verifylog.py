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


def test_cli_pcr_value_as_tpm2_pcrread_prints_it(mlist, tmp_path):
    """--pcr BANK:INDEX=HEX takes the value as tpm2_pcrread prints it (0x, upper case)
    or plain, and refuses a value that is not the bank's digest size in one line."""
    lst = tmp_path / "list"
    lst.write_bytes(mlist.read("binary", 0, mlist.size("binary")))
    run = lambda *a: subprocess.run([sys.executable, "-m", "imafs", "verify-log", str(lst), *a],
                                    capture_output=True, text=True)
    v1, v256 = mlist.pcr("sha1", 10).hex(), mlist.pcr("sha256", 10).hex()
    for spec in (f"sha256:10=0x{v256.upper()}", f"sha256:10=0X{v256}", f"sha256:10={v256.upper()}",
                 f"sha1:10={v1}", f"SHA1:10=0x{v1}"):
        r = run("--pcr", spec)
        assert r.returncode == 0 and "PCR 10 match" in r.stdout, (spec, r.stderr)
    r = run("--pcr", f"sha1:10=0x{v1}", "--pcr", f"sha256:10=0x{v256}")
    assert r.returncode == 0 and "sha1 PCR 10 match; sha256 PCR 10 match" in r.stdout
    # a wrong value of the right size is a mismatch; everything else is refused (rc 2)
    wrong = "0x" + ("ff" * 32)
    r = run("--pcr", f"sha256:10={wrong}")
    assert r.returncode == 1 and "pcr-mismatch" in r.stderr and "ff" * 32 in r.stderr
    for spec, why in ((f"sha256:10=", "32 bytes (64 hex digits), this one has 0"),
                      (f"sha256:10=0x", "this one has 0"),
                      (f"sha256:10={v1}", "this one has 40"),          # a sha1 value
                      (f"sha1:10={v256}", "20 bytes (40 hex digits), this one has 64"),
                      (f"sha256:10=0x{v256}00", "this one has 66"),
                      (f"sha256:10=0x{v256[:-1]}", "this one has 63"),
                      (f"sha256:10=0x{v256[:-2]} 0", "not hex"),
                      (f"sha256:10=0x{v256[:-2]}zz", "not hex"),
                      (f"sha256:24=0x{v256}", "index must be 0-23"),
                      (f"sha256:-1=0x{v256}", "index must be 0-23"),
                      (f"sha256=0x{v256}", "BANK:INDEX=HEX"),
                      (f"nosuch:10=0x{v256}", "unknown hash algorithm")):
        r = run("--pcr", spec)
        assert r.returncode == 2, (spec, r.stdout, r.stderr)
        assert why in r.stderr and len(r.stderr.strip().splitlines()) == 1, (spec, r.stderr)
        assert "Traceback" not in r.stderr


def test_pcr_file_out_of_range_and_wrong_size(mlist, tmp_path):
    """A pcrs/ file with a PCR beyond 23 or values of another bank is reported, never a
    traceback or a silent match."""
    data = mlist.read("ascii", 0, mlist.size("ascii"))
    rep = verifylog.verify_bytes(data, expected={"sha1": {30: b"\x01" * 20}})
    assert [p.kind for p in rep.problems] == ["pcr-mismatch"] and "no such PCR" in str(rep.problems[0])
    rep = verifylog.verify_bytes(data, expected={"sha256": {10: mlist.pcr("sha1", 10)}})
    assert [p.kind for p in rep.problems] == ["pcr-mismatch"]
    assert "is 20 bytes, a sha256 PCR is 32" in str(rep.problems[0])
    p = tmp_path / "pcrs"
    p.write_text(mlist.pcrs_text("sha1") + "PCR-30: " + "00" * 20 + "\n")
    lst = tmp_path / "list"
    lst.write_bytes(data)
    r = subprocess.run([sys.executable, "-m", "imafs", "verify-log", str(lst), "--pcrs", f"sha1,{p}"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no such PCR" in r.stderr and "Traceback" not in r.stderr


def test_binary_file_given_as_pcr_file(mlist, tmp_path):
    """A binary list mistaken for a PCR file is one clear line (it was a codec error)."""
    lst = tmp_path / "list"
    lst.write_bytes(mlist.read("binary", 0, mlist.size("binary")))
    r = subprocess.run([sys.executable, "-m", "imafs", "verify-log", str(lst), "--pcrs",
                        f"sha1,{lst}"], capture_output=True, text=True)
    assert r.returncode == 2 and "not a PCR file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "codec" not in r.stderr
