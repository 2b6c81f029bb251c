"""imafs.ima.measurelog: the LMDB-backed list, PCR banks, views and offset index."""
import hashlib
import os
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imafs.ima import measurelog as M
from imafs.ima.measurelog import MeasurementList, boot_aggregate_entry
from imafs.ima.templates import (TemplateEntry, build_entry, buf_entry, parse_ascii,
                                 parse_binary)
from imafs.store import Store

BOOT_AGGREGATE_NO_TPM = "0adefe762c149c7cec19da62f0da1297fcfbffff"
VIEWS = ["ascii", "ascii_sha1", "ascii_sha256", "binary", "binary_sha1", "binary_sha256"]


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state"), sync=False)
    yield s
    s.close()


def no_tpm(tmp_path):
    return str(tmp_path / "no-tpm")


def file_entry(i: int, template: str = "ima-ng", pcr: int = 10) -> TemplateEntry:
    digest = hashlib.sha256(b"file %d" % i).digest()
    if template == "ima":
        return build_entry("ima", name=f"/bin/f{i}", algo="sha1",
                           digest=hashlib.sha1(b"file %d" % i).digest(), pcr=pcr)
    sig = None
    if template in ("ima-sig", "ima-sigv2") and i % 2:
        sig = b"\x03\x02\x04" + bytes(4) + (64).to_bytes(2, "big") + os.urandom(64)
    return build_entry(template, name=f"/usr/bin/prog-{i}" + "x" * (i % 37), digest=digest,
                       xattr=sig, pcr=pcr, ns_id=7)


def replay(records, bank):
    """PCR values from a parsed list, computed here independently."""
    size = hashlib.new(bank).digest_size
    pcrs = [bytes(size)] * M.NUM_PCRS
    for e in records:
        h = e.recorded_hash
        val = b"\xff" * size if not any(h) else h
        pcrs[e.pcr] = hashlib.new(bank, pcrs[e.pcr] + val).digest()
    return pcrs


# -- basics -------------------------------------------------------------------

def test_new_list_starts_with_boot_aggregate(store, tmp_path):
    ml = MeasurementList(store, 0, tpm_pcr_dir=no_tpm(tmp_path))
    assert ml.count == 1 and ml.violations == 0
    (e,) = ml.entries()
    assert e.recorded_hash.hex() == BOOT_AGGREGATE_NO_TPM
    line = ml.read("ascii", 0, 1 << 20)
    assert line == (b"10 " + BOOT_AGGREGATE_NO_TPM.encode() + b" ima-ng sha256:" + b"0" * 64
                    + b" boot_aggregate\n")
    assert ml.size("ascii") == len(line)
    assert ml.pcr("sha1", 10) == hashlib.sha1(bytes(20) + bytes.fromhex(
        BOOT_AGGREGATE_NO_TPM)).digest()
    assert ml.pcr("sha1", 0) == bytes(20)
    assert MeasurementList(store, 1, boot_aggregate=False).count == 0


def test_add_duplicates_and_pcrs(store, tmp_path):
    ml = MeasurementList(store, 0, tpm_pcr_dir=no_tpm(tmp_path))
    e = file_entry(1)
    assert ml.add(e) is True
    assert ml.add(e) is False                      # same template hash, same PCR
    assert ml.add(file_entry(1, pcr=11)) is True   # the kernel keys by (hash, pcr)
    assert ml.add_many([file_entry(2), file_entry(2), file_entry(1)]) == [True, False, False]
    assert ml.count == 4
    for bank in ("sha1", "sha256"):
        recs = list(parse_binary(ml.read(f"binary_{bank}", 0, 1 << 20), bank))
        assert len(recs) == 4
        assert ml.pcrs(bank) == replay(recs, bank)
    with pytest.raises(ValueError):
        ml.add(file_entry(3, pcr=24))
    with pytest.raises(ValueError):
        ml.read("ascii_sha384", 0, 10)
    assert ml.entry(1) == e
    with pytest.raises(IndexError):
        ml.entry(99)


