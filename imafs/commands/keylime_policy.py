"""``imafs keylime-policy``: a keylime runtime policy from a measured mount, an ascii
measurement list, or a root file system tree."""
from __future__ import annotations

import json
import logging
import os
import sys

from imafs.cli import CommandError

DESCRIPTION = """\
Write a keylime (7.x) runtime policy: the JSON document a keylime verifier checks an
IMA measurement list against.

--mount MNT   allow what the mount measured: every entry of
              MNT/.imafs/ascii_runtime_measurements (the boot aggregate too;
              violations never).
--list FILE   the same from an ascii measurement list file (a copy, or the
              kernel's /sys/kernel/security/ima/ascii_runtime_measurements).
--rootfs DIR  hash every regular file below DIR (symlinks not followed, other
              file systems not entered) and allow it under its path inside DIR,
              as a mount of DIR records it (DIR/usr/bin/ls -> /usr/bin/ls).

Sources can be combined; digests add up.  Paths are written as IMA writes them
(spaces become "_")."""


def _run(args) -> int:
    from imafs.ima import runtime_policy as rp

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="imafs keylime-policy: %(message)s")
    if not (args.mount or args.list or args.rootfs):
        raise CommandError("give --mount MNT, --list FILE or --rootfs DIR")
    if args.algo is not None and args.algo not in rp.KEYLIME_ALGOS:
        raise CommandError(f"--algo: keylime takes {', '.join(rp.KEYLIME_ALGOS)}")
    policy = rp.empty_policy()
    lists = list(args.list or [])
    for mnt in args.mount or []:
        path = os.path.join(mnt, args.control_name, "ascii_runtime_measurements")
        if not os.path.exists(path):
            raise CommandError(f"--mount: {path} not found (is {mnt} an imafs mount "
                               f"with integrity on?)")
        lists.append(path)
    for path in lists:
        try:
            with open(path, "rb") as f:
                rp.from_ascii_list(f, algo=args.algo, policy=policy)
        except OSError as e:
            raise CommandError(f"{path}: {e.strerror}")
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
    for regex in args.exclude_regex or []:
        policy["excludes"].append(regex)
    rp.finish(policy)
    text = json.dumps(policy, indent=2) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    tmp = f"{args.output}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.output)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CommandError(f"--output: {e.strerror}")
    print(f"{args.output}: {len(policy['digests'])} path(s), {len(policy['ima-buf'])} "
          f"buffer(s), {len(policy['keyrings'])} keyring(s)", file=sys.stderr)
    return 0


def register(sub) -> None:
    import argparse
    p = sub.add_parser("keylime-policy", help="write a keylime runtime policy from a mount, "
                                              "a measurement list or a rootfs",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mount", action="append", metavar="MNT",
                   help="an imafs mount: allow what it measured")
    p.add_argument("--list", action="append", metavar="FILE",
                   help="an ascii measurement list: allow what it holds")
    p.add_argument("--rootfs", action="append", metavar="DIR",
                   help="a root file system tree: allow its files as they are now")
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
    p.add_argument("--boot-aggregate", action="append", metavar="HEX|zero",
                   help="allow this boot aggregate digest; 'zero': the one a mount without "
                        "a TPM records (all zeros of --algo)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=_run)
