"""ima/quota.py: the quota grammar (parse, print back, refusals that say what is
wrong) and the decision (entries, bytes, audited once)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imafs.ima.quota import (DEFAULT_DIGEST_LISTS, DEFAULT_LIST, DEFAULT_NAMESPACES, Quota,
                             QuotaError, QuotaExceeded, admit_digest_list)


def test_parse_and_print():
    assert Quota.parse("list:100000:64M").limits == {"list": (100000, 64 << 20)}
    assert Quota.parse("list:12").limits == {"list": (12, None)}
    assert Quota.parse("list:0:-").limits == {"list": (None, None)}
    assert Quota.parse("list:00000:0K").limits == {"list": (None, None)}   # zero: no limit
    assert Quota.parse("list:5", Quota.default()).limits == {
        "list": (5, None), "digest-lists": DEFAULT_DIGEST_LISTS,
        "namespaces": DEFAULT_NAMESPACES}
    assert Quota.default().limits == {"list": DEFAULT_LIST, "digest-lists": DEFAULT_DIGEST_LISTS,
                                      "namespaces": DEFAULT_NAMESPACES}
    q = Quota.parse("list:7:3K")
    assert Quota.parse(q.text()).limits == q.limits


@pytest.mark.parametrize("bad", ["", "list", "model:1", "list:x", "list:1:2T", "list:1:2:3",
                                 "list:-1", " , ", "namespaces:1:1M", "namespaces:1025", "digest-lists:x",
                                 "list:1,list:2"])
def test_refused_with_a_reason(bad):
    with pytest.raises(QuotaError) as e:
        Quota.parse(bad)
    assert str(e.value).strip()


@given(st.text(max_size=40))
def test_any_text_parses_or_is_refused(text):
    try:
        q = Quota.parse(text)
    except QuotaError as e:
        assert str(e)
        return
    assert Quota.parse(q.text()).limits == q.limits


class Audit:
    def __init__(self):
        self.recs = []

    def record(self, type_, **fields):
        self.recs.append((type_, fields))


def test_admit_entries_and_bytes_audited_once():
    q = Quota.parse("list:3:100")
    audit = Audit()
    q.admit("/c", "list", 2, 50, 10, audit)           # the third entry fits
    with pytest.raises(QuotaExceeded) as e:
        q.admit("/c", "list", 3, 60, 10, audit)
    assert e.value.errno == 5 and "at most 3" in str(e.value)
    with pytest.raises(QuotaExceeded):
        q.admit("/c", "list", 1, 95, 10, audit)       # bytes
    assert [k for k, _ in audit.recs] == ["quota_exceeded"]
    Quota.unlimited().admit("/", "list", 10**9, 10**12, 1, audit)


def test_namespaces_kind_and_within():
    """namespaces: a count (1..1024, 0 no limit of its own), printed without a size;
    Quota.namespaces() is the default when a quota does not say; within() keeps the
    tighter limit of each kind (a quota from inside never loosens its parent's)."""
    q = Quota.parse("namespaces:8")
    assert q.limits == {"namespaces": (8, None)} and q.text() == "namespaces:8"
    assert Quota.parse(q.text()).limits == q.limits
    assert Quota.parse("namespaces:0").namespaces() is None
    assert Quota.unlimited().namespaces() == DEFAULT_NAMESPACES[0]
    outer = Quota.parse("list:100:1M,namespaces:4")
    loose = Quota.parse("list:0:0,namespaces:0", Quota.default())
    assert loose.within(outer).limits == {"list": (100, 1 << 20), "namespaces": (4, None),
                                          "digest-lists": DEFAULT_DIGEST_LISTS}
    tight = Quota.parse("list:10,namespaces:2")
    assert tight.within(outer).limits == {"list": (10, 1 << 20), "namespaces": (2, None)}
    assert tight.within(Quota.unlimited()).limits == tight.limits


def test_digest_lists_counted_by_lists_and_file_bytes():
    """digest-lists: entries are the lists a namespace has loaded, bytes their files'
    sizes; the root (no quota) is never refused."""
    from types import SimpleNamespace as NS
    ns = NS(path="/c", quota=Quota.parse("digest-lists:2:100"))
    idx = NS(lists=lambda: [NS(size=40)])
    audit = Audit()
    admit_digest_list(ns, idx, 60, audit)                      # 2 lists, 100 bytes: fits
    with pytest.raises(QuotaExceeded, match="digest-lists quota reached"):
        admit_digest_list(ns, idx, 61, audit)                  # bytes
    idx2 = NS(lists=lambda: [NS(size=1), NS(size=1)])
    with pytest.raises(QuotaExceeded, match="2 entries, at most 2"):
        admit_digest_list(ns, idx2, 1, audit)                  # lists
    assert [f["kind"] for _, f in audit.recs] == ["digest-lists"]
    admit_digest_list(NS(path="/", quota=None), idx2, 10**9, audit)
