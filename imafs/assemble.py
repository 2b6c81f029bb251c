"""The composition root: builds a mount's FUSE operations object from its options --
the overlay, and (when integrity is on) the stores, the root keyring, the TPM, the
namespaces and their binder, the engine, its FUSE adapter and the control directory.
The daemon (fs/daemon.py) calls :func:`build`; nothing else wires these together.
"""
from __future__ import annotations

import errno
import functools
import logging
import os

import pyfuse3

from imafs.fs.adapter import IntegrityHooks, open_as_writer, open_in_mount
from imafs.fs import sysio
from imafs.fs.control import ControlDir
from imafs.fs.overlay import Overlay
from imafs.ima.audit import AuditLog
from imafs.ima.binding import Binder, protect_daemon
from imafs.ima import evm as evmfmt
from imafs.ima.digest_cache import HostLists
from imafs.ima.digest_index import DigestListIndex
from imafs.ima.engine import Engine
from imafs.ima.hostns import HostNamespaces
from imafs.ima.evm_hooks import EvmState, load_key
from imafs.ima.keys import Keyring, VerifiedSignatures
from imafs.ima.measurelog import MeasurementList
from imafs.ima.modelstore import ModelStore, aggregate_of
from imafs.ima.namespaces import Namespace, NamespaceTree
from imafs.ima.policy import Policy
from imafs.ima.policy_parse import load_policy_arg, parse_policy
from imafs.ima.quota import Quota
from imafs.ima.securityfs import Securityfs
from imafs.ima.tpm import TPM, TPMError
from imafs.store import Store

log = logging.getLogger("imafs")


# every request handler pyfuse3 calls (forget is answered by nobody: it only logs)
_HANDLERS = ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir",
             "unlink", "rmdir", "symlink", "rename", "link", "open", "read", "write",
             "flush", "release", "fsync", "opendir", "readdir", "releasedir", "fsyncdir",
             "statfs", "setxattr", "getxattr", "listxattr", "removexattr", "access",
             "create")


