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


def test_a_command_loads_only_its_module():
    """``imafs umount ...`` parses with mount.py alone (it need not import every
    command's dependencies); no command, an unknown word or an option first: all."""
    import subprocess
    import sys
    code = ("import sys; from imafs import cli; cli.build_parser(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.startswith('imafs.commands.') and '._' not in m))")
    def loaded(*argv):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                             text=True, check=True).stdout
        return eval(out)
    assert loaded("umount", "/mnt") == ["imafs.commands.mount"]
    assert loaded("digest-list", "show", "x") == ["imafs.commands.digest_list"]
    everything = [f"imafs.commands.{n}" for n in cli.command_modules()]
    for argv in ([], ["nosuch"], ["--version"], ["-h", "mount"]):
        assert set(everything) <= set(loaded(*argv)), argv
    # the parser of one command reads the same arguments as the whole parser
    one = cli.build_parser(["umount", "--lazy", "/m"]).parse_args(["umount", "--lazy", "/m"])
    whole = cli.build_parser().parse_args(["umount", "--lazy", "/m"])
    assert vars(one).keys() == vars(whole).keys() and one.mountpoint == whole.mountpoint
