"""ima/quota.py: the quota grammar (parse, print back, refusals that say what is
wrong) and the decision (entries, bytes, audited once)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imafs.ima.quota import DEFAULT_LIST, Quota, QuotaError, QuotaExceeded


def test_parse_and_print():
    assert Quota.parse("list:100000:64M").limits == {"list": (100000, 64 << 20)}
    assert Quota.parse("list:12").limits == {"list": (12, None)}
    assert Quota.parse("list:0:-").limits == {"list": (None, None)}
    assert Quota.parse("list:5", Quota.default()).limits == {"list": (5, None)}
    assert Quota.default().limits == {"list": DEFAULT_LIST}
    q = Quota.parse("list:7:3K")
    assert Quota.parse(q.text()).limits == q.limits


@pytest.mark.parametrize("bad", ["", "list", "model:1", "list:x", "list:1:2T", "list:1:2:3",
                                 "list:-1", " , "])
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