def guard(ops):
    """Make every request handler of ``ops`` answer an unexpected exception with an
    errno (the OSError's own, else EIO) and a logged traceback.  pyfuse3 ends its main
    loop on any exception that is not a FUSEError: one failing request (a full disk
    under the state directory, a bug) would otherwise take the whole mount down, and
    every process on it would get ENOTCONN.  Cancellation (BaseException) passes."""
    def wrap(name, fn):
        @functools.wraps(fn)
        async def guarded(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except Exception as e:  # noqa: BLE001 - the point of this wrapper
                log.error("%s failed: %s: %s", name, type(e).__name__, e, exc_info=True)
                if name == "forget":
                    return None
                err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
                raise pyfuse3.FUSEError(err) from None
        return guarded

    for name in _HANDLERS:
        fn = getattr(ops, name, None)
        if fn is not None and not getattr(fn, "_imafs_guarded", False):
            g = wrap(name, fn)
            g._imafs_guarded = True
            setattr(ops, name, g)
    return ops


class Filesystem:
    """``ops`` for pyfuse3; ``host``: the namespace operations the control socket
    serves (imafs/ima/hostns.py), ``lists`` its digest-list operations
    (imafs/ima/digest_cache.py); None without integrity."""

    def __init__(self, ops, closers=(), host=None, lists=None):
        self.ops = guard(ops)
        self._closers = list(closers)
        self.host = host
        self.lists = lists

    def close(self) -> None:
        self.ops.close_all()
        for c in self._closers:
            try:
                c()
            except Exception as e:  # noqa: BLE001 - closing must go on
                log.warning("close: %s", e)


def namespace_tree(store, rules, *, keyring: Keyring, mlist: MeasurementList,
                   appraise: str = "enforce", template: str = "ima-ng",
                   hash_algo: str = "sha256", binder=None, audit=None,
                   evm: EvmState | None = None, backing: str | None = None,
                   ns_quota: Quota | None = None,
                   models: ModelStore | None = None) -> NamespaceTree:
    """The root namespace (``rules``, ``keyring``, ``mlist`` and options given) and the
    children stored in ``store``, each with its own list, PCRs, keyring and policy;
    a child's options default to its parent's (EVM: off unless ``evm=`` says, with
    the root's build-time configuration); every keyring shares the root's memo of
    verified signatures, and each has its own digest lists. ``binder`` places
    processes (None: every process is in the root namespace). ``backing``: a child's
    HMAC key may not lie in it. ``ns_quota``: a child's storage quota unless its
    options say (``quota``: quota.py's grammar, over this one); default
    Quota.default(). ``models`` makes the behaviour model of a child whose options say
    ``model=`` (none without it)."""
    base_quota = ns_quota if ns_quota is not None else Quota.default()
    verified = keyring.verified
    root = Namespace(id=0, name="", parent=None, policy=Policy(rules), mlist=mlist,
                     keyring=keyring, appraise_mode=appraise, template=template,
                     hash_algo=hash_algo, evm=evm or EvmState(),
                     digest_lists=DigestListIndex(store, 0) if store is not None else None)

    def child_evm(name, o) -> EvmState:
        mode = o.get("evm") or "off"
        key = None
        if o.get("evm_key"):
            try:
                key = load_key(o["evm_key"], backing=backing,
                               fingerprint=o.get("evm_key_fp") or None)
            except evmfmt.HmacKeyError as e:
                if "evm_key_fp" not in o:
                    raise ValueError(str(e)) from None
                # a stored namespace whose key is gone: fail closed (its HMACs fail)
                log.error("namespace %s: EVM HMAC key not loaded: %s", name, e)
        flags = o.get("evm_flags")
        return EvmState(mode, key, config=root.evm.config,
                        flags=int(flags) if flags is not None else None)

    def factory(nsid, name, parent, o, policy_text):
        template = o.get("template") or parent.template
        algo = o.get("hash") or parent.hash_algo
        ring = Keyring(store, nsid)
        ring.verified = verified
        option = o.get("model") or ""
        quota = Quota.parse(o["quota"], base_quota) if o.get("quota") else \
            Quota(dict(base_quota.limits))
        return Namespace(quota=quota, quota_spec=o.get("quota") or "",
            id=nsid, name=name, parent=parent, policy=Policy(parse_policy(policy_text)),
            mlist=MeasurementList(store, nsid, template=template, hash_algo=algo),
            keyring=ring, appraise_mode=o.get("appraise") or parent.appraise_mode,
            template=template, hash_algo=algo, evm=child_evm(name, o),
            digest_lists=DigestListIndex(store, nsid), model_option=option,
            model=models.make(nsid, option) if models is not None and option else None)

    tree = NamespaceTree(root, binder.ns_of if binder is not None else None, store=store,
                         factory=factory, binder=binder, audit=audit, child_quota=base_quota)
    tree.models = models
    return tree


def root_evm(x: dict, backing: str) -> EvmState:
    """The root namespace's EVM from ``--evm``, ``--evm-key`` and ``--evm-fsuuid``
    (ValueError: a key imafs refuses)."""
    config = evmfmt.EvmConfig(fsuuid=x.get("evm_fsuuid", "on") != "off")
    key = None
    if x.get("evm_key"):
        try:
            key = load_key(x["evm_key"], backing=backing)
        except evmfmt.HmacKeyError as e:
            raise ValueError(f"--evm-key: {e}") from None
    return EvmState(x.get("evm") or "off", key, config=config)


def build(opts) -> Filesystem:
    common = dict(control_name=opts.control_name.encode(), attr_timeout=opts.attr_timeout,
                  entry_timeout=opts.attr_timeout, read_only=opts.read_only)
    if not opts.integrity:
        return Filesystem(Overlay(opts.backing, **common))

    x = opts.extra
    rules = load_policy_arg(opts.policy) if opts.policy else []
    store = Store(os.path.join(opts.state, "lmdb"))
    # the root keyring is the command line's, at each mount, as the kernel's .ima
    # keyring is built at each boot: keys written to MNT/.imafs/keys last for this
    # mount, and root keys stored by earlier mounts are deleted, so a certificate taken
    # out of --keys DIR is no longer trusted (only the epoch persists: it never goes
    # back). Child namespaces keep their stored keyrings (the factory below).
    try:
        keyring = Keyring(store, 0, persist_keys=False)
        for d in x.get("keys_dirs", []):
            loaded, refused = keyring.load_dir(d)
            for fp, why in refused:
                raise ValueError(f"key {fp}: {why}")
        for cert in x.get("key_files", []):
            with open(cert, "rb") as f:
                keyring.add(f.read())
    except BaseException:
        store.close()
        raise
    if keyring.purged:
        log.info("root keyring: %d key(s) stored by earlier mounts dropped (the root "
                 "keyring comes from --keys/--key at each mount)", keyring.purged)
    tpm = None
    if x.get("tpm"):
        # --tpm: the root list is also extended into this TPM (imafs/ima/tpm.py); its
        # boot aggregate comes from the TPM's PCRs 0-9; an unreachable TPM, or one whose
        # PCRs hold something else, refuses the mount
        try:
            tpm = TPM(x["tpm"])
            mlist = MeasurementList(store, 0, template=x.get("template", "ima-ng"),
                                    hash_algo=x.get("hash", "sha256"), tpm=tpm)
        except TPMError as e:
            if tpm is not None:
                tpm.close()
            store.close()
            raise ValueError(f"--tpm {x['tpm']}: {e}") from None
        log.info("root namespace list extended into %r", tpm)
    else:
        mlist = MeasurementList(store, 0, template=x.get("template", "ima-ng"),
                                hash_algo=x.get("hash", "sha256"))
    # digests, Merkle trees and verified signatures are a cache: their own environment,
    # committed without waiting for the disk (a cold open paid fsyncs for them otherwise)
    cache_store = Store(os.path.join(opts.state, "cache"), sync=False)
    keyring.verified = VerifiedSignatures(cache_store)
    # the binder holds what binds processes (a detached cgroup hierarchy, descriptors
    # of bound pid namespaces): nobody of the daemon's uid may reach its descriptors
    protect_daemon()
    binder = Binder.for_store(store, opts.state)
    audit = AuditLog(x.get("audit_log") or os.path.join(opts.state, "audit.log"))
    evm = root_evm(x, opts.backing)
    # behaviour models: their aggregate is the root list's boot aggregate (the TPM's)
    models = ModelStore(store, aggregate_of(mlist))
    tree = namespace_tree(store, rules, keyring=keyring, mlist=mlist,
                          appraise=x.get("appraise", "enforce"),
                          template=x.get("template", "ima-ng"),
                          hash_algo=x.get("hash", "sha256"), binder=binder, audit=audit,
                          evm=evm, backing=opts.backing,
                          ns_quota=Quota.parse(x["ns_quota"], Quota.default())
                          if x.get("ns_quota") else None, models=models)
    root = tree.root
    # --verify-reads on|off; default: on when the root policy has an appraise rule
    vr = x.get("verify_reads")
    verify_reads = vr == "on" if vr in ("on", "off") else any(
        r.action == "appraise" for r in rules)
    engine = Engine(tree, store=store, audit=audit, verify_reads=verify_reads,
                    cache_store=cache_store, mmap_check=x.get("mmap_check") or "all-elf",
                    **({"tree_memory": x["tree_memory"] << 20}
                       if x.get("tree_memory") is not None else {}))
    hooks = IntegrityHooks(engine, mountpoint=opts.mountpoint, read_only=opts.read_only)
    overlay = Overlay(opts.backing, hooks=hooks, **common)
    # the control files read the paths written to them inside the mount only; the
    # digest-list files as their writer sees them (a file of the mount: its backing one)
    mountpoint = os.path.realpath(opts.mountpoint) if opts.mountpoint else ""

    def backing_of(nodeid: int) -> tuple[int, bytes]:
        try:
            node = overlay.inode(nodeid)
            with node.pinned() as fd:
                return (overlay.fds.call(os.open, sysio.proc_path(fd),
                                         os.O_PATH | os.O_CLOEXEC), node.path())
        except pyfuse3.FUSEError as e:
            raise OSError(e.errno, os.strerror(e.errno)) from None

    open_as = functools.partial(open_as_writer, backing_of=backing_of, mountpoint=mountpoint)
    overlay.attach_control(ControlDir(Securityfs(
        engine, open_file=functools.partial(open_in_mount, overlay.root_fd,
                                            mountpoint=mountpoint),
        open_as=open_as)))
    log.info("root namespace: %d policy rule(s), %d key(s), appraise %s, template %s, hash %s, "
             "verify-reads %s, mmap-check %s, EVM %s", len(rules), len(keyring),
             root.appraise_mode, root.template, root.hash_algo,
             "on" if verify_reads else "off", engine.mmap_check, root.evm.describe())
    # the binder last: a namespace's cgroup goes only once nothing serves it
    return Filesystem(overlay, [hooks.close, audit.close, store.close, cache_store.close,
                                binder.close]
                      + ([tpm.close] if tpm is not None else []),
                      host=HostNamespaces(tree, audit), lists=HostLists(engine, open_as))
