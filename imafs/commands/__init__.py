"""Subcommands of the ``imafs`` command line.

Every module in this package defines ``register(subparsers)``, which adds its
subcommand(s) with ``set_defaults(func=...)``; ``func(args)`` returns the exit code.
``imafs.cli`` discovers the modules, so a new command needs no edit elsewhere.
"""


class CommandError(Exception):
    """A refusal with a one-line message for the user; exits with status 2.
    Commands import it from here, never from ``imafs.cli``."""