def test_violations(store, tmp_path):
    ml = MeasurementList(store, 0, tpm_pcr_dir=no_tpm(tmp_path))
    ml.add(file_entry(1))
    before = ml.pcrs("sha256")
    v = ml.add_violation(None, "/etc/shadow")
    ml.add_violation("ima-ng", "/etc/shadow")       # violations are never deduplicated
    assert ml.count == 4 and ml.violations == 2
    assert v.fields == (b"sha256:\0" + bytes(32), b"/etc/shadow\0")
    s1 = hashlib.sha256(before[10] + b"\xff" * 32).digest()
    assert ml.pcr("sha256", 10) == hashlib.sha256(s1 + b"\xff" * 32).digest()
    text = ml.read("ascii", 0, 1 << 20).splitlines()
    assert text[2] == (b"10 " + b"0" * 40 + b" ima-ng sha256:" + b"0" * 64 + b" /etc/shadow")
    assert ml.read("ascii_sha256", 0, 1 << 20).splitlines()[2].startswith(b"10 " + b"0" * 64)
    recs = list(parse_binary(ml.read("binary_sha256", 0, 1 << 20), "sha256"))
    assert ml.pcrs("sha256") == replay(recs, "sha256")
    assert [r.violation for r in recs] == [False, False, True, True]
    v2 = ml.add_violation("ima", "/x", pcr=10)
    assert v2.fields == (bytes(20), b"/x\0") and ml.violations == 3


def test_views_and_pcrs_text(store, tmp_path):
    ml = MeasurementList(store, 3, tpm_pcr_dir=no_tpm(tmp_path), template="ima-sig")
    for i in range(20):
        ml.add(file_entry(i, "ima-sig"))
    es = list(ml.entries())
    assert es[0].template == "ima-sig" and es[0].fields[2] == b""
    for bank in ("sha1", "sha256"):
        expect_a = b"".join(e.ascii_line(bank) for e in es)
        expect_b = b"".join(e.binary_record(bank) for e in es)
        assert ml.read(f"ascii_{bank}", 0, 1 << 20) == expect_a
        assert ml.read(f"binary_{bank}", 0, 1 << 20) == expect_b
        assert ml.size(f"ascii_{bank}") == len(expect_a)
        assert list(parse_ascii(expect_a)) == es
    assert ml.read("ascii", 0, 1 << 20) == ml.read("ascii_sha1", 0, 1 << 20)
    assert ml.read("binary", 0, 1 << 20) == ml.read("binary_sha1", 0, 1 << 20)
    text = ml.pcrs_text("sha256").splitlines()
    assert len(text) == 24
    assert text[0] == "PCR-00: " + "00" * 32
    assert text[10] == "PCR-10: " + ml.pcr("sha256", 10).hex()
    assert text[23].startswith("PCR-23: ")


def test_persistence_and_namespaces(tmp_path):
    path = str(tmp_path / "state")
    s = Store(path, sync=False)
    a = MeasurementList(s, 1, tpm_pcr_dir=no_tpm(tmp_path))
    b = MeasurementList(s, 2, tpm_pcr_dir=no_tpm(tmp_path), template="ima")
    for i in range(40):        # interleaved appends to two lists
        a.add(file_entry(i))
        if i % 3 == 0:
            b.add(file_entry(i, "ima"))
    assert b.add(file_entry(0, "ima")) is False
    assert a.add(file_entry(0, "ima")) is True     # lists do not share their hash table
    state_a = (a.count, a.pcrs("sha1"), a.read("ascii", 0, 1 << 20))
    state_b = (b.count, b.pcrs("sha256"), b.read("binary_sha256", 0, 1 << 20))
    s.close()
    s = Store(path, sync=False)
    a = MeasurementList(s, 1, tpm_pcr_dir=no_tpm(tmp_path))
    b = MeasurementList(s, 2, tpm_pcr_dir=no_tpm(tmp_path), template="ima")
    assert (a.count, a.pcrs("sha1"), a.read("ascii", 0, 1 << 20)) == state_a
    assert (b.count, b.pcrs("sha256"), b.read("binary_sha256", 0, 1 << 20)) == state_b
    assert a.count == 42 and b.count == 15
    assert all(e.template == "ima" for e in b.entries())
    with pytest.raises(ValueError, match="banks"):
        MeasurementList(s, 1, banks=("sha1", "sha384"))
    s.close()
    ro = Store(path, readonly=True)                # e.g. verify-log on a stopped mount
    a = MeasurementList(ro, 1)
    assert (a.count, a.pcrs("sha1"), a.read("ascii", 0, 1 << 20)) == state_a
    ro.close()


