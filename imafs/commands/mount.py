"""imafs mount / imafs umount."""
from __future__ import annotations

import os

from imafs.commands import CommandError
from imafs.fs import daemon
from imafs.ima.keys import CERT_SUFFIXES, Keyring, KeyringError


def _mount(args) -> int:
    allow_other = True
    read_only = False
    for o in args.o or []:
        for word in o.split(","):
            if word == "allow_other":
                allow_other = True
            elif word == "noallow_other":
                allow_other = False
            elif word in ("ro", "rw"):
                read_only = word == "ro"
            elif word:
                raise CommandError(f"unknown -o option {word!r} "
                                   f"(allow_other, noallow_other, ro, rw)")
    opts = daemon.MountOptions(
        backing=args.backing, mountpoint=args.mountpoint, state=args.state,
        foreground=args.foreground, log_file=args.log_file, log_level=args.log_level,
        allow_other=allow_other, read_only=read_only, policy=args.policy,
        control_name=args.control_name,
        integrity=not args.no_integrity, attr_timeout=args.attr_timeout,
        extra={"keys_dirs": args.keys or [], "key_files": args.key or [],
               "appraise": args.appraise, "template": args.template, "hash": args.hash,
               "audit_log": args.audit_log, "verify_reads": args.verify_reads,
               "mmap_check": args.mmap_check, "tpm": args.tpm, "evm": args.evm,
               "evm_key": args.evm_key, "evm_fsuuid": args.evm_fsuuid,
               "tree_memory": args.tree_memory, "ns_quota": args.ns_quota})
    _check_engine_args(opts)
    try:
        return daemon.mount(opts)
    except daemon.MountError as e:
        raise CommandError(str(e))


def _mib(text: str) -> int:
    """A whole number of MiB, at least 1 (argparse type)."""
    import argparse
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of MiB, at least 1")
    return n


def _quota(text: str) -> str:
    """A --ns-quota specification that parses (argparse type; kept as text)."""
    import argparse
    from imafs.ima.quota import Quota, QuotaError
    try:
        Quota.parse(text)
    except QuotaError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def _check_engine_args(opts) -> None:
    """Refuse bad policy, keys or algorithms before anything is mounted."""
    from imafs.ima.policy import PolicyError
    from imafs.ima.policy_parse import load_policy_arg
    if opts.policy is not None:
        try:
            load_policy_arg(opts.policy)
        except PolicyError as e:
            raise CommandError(f"--policy: {e}")
    ring = Keyring()        # refusals named by file, as the keys control file does
    for d in opts.extra["keys_dirs"]:
        if not os.path.isdir(d):
            raise CommandError(f"--keys: {d!r} is not a directory")
        for fp, why in ring.load_dir(d)[1]:
            raise CommandError(f"--keys {d}: {fp}: {why}")
    for k in opts.extra["key_files"]:
        if not os.path.isfile(k):
            raise CommandError(f"--key: {k!r} is not a file")
        try:
            with open(k, "rb") as f:
                ring.add(f.read())
        except OSError as e:
            raise CommandError(f"--key {k}: {e.strerror}")
        except KeyringError as e:
            raise CommandError(f"--key {k}: {e}")
    if opts.extra.get("tpm"):
        from imafs.ima.tpm import TPMError, parse_tcti
        try:
            parse_tcti(opts.extra["tpm"])
            import tpm2_pytss  # noqa: F401
        except TPMError as e:
            raise CommandError(f"--tpm: {e}")
        except ImportError as e:
            raise CommandError(f"--tpm needs tpm2-pytss (pip install 'imafs[tpm]'; it builds "
                               f"against libtss2-dev): {e}")
        if not opts.integrity:
            raise CommandError("--tpm needs integrity (not with --no-integrity)")
    from imafs.ima import hashing
    try:
        hashing.hash_algo(opts.extra["hash"]).new()
    except (ValueError, hashing.HashAlgoError) as e:
        raise CommandError(f"--hash: {e}")
    _check_evm_args(opts)


def _check_evm_args(opts) -> None:
    x = opts.extra
    if x.get("evm_key") and x.get("evm", "off") == "off":
        raise CommandError("--evm-key needs --evm enforce or --evm log")
    if x.get("evm", "off") != "off" and not opts.integrity:
        raise CommandError("--evm needs integrity (not with --no-integrity)")
    if x.get("evm_key"):
        from imafs.ima.evm import HmacKeyError
        from imafs.ima.evm_hooks import load_key
        try:
            load_key(x["evm_key"], backing=opts.backing)
        except HmacKeyError as e:
            raise CommandError(f"--evm-key: {e}")


def _umount(args) -> int:
    return daemon.umount(args.mountpoint, lazy=args.lazy)


