"""imafs.ima.hostns: namespaces made, listed and removed from the host (what the control
socket's requests do), on a real LMDB store with a binder that records its moves."""
from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest

from imafs.assemble import namespace_tree
from imafs.ima import hostns
from imafs.ima.hostns import CreateRequest, HostNamespaces, Target
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import NamespaceError
from imafs.ima.nsevents import parse_event
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import parse_policy
from imafs.ima.templates import parse_ascii
from imafs.store import Store

POLICY = "measure func=BPRM_CHECK\nmeasure func=FILE_CHECK mask=MAY_READ\n"


class Binder:
    """Records bind(pid, ns); ``members`` says who is in a namespace; ``fail`` makes
    the next bind raise (a process that exited)."""

    def __init__(self):
        self.moves, self.inside, self.fail = [], {}, None

    def bind(self, pid, nsid):
        if self.fail:
            raise OSError(errno.ESRCH, self.fail)
        self.moves.append((pid, nsid))
        self.inside.setdefault(nsid, set()).add(pid)

    def members(self, nsid):
        return sorted(self.inside.get(nsid, ()))

    def remove(self, nsid):
        self.inside.pop(nsid, None)

    ns_of = read_ns = lambda self, pid: 0


@pytest.fixture
def host(tmp_path):
    store = Store(str(tmp_path / "lmdb"))
    binder = Binder()
    tree = namespace_tree(store, [], keyring=Keyring(store, 0),
                          mlist=MeasurementList(store, 0), binder=binder)
    yield HostNamespaces(tree), binder
    store.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    from imafs.cli import main
    d = tmp_path_factory.mktemp("k")
    assert main(["keygen", "--out", str(d), "--type", "ec"]) == 0
    return (d / "signing_cert.der").read_bytes()


def names(ns) -> list[bytes]:
    return [e.name for e in parse_ascii(b"".join(ns.mlist.iter_view("ascii")))]


def test_create_with_policy_and_keys_records_and_binds(host, cert):
    h, binder = host
    out = h.create(CreateRequest("3f" * 32, Target(4242), {"appraise": "log"}, POLICY, [cert]))
    ns = h.tree.root.children["3f" * 32]
    assert out["origin"] == "host" == ns.origin and out["appraise"] == "log"
    assert ns.policy.text() == Policy(parse_policy(POLICY.encode())).text()
    assert [k.der for k in ns.keyring] == [cert]
    assert out["keys"] == [f"{k.keyid:08x}" for k in ns.keyring]
    assert binder.moves == [(4242, ns.id)]
    # the host list's ns-create carries origin, the policy's digest and the key ids;
    # the child's ns-init the same data
    root_events = [e for e in parse_ascii(b"".join(h.tree.root.mlist.iter_view("ascii")))
                   if e.name == b"ns-create"]
    f = parse_event(root_events[0].get("buf"))
    assert f["origin"] == "host" and f["keys"] == out["keys"][0]
    assert f["policy"] == "sha256:" + hashlib.sha256(ns.policy.text().encode()).hexdigest()
    assert names(ns) == [b"boot_aggregate", b"ns-init"]


@pytest.mark.parametrize("req,why", [
    (dict(policy="measure func=NOPE\n"), "policy: line 1"),
    (dict(certs=[b"0\x82\x01\x00garbage"]), "keys: certificate 1"),
    (dict(options={"appraise": "maybe"}), "appraise=: "),
    (dict(options={"policy": "/etc/p"}), "policy=: "),
    (dict(options={"quota": "3"}), "expected KIND:ENTRIES"),
    (dict(options={"digest_lists": "/x"}), "not built yet"),
    (dict(name="a/b"), "bad namespace name"),
    (dict(policy="measure func=BPRM_CHECK\n" * 4097), "rules (at most 4096)"),
])
def test_refusals_make_nothing(host, req, why):
    h, binder = host
    before = h.tree.root.mlist.count
    args = dict(name="web", target=Target(1), options={}, policy=None, certs=[])
    args.update(req)
    with pytest.raises(NamespaceError) as e:
        h.create(CreateRequest(**args))
    assert why in str(e.value)
    assert not h.tree.root.children and h.tree.root.mlist.count == before
    assert binder.moves == []


def test_a_process_that_cannot_be_bound_undoes_the_creation(host):
    h, binder = host
    binder.fail = "no such process"
    with pytest.raises(NamespaceError) as e:
        h.create(CreateRequest("web", Target(99999)))
    assert e.value.errno == errno.EPERM and "removed again" in str(e.value)
    assert not h.tree.root.children
    assert names(h.tree.root)[-2:] == [b"ns-create", b"ns-remove"]   # the list says so


def test_a_pidfd_of_another_process_is_refused(host):
    h, binder = host
    fd = os.pidfd_open(os.getpid())
    try:
        with pytest.raises(NamespaceError) as e:
            h.create(CreateRequest("web", Target(os.getpid() + 100000, fd)))
        assert e.value.errno in (errno.ESRCH, errno.EPERM) and binder.moves == []
        assert hostns.pidfd_pid(fd) == os.getpid()
    finally:
        os.close(fd)


def test_name_taken_is_eexist(host):
    h, _ = host
    h.create(CreateRequest("web", Target(1)))
    with pytest.raises(NamespaceError) as e:
        h.create(CreateRequest("web", Target(2)))
    assert e.value.errno == errno.EEXIST