def test_append_is_atomic(store, tmp_path, monkeypatch):
    ml = MeasurementList(store, 0, tpm_pcr_dir=no_tpm(tmp_path))
    ml.add(file_entry(1))
    before = (ml.count, ml.pcrs("sha1"), ml.pcrs("sha256"), ml.size("ascii"),
              ml.read("binary", 0, 1 << 20))

    def boom(algo):
        raise RuntimeError("crash while extending")
    monkeypatch.setattr(M, "new_hash", boom)       # fails after the entry was put
    with pytest.raises(RuntimeError):
        ml.add(file_entry(2))
    with pytest.raises(RuntimeError):
        ml.add_many([file_entry(3), file_entry(4)])
    monkeypatch.undo()
    assert (ml.count, ml.pcrs("sha1"), ml.pcrs("sha256"), ml.size("ascii"),
            ml.read("binary", 0, 1 << 20)) == before
    assert ml.add(file_entry(2)) is True           # no stale duplicate key either
    assert ml.count == 3


def test_creation_is_atomic(store, tmp_path, monkeypatch):
    real, calls = M.new_hash, []

    def failing_extend(algo):          # bank checks pass, the PCR extension fails
        calls.append(algo)
        if len(calls) > 2:
            raise ZeroDivisionError
        return real(algo)
    monkeypatch.setattr(M, "new_hash", failing_extend)
    with pytest.raises(ZeroDivisionError):
        MeasurementList(store, 4, tpm_pcr_dir=no_tpm(tmp_path))
    monkeypatch.undo()
    ml = MeasurementList(store, 4, tpm_pcr_dir=no_tpm(tmp_path))
    assert ml.count == 1                          # created now, with its boot aggregate
    assert next(ml.entries()).recorded_hash.hex() == BOOT_AGGREGATE_NO_TPM


def test_threads(store, tmp_path):
    ml = MeasurementList(store, 0, tpm_pcr_dir=no_tpm(tmp_path))
    results = []

    def worker(k):
        got = [ml.add(file_entry(i)) for i in range(k * 50, k * 50 + 100)]
        ml.add_violation(None, f"/tmp/v{k}")
        results.append(sum(got))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 350                     # entries 0..349, each once
    assert ml.count == 1 + 350 + 6 and ml.violations == 6
    for bank in ("sha1", "sha256"):
        recs = list(parse_binary(ml.read(f"binary_{bank}", 0, 1 << 24), bank))
        assert len(recs) == ml.count
        assert ml.pcrs(bank) == replay(recs, bank)


def test_readers_during_appends(store, tmp_path):
    ml = MeasurementList(store, 0, tpm_pcr_dir=no_tpm(tmp_path))
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            data = ml.read("binary_sha256", 0, 1 << 24)
            try:
                recs = list(parse_binary(data, "sha256"))
                assert all(r.recorded_hash == r.template_hash("sha256") for r in recs)
            except Exception as e:     # pragma: no cover - reported below
                errors.append(e)
            time.sleep(0.001)
    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        ml.add(file_entry(i, "ima-sig"))
    stop.set()
    t.join()
    assert not errors


# -- boot aggregate -----------------------------------------------------------

def fake_tpm(root, banks):
    regs = {}
    for bank in banks:
        size = hashlib.new(bank).digest_size
        d = root / f"pcr-{bank}"
        d.mkdir(parents=True)
        regs[bank] = []
        for i in range(24):
            val = hashlib.new(bank, b"%s %d" % (bank.encode(), i)).digest()[:size]
            (d / str(i)).write_text(val.hex().upper() + "\n")
            regs[bank].append(val)
    return regs


def test_boot_aggregate_no_tpm(tmp_path):
    e = boot_aggregate_entry(tpm_pcr_dir=no_tpm(tmp_path))
    assert e.template_hash().hex() == BOOT_AGGREGATE_NO_TPM
    assert boot_aggregate_entry("ima", no_tpm(tmp_path)).fields == (bytes(20),
                                                                   b"boot_aggregate\0")
    assert boot_aggregate_entry(tpm_pcr_dir=no_tpm(tmp_path), hash_algo="sha1").fields[0] == \
        b"sha1:\0" + bytes(20)
    e = boot_aggregate_entry("ima-ns", no_tpm(tmp_path), ns_id=5)
    assert e.fields[2] == b"\x05\0\0\0"


def test_boot_aggregate_tpm2_banks(tmp_path):
    root = tmp_path / "tpm0"
    regs = fake_tpm(root, ["sha1", "sha256", "sha384"])
    e = boot_aggregate_entry("ima-ng", str(root))
    assert e.fields[0] == b"sha256:\0" + hashlib.sha256(b"".join(regs["sha256"][:10])).digest()
    # ima_hash_algo's own bank wins
    e = boot_aggregate_entry("ima-ng", str(root), hash_algo="sha384")
    assert e.fields[0] == b"sha384:\0" + hashlib.sha384(b"".join(regs["sha384"][:10])).digest()
    # the ima template only takes a sha1 aggregate, over PCRs 0-7
    e = boot_aggregate_entry("ima", str(root))
    assert e.fields[0] == hashlib.sha1(b"".join(regs["sha1"][:8])).digest()


