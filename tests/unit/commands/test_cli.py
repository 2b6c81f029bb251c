"""The command line's shape: commands never import imafs.cli (no import cycle), and
``imafs --help`` lists every command module in the fixed order."""
from __future__ import annotations

import subprocess
import sys

from imafs import cli
from imafs.commands import CommandError


def test_command_modules_do_not_import_cli():
    mods = cli.command_modules() + ["_files"]
    code = ("import sys\n"
            + "".join(f"import imafs.commands.{m}\n" for m in mods)
            + "print('imafs.cli' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_help_lists_the_commands_in_order():
    mods = cli.command_modules()
    assert mods[:len(cli.ORDER)] == list(cli.ORDER)
    assert "_files" not in mods
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    assert list(sub.choices) == ["digest", "digest-list", "keylime-policy", "keygen", "sign", "verify",
                                 "mount", "umount", "ns", "oci-hook", "policy", "model",
                                 "verify-log"]
    assert cli.CommandError is CommandError
