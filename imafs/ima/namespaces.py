"""Integrity namespaces: each has its own policy, measurement list, PCR banks,
keyring, appraise mode and violation counter, and a parent whose rules still apply.

The root namespace (id 0) is the mount's. Binding processes to namespaces lives in
:class:`NamespaceTree`; how a process is recognised is given by a resolver function
(pid -> namespace id) that the daemon supplies.

Persistence: child namespaces (their options and policies) are in the store's ``ns``
database; lists, PCRs and keys in their own databases. The root namespace is not
stored here: its policy (and its keys) come from the command line at each mount.

``ns-create``, ``ns-join`` and ``ns-remove`` (:meth:`NamespaceTree.ns_create`,
``ns_join``, ``ns_remove``) record the change in the parent's list (the records:
nsevents.py) and move processes through the binder.

Each namespace has its own ``security.ima`` and ``security.evm``: the root's are the
file's own attributes; a child's are kept under private names
(``security.imafs.nsID.ima``, ``.evm``), written and read as ``security.ima`` /
``security.evm`` by the child's processes (nsxattr.py's :class:`XattrView`), and never
replace the host's. A child that has written no ``security.ima`` of its own sees, and appraises
against its own keyring, the file's own (the image's) value
(:meth:`Namespace.ima_xattr`). Each namespace has its own EVM state (mode, HMAC key,
flags: ``Namespace.evm``, imafs/ima/evm_hooks.py).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import struct
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable

from imafs.ima import nsoptions
from imafs.ima.evm_hooks import EvmState
from imafs.ima.keys import Keyring
from imafs.ima.measurelog import MeasurementList
from imafs.ima.nsevents import (NS_CREATE, NS_INIT, NS_JOIN, NS_JOIN_FAILED, NS_REMOVE,
                                event_data)
from imafs.ima.nsoptions import APPRAISE_MODES, NAME_RE, OptionError  # noqa: F401
from imafs.ima.nsxattr import EVM_XATTR, IMA_XATTR, PRIVATE_XATTR_PREFIX
from imafs.ima.policy import Policy
from imafs.ima.quota import DEFAULT_NAMESPACES, Quota
from imafs.ima.record import record_buffer

log = logging.getLogger("imafs.engine")

# Limits, as the kernel's for user namespaces: every open is measured, appraised and
# recorded in its namespace's list and every ancestor's (so the depth bounds what one
# open costs), and each namespace holds a policy, a list, PCRs, a keyring and a cgroup.
# create_user_ns() refuses a user namespace deeper than 32 below the initial one (and
# create_pid_namespace() a pid namespace deeper than MAX_PID_NS_LEVEL, 32) or more than
# the user.max_user_namespaces count with ENOSPC; ns-create does the same.
MAX_NS_DEPTH = 32           # levels below the root namespace (the root is level 0)
MAX_NAMESPACES = 1024       # namespaces of a mount, the root not counted
# Namespaces count per subtree: a child namespace and all its descendants may hold at
# most this many namespaces together (itself included) unless its quota says otherwise
# (quota.py, kind ``namespaces``), so that one container cannot take the mount's 1024
# from the others (issue 14 item 5); every ancestor's quota applies as well.
DEFAULT_SUBTREE_NAMESPACES = DEFAULT_NAMESPACES[0]
# The root namespace has no subtree quota (it is the mount's): its children made from
# inside count per creator instead -- per container, the pid namespace just below the
# daemon's that the creating process is in (a process that is not the host: without
# CAP_SYS_ADMIN in the initial user namespace). A container in the root namespace
# that makes a nested pid namespace for each ns-create still makes at most this many
# (issue 15: one container made 1,022 namespaces in 6 s).
MAX_ROOT_CHILDREN_PER_CREATOR = DEFAULT_SUBTREE_NAMESPACES


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
    origin: str = "inside"      # "host": made from the host (control socket)
    evm: EvmState = field(default_factory=EvmState)
    #: what the namespace may make the daemon store (quota.py); the root's: no limit
    quota: Quota = field(default_factory=Quota.unlimited)
    quota_spec: str = ""        # its own ``quota=`` option, if any (kept; over the default)
    # the namespace's behaviour model (imafs/ima/model.py; docs/models.md), or None;
    # model_option: what ns-create's model= said ("learn" or a model file's path)
    model: object = field(default=None, repr=False)
    model_option: str = ""
    subtree: int = 1            # namespaces in its subtree, itself included
    creator: str = ""           # the container that made it from inside ("": the host)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    children: dict = field(default_factory=dict, repr=False)
    # the digest lists loaded into this namespace (ima/digest_index.DigestListIndex;
    # None: none can be): they vouch for files to this namespace's rules only
    digest_lists: object = field(default=None, repr=False)

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
        return IMA_XATTR if self.id == 0 else f"{PRIVATE_XATTR_PREFIX}ns{self.id}.ima"

    @property
    def subtree_limit(self) -> int | None:
        """How many namespaces this one and its descendants may hold together: its
        quota's ``namespaces`` kind (quota.py; default DEFAULT_SUBTREE_NAMESPACES); the
        root's is the mount's (MAX_NAMESPACES, checked apart); None: no limit of its
        own."""
        if self.parent is None:
            return None
        return self.quota.namespaces()

    @property
    def evm_xattr_name(self) -> str:
        """Where this namespace keeps its own ``security.evm`` on backing files."""
        return EVM_XATTR if self.id == 0 else f"{PRIVATE_XATTR_PREFIX}ns{self.id}.evm"

    def ima_xattr(self, getxattr) -> bytes | None:
        """The ``security.ima`` this namespace measures and appraises a file with
        (``getxattr(name) -> bytes | None``): a child's own value when it has written
        one, else the file's own -- the image's signature, checked against the child's
        keyring. The root's is the file's."""
        if self.id != 0:
            own = getxattr(self.xattr_name)
            if own is not None:
                return own
        return getxattr(IMA_XATTR)

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

    def epoch(self) -> tuple[int, int, int, int]:
        """Verdicts of this namespace depend on its policy, its keys, its loaded
        digest lists and its EVM state."""
        lists = self.digest_lists
        return (self.policy_epoch, self.keyring.epoch, lists.epoch if lists else 0,
                self.evm.epoch)

    def fingerprint(self) -> bytes:
        """The same as content, stable across mounts (for verdicts kept in LMDB): its
        id, options, policy text, the certificates of its keyring, its EVM state (mode,
        flags, the HMAC key's fingerprint; empty while off) and the digest lists it has
        loaded (none: nothing added, so an older state keeps its verdicts)."""
        ep = self.epoch()
        cached = getattr(self, "_fp", None)
        if cached is not None and cached[0] == ep:
            return cached[1]
        h = hashlib.sha256(repr((self.id, self.appraise_mode, self.template,
                                 self.hash_algo)).encode())
        h.update(self.policy.text().encode())
        h.update(self.evm.fingerprint())
        for k in sorted(k.fingerprint for k in self.keyring):
            h.update(k)
        lists = self.digest_lists.state() if self.digest_lists is not None else b""
        if lists:
            h.update(b"digest lists:" + lists)
        fp = h.digest()[:16]
        self._fp = (ep, fp)
        return fp


def chain_epochs(chain) -> tuple:
    """The policy and keyring epochs of a namespace chain (verdicts depend on them)."""
    return tuple(n.epoch() for n in chain)


def chain_fingerprints(chain) -> tuple:
    """What the decisions of a namespace chain depend on, as content (epochs restart
    with a mount): each namespace's fingerprint."""
    return tuple(n.fingerprint() for n in chain)



class NamespaceError(Exception):
    """A refused namespace operation; ``errno`` says how the control file fails."""

    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


class NamespaceTree:
    """All namespaces of a mount, persisted in LMDB (db ``ns``: id -> JSON)."""

    def __init__(self, root: Namespace, resolver=None, *, store=None, factory=None,
                 binder=None, audit=None, child_quota: Quota | None = None):
        """``resolver(pid) -> namespace id or None``; ``factory(id, name, parent,
        opts, policy_text) -> Namespace`` makes a child; ``binder`` (binding.py) moves
        processes into a namespace created by ``ns_create``; ``audit`` records
        creations and removals; ``child_quota``: a child's quota when its options do
        not say (the mount's --ns-quota; default Quota.default())."""
        self.root = root
        self.binder = binder
        self.audit = audit
        self.by_id: dict[int, Namespace] = {root.id: root}
        self._resolver = resolver
        self.store = store
        self._factory = factory          # (id, name, parent, opts, policy_text) -> Namespace
        self.child_quota = child_quota if child_quota is not None else Quota.default()
        self._lock = threading.RLock()
        self._high = root.id             # highest id ever given (ids are never reused)
        self._acting = threading.local()  # acting_as(): (pid, ns) of this thread
        # the mount's behaviour models (modelstore.ModelStore; set by the composition
        # root): what makes a namespace's model and keeps it across mounts
        self.models = None
        if store is not None:
            self._load()
        if binder is not None and hasattr(binder, "attach"):
            binder.attach(self._parent_id)

    def _parent_id(self, nsid: int) -> int | None:
        ns = self.by_id.get(nsid)
        return None if ns is None or ns.parent is None else ns.parent.id

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
               "policy": ns.policy.text(), "uuid": getattr(ns, "uuid", ""),
               "origin": ns.origin, "quota": ns.quota_spec, "creator": ns.creator}
        if ns.evm.mode != "off":
            rec.update(evm=ns.evm.mode, evm_flags=ns.evm.flags,
                       evm_key=ns.evm.key.source if ns.evm.key is not None else "",
                       evm_key_fp=ns.evm.key.fingerprint.hex() if ns.evm.key else "")
        if ns.model_option:
            rec["model"] = ns.model_option
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
            opts = {"template": rec["template"], "hash": rec["hash"],
                    "appraise": rec["appraise"]}
            for k in ("evm", "evm_key", "evm_key_fp", "evm_flags"):
                if rec.get(k):
                    opts[k] = rec[k]
            if rec.get("quota"):
                opts["quota"] = rec["quota"]
            if rec.get("model"):
                opts["model"] = rec["model"]
            ns = self._factory(nsid, rec["name"], parent, opts, rec["policy"])
            ns.uuid = rec.get("uuid", "")
            ns.origin = rec.get("origin", "inside")
            ns.creator = rec.get("creator", "")
            self._tighten(ns)
            parent.children[ns.name] = ns
            self.by_id[nsid] = ns
        # subtree counts: a child's id is always above its parent's
        for nsid in sorted(self.by_id, reverse=True):
            ns = self.by_id[nsid]
            if ns.parent is not None:
                ns.parent.subtree += ns.subtree

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
        """ns-create's text, ``NAME [OPTION=VALUE ...]``, in the namespace-options
        grammar (nsoptions.py) as a process inside the mount gives it: options that
        name host files are refused (EINVAL)."""
        try:
            return nsoptions.parse_create(text)
        except OptionError as e:
            raise NamespaceError(errno.EINVAL, str(e)) from None

    def create(self, parent: Namespace, name: str, opts: dict, *,
               origin: str = "inside", creator: str = "") -> Namespace:
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
            for a in parent.chain():
                lim = a.subtree_limit
                if lim is not None and a.subtree + 1 > lim:
                    raise NamespaceError(
                        errno.ENOSPC, f"namespace {a.path} and its descendants hold "
                                      f"{a.subtree} namespaces, its quota (namespaces:"
                                      f"{lim}): {path} is refused; remove one of them "
                                      f"first")
            if creator and parent.parent is None:
                made = sum(1 for c in parent.children.values() if c.creator == creator)
                if made >= MAX_ROOT_CHILDREN_PER_CREATOR:
                    raise NamespaceError(
                        errno.ENOSPC, f"{creator} made {made} of the namespaces under "
                                      f"{parent.path}, the most one creator may: {path} "
                                      f"is refused; remove one of them first")
            nsid = self._next_id()
            ns = self._factory(nsid, name, parent, opts, "")
            ns.uuid = str(uuid.uuid4())
            ns.origin = origin
            ns.creator = creator
            self._tighten(ns)
            parent.children[name] = ns
            self.by_id[nsid] = ns
            for a in parent.chain():
                a.subtree += 1
            self._save(ns)
            return ns

    def _tighten(self, ns: Namespace) -> None:
        """A quota given from inside (ns-create) never loosens what the namespace would
        have without it: its parent's, or below the root the mount's (quota.py)."""
        if ns.origin == "inside" and ns.quota_spec:
            outer = ns.parent.quota if ns.parent.parent is not None else self.child_quota
            ns.quota = ns.quota.within(outer)

    def remove(self, parent: Namespace, name: str) -> Namespace:
        with self._lock:
            ns = parent.children.get(name)
            if ns is None:
                raise NamespaceError(errno.ENOENT, f"no namespace {name!r} under {parent.path}")
            if ns.children:
                raise NamespaceError(errno.ENOTEMPTY, f"namespace {ns.path} has child namespaces")
            del parent.children[name]
            del self.by_id[ns.id]
            for a in parent.chain():
                a.subtree -= 1
            if self.store is not None:
                # its stored model goes with it (imafs/ima/modelstore.py)
                models = self.store.db("models") if ns.model is not None else None
                with self.store.env.begin(write=True, db=self.store.db("ns")) as t:
                    t.delete(struct.pack(">I", ns.id))
                    if models is not None:
                        t.delete(struct.pack(">I", ns.id), db=models)
            if ns.digest_lists is not None:     # its id is never given again
                try:
                    ns.digest_lists.clear()
                except Exception as e:  # noqa: BLE001 - lmdb.Error: unusable anyway
                    log.warning("namespace %s: its digest lists stay in LMDB: %s",
                                ns.path, e)
            return ns

    # --- ns-create / ns-remove
    def ns_create(self, parent: Namespace, text: str, pid: int, uid: int, *,
                  check: Callable[[], None] | None = None,
                  bind: Callable[[Namespace], None] | None = None,
                  creator: str = "") -> Namespace:
        """``ns-create``: a child of ``parent`` named and configured by ``text``
        (parse_create), into which process ``pid`` moves (create_bound). ``creator``:
        the container making it, when not the host (MAX_ROOT_CHILDREN_PER_CREATOR)."""
        name, opts = self.parse_create(text)
        return self.create_bound(parent, name, opts, pid, uid, check=check, bind=bind,
                                 creator=creator)

    def create_bound(self, parent: Namespace, name: str, opts: dict, pid: int, uid: int, *,
                     check: Callable[[], None] | None = None,
                     bind: Callable[[Namespace], None] | None = None,
                     setup: Callable[[Namespace], None] | None = None,
                     origin: str = "inside", extra: str = "",
                     creator: str = "") -> Namespace:
        """A child of ``parent`` (options already checked), into which process ``pid``
        moves. ``check()`` (raises NamespaceError) runs first; ``setup(child)`` gives
        the new child what it starts with (a host-given policy and keys) before
        anything is recorded: when it raises, the child is removed again and no list
        shows it. The creation is then measured in the parent's list (``ns-create``)
        and starts the child's (``ns-init``), with the same data (``extra`` appended
        to it), so a verifier ties them -- before anyone moves: a creation the
        parent's list cannot show (full disk) moves nobody. ``bind(child)`` moves the
        process (default: the binder moves ``pid``). When it cannot be moved, the
        child is removed again, through ``ns-remove`` once its creation is in the
        parent's list, so the list tells what happened."""
        if check is not None:
            check()
        try:
            child = self.create(parent, name, opts, origin=origin, creator=creator)
        except NamespaceError:
            raise
        except ValueError as e:     # options the list or the templates refuse
            raise NamespaceError(errno.EINVAL, f"namespace {name!r}: {e}") from None
        except Exception as e:  # noqa: BLE001 - lmdb.Error (full disk): nothing created
            raise NamespaceError(errno.EIO, f"cannot store namespace {name!r}: {e}") from None
        if setup is not None:
            try:
                setup(child)
                self._save(child)
            except Exception as e:  # noqa: BLE001 - nothing recorded yet: just undo
                self._undo_create(parent, child, False, pid, uid)
                err = e.errno if isinstance(e, NamespaceError) else errno.EINVAL
                raise NamespaceError(err, f"namespace {child.path}: {e}") from None
        data = event_data(NS_CREATE, child) + (" " + extra if extra else "").encode()
        recorded = False
        try:
            record_buffer(parent, NS_CREATE, data, audit=self.audit)
            recorded = True
            record_buffer(child, NS_INIT, data, audit=self.audit)
        except Exception as e:  # noqa: BLE001 - fail closed, the process stays where it is
            self._undo_create(parent, child, recorded, pid, uid)
            raise NamespaceError(errno.EIO, f"cannot record the creation of {child.path}: "
                                            f"{e}") from None
        if bind is None and self.binder is not None:
            bind = lambda c: self.binder.bind(pid, c.id)  # noqa: E731
        if bind is not None:
            try:
                bind(child)
            except Exception as e:  # noqa: BLE001 - BindingError, OSError
                self._undo_create(parent, child, True, pid, uid)
                raise NamespaceError(errno.EPERM, f"{e}; namespace {child.path} removed "
                                                  f"again") from None
        self._audit("ns_create", ns=parent.path, child=child.path, id=child.id,
                    uuid=child.uuid, pid=pid, uid=uid, origin=origin)
        return child

    def _undo_create(self, parent: Namespace, child: Namespace, recorded: bool, pid: int,
                     uid: int) -> None:
        try:
            if recorded:
                self.ns_remove(parent, child.name, pid, uid)
            else:
                self.remove(parent, child.name)
                if self.binder is not None:
                    self.binder.remove(child.id)
        except Exception as e:  # noqa: BLE001 - report, the refusal stands
            log.error("namespace %s: cannot remove it after a failed creation: %s",
                      child.path, e)

    def ns_remove(self, parent: Namespace, text: str, pid: int, uid: int) -> Namespace:
        """``ns-remove``: the child ``text`` names, when no process is in it. Its list
        stays in LMDB (its id is never given again) but is no longer served; its final
        length and PCR 10 go into the parent's list."""
        name = text.strip()
        child = parent.children.get(name)
        if child is None:
            raise NamespaceError(errno.ENOENT, f"no namespace {name!r} under {parent.path}")
        if self.binder is not None and self.binder.members(child.id):
            raise NamespaceError(errno.EBUSY, f"namespace {child.path} still has processes")
        self.remove(parent, name)
        if self.binder is not None:
            try:
                self.binder.remove(child.id)
            except Exception as e:  # noqa: BLE001 - the namespace is gone either way
                log.warning("namespace %s: %s", child.path, e)
        record_buffer(parent, NS_REMOVE, event_data(NS_REMOVE, child))
        self._audit("ns_remove", ns=parent.path, child=child.path, id=child.id, pid=pid,
                    uid=uid)
        return child

    def ns_join(self, base: Namespace, text: str, pid: int, uid: int, *,
                check: Callable[[], None] | None = None,
                bind: Callable[[Namespace], None] | None = None) -> Namespace:
        """``ns-join``: process ``pid`` of ``base`` moves into the existing descendant
        ``text`` names (only deeper: :meth:`descendant`). The join is recorded first in
        that namespace's parent's list (``ns-join``): nobody moves unrecorded; a move
        that fails after that is recorded too (``ns-join-failed``). ``check()`` (raises
        NamespaceError) runs once the target is known; ``bind(target)`` moves the
        process (default: the binder moves ``pid``)."""
        target = self.descendant(base, text)
        if check is not None:
            check()
        uuid_ = getattr(target, "uuid", "")
        data = (f"{NS_JOIN} name={target.path} id={target.id} uuid={uuid_} "
                f"from={base.path}").encode()
        try:
            record_buffer(target.parent, NS_JOIN, data)
        except Exception as e:  # noqa: BLE001 - fail closed: nobody moves unrecorded
            raise NamespaceError(errno.EIO, f"cannot record the join of {target.path}: "
                                            f"{e}") from None
        if bind is None and self.binder is not None:
            bind = lambda t: self.binder.bind(pid, t.id, whole_pidns=False)  # noqa: E731
        try:
            if bind is not None:
                bind(target)
        except Exception as e:  # noqa: BLE001 - BindingError, OSError
            try:
                record_buffer(target.parent, NS_JOIN_FAILED,
                              NS_JOIN_FAILED.encode() + data[len(NS_JOIN):])
            except Exception as e2:  # noqa: BLE001
                log.error("cannot record the failed join of %s: %s", target.path, e2)
            raise NamespaceError(errno.EPERM, str(e)) from None
        self._audit("ns_join", ns=base.path, target=target.path, id=target.id, pid=pid,
                    uid=uid)
        return target

    def _audit(self, kind: str, **fields) -> None:
        if self.audit is not None:
            self.audit.record(kind, **fields)
