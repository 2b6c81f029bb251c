"""Subcommands of the ``imafs`` command line.

Every module in this package defines ``register(subparsers)``, which adds its
subcommand(s) with ``set_defaults(func=...)``; ``func(args)`` returns the exit code.
``imafs.cli`` discovers the modules, so a new command needs no edit elsewhere.
"""
