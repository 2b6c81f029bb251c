"""``imafs keylime-policy``: a keylime runtime policy from a measured mount, an ascii
measurement list, or a root file system tree."""
from __future__ import annotations

import json
import logging
import os
import sys

from imafs.commands import CommandError
from imafs.commands._files import write_whole

DESCRIPTION = """\
Write a keylime (7.x) runtime policy: the JSON document a keylime verifier checks an
IMA measurement list against.

--mount MNT   allow what the mount measured: every entry of
              MNT/.imafs/ascii_runtime_measurements (the boot aggregate and buffer
              entries such as ns-create too; violations never).
--ns NAME     with --mount: the list of the mount's integrity namespace NAME
              instead (MNT/.imafs/namespaces/NAME/...; a/b for a child b of a).
--list FILE   the same from an ascii measurement list file (a copy, or the
              kernel's /sys/kernel/security/ima/ascii_runtime_measurements).
--rootfs DIR  hash every regular file below DIR (symlinks not followed, other
              file systems not entered) and allow it under its path inside DIR,
              as a mount of DIR records it (DIR/usr/bin/ls -> /usr/bin/ls).
--keys DIR, --key CERT
              X.509 certificates (DER or PEM) for keylime's "verification-keys":
              keylime accepts an ima-sig entry whose signature one of them verifies
              (and otherwise checks its digest against the policy).

Excludes, by default (--no-default-excludes leaves them out): the namespace events
(ns-create, ns-init, ns-remove, ns-join, ns-join-failed: every container started
after the policy was written adds one with unique data; `imafs verify-log --child`
checks them instead) and package managers' mutable state (/var/lib/dpkg/status and
triggers, apt's lists and caches, debconf's and rpm's databases: rewritten in place,
so no digest stays true; their digests are not listed). docs/attestation.md.

With --rootfs, the files are the tree's alone: a --mount or --list then adds only
its boot aggregate and its buffer entries (ns-create, ns-init, ns-remove; the
keys a kernel's list records), never the file digests it recorded: a file changed
after the tree was hashed fails, the entries no tree holds pass. Without --rootfs, lists add
everything they hold. Paths are written as IMA writes them (spaces become "_")."""


def _ns_list(mnt: str, control: str, ns: str | None) -> str:
    """The ascii list of namespace ``ns`` ("a/b": child b of a) of a mount."""
    base = os.path.join(mnt, control)
    if ns is not None:
        parts = [p for p in ns.strip("/").split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise CommandError(f"--ns: {ns!r} is not a namespace name")
        for part in parts:
            base = os.path.join(base, "namespaces", part)
        if not os.path.isdir(base):
            raise CommandError(f"--ns {ns}: {base} not found (no such namespace below the "
                               f"caller's namespace of {mnt}; see {mnt}/{control}/namespaces/)")
    path = os.path.join(base, "ascii_runtime_measurements")
    if not os.path.exists(path):
        raise CommandError(f"--mount: {path} not found (is {mnt} an imafs mount "
                           f"with integrity on?)")
    return path


def _verification_keys(dirs: list[str], certs: list[str]) -> str:
    """keylime's "verification-keys": the JSON string of
    keylime.ima.file_signatures.ImaKeyring.to_string(), {"pubkeys": [base64 of the
    DER SubjectPublicKeyInfo], "keyids": [the IMA key id as an integer]}; keylime
    looks a signature's key up by that id."""
    import base64
    from cryptography.hazmat.primitives import serialization
    from imafs.ima.keys import Keyring, KeyringError

    ring = Keyring(require_digsig=False)
    for d in dirs:
        try:
            loaded, refused = ring.load_dir(d)
        except OSError as e:
            raise CommandError(f"--keys {d}: {e.strerror}")
        for fp, why in refused:
            print(f"imafs keylime-policy: key {fp} not used: {why}", file=sys.stderr)
        if not loaded:
            raise CommandError(f"--keys {d}: no usable certificate (*.der, *.pem, *.crt, ...)")
    for c in certs:
        try:
            with open(c, "rb") as f:
                ring.add(f.read(1 << 20))
        except OSError as e:
            raise CommandError(f"--key {c}: {e.strerror}")
        except KeyringError as e:
            raise CommandError(f"--key {c}: {e}")
    pubkeys, keyids = [], []
    for info in ring:
        if info.keyid in keyids:
            print(f"imafs keylime-policy: two keys have the id {info.keyid:08x}; keylime "
                  f"keeps one of them", file=sys.stderr)
        keyids.append(info.keyid)
        pubkeys.append(base64.b64encode(info.public_key.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo)).decode("ascii"))
    return json.dumps({"pubkeys": pubkeys, "keyids": keyids})


