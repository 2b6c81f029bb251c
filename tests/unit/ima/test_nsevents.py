"""imafs.ima.nsevents: the data of the namespace events' ima-buf entries, written
(event_data) and read back (parse_event); malformed data is a ValueError that says
what, never anything else."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imafs.ima.nsevents import (NS_CREATE, NS_EVENTS, NS_INIT, NS_JOIN, NS_REMOVE,
                                event_data, parse_event)


class _List:
    count = 7
    banks = ["sha1", "sha256"]

    def pcr(self, bank, n):
        assert (bank, n) == ("sha256", 10)
        return bytes(range(32))


NS = SimpleNamespace(path="/web/db", id=12, uuid="0f6a3c1e-8d1b-4c6e-9d55-2b7c4a1e9f00",
                     template="ima-ns", hash_algo="sha512", appraise_mode="log",
                     mlist=_List())


def test_create_and_init_carry_the_same_options():
    for event in (NS_CREATE, NS_INIT):
        data = event_data(event, NS)
        assert data == (f"{event} name=/web/db id=12 uuid={NS.uuid} template=ima-ns "
                        f"hash=sha512 appraise=log").encode()
        assert parse_event(data) == {"event": event, "name": "/web/db", "id": "12",
                                     "uuid": NS.uuid, "template": "ima-ns",
                                     "hash": "sha512", "appraise": "log"}


def test_remove_carries_the_final_length_and_pcr10():
    f = parse_event(event_data(NS_REMOVE, NS))
    assert (f["event"], f["entries"], f["pcr10"]) == \
        (NS_REMOVE, "7", "sha256:" + bytes(range(32)).hex())
    # a list without PCRs: the count alone
    bare = SimpleNamespace(**{**vars(NS), "mlist": SimpleNamespace(count=0, banks=[])})
    assert "pcr10" not in parse_event(event_data(NS_REMOVE, bare))


def test_other_events_name_the_namespace_only():
    assert parse_event(event_data(NS_JOIN, NS)) == {"event": NS_JOIN, "name": "/web/db",
                                                    "id": "12", "uuid": NS.uuid}


@pytest.mark.parametrize("data, says", [
    (b"\xff", "not UTF-8"),
    (b"", "not a namespace event"),
    (b"ns-create", "no name= field"),
    (b"boot_aggregate name=/ id=1 uuid=u", "not a namespace event"),
    (b"ns-create name=/a id=1 uuid=u name=/b", "malformed field"),
    (b"ns-create name=/a id=1 uuid=u  template=ima", "malformed field"),
    (b"ns-create name=/a id=1 uuid=u =x", "malformed field"),
    (b"ns-remove name=/a uuid=u", "no id= field"),
    (b"ns-remove name=/a id=-1 uuid=u", "not a number"),
])
def test_malformed_data_is_refused_with_what(data, says):
    with pytest.raises(ValueError, match=says):
        parse_event(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NS_EVENTS), st.lists(st.text(max_size=12), max_size=6),
       st.binary(max_size=40))
def test_parse_refuses_or_returns_what_it_read(event, words, tail):
    data = " ".join([event, *words]).encode() + tail
    try:
        f = parse_event(data)
    except ValueError:
        return
    assert f["event"] == event and f["id"].isdigit()
    assert {"name", "id", "uuid"} <= set(f)