def test_list_and_remove_with_archive(host, tmp_path):
    h, binder = host
    out = h.create(CreateRequest("web", Target(7), policy=POLICY))
    h.create(CreateRequest("db", Target(8)))
    listed = h.list()
    assert [n["name"] for n in listed] == ["db", "web"]
    assert listed[1]["processes"] == 1 and listed[1]["rules"] == 2
    with pytest.raises(NamespaceError) as e:
        h.remove("web")
    assert e.value.errno == errno.EBUSY
    binder.inside.clear()
    with pytest.raises(NamespaceError) as e:
        h.remove("web", uuid="not-this-one")
    assert e.value.errno == errno.ESTALE
    with pytest.raises(NamespaceError) as e:
        h.remove("nope")
    assert e.value.errno == errno.ENOENT
    arch = tmp_path / "archive"
    arch.mkdir()
    fd = os.open(arch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        gone = h.remove("web", uuid=out["uuid"], archive_fd=fd)
    finally:
        os.close(fd)
    d = arch / gone["archive"]
    assert gone["archive"] == f"web.{out['id']}" and gone["entries"] == 2
    assert sorted(p.name for p in d.iterdir()) == [
        "ascii_runtime_measurements", "ascii_runtime_measurements_sha256",
        "binary_runtime_measurements", "binary_runtime_measurements_sha256",
        "namespace.json", "pcrs"]
    info = json.loads((d / "namespace.json").read_text())
    assert info["uuid"] == out["uuid"] and info["entries"] == 2 and info["origin"] == "host"
    assert (d / "pcrs" / "sha256").read_text().splitlines()[10] == \
        f"PCR-10: {gone['pcr10_sha256']}"
    assert [e.name for e in parse_ascii((d / "ascii_runtime_measurements").read_bytes())] \
        == [b"boot_aggregate", b"ns-init"]
    assert "web" not in h.tree.root.children
    assert names(h.tree.root)[-1] == b"ns-remove"
    # an archive directory that already holds NAME.ID: refused, nothing removed
    h.create(CreateRequest("web2", Target(9)))
    binder.inside.clear()
    nid = h.tree.root.children["web2"].id
    (arch / f"web2.{nid}").mkdir()
    fd = os.open(arch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(NamespaceError) as e:
            h.remove("web2", archive_fd=fd)
    finally:
        os.close(fd)
    assert "archive" in str(e.value) and "web2" in h.tree.root.children


@pytest.fixture
def host_models(tmp_path):
    from imafs.ima.modelstore import ModelStore
    store = Store(str(tmp_path / "lmdb"))
    binder = Binder()
    models = ModelStore(store, bytes(range(32)))
    tree = namespace_tree(store, [], keyring=Keyring(store, 0),
                          mlist=MeasurementList(store, 0), binder=binder, models=models)
    yield HostNamespaces(tree), binder
    store.close()


def _model(aggregate: bytes) -> str:
    from imafs.ima import model as M, modelmap as mm
    from imafs.ima.modelfile import format_model
    m = M.Model(aggregate)
    m.decide(M.Actor((1, 1), None, mm.Coe()),
             mm.file_open("/a", mm.Inode(0, 0, 0o100644), bytes(32), 4))
    return format_model(m.export()).decode()


def test_create_with_a_model(host_models):
    """model=learn, or a model file's text: the namespace's model from its creation,
    its ns-create recording which (model=learn, model=state:HEX); ns-list says its
    mode; model-export gives the file back."""
    h, binder = host_models
    text = _model(bytes(range(32)))
    out = h.create(CreateRequest("m", Target(7), {}, None, [], model=text))
    ns = h.tree.root.children["m"]
    assert out["model"] == "sealed" and ns.model.mode == "sealed" and ns.model.points
    assert h.tree.models.make(ns.id, "host").mode == "sealed"     # stored
    data = [parse_event(e.get("buf")) for e in parse_ascii(
        b"".join(h.tree.root.mlist.iter_view("ascii"))) if e.name == b"ns-create"]
    assert data[0]["model"] == "state:" + ns.model.state().hex()
    ex = h.model_export("m", limit=1 << 20)
    assert ex["model"] == text and ex["mode"] == "sealed"
    h.create(CreateRequest("l", Target(8), {"model": "learn"}, None, []))
    assert h.tree.root.children["l"].model.mode == "learn"
    assert [d["model"] for d in [parse_event(e.get("buf")) for e in parse_ascii(
        b"".join(h.tree.root.mlist.iter_view("ascii"))) if e.name == b"ns-create"]][1] \
        == "learn"
    with pytest.raises(NamespaceError) as e:
        h.model_export("m", limit=10)
    assert e.value.errno == errno.EFBIG
    with pytest.raises(NamespaceError) as e:
        h.model_export("nope", limit=1 << 20)
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize("kw,why", [
    (dict(options={"model": "/etc/x.model"}), "goes as its text"),
    (dict(model="aggregate 00\n"), "model file line 1"),
    (dict(model=_model(bytes(32))), "is not this mount's"),
    (dict(options={"model": "learn"}, model=_model(bytes(range(32)))), "one or the other"),
])
def test_model_refusals_make_nothing(host_models, kw, why):
    h, binder = host_models
    before = h.tree.root.mlist.count
    args = dict(name="web", target=Target(1), options={}, policy=None, certs=[])
    args.update(kw)
    with pytest.raises(NamespaceError) as e:
        h.create(CreateRequest(**args))
    assert why in str(e.value) and e.value.errno == errno.EINVAL
    assert not h.tree.root.children and h.tree.root.mlist.count == before
    assert binder.moves == []