def register(sub) -> None:
    p = sub.add_parser("mount", help="mount BACKING at MOUNTPOINT through imafs",
                       description="Show BACKING at MOUNTPOINT; measure, appraise and audit "
                                   "opens and execs as the policy says. Returns once mounted; "
                                   "the daemon runs in the background.")
    p.add_argument("backing", metavar="BACKING")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--state", metavar="DIR",
                   help=f"LMDB state directory (default {daemon.DEFAULT_STATE_ROOT}/<hash of BACKING>)")
    p.add_argument("--foreground", "-f", action="store_true", help="do not detach")
    p.add_argument("--log-file", metavar="FILE",
                   help="log file (default: stderr in foreground, STATE/imafs.log otherwise)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("-o", action="append", metavar="OPT",
                   help="mount options: allow_other (default), noallow_other; "
                   "ro (read-only: every change EROFS), rw (default)")
    p.add_argument("--policy", metavar="FILE|tcb|appraise_tcb",
                   help="the root namespace's IMA policy (default: no rules, as the kernel)")
    p.add_argument("--keys", action="append", metavar="DIR",
                   help=f"load every certificate ({', '.join('*' + s for s in CERT_SUFFIXES)}) "
                   "of DIR into the root keyring")
    p.add_argument("--key", action="append", metavar="CERT",
                   help="load one certificate (DER or PEM) into the root keyring; repeatable")
    p.add_argument("--appraise", choices=["enforce", "log", "fix", "off"], default="enforce",
                   help="what a failed appraisal does: enforce (EACCES, default), log "
                        "(allow and record), fix (write the hash, allow), off")
    p.add_argument("--template", default="ima-ng",
                   choices=["ima", "ima-ng", "ima-sig", "ima-ngv2", "ima-sigv2", "ima-ns"],
                   help="default measurement template (default ima-ng, as the kernel)")
    p.add_argument("--hash", default="sha256", metavar="ALGO",
                   help="hash algorithm for measurement and fix mode (default sha256)")
    p.add_argument("--audit-log", metavar="FILE", help="audit log (default STATE/audit.log)")
    p.add_argument("--verify-reads", nargs="?", const="on", choices=["on", "off"],
                   metavar="on|off",
                   help="check every read of a measured or appraised file against the "
                        "fs-verity Merkle tree computed when it was measured; a changed "
                        "block is EIO and a violation (default: on when the --policy has "
                        "an appraise rule, else off; decided at mount time)")
    p.add_argument("--tree-memory", type=_mib, default=None, metavar="MIB",
                   help="MiB of verity trees (1/128 of each verified file) the daemon keeps "
                        "in memory; past it they are read back from the tree cache as "
                        "needed (default 64)")
    p.add_argument("--ns-quota", type=_quota, default=None, metavar="KIND:ENTRIES[:SIZE]",
                   help="what each child integrity namespace may make the daemon store, "
                        "e.g. list:100000:64M (entries and bytes of its measurement list; "
                        "0 or - for no limit; default list:1000000:256M) and namespaces:N "
                        "(how many namespaces a child and its descendants may hold, default "
                        "64); a namespace at its list quota fails closed (EIO) alone")
    p.add_argument("--mmap-check", choices=["off", "mount-programs", "all-elf"],
                   default="all-elf",
                   help="FUSE shows no mmap: which read-only opens of an ELF file stand for "
                        "a library load, with its MMAP_CHECK hooks: all-elf (every one, "
                        "default: no process loads unappraised code through the mount, "
                        "but cp or sha256sum of an unsigned library is refused under an "
                        "MMAP_CHECK appraise rule), mount-programs (those of processes "
                        "running a program from the mount, e.g. a container chrooted "
                        "into it), off (none: only execs and their loader)")
    p.add_argument("--tpm", metavar="TCTI",
                   help="also extend the root namespace's list into PCR 10 (and the PCR of "
                        "each entry) of this TPM 2.0, e.g. swtpm:host=127.0.0.1,port=2321 or "
                        "device:/dev/tpmrm0; the boot aggregate comes from its PCRs 0-9 "
                        "(needs tpm2-pytss: pip install 'imafs[tpm]')")
    p.add_argument("--evm", choices=["enforce", "log", "off"], default="off",
                   help="EVM in the root namespace (security.evm protects security.ima, "
                        "the other security xattrs, owner, group and mode): enforce (a "
                        "file whose metadata does not verify fails appraisal; changes the "
                        "kernel's EVM refuses are EPERM), log (audited only), off "
                        "(default). Signature keys: the root keyring (--keys/--key)")
    p.add_argument("--evm-key", metavar="FILE",
                   help="the root namespace's EVM HMAC key: raw bytes (32 to 128), as "
                        "/etc/keys/evm-key-plain; a root-owned file of mode 600 outside "
                        "BACKING. The daemon checks HMACs with it and writes them after "
                        "permitted changes through the mount")
    p.add_argument("--evm-fsuuid", choices=["on", "off"], default="on",
                   help="HMACs and type-3 signatures cover the backing file system's UUID "
                        "(on, as kernels built with CONFIG_EVM_ATTR_FSUUID; off: as "
                        "evmctl 1.4's hmac computes them)")
    p.add_argument("--control-name", default=".imafs", metavar="NAME",
                   help="name of the control directory at the mount root (default .imafs)")
    p.add_argument("--no-integrity", action="store_true",
                   help="plain passthrough: no measurement, appraisal or control directory")
    p.add_argument("--attr-timeout", type=float, default=1.0, metavar="SECONDS",
                   help="how long the kernel may cache attributes and names (default 1)")
    p.set_defaults(func=_mount)

    u = sub.add_parser("umount", help="unmount an imafs mount and wait for its daemon")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--lazy", "-l", action="store_true", help="detach even when busy")
    u.set_defaults(func=_umount)
