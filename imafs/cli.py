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


# commands whose module has another name than the command's (mount.py: umount too)
MODULE_OF = {"umount": "mount"}


def _module_for(argv: list[str]) -> str | None:
    """The one command module ``argv`` needs (its first word names the command), or
    None: all of them (no command, ``--help``, a word that is no command)."""
    word = next((w for w in argv if not w.startswith("-")), None)
    if word is None or word != argv[0]:
        return None
    name = MODULE_OF.get(word, word.replace("-", "_"))
    return name if name in command_modules() else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``imafs``; given ``argv``, only the module of its command is
    imported (``imafs umount`` need not load every command's dependencies)."""
    p = argparse.ArgumentParser(prog="imafs", description=__doc__)
    p.add_argument("--version", action="version", version=f"imafs {imafs.__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    only = _module_for(argv) if argv else None
    for name in [only] if only else command_modules():
        importlib.import_module(f"imafs.commands.{name}").register(sub)
    if only and argv[0] not in sub.choices:
        return build_parser()
    return p


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
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
