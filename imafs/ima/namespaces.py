"""Integrity namespaces: each has its own policy, measurement list, PCR banks,
keyring, appraise mode and violation counter, and a parent whose rules still apply.

The root namespace (id 0) is the mount's. Binding processes to namespaces lives in
:class:`NamespaceTree`; how a process is recognised is given by a resolver function
(pid -> namespace id) that the daemon supplies.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.policy import Policy

APPRAISE_MODES = ("enforce", "log", "fix", "off")


@dataclass
class Namespace:
    id: int
    name: str
    parent: "Namespace | None"
    policy: Policy
    mlist: MeasurementList
    keyring: Keyring
    appraise_mode: str = "enforce"
    template: str = "ima-ng"
    hash_algo: str = "sha256"
    policy_epoch: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    children: dict = field(default_factory=dict, repr=False)

    def chain(self) -> list["Namespace"]:
        """This namespace and its ancestors, leaf first."""
        out, ns = [], self
        while ns is not None:
            out.append(ns)
            ns = ns.parent
        return out

    @property
    def xattr_name(self) -> str:
        """Where this namespace keeps its own ``security.ima`` on backing files."""
        return "security.ima" if self.id == 0 else f"security.imafs.ns{self.id}.ima"

    @property
    def path(self) -> str:
        parts, ns = [], self
        while ns is not None and ns.parent is not None:
            parts.append(ns.name)
            ns = ns.parent
        return "/" + "/".join(reversed(parts))

    def set_policy(self, policy: Policy) -> None:
        with self.lock:
            self.policy = policy
            self.policy_epoch += 1

    def epoch(self) -> tuple[int, int]:
        """Verdicts of this namespace depend on its policy and its keys."""
        return (self.policy_epoch, self.keyring.epoch)


class NamespaceTree:
    def __init__(self, root: Namespace, resolver=None):
        self.root = root
        self.by_id: dict[int, Namespace] = {root.id: root}
        self._resolver = resolver

    def of_pid(self, pid: int) -> Namespace:
        """The namespace of a process (the root one unless a resolver says otherwise;
        a resolver returning None for a process it cannot place gets the root)."""
        if self._resolver is None:
            return self.root
        nsid = self._resolver(pid)
        return self.by_id.get(nsid, self.root) if nsid is not None else self.root
