"""``imafs verify``: appraise files offline, with the engine's own appraisal.

Without --policy a file is appraised as by a rule ``appraise`` without options
(--require-sig: ``appraise_type=imasig``; a signature v3 as by ``digest_type=verity``);
with --policy, as a mount with that root policy would for a read (or exec) by root:
the access's hooks are matched with :meth:`imafs.ima.policy.Policy.match` and each
appraising decision is appraised. Either way one :class:`~imafs.ima.policy.Decision`
goes to :func:`imafs.ima.appraise.appraise_decision`, as the engine's do. With --evm
the file's ``security.evm`` is checked too (imafs.ima.evm), as a mount with ``--evm
enforce`` checks it, and its status goes into the appraisal.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sys

from imafs.commands import CommandError
from imafs.commands import _files
from imafs.commands._files import open_regular, progress, walk
from imafs.fs.sysio import fs_info
from imafs.ima import appraise as ap
from imafs.ima import binfmt, digest_cache, hashing, hooks
from imafs.ima import digest_lists as dl
from imafs.ima.digest_index import scratch_index
from imafs.ima import keys as km
from imafs.ima.policy import MAY_READ, Decision, Policy, PolicyError
from imafs.ima.policy_parse import load_policy_arg
from imafs.ima.verity import fsverity_digest_fd


def _keyring(args) -> km.Keyring:
    ring = km.Keyring()
    for d in args.keys or ():
        if not os.path.isdir(d):
            raise CommandError(f"--keys {d}: not a directory")
        loaded, refused = ring.load_dir(d)
        for path, why in refused:
            print(f"imafs verify: ignoring {path}: {why}", file=sys.stderr)
    for c in args.key or ():
        try:
            with open(c, "rb") as f:
                ring.add(f.read())
        except OSError as e:
            raise CommandError(f"--key {c}: {e.strerror}")
        except km.KeyringError as e:
            raise CommandError(f"--key {c}: {e}")
    return ring


def _load_policy(value: str):
    try:
        return Policy(load_policy_arg(value))
    except PolicyError as e:
        raise CommandError(f"--policy: {e}")


# root, as the engine sees a root caller (imafs.ima.iint.Subject.ids)
_ROOT_IDS = {"uid": 0, "euid": 0, "suid": 0, "gid": 0, "egid": 0, "sgid": 0,
             "cap_setuid": True, "cap_setgid": True}


def _root_events(policy, path: str, fd: int, st, exec_: bool, fs_cache: dict | None = None):
    """The access events the mount derives from a read-only open by root of this file
    (``exec_``: an exec by root that runs it), built by the engine's hook mapping
    (imafs.ima.hooks: open_hooks, access_events): a read is FILE_CHECK
    MAY_READ, and for an ELF file, when a rule can match an mmap hook, also the
    dynamic loader's MMAP_CHECK_REQPROT and MMAP_CHECK; an exec is FILE_CHECK and
    BPRM_CHECK, and for an ELF file CREDS_CHECK (with the credentials the exec gives:
    set-id bits) and the mmap hooks. (The ELF interpreter's own open, FILE_CHECK and
    mmap hooks without BPRM_CHECK, is not asked about.)"""
    def elf() -> bool:
        try:
            return st.st_size >= 4 and binfmt.is_elf(os.pread(fd, 4, 0))
        except OSError:
            return False
    role = ("elf" if elf() else "other") if exec_ else None
    library = not exec_ and hooks.has_func(policy, "MMAP_CHECK") and elf()
    return hooks.access_events(hooks.open_hooks(MAY_READ, exec_, role, library), _ROOT_IDS,
                               st, _fs(fd, st, fs_cache), path, exec_, role)


def _fs(fd: int, st, fs_cache: dict | None):
    """The file system the mount sees, the backing file's (run verify on the backing
    tree, not through the mount): the mount's own fs_info, once per device. Always:
    Policy.needs leaves out fsuuid (None is the null UUID, not "unknown")."""
    fs = fs_cache.get(st.st_dev) if fs_cache is not None else None
    if fs is None:
        fs = fs_info(fd, st.st_dev)
        if fs_cache is not None:
            fs_cache[st.st_dev] = fs
    return fs


def _xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise
        return None


def _appraised(fd: int, xattr_name: str, evm_check, data: bytes | None = None):
    """What an appraisal of the open file ``fd`` takes: its value (``xattr_name``), its
    digest per algorithm (of ``data`` when given -- the very bytes a list is parsed
    from -- else of the file, each computed once), its fs-verity digest, and EVM's
    result and status. Returns (value, digest_for, verity, evm_r, evm_status)."""
    value = _xattr(fd, xattr_name)
    cache: dict[str, bytes] = {}

    def digest_for(a: str) -> bytes:
        if a not in cache:
            cache[a] = (hashing.hash_algo(a).new(data).digest() if data is not None
                        else hashing.hash_fd(fd, [a])[a])
        return cache[a]

    def verity(a: str):
        try:
            return fsverity_digest_fd(fd, a)
        except hashing.HashAlgoError:       # fs-verity has no such algorithm
            return None

    evm_r = evm_check(fd) if evm_check is not None else None
    evm_status = evm_r.status if evm_r is not None and value else ap.UNKNOWN
    return value, digest_for, verity, evm_r, evm_status


def _decide(policy, events, value, digest_for, verity, ring, *, default_algo: str,
            evm_status, lists=None):
    """The mount's step 5 for one open by root, appraisal side: each event's decision
    (``policy.match``); an appraising one is appraised once per decision flags -- with
    ``digest_cache=``, by the digest lists first (``lists``, a DigestListIndex: the
    engine's lookup and pass, imafs.ima.digest_cache), then by the file's value.
    Returns (the first failure, else the first pass, else None; every appraisal's
    result; whether a rule measures the open)."""
    verdict = None
    seen: dict = {}
    results = []
    measured = False
    found: list = []

    def listed():
        if not found:
            found.append(digest_cache.lookup_in(lists, digest_for))
        return found[0]
    for ev in events:
        d = policy.match(ev)       # all pairs: digest_type is OR-ed, as the engine's
        measured = measured or d.measure
        if not d.appraise:
            continue
        flags = ap.decision_flags(d)
        if flags not in seen:
            r = digest_cache.listed_pass(listed()) if d.digest_cache_appraise else None
            if r is None:
                r = ap.appraise_decision(value, d, digest_for, ring, verity_digest=verity,
                                         default_algo=default_algo, evm_status=evm_status)
            seen[flags] = r
            results.append(r)
        r = seen[flags]
        r = dataclasses.replace(r, detail=f"{r.detail}; {ev.func} rule "
                                f"'{str(d.appraise_rule).rstrip()}'".lstrip("; "))
        if not r.passed:
            return r, results, measured
        verdict = verdict or r
    return verdict, results, measured


def verify_file(path: str, ring, *, xattr_name: str = "security.ima",
                require_sig: bool = False, default_algo: str = "sha256",
                policy=None, exec_: bool = False,
                fs_cache: dict | None = None, evm_check=None,
                lists=None) -> ap.AppraiseResult | None:
    """Offline appraisal of one file.

    Without ``policy``: as an ``appraise`` rule without options (``require_sig``:
    ``appraise_type=imasig``), except that a signature v3 is checked against the
    file's fs-verity digest, as a ``digest_type=verity`` rule would.

    With ``policy`` (an imafs.ima.policy.Policy): the verdict the mount, in enforce
    mode, gives a read-only open of the file by root (``exec_``: an exec by root):
    every hook of that access that the policy appraises is appraised with its
    decision's appraise_type, appraise_algos and digest_type; the first failure is
    the verdict, else the pass (its detail names the rule). None when no rule
    appraises the access (the mount allows it unappraised). ``fs_cache``: a dict
    that keeps the file-system facts (fsmagic, ...) per device across calls.
    ``evm_check(fd) -> evm.EvmResult``: EVM's status of the file, which the appraisal
    takes (as with ``--evm enforce``) and the result's ``evm`` attribute holds.
    ``lists`` (with ``policy``): the DigestListIndex of the lists loaded by
    :func:`load_lists`, which ``digest_cache=`` decisions consult as the mount's."""
    fd = open_regular(path)
    try:
        value, digest_for, verity, evm_r, evm_status = _appraised(fd, xattr_name, evm_check)
        if policy is None:
            d = Decision(appraise=True, appraise_type="imasig" if require_sig else None,
                         digest_type=("verity" if value and value[0] == ap.IMA_VERITY_DIGSIG
                                      else None))
            return _with_evm(ap.appraise_decision(value, d, digest_for, ring,
                                                  verity_digest=verity,
                                                  default_algo=default_algo,
                                                  evm_status=evm_status), evm_r)
        verdict, _, _ = _decide(policy, _root_events(policy, path, fd, os.fstat(fd), exec_,
                                                     fs_cache),
                                value, digest_for, verity, ring, default_algo=default_algo,
                                evm_status=evm_status, lists=lists)
        return _with_evm(verdict, evm_r) if verdict is not None else None
    finally:
        os.close(fd)


def load_lists(paths, idx, policy, ring, *, xattr_name: str = "security.ima",
               default_algo: str = "sha256", fs_cache: dict | None = None,
               evm_check=None) -> list:
    """--digest-list: each list into ``idx`` (an imafs.ima.digest_index.scratch_index),
    in the order given, as a mount with ``policy`` loads it for root (digest_list_add):
    the open is the hook DIGEST_LIST_CHECK, measured and appraised as the policy says
    (its appraisal over the very bytes parsed), a failed appraisal refuses it, and
    :func:`imafs.ima.digest_cache.load_offline` checks and parses it and keeps the
    actions done to it. Returns the ListInfos; CommandError naming the list on any
    refusal (nothing is verified then)."""
    out = []
    for path in paths:
        try:
            fd = open_regular(path)
        except OSError as e:
            raise CommandError(f"--digest-list {path}: {e.strerror or e}")
        try:
            st = os.fstat(fd)
            data = digest_cache.read_all(fd, min(st.st_size, dl.MAX_LIST_SIZE + 1))
            value, digest_for, verity, _, evm_status = _appraised(fd, xattr_name, evm_check,
                                                                  data)
            events = hooks.access_events([(digest_cache.DIGEST_LIST_CHECK, MAY_READ)],
                                         _ROOT_IDS, st, _fs(fd, st, fs_cache), path,
                                         False, None)
            _, results, measured = _decide(policy, events, value, digest_for, verity, ring,
                                           default_algo=default_algo,
                                           evm_status=evm_status, lists=idx)
            info = digest_cache.load_offline(idx, path, data, measured=measured,
                                             appraisals=results,
                                             origin={"path": path, "via": "imafs verify"})
        except digest_cache.DigestListRefused as e:
            why = str(e) if path in str(e) else f"{path}: {e}"
            raise CommandError(f"--digest-list {why} "
                               f"({errno.errorcode.get(e.errno, e.errno)})") from None
        except (OSError, ValueError) as e:
            raise CommandError(f"--digest-list {path}: "
                               f"{getattr(e, 'strerror', None) or e}") from None
        finally:
            os.close(fd)
        out.append(info)
    return out


def _with_evm(r: ap.AppraiseResult, evm_r) -> ap.AppraiseResult:
    """``r`` with EVM's result attached (``r.evm``), for the report."""
    return r if evm_r is None else dataclasses.replace(r, evm=evm_r)


def _evm_checker(args, ring):
    """--evm: fd -> evm.EvmResult, with the keyring and --evm-key's HMAC key."""
    from imafs.commands._files import evm_config, evm_metadata
    from imafs.ima import evm
    key = None
    if args.evm_key:
        try:
            key = evm.HmacKey.from_file(args.evm_key)
        except evm.HmacKeyError as e:
            raise CommandError(f"--evm-key: {e}")
    config = evm_config(args)

    def check(fd: int):
        meta = evm_metadata(fd, args, config)
        try:
            value = os.getxattr(fd, evm.XATTR_NAME_EVM)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
            value = None
        return evm.evm_verify_hmac(value, meta, hmac_key=key, keyring=ring, config=config)
    return check


def cmd_verify(args) -> int:
    policy = None
    if args.policy is not None:
        if args.require_sig:
            raise CommandError("--require-sig and --policy: the policy's appraise_type decides")
        policy = _load_policy(args.policy)
    elif args.exec_:
        raise CommandError("--exec needs --policy")
    ring = _keyring(args)
    try:
        default = hashing.hash_algo(args.hash).name
    except hashing.HashAlgoError as e:
        raise CommandError(f"--hash {args.hash}: {e}")
    name = _files.xattr_name(args.xattr)
    if not args.evm and (args.evm_key or args.m32 or args.smack or args.uuid is not False):
        raise CommandError("--evm-key, --uuid, --m32 and --smack go with --evm")
    if args.evm and name != "security.ima":
        raise CommandError("--evm checks security.evm, which covers security.ima: not with "
                           "--xattr user")
    evm_check = _evm_checker(args, ring) if args.evm else None
    if args.digest_list and policy is None:
        raise CommandError("--digest-list needs --policy: its rules say whether a list "
                           "counts (digest_cache=) and how a list is loaded "
                           "(func=DIGEST_LIST_CHECK)")
    fs_cache: dict = {}
    with scratch_index() if args.digest_list else contextlib.nullcontext() as idx:
        for info in load_lists(args.digest_list or (), idx, policy, ring, xattr_name=name,
                               default_algo=default, fs_cache=fs_cache,
                               evm_check=evm_check):
            if not info.actions & dl.ACTION_APPRAISED:
                print(f"imafs verify: {info.origin['path']}: loaded as {info.label} "
                      f"({dl.format_actions(info.actions)}): no rule appraises "
                      f"DIGEST_LIST_CHECK, so it vouches for no appraisal", file=sys.stderr)
            elif args.verbose:
                print(f"imafs verify: {info.origin['path']}: loaded as {info.label} "
                      f"({info.count} digests, {dl.format_actions(info.actions)})",
                      file=sys.stderr)
        return _verify_all(args, ring, name, default, policy, evm_check, fs_cache, idx)


def _verify_all(args, ring, name, default, policy, evm_check, fs_cache, lists) -> int:
    todo = list(walk(args.paths, args.recursive, args.skip_special))
    bad = 0
    with progress(len(todo), args.quiet) as bar:
        for path, why in todo:
            bar.update(1)
            if why is None:
                try:
                    r = verify_file(path, ring, xattr_name=name, require_sig=args.require_sig,
                                    default_algo=default, policy=policy, exec_=args.exec_,
                                    fs_cache=fs_cache, evm_check=evm_check, lists=lists)
                except IsADirectoryError as e:
                    why = e.strerror
                except OSError as e:
                    why = e.strerror or str(e)
                except ValueError as e:     # a rule tests what could not be learnt
                    why = str(e)
            if why is not None:
                bad += 1
                bar.write(f"{path}: error ({why})")
                continue
            if r is None:                   # --policy: no rule appraises this access
                if not args.failures_only:
                    bar.write(f"{path}: not appraised")
                continue
            ev = r.evm
            evm_text = "" if ev is None else (
                f" [evm: {ev.kernel_name}" + (f" ({ev.cause})" if ev.cause else "")
                + (f": {ev.detail}" if args.verbose and ev.detail else "") + "]")
            if r.passed:
                if not args.failures_only:
                    bar.write(f"{path}: pass" + (f" ({r.detail})" if args.verbose else "")
                              + evm_text)
            else:
                bad += 1
                bar.write(f"{path}: fail ({r.cause})"
                          + (f" [{r.status}: {r.detail}]" if args.verbose else "") + evm_text)
    return 1 if bad else 0


def register(sub) -> None:
    p = sub.add_parser(
        "verify", help="appraise files offline against keys",
        description="Print 'PATH: pass' or 'PATH: fail (cause)' per file, causes as the "
        "kernel names them ('PATH: error (reason)' when a file or directory cannot be "
        "read). Without --policy every file is appraised as by a rule 'appraise' without "
        "options: a hash (01, 04) must equal the file's digest in the algorithm it names "
        "(with --require-sig it fails, IMA-signature-required); a signature v2 (03) must "
        "verify, with a key of --keys/--key, over the file's digest in its algorithm; a "
        "signature v3 (06) is checked as by digest_type=verity, over the file's fs-verity "
        "digest (4096-byte blocks, no salt) in its algorithm; any algorithm is accepted "
        "(no appraise_algos); no value fails (missing-hash, or IMA-signature-required "
        "with --require-sig). With --policy the verdict is the one a mount with that "
        "policy gives in enforce mode to a read-only open by root (FILE_CHECK MAY_READ; "
        "for an ELF file also the loader's MMAP_CHECK_REQPROT and MMAP_CHECK when a rule "
        "can match them) or, with --exec, to an exec by root that runs the file "
        "(FILE_CHECK and BPRM_CHECK, MAY_EXEC; for an ELF file also CREDS_CHECK with the "
        "set-id credentials, and the mmap hooks): the matching appraise rule's "
        "appraise_type, appraise_algos and digest_type decide what is checked, and a file "
        "no rule appraises prints 'PATH: not appraised' (the mount allows it); with "
        "--digest-list, digest_cache= rules consult the lists as the mount's do. Run it on "
        "the backing tree: fsmagic/fsname/fsuuid are those of the files' file system. "
        "Exit 0 when no file fails, else 1.")
    p.add_argument("--keys", action="append", metavar="DIR",
                   help=f"directory of certificates "
                   f"({', '.join('*' + s for s in km.CERT_SUFFIXES)})")
    p.add_argument("--key", action="append", metavar="CERT", help="one certificate")
    p.add_argument("--require-sig", action="store_true",
                   help="hashes do not pass, only signatures (appraise_type=imasig); "
                   "not with --policy")
    p.add_argument("--policy", metavar="FILE|tcb|appraise_tcb",
                   help="answer as a mount with this root policy would (see above)")
    p.add_argument("--digest-list", action="append", metavar="LIST",
                   help="with --policy: a digest list loaded first, as the mount loads "
                   "it (DIGEST_LIST_CHECK: measured and appraised as the policy says, "
                   "with --keys/--key; a refused or malformed list stops the command); "
                   "digest_cache= rules then pass a file whose digest is in a list that "
                   "was appraised (repeatable, loaded in the order given)")
    p.add_argument("--exec", dest="exec_", action="store_true",
                   help="with --policy: the verdict for an exec (BPRM_CHECK), not a read")
    p.add_argument("-a", "--hash", default="sha256",
                   help="algorithm for files without a value naming one: the mount's "
                   "--hash (default sha256)")
    p.add_argument("--xattr", choices=("security", "user"), default="security")
    p.add_argument("--evm", action="store_true",
                   help="also check security.evm against the keys (and --evm-key), as a "
                   "mount with --evm enforce: its status goes into the appraisal and is "
                   "printed as [evm: INTEGRITY_...]")
    p.add_argument("--evm-key", metavar="FILE",
                   help="with --evm: the HMAC key (raw bytes, root-owned, mode 600)")
    _files.add_evm_options(p)
    p.add_argument("-r", "--recursive", action="store_true")
    p.add_argument("--skip-special", action="store_true")
    p.add_argument("--failures-only", action="store_true",
                   help="print only failures and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="add status and detail")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_verify)
