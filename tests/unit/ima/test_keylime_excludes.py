"""The default excludes of ``imafs keylime-policy`` (imafs.ima.keylime), checked with
keylime's own list checker: namespaces created and removed after a policy was written
pass, and so do package managers' rewritten files; a file entry of the same name as
an event, or any other new file, does not."""
from __future__ import annotations

import json
import re
import sys
import types

import pytest

from imafs.assemble import namespace_tree
from imafs.ima import keylime as kl
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.nsevents import NS_EVENTS
from imafs.ima.templates import build_entry
from imafs.store import Store


def _keylime():
    sys.modules.setdefault("gpg", types.ModuleType("gpg"))
    try:
        from keylime.common.algorithms import Hash
        from keylime.ima import ima
    except ImportError as e:
        pytest.skip(f"keylime is not importable: {e}")
    return ima, Hash


class Binder:
    def bind(self, pid, nsid):
        pass

    def members(self, nsid):
        return []

    def remove(self, nsid):
        pass

    ns_of = read_ns = lambda self, pid: 0


def test_default_excludes_are_the_events_and_mutable_state_only():
    ex = kl.default_excludes()
    assert ex[0] == "^(ns-create|ns-init|ns-remove|ns-join|ns-join-failed)$"
    rx = [re.compile(p) for p in ex]
    hit = lambda n: any(r.match(n) for r in rx)       # noqa: E731 - keylime's re.match
    for name in (*NS_EVENTS, "/var/lib/dpkg/status", "/var/lib/dpkg/status-old",
                 "/var/lib/dpkg/triggers/File", "/var/lib/apt/lists/x_Packages",
                 "/var/cache/debconf/config.dat"):
        assert hit(name), name
    for name in ("/ns-create", "ns-created", "xns-init", "/usr/bin/dpkg",
                 "/var/lib/dpkg/info/bash.list", "/etc/apt/sources.list", "boot_aggregate"):
        assert not hit(name), name


def test_drop_excluded_removes_mutable_digests_only():
    p = kl.empty_policy()
    p["digests"] = {"/var/lib/dpkg/status": ["aa"], "/usr/bin/dpkg": ["bb"],
                    "boot_aggregate": ["00"]}
    assert kl.drop_excluded(p, kl.MUTABLE_EXCLUDES) == 1
    assert set(p["digests"]) == {"/usr/bin/dpkg", "boot_aggregate"}


def test_keylime_passes_namespaces_made_after_the_policy(tmp_path):
    ima, Hash = _keylime()
    store = Store(str(tmp_path / "lmdb"))
    try:
        t = namespace_tree(store, [], keyring=Keyring(store, 0),
                           mlist=MeasurementList(store, 0), binder=Binder())
        root = t.root
        root.mlist.add(build_entry("ima-ng", name="/usr/bin/true", algo="sha256",
                                   digest=b"\x11" * 32, pcr=10))
        policy = kl.empty_policy()
        kl.from_ascii_list(b"".join(root.mlist.iter_view("ascii")).splitlines(True),
                           policy=policy)
        policy["excludes"] = kl.default_excludes()
        kl.finish(policy)
        ima.validate_runtime_policy(policy)
        # after the policy: containers come and go, dpkg rewrites its status
        for i in range(3):
            t.ns_create(root, f"c{i}", 100 + i, 0)
            t.ns_remove(root, f"c{i}", 0, 0)
        root.mlist.add(build_entry("ima-ng", name="/var/lib/dpkg/status", algo="sha256",
                                   digest=b"\x22" * 32, pcr=10))

        def check(p):
            lines = b"".join(root.mlist.iter_view("ascii")).decode().splitlines(True)
            pcr = root.mlist.pcr("sha1", 10).hex()
            running, failure = ima.process_measurement_list(
                None, lines, json.loads(json.dumps(p)), pcrval=pcr, hash_alg=Hash.SHA1)
            assert running == pcr
            return {e.event_id for e in failure.events}

        assert check(policy) == set()
        without = dict(policy, excludes=[])
        assert check(without) != set()          # the events fail without the excludes
        # anything else new still fails
        root.mlist.add(build_entry("ima-ng", name="/usr/bin/new", algo="sha256",
                                   digest=b"\x33" * 32, pcr=10))
        assert check(policy) == {"ima.validation.ima-ng.not_in_allowlist"}
    finally:
        store.close()
