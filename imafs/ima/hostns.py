"""Integrity namespaces made, listed and removed from the host: what the control
socket's requests do (imafs/ctl/server.py carries them; ``imafs ns`` and
``imafs oci-hook`` send them).

A namespace made from the host is a child of the root namespace that starts with
the policy and keys its creator gave (a profile's, or files named on the command
line), checked whole before anything is made: a bad rule or an unusable certificate
refuses the request and nothing is created. Its creation is recorded as any
``ns-create`` is, with ``origin=host``, the sha256 of its policy text and its key
ids added to the data, and the process named by the request (a container's init,
still paused by its runtime) is bound to it before any of its code runs. A failure
anywhere undoes the creation (docs/namespaces.md, "Namespaces made from the host").

Binding goes through :func:`bind_process` alone: how a process is tied to a namespace
changes underneath (the binder), not how the host side asks for it.

Removal checks that no process is left, optionally that the namespace is the one the
caller made (its UUID), and archives its list into a directory the caller opened
(a descriptor: the daemon never resolves a caller's path) before it removes it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

from imafs.ima import nsoptions
from imafs.ima.keys import Keyring, KeyringError
from imafs.ima.modelfile import MAX_MODEL_BYTES, ModelFileError, format_model, parse_model
from imafs.ima.namespaces import Namespace, NamespaceError, NamespaceTree
from imafs.ima.nsoptions import OptionError
from imafs.ima.policy import MAX_POLICY_BYTES, Policy, PolicyError
from imafs.ima.policy_parse import parse_policy
from imafs.ima.securityfs_write import MAX_POLICY_RULES

log = logging.getLogger("imafs.hostns")

MAX_CERTS = 256                 # certificates one request may give a namespace
MAX_CERT_BYTES = 64 * 1024      # one certificate
ARCHIVE_VIEWS = ("binary_runtime_measurements", "binary_runtime_measurements_sha256",
                 "ascii_runtime_measurements", "ascii_runtime_measurements_sha256")
_VIEW_OF = {"binary_runtime_measurements": "binary",
            "binary_runtime_measurements_sha256": "binary_sha256",
            "ascii_runtime_measurements": "ascii",
            "ascii_runtime_measurements_sha256": "ascii_sha256"}


@dataclass
class Target:
    """The process a new namespace binds: its pid (in the daemon's pid namespace) and,
    when the caller sent one, a pidfd of it, which pins the process (a pid reused
    since the caller looked is another process, and the pidfd says so)."""
    pid: int
    pidfd: int | None = None


@dataclass
class CreateRequest:
    name: str
    target: Target
    options: dict = field(default_factory=dict)     # value options of nsoptions
    policy: str | None = None                       # the policy's text
    certs: list = field(default_factory=list)       # DER or PEM certificates (bytes)
    model: str | None = None                        # a model file's text (models.md)
    uid: int = 0                                    # the requester's, for the audit log


def pidfd_pid(pidfd: int) -> int | None:
    """The pid a pidfd refers to, in this process's pid namespace (its fdinfo's
    ``Pid:``; -1 there, None here, once the process has been reaped)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def bind_process(tree: NamespaceTree, ns: Namespace, target: Target) -> None:
    """THE way the host side binds a process to a namespace it made: the binder binds
    its pid namespace when it has one of its own (a container's init: the whole
    container, and whatever enters it later), else its cgroup (binding.py), and
    refuses a process already in a namespace the new one is not below; the pidfd,
    when given, proves that the process bound is still the one the caller meant."""
    if tree.binder is None:
        raise NamespaceError(errno.EPERM, "this mount binds no processes to namespaces")
    if target.pidfd is not None and pidfd_pid(target.pidfd) != target.pid:
        raise NamespaceError(errno.ESRCH, f"pid {target.pid} is not the process the "
                                          f"caller's pidfd holds (it has exited)")
    tree.binder.bind(target.pid, ns.id)
    if target.pidfd is not None and pidfd_pid(target.pidfd) != target.pid:
        raise NamespaceError(errno.ESRCH, f"pid {target.pid} exited while it was bound")


