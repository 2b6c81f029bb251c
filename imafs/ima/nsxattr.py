"""Which ``security.ima`` and ``security.evm`` a process sees: its namespace's own.

The kernel has one ``security.ima`` and one ``security.evm`` per inode
(XATTR_NAME_IMA / XATTR_NAME_EVM). imafs gives each integrity namespace its own: the
root namespace's are the file's attributes; a child's are kept under private names
(``security.imafs.nsID.ima``, ``.evm``: :data:`PRIVATE_XATTR_PREFIX`, defined here
only) and are read, written and listed as ``security.ima`` / ``security.evm`` by the
child's processes only. Where a child has written no ``security.ima`` of its own it
reads the file's (the image's). Private names are nobody's to read, write or list
directly.

:class:`XattrView` answers the FUSE getxattr/listxattr/setxattr requests
(appraise_hooks.py) and gives EVM the values a namespace sees (evm_hooks.py). The
names a namespace stores under are ``Namespace.xattr_name`` / ``evm_xattr_name``
(namespaces.py), built from the constants here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from imafs.ima.evm import XATTR_NAME_EVM, XATTR_NAME_IMA

if TYPE_CHECKING:
    from imafs.ima.namespaces import Namespace, NamespaceTree

IMA_XATTR = XATTR_NAME_IMA          # "security.ima"
EVM_XATTR = XATTR_NAME_EVM          # "security.evm"
#: the prefix of the names under which child namespaces keep their own security.ima
#: and security.evm
PRIVATE_XATTR_PREFIX = "security.imafs."


class XattrView:
    """The xattr names and values each namespace of ``tree`` sees. Names are bytes,
    as the FUSE requests carry them. :meth:`value` is what the engine reads of a file
    for a namespace (EVM's view)."""

    IMA = IMA_XATTR.encode()
    EVM = EVM_XATTR.encode()
    OWN = (IMA, EVM)                    # the names each namespace has its own of
    PRIVATE = PRIVATE_XATTR_PREFIX.encode()
    UNKNOWN = PRIVATE + b"unknown"      # a name no file has: reads as ENODATA

    def __init__(self, tree: NamespaceTree):
        self.tree = tree

    def is_private(self, name: bytes) -> bool:
        return name.startswith(self.PRIVATE)

    @staticmethod
    def own_name(ns: Namespace, name: bytes) -> bytes:
        """Where namespace ``ns`` keeps its own ``name`` (one of OWN)."""
        return (ns.xattr_name if name == XattrView.IMA else ns.evm_xattr_name).encode()

    def stored_name(self, ns: Namespace, name: bytes) -> bytes | None:
        """The name a write (or removal) of ``name`` by a process of ``ns`` goes to, or
        None for ``name`` itself."""
        if name in self.OWN and ns.id != 0:
            return self.own_name(ns, name)
        return None

    def read_name(self, pid: int, name: bytes) -> bytes | tuple | None:
        """The name a read of ``name`` by ``pid`` reads instead -- or the names, in
        order, of which the first the file has is read -- or None for ``name``."""
        if name.startswith(self.PRIVATE):
            # a namespace's own security.ima is read as security.ima inside it; by its
            # private name nobody reads it (a sibling would, otherwise)
            return self.UNKNOWN
        if name in self.OWN:
            ns = self.tree.of_pid(pid)
            if ns is None:
                return self.UNKNOWN
            if ns.id != 0:
                # security.ima: its own, else the file's (the image's); security.evm:
                # its own (value() says when the engine falls back to the file's)
                return (self.own_name(ns, name), name) if name == self.IMA else \
                    self.own_name(ns, name)
        return None

    def listed(self, pid: int, names: list[bytes]) -> list[bytes]:
        """The names ``pid`` is shown: ``security.ima`` when its namespace has a value
        -- its own, or for a child without one the file's -- and ``security.evm`` when
        it has its own (the host's attribute, or the namespace's private copy); no
        private name."""
        out = [n for n in names if n not in self.OWN and not n.startswith(self.PRIVATE)]
        ns = self.tree.of_pid(pid)
        if ns is not None:
            for own in self.OWN:
                if self.own_name(ns, own) in names or (own == self.IMA and own in names):
                    out.append(own)
        return out

    def value(self, ns: Namespace, name: str, getxattr) -> bytes | None:
        """The value of xattr ``name`` as namespace ``ns`` sees it, read through
        ``getxattr(name) -> bytes | None``: its own ``security.ima`` (a child without
        one: the file's, Namespace.ima_xattr) and ``security.evm`` (a child's private
        ones), every other attribute the file's.
        A child without a ``security.evm`` of its own sees the file's -- an image's
        signature -- unless it has a ``security.ima`` of its own, which the file's
        ``security.evm`` does not cover."""
        if name == IMA_XATTR:
            return ns.ima_xattr(getxattr)
        if name == EVM_XATTR:
            if ns.id == 0:
                return getxattr(EVM_XATTR)
            own = getxattr(ns.evm_xattr_name)
            if own is not None or getxattr(ns.xattr_name) is not None:
                return own
            return getxattr(EVM_XATTR)
        return getxattr(name)
