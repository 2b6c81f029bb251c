"""imafs.ima.verifylog: namespace events (ns-create, ns-init, ns-remove, ns-join) are
checked in a list, and child lists are tied to their parent's events -- what replaces
keylime's check of these entries once a keylime policy excludes them."""
from __future__ import annotations

import pytest

from imafs.assemble import namespace_tree
from imafs.ima import verifylog
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.templates import buf_entry, build_entry
from imafs.store import Store


class Binder:
    def __init__(self):
        self.inside = {}

    def bind(self, pid, nsid):
        self.inside.setdefault(nsid, set()).add(pid)

    def members(self, nsid):
        return sorted(self.inside.get(nsid, ()))

    def remove(self, nsid):
        self.inside.pop(nsid, None)

    ns_of = read_ns = lambda self, pid: 0


@pytest.fixture
def tree(tmp_path):
    store = Store(str(tmp_path / "lmdb"))
    binder = Binder()
    t = namespace_tree(store, [], keyring=Keyring(store, 0), mlist=MeasurementList(store, 0),
                       binder=binder)
    t.test_binder = binder
    yield t
    store.close()


def listing(ns) -> bytes:
    return b"".join(ns.mlist.iter_view("binary"))


def report(data: bytes):
    return verifylog.verify_bytes(data)


def file_entry(path: str):
    return build_entry("ima-ng", name=path, algo="sha256", digest=bytes(32), pcr=10)


def test_a_host_list_with_creations_and_removals_links_its_children(tree):
    web = tree.ns_create(tree.root, "web appraise=log", 11, 0)
    web.mlist.add(file_entry("/etc/hostname"))
    db = tree.ns_create(tree.root, "db", 12, 0)
    child = listing(web)                      # web's list before its removal...
    tree.test_binder.inside.clear()
    tree.ns_remove(tree.root, "web", 0, 0)    # ...is its final list
    host = report(listing(tree.root))
    assert host.ok, host.problems
    assert [ev for _, ev, _, _ in host.ns_events] == ["ns-create", "ns-create", "ns-remove"]
    links = verifylog.link(host, [("web", report(child)), ("db", report(listing(db)))])
    assert [lk.problems for lk in links] == [[], []]
    assert links[0].removed_at == 3 and links[0].created_at == 1
    assert links[1].removed_at is None and links[1].name == "/db"


def test_a_child_list_that_does_not_match_its_removal_is_caught(tree):
    web = tree.ns_create(tree.root, "web", 11, 0)
    web.mlist.add(file_entry("/a"))
    tree.test_binder.inside.clear()
    tree.ns_remove(tree.root, "web", 0, 0)
    host = report(listing(tree.root))
    longer = listing(web) + file_entry("/added-later").binary_record("sha1")
    shorter_data = b"".join(e.binary_record("sha1") for e in
                            list(web.mlist.entries())[:-1])
    for data, why in ((longer, "with 3 entries, the list has 4"),
                      (shorter_data, "with 3 entries, the list has 2")):
        lk = verifylog.link(host, [("web", report(data))])[0]
        assert any(why in p for p in lk.problems), lk.problems
    # another namespace's list, and a list that is no child's
    other = tree.ns_create(tree.root, "other", 13, 0)
    host2 = report(b"".join(e.binary_record("sha1") for e in list(tree.root.mlist.entries())[:2]))
    lk = verifylog.link(host2, [("other", report(listing(other)))])[0]
    assert "is no ns-create of the parent list" in lk.problems[0]
    lk = verifylog.link(host, [("root", report(listing(tree.root)))])[0]
    assert "no ns-init entry" in lk.problems[0]


@pytest.mark.parametrize("entries,why", [
    ([b"ns-remove name=/web id=1 uuid=u entries=2"], "no earlier ns-create of this list"),
    ([b"ns-create name=/web id=1 uuid=u", b"ns-create name=/db id=1 uuid=v"],
     "created twice"),
    ([b"ns-create name=/web id=x uuid=u"], "is not a number"),
    ([b"ns-create name=/web uuid=u"], "no id= field"),
    ([b"ns-join name=/web id=1 uuid=u from=/"], "no earlier ns-create"),
    ([b"ns-create name=/web id=1 uuid=u", b"ns-remove name=/web id=1 uuid=OTHER entries=2"],
     "no earlier ns-create"),
    ([b"something else"], "not a namespace event"),
])
def test_malformed_or_unexplained_events_are_problems(entries, why):
    names = [d.split(b" ", 1)[0].decode() if d.startswith(b"ns-") else "ns-create"
             for d in entries]
    data = build_entry("ima-ng", name="boot_aggregate", algo="sha256", digest=bytes(32),
                       pcr=10).binary_record("sha1")
    data += b"".join(buf_entry(n, d).binary_record("sha1") for n, d in zip(names, entries))
    rep = report(data)
    assert not rep.ok and rep.problems[0].kind == "ns-event"
    assert why in rep.problems[0].detail, rep.problems


def test_ns_init_only_second(tree):
    web = tree.ns_create(tree.root, "web", 11, 0)
    entries = list(web.mlist.entries())
    moved = [entries[0], file_entry("/x"), entries[1]]
    rep = report(b"".join(e.binary_record("sha1") for e in moved))
    assert not rep.ok and "second entry" in rep.problems[0].detail
