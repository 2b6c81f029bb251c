"""MeasurementList.attach_tpm with a TPM model (no swtpm): order, violations, boot
aggregate, sync at attach, failures that did or did not reach the TPM, resets."""
from __future__ import annotations

import hashlib

import pytest

from imafs.ima.measurelog import MeasurementList
from imafs.ima.templates import build_entry
from imafs.ima.tpm import TPMError, TPMMismatch, parse_tcti
from imafs.store import Store

SIZES = {"sha1": 20, "sha256": 32, "sha384": 48}


class FakeTPM:
    tcti = "fake"

    def __init__(self, banks=("sha1", "sha256", "sha384")):
        self.banks = tuple(banks)
        self.reset()
        self.fail = None        # "before": refuse the command; "after": apply, then fail
        self.log = []

    def reset(self):
        self.pcr = {b: [bytes(SIZES[b])] * 24 for b in self.banks}

    def read_many(self, bank, indices):
        if self.fail == "down":
            raise TPMError("down")
        return [self.pcr[bank][i] for i in indices]

    def extend(self, pcr, digests):
        if self.fail in ("before", "down"):
            raise TPMError("refused")
        for b, d in digests.items():
            self.pcr[b][pcr] = hashlib.new(b, self.pcr[b][pcr] + d).digest()
        self.log.append(pcr)
        if self.fail == "after":
            self.fail = None
            raise TPMError("lost reply")


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "lmdb"), sync=False)
    yield s
    s.close()


def entry(i, pcr=10):
    return build_entry("ima-ng", name=f"/f{i}", digest=hashlib.sha256(b"%d" % i).digest(), pcr=pcr)


def same(ml, tpm):
    """The PCRs a list extends (10 and up) agree; 0-9 are the firmware's."""
    return all(ml.pcrs(b)[10:] == tpm.pcr[b][10:] for b in ("sha1", "sha256"))


def test_entries_violations_and_other_pcrs(store, tmp_path):
    tpm = FakeTPM()
    tpm.pcr["sha256"][0] = b"\x01" * 32
    ml = MeasurementList(store, 0, tpm=tpm, tpm_pcr_dir=str(tmp_path / "none"))
    # boot aggregate from the TPM's PCRs 0-9
    agg = hashlib.sha256(b"".join(tpm.pcr["sha256"][:10])).digest()
    assert ml.entry(0).fields[0] == b"sha256:\0" + agg
    ml.add(entry(1))
    ml.add(entry(2, pcr=11))
    ml.add_violation("ima-ng", "/v")
    ml.add_many([entry(3), entry(4)])
    assert same(ml, tpm) and ml.tpm_pending == 0
    assert tpm.log == [10, 10, 11, 10, 10, 10]
    assert any(tpm.pcr["sha384"][10])          # every TPM bank is extended


def test_attach_sync_rules(store, tmp_path):
    tpm = FakeTPM()
    ml = MeasurementList(store, 0, tpm=tpm)
    ml.add(entry(1))
    # remount on the same TPM: nothing replayed
    n = len(tpm.log)
    MeasurementList(store, 0, tpm=tpm)
    assert len(tpm.log) == n
    # reset TPM: the whole list again
    tpm.reset()
    ml = MeasurementList(store, 0, tpm=tpm)
    assert same(ml, tpm)
    # a TPM holding something else: refused
    tpm.extend(10, {"sha1": b"\x02" * 20, "sha256": b"\x02" * 32})
    with pytest.raises(TPMMismatch, match="PCR 10"):
        MeasurementList(store, 0, tpm=tpm)
    with pytest.raises(TPMError, match="none of the list's PCR banks"):
        MeasurementList(store, 0, tpm=FakeTPM(banks=("sha384",)))


def test_remount_after_a_crash_between_commit_and_extend(store):
    """A daemon killed after an entry's LMDB commit and before its TPM extension
    leaves the TPM behind the list: the next mount extends it from where it stopped
    (and still refuses a TPM that holds no prefix of the list)."""
    tpm = FakeTPM()
    ml = MeasurementList(store, 0, tpm=tpm)
    ml.add(entry(1))
    ml.add(entry(2, pcr=11))
    behind = MeasurementList(store, 0)          # the same list, nothing extended
    behind.add(entry(3))
    behind.add(entry(4, pcr=11))
    behind.add_violation("ima-ng", "/v")
    assert not same(behind, tpm)
    n = len(tpm.log)
    ml = MeasurementList(store, 0, tpm=tpm)
    assert same(ml, tpm) and ml.tpm_pending == 0
    assert tpm.log[n:] == [10, 11, 10]          # only the three it had not seen
    ml.add(entry(5))
    assert same(ml, tpm)
    # a TPM that is ahead or elsewhere: no prefix matches
    tpm.extend(11, {"sha1": b"\x07" * 20, "sha256": b"\x07" * 32, "sha384": b"\x07" * 48})
    with pytest.raises(TPMMismatch):
        MeasurementList(store, 0, tpm=tpm)


@pytest.mark.parametrize("how", ["before", "after"])
def test_failed_extend_retried_once(store, how):
    tpm = FakeTPM()
    ml = MeasurementList(store, 0, tpm=tpm)
    tpm.fail = how
    with pytest.raises(TPMError):
        ml.add(entry(1))
    assert ml.count == 2 and ml.tpm_pending == 1
    tpm.fail = None
    assert ml.add(entry(1)) is False         # already in the list; the TPM catches up
    assert ml.tpm_pending == 0 and same(ml, tpm)
    ml.add(entry(2))
    assert same(ml, tpm)


def test_reset_while_attached_and_foreign_extend(store):
    tpm = FakeTPM()
    ml = MeasurementList(store, 0, tpm=tpm)
    ml.add(entry(1))
    tpm.fail = "down"
    with pytest.raises(TPMError):
        ml.add(entry(2))
    tpm.fail = None
    tpm.reset()                                 # came back reset: replayed
    ml.add(entry(3))
    assert same(ml, tpm)
    tpm.fail = "before"
    with pytest.raises(TPMError):
        ml.add(entry(4))
    tpm.fail = None
    tpm.extend(10, {"sha1": b"\x05" * 20, "sha256": b"\x05" * 32})   # someone else
    with pytest.raises(TPMMismatch):
        ml.add(entry(5))
    with pytest.raises(TPMError):                # failed for good, until a remount
        ml.add(entry(6))


def test_parse_tcti():
    assert parse_tcti("swtpm:host=127.0.0.1,port=2321") == ("swtpm", "host=127.0.0.1,port=2321")
    assert parse_tcti("device:/dev/tpmrm0") == ("device", "/dev/tpmrm0")
    assert parse_tcti("tabrmd") == ("tabrmd", None)
    for bad in ("", "bad tcti", "/dev/tpm0"):
        with pytest.raises(TPMError):
            parse_tcti(bad)
