"""ima/treemem.py: verity trees over the memory budget are spilled to the tree cache
and still verify reads (leaf blocks read back and checked against the level above);
a tree the cache lost fails closed; one it never had is let go from an idle IInt."""
from __future__ import annotations

import errno
import os

import pytest

from imafs.ima import hashing
from imafs.ima.verity import VeritySpec
from imafs.ima.cache import TreeCache
from imafs.ima.iint import AccessDenied, IInt
from imafs.ima.treemem import TreeMemory
from imafs.store import Store

SIZE = 3 * (1 << 20) + 1000          # 769 data blocks: 24 KiB of leaves, 7 leaf blocks


@pytest.fixture
def env(tmp_path):
    store = Store(str(tmp_path / "cache"), sync=False)
    yield TreeCache(store)
    store.close()


def _tree(data):
    return hashing.hash_bytes(data, (), verity=VeritySpec()).tree


def _ii(n, tree):
    ii = IInt((1, n))
    ii.version = (1, 2, SIZE, 0)
    ii.tree = tree
    return ii


def test_spilled_trees_still_verify(env, monkeypatch):
    monkeypatch.setattr("imafs.ima.treemem.MIN_SPILL", 0)
    data = os.urandom(SIZE)
    mem = TreeMemory(env, budget=30 << 10)
    trees = [_tree(data) for _ in range(3)]
    iis = [_ii(n, t) for n, t in enumerate(trees)]
    for ii, t in zip(iis, trees):
        assert env.put(ii.key, ii.version, t)
        mem.hold(ii, t, stored=True)
    assert mem.resident <= 30 << 10
    assert mem.spilled == 2
    spilled = trees[0]
    assert not isinstance(spilled.leaves, bytes)
    whole = _tree(data)
    for off in (0, 4096 * 127, 4096 * 128, 4096 * 700, SIZE - SIZE % 4096):
        chunk = data[off:off + 3 * 4096]
        assert spilled.verify_range(off, chunk).ok
        assert spilled.block_hash(off // 4096) == whole.block_hash(off // 4096)
    bad = bytearray(data[4096:8192])
    bad[7] ^= 1
    res = spilled.verify_range(4096, bytes(bad))
    assert not res.ok and res.first_bad_block == 1


def test_lost_or_corrupted_stored_tree_fails_closed(env, monkeypatch):
    monkeypatch.setattr("imafs.ima.treemem.MIN_SPILL", 0)
    data = os.urandom(SIZE)
    mem = TreeMemory(env, budget=0)
    t = _tree(data)
    ii = _ii(0, t)
    env.put(ii.key, ii.version, t)
    mem.hold(ii, t, stored=True)
    assert mem.spilled == 1
    # the stored copy replaced by another tree of the same length: no match above
    other = _tree(os.urandom(SIZE))
    env.put(ii.key, ii.version, other)
    with pytest.raises(AccessDenied) as e:
        t.verify_range(0, data[:4096])
    assert e.value.errno == errno.EIO
    env.delete(ii.key)                      # gone
    with pytest.raises(AccessDenied):
        t.verify_range(0, data[:4096])


def test_unstored_idle_tree_is_let_go(env, monkeypatch):
    monkeypatch.setattr("imafs.ima.treemem.MIN_SPILL", 0)
    mem = TreeMemory(env, budget=0)
    t = _tree(os.urandom(SIZE))
    ii = _ii(0, t)
    mem.hold(ii, t, stored=False)
    assert ii.tree is None and mem.resident == 0
    # an open handle verifying against it keeps it (over the budget)
    t2 = _tree(os.urandom(SIZE))
    ii2 = _ii(1, t2)
    ii2.live[id(t2)] = [t2, (), 1]
    mem.hold(ii2, t2, stored=False)
    assert ii2.tree is t2 and isinstance(t2.leaves, bytes)
