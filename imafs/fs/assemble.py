"""Builds the FUSE operations object for a mount from its options: the overlay,
and (when integrity is on) the engine adapter and the control directory."""
from __future__ import annotations

from imafs.fs.overlay import Overlay


class Filesystem:
    def __init__(self, ops, closers=()):
        self.ops = ops
        self._closers = list(closers)

    def close(self) -> None:
        self.ops.close_all()
        for c in self._closers:
            try:
                c()
            except Exception:
                pass


def build(opts) -> Filesystem:
    ops = Overlay(opts.backing, control_name=opts.control_name.encode(),
                  attr_timeout=opts.attr_timeout, entry_timeout=opts.attr_timeout)
    return Filesystem(ops)
