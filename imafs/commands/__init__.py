"""Subcommands of the ``imafs`` command line.

Every public module in this package defines ``register(subparsers)``, which adds its
subcommand(s) with ``set_defaults(func=...)``; ``func(args)`` returns the exit code.
``imafs.cli`` discovers the modules, so a new command needs no edit elsewhere; modules
whose name starts with ``_`` are helpers shared by commands, not commands.

A command refuses with :class:`CommandError`; commands never import ``imafs.cli``.
"""


class CommandError(Exception):
    """A refusal with a one-line message for the user; exits with status 2."""