def _run(args) -> int:
    from imafs.ima import keylime as rp

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="imafs keylime-policy: %(message)s")
    if not (args.mount or args.list or args.rootfs):
        raise CommandError("give --mount MNT, --list FILE or --rootfs DIR")
    if args.ns is not None and not args.mount:
        raise CommandError("--ns NAME needs --mount MNT")
    if args.algo is not None and args.algo not in rp.KEYLIME_ALGOS:
        raise CommandError(f"--algo: keylime takes {', '.join(rp.KEYLIME_ALGOS)}")
    policy = rp.empty_policy()
    lists = list(args.list or [])
    for mnt in args.mount or []:
        lists.append(_ns_list(mnt, args.control_name, args.ns))
    for path in lists:
        # with --rootfs the tree gives the files: a list gives what no tree holds
        target = rp.empty_policy() if args.rootfs else policy
        try:
            with open(path, "rb") as f:
                rp.from_ascii_list(f, algo=None if args.rootfs else args.algo, policy=target)
        except OSError as e:
            raise CommandError(f"{path}: {e.strerror}")
        if target is not policy:
            ba = target["digests"].get(rp.BOOT_AGGREGATE)
            if ba:
                policy["digests"].setdefault(rp.BOOT_AGGREGATE, []).extend(ba)
            for key in ("ima-buf", "keyrings"):
                for name, digests in target[key].items():
                    policy[key].setdefault(name, []).extend(digests)
    for root in args.rootfs or []:
        try:
            rp.from_rootfs(root, algo=args.algo or "sha256", excludes=args.exclude or [],
                           policy=policy)
        except rp.RuntimePolicyError as e:
            raise CommandError(str(e))
    for value in args.boot_aggregate or []:
        if value == "zero":
            value = rp.boot_aggregate_zero(args.algo or "sha256")
        try:
            bytes.fromhex(value)
        except ValueError:
            raise CommandError(f"--boot-aggregate: {value!r} is neither hex nor 'zero'")
        policy["digests"].setdefault(rp.BOOT_AGGREGATE, []).append(value.lower())
    if not args.no_default_excludes:
        policy["excludes"].extend(rp.default_excludes())
    for regex in args.exclude_regex or []:
        policy["excludes"].append(regex)
    import re
    for regex in policy["excludes"]:
        try:
            re.compile(regex)
        except re.error as e:
            raise CommandError(f"--exclude-regex {regex!r}: {e}")
    if not args.no_default_excludes:
        rp.drop_excluded(policy, rp.MUTABLE_EXCLUDES)
    if args.keys or args.key:
        policy["verification-keys"] = _verification_keys(args.keys or [], args.key or [])
    rp.finish(policy)
    text = json.dumps(policy, indent=2) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    try:
        write_whole(args.output, text.encode())
    except OSError as e:
        raise CommandError(f"--output: {e.strerror}")
    nkeys = len(json.loads(policy["verification-keys"])["keyids"]) \
        if policy["verification-keys"] else 0
    print(f"{args.output}: {len(policy['digests'])} path(s), {len(policy['ima-buf'])} "
          f"buffer(s), {len(policy['keyrings'])} keyring(s), {nkeys} verification key(s)",
          file=sys.stderr)
    return 0


def register(sub) -> None:
    import argparse
    p = sub.add_parser("keylime-policy", help="write a keylime runtime policy from a mount, "
                                              "a measurement list or a rootfs",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mount", action="append", metavar="MNT",
                   help="an imafs mount: allow what it measured")
    p.add_argument("--ns", metavar="NAME",
                   help="with --mount: the list of the mount's integrity namespace NAME "
                        "(MNT/.imafs/namespaces/NAME/; a/b: child b of a)")
    p.add_argument("--list", action="append", metavar="FILE",
                   help="an ascii measurement list: allow what it holds")
    p.add_argument("--rootfs", action="append", metavar="DIR",
                   help="a root file system tree: allow its files as they are now (lists "
                        "then add only their boot aggregate and buffer entries)")
    p.add_argument("--keys", action="append", metavar="DIR",
                   help="certificates of a directory for keylime's verification-keys "
                        "(ima-sig signatures)")
    p.add_argument("--key", action="append", metavar="CERT",
                   help="one certificate (DER or PEM) for verification-keys")
    p.add_argument("--algo", metavar="ALGO",
                   help="file digest algorithm: for --rootfs (default sha256); with "
                        "--mount/--list, keep only entries of this algorithm")
    p.add_argument("--output", "-o", metavar="FILE", help="where to write (default stdout)")
    p.add_argument("--control-name", default=".imafs", metavar="NAME",
                   help="the mount's control directory (default .imafs)")
    p.add_argument("--exclude", action="append", metavar="DIR",
                   help="with --rootfs: a directory inside the tree not to walk (e.g. /proc)")
    p.add_argument("--exclude-regex", action="append", metavar="REGEX",
                   help="add a path regex to the policy's excludes (keylime ignores matches)")
    p.add_argument("--no-default-excludes", action="store_true",
                   help="write no default excludes (namespace events, package managers' "
                        "mutable state) and keep their digests")
    p.add_argument("--boot-aggregate", action="append", metavar="HEX|zero",
                   help="allow this boot aggregate digest; 'zero': the one a mount without "
                        "a TPM records (all zeros of --algo)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=_run)
