"""The inode hooks: a change of a file's attributes or xattrs through the mount, and
which ``security.ima`` / ``security.evm`` a caller reads and lists.

The kernel keeps these beside the appraisal, in ima_appraise.c: ima_inode_setxattr()
and ima_inode_removexattr() (a ``security.ima`` value must parse; the file's
appraisal flags are reset), ima_inode_post_setattr() and ima_reset_appraise_flags()
(:meth:`InodeHooks.file_changed`: the file's verdicts are stale). EVM's hooks around
the same changes are evm_main.c's, here evm_hooks.py, called under the file's lock
between EVM's check and its update. What imafs adds: a child namespace's own
``security.ima`` and ``security.evm`` (nsxattr.py: the names a caller reads, writes
and lists), and the behaviour models' hooks for the same operations (modelhooks.py:
:meth:`InodeHooks.inode_event`).

:class:`InodeHooks` is mixed into :class:`imafs.ima.engine.Engine`: the FUSE adapter
calls these as the engine's methods.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from typing import TYPE_CHECKING, Callable

from imafs.ima import appraise as ap
from imafs.ima.evm_hooks import Change
from imafs.ima.iint import COUNTS, AccessDenied, Subject, settle
from imafs.ima.modelhooks import models_of

if TYPE_CHECKING:
    from imafs.ima.evm_hooks import EvmHooks
    from imafs.ima.iint import IIntTable
    from imafs.ima.modelhooks import Modelling
    from imafs.ima.namespaces import Namespace
    from imafs.ima.nsxattr import XattrView

log = logging.getLogger("imafs.engine")


class InodeHooks:
    """The engine's inode hooks. They use these parts of the engine:"""

    xattrs: XattrView                           # which names a namespace sees
    evm: EvmHooks                               # EVM's check and update of a change
    iints: IIntTable                            # the files' integrity state
    modelling: Modelling                        # the behaviour models
    namespace_of: Callable[[Subject], Namespace]    # the caller's namespace (refuses)
    modelled: Callable[[], bool]                # does any namespace have a model

    def file_changed(self, key, size: int | None = None) -> None:
        """Attributes or xattrs changed through the mount: verdicts are stale (the
        kernel's IMA_CHANGE_ATTR; the new-file allowance stays, as since 6.14).
        ``size``: the file's size now; one that differs from the measured size is a
        content change through the mount (truncate), which, like a writable open,
        ends the read-time verification of the handles open now -- and, while a
        writer has the file open through the mount, is a change its last close
        relabels (as the kernel's i_version check there sees a truncate by path)."""
        ii = self.iints.find(key)
        if ii is not None:
            with ii.lock:
                if size is not None and (ii.version is None or ii.version[2] != size):
                    with COUNTS:
                        ii.wgen += 1
                        if ii.writers:
                            ii.dirty = True
                ii.reset(None)

    def inode_setattr(self, subject: Subject, key, change: Change, apply, file=None):
        """A change of owner, group, mode or size through the mount by ``subject``:
        ``apply()`` makes it and returns the stat after it. EVM checks it first and
        brings HMACs up to date after it (evm_hooks.py; ``file()`` gives the file as a
        FileRef when EVM needs it, None for a file that is not regular); the file's
        verdicts are stale. Returns the stat; AccessDenied refuses (nothing done)."""
        st = self._evm_change(subject, key, change, apply, file)
        self.file_changed(key, st.st_size if stat.S_ISREG(st.st_mode) else None)
        return st

    def inode_setxattr(self, subject: Subject, key, path: bytes, name: bytes,
                       value: bytes | None, apply, file=None, st=None) -> None:
        """ima_inode_setxattr / ima_inode_removexattr (``value`` None) and EVM's hooks,
        by ``subject``: a ``security.ima`` value must parse (EINVAL), private names are
        imafs's own (EPERM); EVM checks the change (evm_hooks.py); ``apply(name)``
        stores it under ``name`` -- a child namespace's own for ``security.ima`` and
        ``security.evm``; HMACs follow; the file's verdicts are stale. ``file()`` as
        for inode_setattr. Given the file's ``st``, the behaviour models'
        inode_setxattr / inode_removexattr first (EPERM; may read /proc: a worker
        thread calls this)."""
        view = self.xattrs
        if view.is_private(name):
            raise AccessDenied(errno.EPERM, "namespace-private integrity attributes are "
                                            "managed by imafs")
        if name == view.IMA and value is not None:
            try:
                ap.parse_ima_xattr(value)
            except ap.XattrError as e:
                log.warning("refused security.ima on %s: %s", os.fsdecode(path), e)
                raise AccessDenied(errno.EINVAL, str(e)) from None
        if st is not None and self.modelled():
            settle(self.inode_event(subject, "inode_setxattr" if value is not None
                                    else "inode_removexattr",
                                    {"st": st, "path": path, "name": name, "value": value}))
        stored = name
        if name in view.OWN:
            ns = self.namespace_of(subject)
            stored = view.stored_name(ns, name) or name
        self._evm_change(subject, key, Change(name=os.fsdecode(name), value=value),
                         lambda: apply(stored), file)
        self.file_changed(key)

    def _evm_change(self, subject: Subject, key, change: Change, apply, file):
        """``apply()`` between EVM's check and its update, under the file's lock (as
        the kernel's under the inode's), when some namespace has EVM on."""
        if file is None or not self.evm.active():
            return apply()
        ns = self.namespace_of(subject)
        f = file()
        if f is None:
            return apply()
        ii = self.iints.get(key)
        with ii.lock:
            return self.evm.inode_change(ns, f, change, apply, pid=subject.pid,
                                         uid=subject.uid)

    def inode_event(self, subject: Subject, hook: str, facts: dict):
        """A namespace operation through the mount, before it is done (the LSM hooks
        of modelhooks.EVENT_OF: inode_create, inode_unlink, inode_setattr, ...), for
        the behaviour models of the caller's namespace chain: None (allowed), a
        Pending (finish it in a worker thread), or AccessDenied (EPERM) to refuse."""
        pairs = models_of(self.namespace_of(subject))
        if not pairs:
            return None
        return self.modelling.inode_event(subject, pairs, hook, facts)

    def inode_getxattr(self, pid: int, name: bytes) -> bytes | tuple | None:
        """The name a read of xattr ``name`` by ``pid`` reads instead (a tuple: the
        first of these names the file has), or None."""
        return self.xattrs.read_name(pid, name)

    def inode_listxattr(self, pid: int, names: list[bytes]) -> list[bytes]:
        """The xattr names ``pid`` is shown of ``names``."""
        return self.xattrs.listed(pid, names)
