"""imafs: Linux IMA in user space, as a FUSE overlay filesystem."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import imafs.commands
from imafs.commands import CommandError


# the order ``imafs --help`` lists the commands in; a module not named here follows
ORDER = ("digest", "digest_list", "keylime_policy", "keygen", "sign", "verify", "mount", "ns",
         "oci_hook", "policy", "model", "verify_log")


def command_modules() -> list[str]:
    """The command modules of imafs.commands, in help order."""
    names = [m.name for m in pkgutil.iter_modules(imafs.commands.__path__)
             if not m.name.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imafs", description=__doc__)
    p.add_argument("--version", action="version", version=f"imafs {imafs.__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"imafs.commands.{name}").register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # a command whose positional words may also follow its options (imafs ns create
    # MNT NAME --pid PID OPTION=VALUE...) names the list they join (set_defaults(
    # trailing=...)); anything else unknown is an error, as parse_args makes it
    trailing = getattr(args, "trailing", None)
    if extra:
        if trailing is None or any(w.startswith("-") for w in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, trailing).extend(extra)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except CommandError as e:
        print(f"imafs {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
