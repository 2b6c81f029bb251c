"""``imafs policy``: check a policy file, show a built-in policy.

``imafs policy check FILE|tcb|appraise_tcb|-`` parses the policy the way a
write to the ``policy`` control file would and prints it as the kernel shows
it (exit 0), or prints ``imafs policy check: FILE: line L, column C: msg`` on
stderr (exit 1).  ``imafs policy show tcb|appraise_tcb`` prints a built-in.
"""
from __future__ import annotations

import sys

from imafs.ima.policy import MAX_POLICY_BYTES, PolicyError, format_policy
from imafs.ima.policy_parse import BUILTIN_POLICIES, load_policy_arg, parse_policy


def _check(args) -> int:
    source = args.policy
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_POLICY_BYTES + 1)
            try:
                rules = parse_policy(data)
            except PolicyError as e:
                raise e.with_source("<stdin>") from None
        else:
            rules = load_policy_arg(source)
    except PolicyError as e:
        print(f"imafs policy check: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(format_policy(rules))
    return 0


def _show(args) -> int:
    sys.stdout.write(BUILTIN_POLICIES[args.name])
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "policy", help="check or show IMA policies",
        description="Check IMA policies and show the built-in ones.")
    sub = p.add_subparsers(dest="policy_cmd", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])

    c = sub.add_parser(
        "check", help="parse a policy and print it as the kernel would",
        description="Parse POLICY (a file, '-' for stdin, or a built-in name: "
                    + ", ".join(BUILTIN_POLICIES) + ") as a write to the policy "
                    "control file would, and print it normalised, one rule per "
                    "line, exactly as the kernel shows a loaded policy. "
                    "Exit 1 with the line and column of the first error.")
    c.add_argument("policy", metavar="POLICY")
    c.set_defaults(func=_check)

    s = sub.add_parser("show", help="print a built-in policy",
                       description="Print a built-in policy as the kernel shows it.")
    s.add_argument("name", choices=sorted(BUILTIN_POLICIES), metavar="NAME",
                   help="one of: " + ", ".join(BUILTIN_POLICIES))
    s.set_defaults(func=_show)
