"""imafs.ima.modelstore: a namespace's model made from its option, kept in LMDB once
sealed, back in its mode at the next mount; a stored model that does not fit comes
back enforcing and empty (fail closed); the aggregate is the root list's."""
from __future__ import annotations

import struct

from imafs.ima import model as M
from imafs.ima import modelmap as mm
from imafs.ima.measurelog import MeasurementList
from imafs.ima.modelstore import ModelStore, aggregate_of
from imafs.store import Store

A = M.Actor((1, 1), None, mm.Coe())


def learned(store: ModelStore) -> M.Model:
    m = store.make(5, "learn")
    for name in ("/a", "/b"):
        m.decide(A, mm.file_open(name, mm.Inode(0, 0, 0o100644), bytes(32), 4))
    return m


def test_option_and_round_trip(tmp_path):
    s = Store(str(tmp_path / "lmdb"), sync=False)
    try:
        ms = ModelStore(s, bytes(range(32)))
        assert ms.make(5, "") is None
        m = learned(ms)
        m.enforce()
        ms.save(5, m)
        back = ModelStore(s, bytes(range(32))).make(5, "learn")
        assert back.mode == "enforce" and back.points == m.points
        assert back.state() == m.state() and back.aggregate == bytes(range(32))
        # another namespace id: a new learning model
        assert ModelStore(s, bytes(range(32))).make(6, "learn").mode == "learn"
    finally:
        s.close()


def test_stored_model_that_does_not_fit_fails_closed(tmp_path):
    s = Store(str(tmp_path / "lmdb"), sync=False)
    try:
        ms = ModelStore(s, bytes(32))
        m = learned(ms)
        m.seal()
        ms.save(5, m)
        other = ModelStore(s, b"\x01" * 32).make(5, "learn")     # the TPM's PCRs moved
        assert other.mode == "enforce" and not other.points
        with s.env.begin(write=True, db=s.db("models")) as t:
            t.put(struct.pack(">I", 5), b"sealed\nnot a model\n")
        damaged = ModelStore(s, bytes(32)).make(5, "learn")
        assert damaged.mode == "enforce" and not damaged.points
        d = damaged.decide(A, mm.file_open("/a", mm.Inode(0, 0, 0o100644), bytes(32), 4))
        assert not d.allowed
    finally:
        s.close()


def test_aggregate_is_the_root_lists_boot_aggregate(tmp_path):
    s = Store(str(tmp_path / "lmdb"), sync=False)
    try:
        ml = MeasurementList(s, 0)
        _t, algo, digest = ml.entry(0).file_digest
        assert algo == "sha256" and aggregate_of(ml) == digest
        sha1 = MeasurementList(s, 7, template="ima", hash_algo="sha1")
        assert len(aggregate_of(sha1)) == 32
    finally:
        s.close()
