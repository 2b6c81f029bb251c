"""Integrity namespaces: each has its own policy, measurement list, PCR banks,
keyring, appraise mode and violation counter, and a parent whose rules still apply.

The root namespace (id 0) is the mount's. Binding processes to namespaces lives in
:class:`NamespaceTree`; how a process is recognised is given by a resolver function
(pid -> namespace id) that the daemon supplies.

Persistence: child namespaces (their options and policies) are in the store's ``ns``
database; lists, PCRs and keys in their own databases. The root namespace is not
stored here: its policy (and its keys) come from the command line at each mount.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import re
import struct
import threading
import uuid
from dataclasses import dataclass, field

from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.policy import Policy

APPRAISE_MODES = ("enforce", "log", "fix", "off")
# Limits, as the kernel's for user namespaces: every open is measured, appraised and
# recorded in its namespace's list and every ancestor's (so the depth bounds what one
# open costs), and each namespace holds a policy, a list, PCRs, a keyring and a cgroup.
# create_user_ns() refuses a user namespace deeper than 32 below the initial one (and
# create_pid_namespace() a pid namespace deeper than MAX_PID_NS_LEVEL, 32) or more than
# the user.max_user_namespaces count with ENOSPC; ns-create does the same.
MAX_NS_DEPTH = 32           # levels below the root namespace (the root is level 0)
MAX_NAMESPACES = 1024       # namespaces of a mount, the root not counted


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

    def fingerprint(self) -> bytes:
        """The same as content, stable across mounts (for verdicts kept in LMDB): its
        id, options, policy text and the certificates of its keyring."""
        ep = self.epoch()
        cached = getattr(self, "_fp", None)
        if cached is not None and cached[0] == ep:
            return cached[1]
        h = hashlib.sha256(repr((self.id, self.appraise_mode, self.template,
                                 self.hash_algo)).encode())
        h.update(self.policy.text().encode())
        for k in sorted(k.fingerprint for k in self.keyring):
            h.update(k)
        fp = h.digest()[:16]
        self._fp = (ep, fp)
        return fp


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
CREATE_OPTIONS = {"template", "hash", "appraise"}


class NamespaceError(Exception):
    """A refused namespace operation; ``errno`` says how the control file fails."""

    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


class NamespaceTree:
    """All namespaces of a mount, persisted in LMDB (db ``ns``: id -> JSON)."""

    def __init__(self, root: Namespace, resolver=None, *, store=None, factory=None):
        self.root = root
        self.by_id: dict[int, Namespace] = {root.id: root}
        self._resolver = resolver
        self.store = store
        self._factory = factory          # (id, name, parent, opts, policy_text) -> Namespace
        self._lock = threading.RLock()
        self._high = root.id             # highest id ever given (ids are never reused)
        self._acting = threading.local()  # acting_as(): (pid, ns) of this thread
        if store is not None:
            self._load()

    # --- processes
    def of_pid(self, pid: int) -> Namespace | None:
        """The namespace of a process; None when it cannot be determined (the caller
        must then refuse, never fall back to the host)."""
        acting = getattr(self._acting, "as_", None)
        if acting is not None and acting[0] == pid:
            return acting[1]
        if self._resolver is None:
            return self.root
        nsid = self._resolver(pid)
        if nsid is None:
            return None
        return self.by_id.get(nsid)

    @contextlib.contextmanager
    def acting_as(self, pid: int, ns: Namespace):
        """Within this block, in this thread only, ``pid`` is taken to be in ``ns``:
        a file a control write loads into a namespace (a policy by path, POLICY_CHECK)
        is decided for that namespace and its ancestors, whichever namespace the
        writer is in (itself or an ancestor) and even if it has exited since."""
        old = getattr(self._acting, "as_", None)
        self._acting.as_ = (pid, ns)
        try:
            yield
        finally:
            self._acting.as_ = old

    def descendant(self, base: Namespace, path: str) -> Namespace:
        """The namespace ``path`` names below ``base`` (``web``, ``web/db``; also an
        absolute path below ``base``'s own), for ``ns-join``: only deeper, never
        ``base`` itself, an ancestor or a sibling (EPERM); ENOENT when it does not
        exist; EINVAL for a malformed path."""
        path = path.strip()
        if not path:
            raise NamespaceError(errno.EINVAL, "ns-join needs the name of a descendant "
                                               "namespace (NAME or NAME/NAME...)")
        if path.startswith("/"):
            own = base.path.rstrip("/") + "/"
            if path.rstrip("/") + "/" == own or not path.startswith(own):
                raise NamespaceError(errno.EPERM, f"{path} is not below namespace "
                                                  f"{base.path}: a process only moves "
                                                  f"deeper")
            path = path[len(own):]
        parts = path.strip("/").split("/")
        if any(p in ("..", ".") for p in parts):
            raise NamespaceError(errno.EPERM, f"{path!r}: a process only moves deeper, "
                                              f"never up or sideways")
        ns = base
        for p in parts:
            if not NAME_RE.match(p):
                raise NamespaceError(errno.EINVAL, f"bad namespace name {p!r}")
            child = ns.children.get(p)
            if child is None:
                raise NamespaceError(errno.ENOENT, f"no namespace {p!r} under {ns.path}")
            ns = child
        return ns

    # --- persistence
    def _save(self, ns: Namespace, txn=None) -> None:
        if self.store is None or ns.parent is None:
            return
        rec = {"name": ns.name, "parent": ns.parent.id, "template": ns.template,
               "hash": ns.hash_algo, "appraise": ns.appraise_mode,
               "policy": ns.policy.text(), "uuid": getattr(ns, "uuid", "")}
        with self.store.env.begin(write=True, db=self.store.db("ns")) as t:
            t.put(struct.pack(">I", ns.id), json.dumps(rec).encode())

    def _load(self) -> None:
        with self.store.env.begin(db=self.store.db("ns")) as txn:
            recs = [(struct.unpack(">I", bytes(k))[0], json.loads(bytes(v)))
                    for k, v in txn.cursor()]
        for nsid, rec in sorted(recs):
            parent = self.by_id.get(rec["parent"])
            if parent is None:
                continue
            ns = self._factory(nsid, rec["name"], parent,
                               {"template": rec["template"], "hash": rec["hash"],
                                "appraise": rec["appraise"]}, rec["policy"])
            ns.uuid = rec.get("uuid", "")
            parent.children[ns.name] = ns
            self.by_id[nsid] = ns

    def _next_id(self) -> int:
        """Namespace ids are never reused (a removed namespace's list stays in LMDB):
        not after removing the newest one, not across a reload."""
        nxt = max(max(self.by_id), self._high) + 1
        if self.store is not None:
            with self.store.env.begin(write=True, db=self.store.db("meta")) as t:
                raw = t.get(b"ns_next")
                if raw is not None:
                    nxt = max(nxt, int(bytes(raw)))
                t.put(b"ns_next", str(nxt + 1).encode())
        self._high = nxt
        return nxt

    def save_policy(self, ns: Namespace) -> None:
        self._save(ns)

    # --- create / remove
    def parse_create(self, text: str) -> tuple[str, dict]:
        words = text.split()
        if not words:
            raise NamespaceError(errno.EINVAL, "ns-create needs a name")
        name, opts = words[0], {}
        if not NAME_RE.match(name):
            raise NamespaceError(errno.EINVAL, f"bad namespace name {name!r} (letters, digits, "
                                               f"'.', '_', '-'; at most 63)")
        for w in words[1:]:
            k, eq, v = w.partition("=")
            if not eq or k not in CREATE_OPTIONS:
                raise NamespaceError(errno.EINVAL, f"unknown option {w!r} (template=, hash=, "
                                                   f"appraise=)")
            if k in opts:
                raise NamespaceError(errno.EINVAL, f"option {k} given twice")
            opts[k] = v
        if "appraise" in opts and opts["appraise"] not in APPRAISE_MODES:
            raise NamespaceError(errno.EINVAL, f"appraise must be one of {', '.join(APPRAISE_MODES)}")
        if "template" in opts:
            from imafs.ima.templates import TEMPLATES
            if opts["template"] not in TEMPLATES:
                raise NamespaceError(errno.EINVAL, f"unknown template {opts['template']!r}")
        if "hash" in opts:
            from imafs.ima import hashing
            try:
                algo = hashing.hash_algo(opts["hash"])
                algo.new()
            except (ValueError, hashing.HashAlgoError) as e:
                raise NamespaceError(errno.EINVAL, f"hash: {e}")
            opts["hash"] = algo.name        # the kernel's name: "SHA512" is sha512
        return name, opts

    def create(self, parent: Namespace, name: str, opts: dict) -> Namespace:
        with self._lock:
            path = f"{parent.path.rstrip('/')}/{name}"
            if name in parent.children:
                raise NamespaceError(errno.EEXIST, f"namespace {path} exists")
            depth = len(parent.chain())          # the new namespace's level
            if depth > MAX_NS_DEPTH:
                raise NamespaceError(errno.ENOSPC, f"namespace {path} would be {depth} "
                                                   f"levels deep: namespaces nest at most "
                                                   f"{MAX_NS_DEPTH} below the root")
            if len(self.by_id) - 1 >= MAX_NAMESPACES:
                raise NamespaceError(errno.ENOSPC, f"the mount holds {MAX_NAMESPACES} "
                                                   f"integrity namespaces, the most it "
                                                   f"may: remove one first")
            nsid = self._next_id()
            ns = self._factory(nsid, name, parent, opts, "")
            ns.uuid = str(uuid.uuid4())
            parent.children[name] = ns
            self.by_id[nsid] = ns
            self._save(ns)
            return ns

    def remove(self, parent: Namespace, name: str) -> Namespace:
        with self._lock:
            ns = parent.children.get(name)
            if ns is None:
                raise NamespaceError(errno.ENOENT, f"no namespace {name!r} under {parent.path}")
            if ns.children:
                raise NamespaceError(errno.ENOTEMPTY, f"namespace {ns.path} has child namespaces")
            del parent.children[name]
            del self.by_id[ns.id]
            if self.store is not None:
                with self.store.env.begin(write=True, db=self.store.db("ns")) as t:
                    t.delete(struct.pack(">I", ns.id))
            return ns