def test_boot_aggregate_sha1_only(tmp_path):
    root = tmp_path / "tpm0"
    regs = fake_tpm(root, ["sha1"])
    e = boot_aggregate_entry("ima-ng", str(root))
    assert e.fields[0] == b"sha1:\0" + hashlib.sha1(b"".join(regs["sha1"][:8])).digest()
    root2 = tmp_path / "tpm1"
    fake_tpm(root2, ["sha256"])
    assert boot_aggregate_entry("ima", str(root2)).fields[0] == bytes(20)


def test_boot_aggregate_tpm12(tmp_path):
    root = tmp_path / "tpm0"
    (root / "device").mkdir(parents=True)
    vals = [hashlib.sha1(b"%d" % i).digest() for i in range(24)]
    (root / "device" / "pcrs").write_text("".join(
        f"PCR-{i:02d}: " + " ".join(f"{b:02X}" for b in v) + "\n" for i, v in enumerate(vals)))
    e = boot_aggregate_entry("ima-ng", str(root))
    assert e.fields[0] == b"sha1:\0" + hashlib.sha1(b"".join(vals[:8])).digest()


def test_list_uses_tpm_for_boot_aggregate(store, tmp_path):
    root = tmp_path / "tpm0"
    regs = fake_tpm(root, ["sha1", "sha256"])
    ml = MeasurementList(store, 9, tpm_pcr_dir=str(root))
    (e,) = ml.entries()
    assert e.fields[0] == b"sha256:\0" + hashlib.sha256(b"".join(regs["sha256"][:10])).digest()


# -- offset index -------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A list of ~700 entries of varied size in namespace 5, interleaved with
    other namespaces' lists, with its views rendered independently."""
    tmp = tmp_path_factory.mktemp("big")
    s = Store(str(tmp / "state"), sync=False)
    others = [MeasurementList(s, n, tpm_pcr_dir=str(tmp / "none")) for n in (4, 6)]
    ml = MeasurementList(s, 5, tpm_pcr_dir=str(tmp / "none"))
    rnd = random.Random(5)
    batch = []
    for i in range(700):
        t = rnd.choice(["ima-ng", "ima-sig", "ima-sigv2", "ima-buf"])
        if t == "ima-buf":
            batch.append(buf_entry(f"buf{i}", os.urandom(rnd.randrange(0, 600))))
        else:
            batch.append(file_entry(i, t, pcr=rnd.choice([10, 10, 10, 11])))
        if i % 50 == 0:
            ml.add_many(batch)
            batch = []
            ml.add_violation(None, f"/v/{i}")
            for o in others:
                o.add(file_entry(i))
    ml.add_many(batch)
    es = list(ml.entries())
    full = {}
    for bank in ("sha1", "sha256"):
        full[f"ascii_{bank}"] = b"".join(e.ascii_line(bank) for e in es)
        full[f"binary_{bank}"] = b"".join(e.binary_record(bank) for e in es)
    full["ascii"], full["binary"] = full["ascii_sha1"], full["binary_sha1"]
    yield ml, full
    s.close()


def test_full_views_match(big):
    ml, full = big
    assert ml.count > 700
    for view in VIEWS:
        assert ml.size(view) == len(full[view])
        assert ml.read(view, 0, len(full[view]) + 100) == full[view]
        assert b"".join(ml.iter_view(view, chunk=4096)) == full[view]
    # boundaries: every entry's start in the binary view, and the end
    starts, pos = [], 0
    for e in ml.entries():
        starts.append(pos)
        pos += len(e.binary_record())
    for s in starts[:: 7] + [pos - 1, pos, pos + 10]:
        assert ml.read("binary", s, 333) == full["binary"][s:s + 333]
    assert ml.read("ascii", 10, 0) == b""
    with pytest.raises(ValueError):
        ml.read("ascii", -1, 10)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VIEWS), st.integers(0, 1 << 20), st.integers(0, 70000))
def test_random_reads_equal_slices(big, view, offset, size):
    ml, full = big
    offset %= len(full[view]) + 50
    assert ml.read(view, offset, size) == full[view][offset:offset + size]
