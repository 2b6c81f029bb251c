"""Namespace trees without a mount, a stand-in for the binder that moves processes
(``Binder``), and processes with a known pid, for the namespace and control-file
tests."""
from __future__ import annotations

import subprocess

from imafs.ima.binding import BindingError
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.namespaces import Namespace, NamespaceTree
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import parse_policy
from imafs.ima.quota import Quota


class Binder:
    """A stand-in for imafs.ima.binding's Binder: which namespace each pid is in, a
    dict (``where``; an unknown pid is in ``default``); ``fail`` makes binds raise
    (a process that did not move); ``removed``: the namespaces removed."""

    def __init__(self, default: int | None = 0):
        self.where: dict[int, int] = {}
        self.removed: list[int] = []
        self.fail = False
        self.default = default

    def ns_of(self, pid):
        return self.where.get(pid, self.default)

    def read_ns(self, pid):
        return self.ns_of(pid)

    def bind(self, pid, ns_id, **kw):
        if self.fail:
            raise BindingError(f"pid {pid} did not move into namespace {ns_id}")
        self.where[pid] = ns_id
        return "cgroup"

    def members(self, ns_id):
        return [p for p, n in self.where.items() if n == ns_id]

    def remove(self, ns_id):
        self.removed.append(ns_id)


def make_tree(store=None, resolver=None, binder=None) -> NamespaceTree:
    def mlist(nsid, template="ima-ng", algo="sha256"):
        if store is None:
            return _NoList()
        return MeasurementList(store, nsid, template=template, hash_algo=algo)

    root = Namespace(id=0, name="", parent=None, policy=Policy([]), mlist=mlist(0),
                     keyring=Keyring(store, 0))

    def factory(nsid, name, parent, o, policy_text):
        template = o.get("template") or parent.template
        algo = o.get("hash") or parent.hash_algo
        return Namespace(quota=Quota.parse(o["quota"], Quota.default()) if o.get("quota")
                         else Quota.default(), quota_spec=o.get("quota") or "",
                         id=nsid, name=name, parent=parent,
                         policy=Policy(parse_policy(policy_text)),
                         mlist=mlist(nsid, template, algo), keyring=Keyring(store, nsid),
                         appraise_mode=o.get("appraise") or parent.appraise_mode,
                         template=template, hash_algo=algo)

    return NamespaceTree(root, resolver, store=store, factory=factory, binder=binder)


class _NoList:
    def add(self, entry):
        return True


def sleeper(procs, cmd="exec sleep 30"):
    p = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    procs.append(p)
    return p


def spawn_with_pid(pid: int, procs, tries: int = 200):
    """A sleeper that gets exactly ``pid`` (free again: its process was reaped), by
    writing ns_last_pid just before forking, as CRIU restores pids; None when other
    processes of the machine keep taking it first."""
    for _ in range(tries):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = sleeper(procs)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None