def check_policy(text: str) -> list:
    """A host-given policy: the rules, or PolicyError/NamespaceError saying why not."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_POLICY_BYTES:
        raise NamespaceError(errno.EFBIG, f"policy: {len(raw)} bytes (at most "
                                          f"{MAX_POLICY_BYTES})")
    rules = parse_policy(raw)
    if len(rules) > MAX_POLICY_RULES:
        raise NamespaceError(errno.EFBIG, f"policy: {len(rules)} rules (at most "
                                          f"{MAX_POLICY_RULES})")
    return rules


def check_certs(certs: list) -> Keyring:
    """Host-given certificates, each checked as the namespace's keyring will check it
    (an in-memory keyring): the keyring, or NamespaceError naming the bad one."""
    if len(certs) > MAX_CERTS:
        raise NamespaceError(errno.EFBIG, f"keys: {len(certs)} certificates (at most "
                                          f"{MAX_CERTS})")
    ring = Keyring()
    for i, der in enumerate(certs, 1):
        if not isinstance(der, (bytes, bytearray)) or len(der) > MAX_CERT_BYTES:
            raise NamespaceError(errno.EINVAL, f"keys: certificate {i} is not a "
                                               f"certificate of at most {MAX_CERT_BYTES} "
                                               f"bytes")
        try:
            ring.add(bytes(der))
        except KeyringError as e:
            raise NamespaceError(errno.EINVAL, f"keys: certificate {i}: {e}") from None
    return ring


class HostNamespaces:
    """The control socket's namespace operations on one mount's tree."""

    def __init__(self, tree: NamespaceTree, audit=None):
        self.tree = tree
        self.audit = audit

    # --- create
    def create(self, req: CreateRequest) -> dict:
        """A child of the root namespace with the request's options, policy and keys,
        and the request's process bound to it; NamespaceError on any refusal, with
        nothing left made."""
        tree = self.tree
        try:
            name = nsoptions.check_name(req.name)
            # host paths the daemon reads itself (evm_key) come as paths; policy and
            # keys as their contents (req.policy, req.certs), never as paths
            opts = nsoptions.parse_options(req.options, host_paths=True, source="request")
        except OptionError as e:
            raise NamespaceError(errno.EINVAL, str(e)) from None
        rules = []
        if req.policy:
            try:
                rules = check_policy(req.policy)
            except PolicyError as e:
                raise NamespaceError(errno.EINVAL, f"policy: {e}") from None
        checked = check_certs(req.certs)
        model_setup, model_extra = self._model(req, opts)
        keyids = ",".join(f"{k.keyid:08x}" for k in checked) or "-"
        ptext = Policy(rules).text()
        extra = (f"origin=host policy=sha256:{hashlib.sha256(ptext.encode()).hexdigest()} "
                 f"keys={keyids}" + (f" {model_extra}" if model_extra else ""))

        def setup(child: Namespace) -> None:
            if rules:
                child.set_policy(Policy(rules))
            for k in checked:
                child.keyring.add(k.der)
            if model_setup is not None:
                model_setup(child)

        child = tree.create_bound(tree.root, name, opts, req.target.pid, req.uid,
                                  setup=setup, origin="host", extra=extra,
                                  bind=lambda c: bind_process(tree, c, req.target))
        log.info("namespace %s (id %d) made from the host: %d rule(s), %d key(s), "
                 "pid %d bound", child.path, child.id, len(rules), len(checked),
                 req.target.pid)
        return self.describe(child)

    def _model(self, req: CreateRequest, opts: dict):
        """The behaviour model a request asks for: ``model=learn`` among its options,
        or a model file's text (its creator read the host file); what creation adds
        (ModelStore.creation), or (None, "")."""
        option = opts.get("model")
        if option is not None and option != "learn":
            raise NamespaceError(errno.EINVAL, f"model={option}: a host file goes as its "
                                               f"text (the request's model argument)")
        if req.model is None and option is None:
            return None, ""
        models = self.tree.models
        if models is None:
            raise NamespaceError(errno.EOPNOTSUPP, "this mount makes no behaviour models")
        mf = None
        if req.model is not None:
            if option == "learn":
                raise NamespaceError(errno.EINVAL, "model=learn and a model file: one or "
                                                   "the other")
            raw = req.model.encode("utf-8", "surrogateescape")
            try:
                if len(raw) > MAX_MODEL_BYTES:
                    raise ModelFileError(0, f"{len(raw)} bytes (at most {MAX_MODEL_BYTES})")
                mf = parse_model(raw)
                models.check(mf)
            except ValueError as e:         # ModelFileError, another aggregate
                raise NamespaceError(errno.EINVAL, f"model: {e}") from None
        opts["model"] = "learn" if mf is None else "host"
        return models.creation(mf)

    # --- list
    def describe(self, ns: Namespace) -> dict:
        binder = self.tree.binder
        return {"name": ns.name, "path": ns.path, "id": ns.id,
                "uuid": getattr(ns, "uuid", ""), "origin": ns.origin,
                "template": ns.template, "hash": ns.hash_algo,
                "appraise": ns.appraise_mode, "evm": ns.evm.mode, "rules": len(ns.policy),
                "model": None if ns.model is None else ns.model.mode,
                "keys": [f"{k.keyid:08x}" for k in ns.keyring],
                "entries": ns.mlist.count,
                "processes": len(binder.members(ns.id)) if binder is not None else 0,
                "children": sorted(ns.children)}

    # --- models
    def model_export(self, path: str, *, limit: int) -> dict:
        """The behaviour model of the namespace at ``path`` (``a/b``, below the root)
        as a model file's text, with its mode and state; ENOENT without one, EFBIG
        over ``limit`` bytes (its control file ``export`` has no bound)."""
        ns = self.tree.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            child = ns.children.get(part)
            if child is None:
                raise NamespaceError(errno.ENOENT, f"no namespace {part!r} under {ns.path}")
            ns = child
        if ns.model is None:
            raise NamespaceError(errno.ENOENT, f"namespace {ns.path} has no behaviour model")
        text = format_model(ns.model.export())
        if len(text) > limit:
            raise NamespaceError(errno.EFBIG, f"the model of {ns.path} is {len(text)} bytes, "
                                              f"more than one answer holds: read "
                                              f".imafs/namespaces/.../model/export instead")
        return {"path": ns.path, "mode": ns.model.mode, "state": ns.model.state().hex(),
                "model": text.decode("ascii")}

    def list(self) -> list[dict]:
        """Every namespace below the root, parents before their children."""
        out, stack = [], [self.tree.root]
        while stack:
            ns = stack.pop()
            if ns.parent is not None:
                out.append(self.describe(ns))
            stack.extend(ns.children[n] for n in sorted(ns.children, reverse=True))
        return out

    # --- remove
    def remove(self, name: str, *, uuid: str | None = None, archive_fd: int | None = None,
               uid: int = 0) -> dict:
        """Remove the root's child ``name`` (NamespaceError: ENOENT, ESTALE for another
        UUID, EBUSY while processes are in it, ENOTEMPTY with children); with
        ``archive_fd``, its list, PCRs and description are written first into a new
        directory NAME.ID below that directory."""
        tree = self.tree
        try:
            nsoptions.check_name(name)
        except OptionError as e:
            raise NamespaceError(errno.EINVAL, str(e)) from None
        ns = tree.root.children.get(name)
        if ns is None:
            raise NamespaceError(errno.ENOENT, f"no namespace {name!r} below the root")
        if uuid is not None and getattr(ns, "uuid", "") != uuid:
            raise NamespaceError(errno.ESTALE, f"namespace {ns.path} is another one (uuid "
                                               f"{getattr(ns, 'uuid', '')}, not {uuid})")
        if tree.binder is not None and tree.binder.members(ns.id):
            raise NamespaceError(errno.EBUSY, f"namespace {ns.path} still has processes")
        if ns.children:
            raise NamespaceError(errno.ENOTEMPTY, f"namespace {ns.path} has child "
                                                  f"namespaces")
        archived = None
        if archive_fd is not None:
            archived = self._archive(ns, archive_fd)
        child = tree.ns_remove(tree.root, name, 0, uid)
        out = self.describe_removed(child)
        if archived is not None:
            if child.mlist.count != archived[1]:
                # an entry came between the archive and the removal (a process joined
                # and left): the removed list is final now, write it again
                self._write_views(child, archive_fd, archived[0], replace=True)
            self._write_info(child, archive_fd, archived[0], out)
            out["archive"] = archived[0]
        return out

    def describe_removed(self, ns: Namespace) -> dict:
        out = {"name": ns.name, "path": ns.path, "id": ns.id,
               "uuid": getattr(ns, "uuid", ""), "entries": ns.mlist.count}
        for bank in ("sha1", "sha256"):
            if bank in ns.mlist.banks:
                out[f"pcr10_{bank}"] = ns.mlist.pcr(bank, 10).hex()
        return out

    def _archive(self, ns: Namespace, dir_fd: int) -> tuple[str, int]:
        """Write ns's list views and PCR files into a new directory NAME.ID below
        ``dir_fd``; returns (its name, the entries written)."""
        sub = f"{ns.name}.{ns.id}"
        try:
            os.mkdir(sub, 0o700, dir_fd=dir_fd)
        except OSError as e:
            raise NamespaceError(e.errno or errno.EIO, f"archive: cannot make {sub}: "
                                                       f"{e.strerror}") from None
        count = ns.mlist.count
        self._write_views(ns, dir_fd, sub)
        return sub, count

    def _write_views(self, ns: Namespace, dir_fd: int, sub: str, replace: bool = False):
        try:
            d = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=dir_fd)
        except OSError as e:
            raise NamespaceError(errno.EIO, f"archive: {sub}: {e.strerror}") from None
        try:
            if not replace:
                os.mkdir("pcrs", 0o700, dir_fd=d)
            for fname in ARCHIVE_VIEWS:
                view = _VIEW_OF[fname]
                if view in ns.mlist.views:
                    _write_file(d, fname, ns.mlist.iter_view(view), replace)
            p = os.open("pcrs", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=d)
            try:
                for bank in ns.mlist.banks:
                    _write_file(p, bank, [ns.mlist.pcrs_text(bank).encode()], replace)
            finally:
                os.close(p)
        except OSError as e:
            raise NamespaceError(errno.EIO, f"archive: {sub}: {e.strerror or e}") from None
        finally:
            os.close(d)

    def _write_info(self, ns: Namespace, dir_fd: int, sub: str, removed: dict) -> None:
        info = dict(removed, template=ns.template, hash=ns.hash_algo,
                    appraise=ns.appraise_mode, origin=ns.origin, removed=time.time(),
                    policy=ns.policy.text(), keys=[f"{k.keyid:08x}" for k in ns.keyring])
        d = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=dir_fd)
        try:
            _write_file(d, "namespace.json",
                        [(json.dumps(info, indent=2, sort_keys=True) + "\n").encode()], False)
        finally:
            os.close(d)


def _write_file(dir_fd: int, name: str, chunks, replace: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if replace else os.O_EXCL
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
