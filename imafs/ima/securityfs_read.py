"""One open of a control file (a :class:`Session`: what every control file implements),
and the files that are only read: the measurement lists, their counters, the PCR
banks, the mount's stats.

A session is made by ``Securityfs.open`` (ima/securityfs.py) once the open is allowed,
and lives until the file is closed; the FUSE layer (fs/control.py) calls its methods
in a worker thread, one at a time per open (holding ``Session.lock``: two threads of
a process may write through one descriptor at once). A refusal is :class:`SecurityfsError` (an
errno and the reason), which the FUSE layer answers with the errno; the log line and
the audit record were written where it was raised.

Contents that are not lists are taken at open (:meth:`Session.contents`): what a
reader sees is never older than its open, and a read never waits for the engine.
Lists are read in place from LMDB by byte range (``MeasurementList.read``): nothing
builds a whole list in memory.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading

from imafs.logutil import PrintableLogFilter

# the log of every control file (tests and operators grep for "imafs.control")
log = logging.getLogger("imafs.control")
log.addFilter(PrintableLogFilter())

TRIM_EVERY = 256 << 10      # list bytes served between two Store.trim() calls


class SecurityfsError(Exception):
    """A control-file request refused: ``errno`` is what the request fails with,
    ``str()`` the reason (already logged, and audited where that file's refusals are)."""

    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


def quote(data: bytes, limit: int = 200) -> str:
    """What a writer sent, for a log line: quoted, cut at ``limit`` characters (the
    log's filter escapes what is not printable)."""
    text = bytes(data).decode("utf-8", "surrogateescape")
    return "'" + (text if len(text) <= limit else text[:limit] + "...") + "'"


class Session:
    """One open of the control file ``node`` (a row of ``securityfs.FILES``) of
    namespace ``ns``, by ``caller`` (a Subject: pid, uid, gid) with open ``flags``.

    A control file implements what differs from this base:
      - ``contents(fs, node, ns, uid)`` (classmethod): what a read returns, taken at
        open; ``size(fs, node, ns, uid)``: what getattr reports (securityfs says 0, but
        sendfile()/splice stop at i_size on a FUSE file: what a read would return now);
      - ``read(off, size) -> bytes`` when reads are not of the contents taken at open;
      - ``write(data) -> int`` (the bytes taken) for a writable file: a refusal
        fails that write(2); ``close()`` once, when the last descriptor is gone (the
        release: where staged writes take effect; close(2) never fails, as the
        kernel's securityfs release, and the mount answers no FLUSH). ``flush()``:
        the part of a close that may refuse (logged and audited), called by it.
    """

    # a stream (model_secfs.ModelEvents): fs/control.py serves its reads on the event
    # loop through take(), wake_on_data() and interrupted(), waiting for data there
    waits = False

    def __init__(self, fs, node, ns, caller, flags: int):
        self.lock = threading.Lock()    # whoever calls the methods below holds it
        self.fs = fs
        self.node = node
        self.name = node.name
        self.ns = ns
        self.pid, self.uid, self.gid = caller.pid, caller.uid, caller.gid
        acc = flags & os.O_ACCMODE
        self.reading = acc != os.O_WRONLY
        self.writing = acc != os.O_RDONLY
        self.data = self.contents(fs, node, ns, self.uid) if self.reading else None

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes | None:
        return b""

    @classmethod
    def size(cls, fs, node, ns, uid: int) -> int:
        data = cls.contents(fs, node, ns, uid)
        return len(data) if data else 0

    def read(self, off: int, size: int) -> bytes:
        if self.data is None:
            raise SecurityfsError(errno.EBADF, f"{self.name} was not opened for reading")
        return self.data[off:off + size]

    def write(self, data: bytes) -> int:
        raise SecurityfsError(errno.EACCES, f"{self.name} is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- lists

class ListFile(Session):
    """``ascii_runtime_measurements`` and ``binary_runtime_measurements`` (and their
    ``_sha1``/``_sha256`` bank variants): the namespace's list, by byte range."""

    VIEWS = {
        "ascii_runtime_measurements": "ascii",
        "ascii_runtime_measurements_sha1": "ascii_sha1",
        "ascii_runtime_measurements_sha256": "ascii_sha256",
        "binary_runtime_measurements": "binary",
        "binary_runtime_measurements_sha1": "binary_sha1",
        "binary_runtime_measurements_sha256": "binary_sha256",
    }

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        self.view = self.VIEWS[node.name]
        self.served = 0             # list bytes read through this open
        self.trimmed = 0            # ... when the store's mapping was last trimmed

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> None:
        return None                 # read in place

    @classmethod
    def size(cls, fs, node, ns, uid: int) -> int:
        return ns.mlist.size(cls.VIEWS[node.name])

    def read(self, off: int, size: int) -> bytes:
        data = self.ns.mlist.read(self.view, off, size)
        self.served += len(data)
        if self.served - self.trimmed >= TRIM_EVERY:
            self.trimmed = self.served
            self.fs.trim()
        return data

    def close(self) -> None:
        if self.served > self.trimmed:
            self.fs.trim()


class MeasurementCount(Session):
    """``runtime_measurements_count``."""

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return f"{ns.mlist.count}\n".encode()


class Violations(Session):
    """``violations``."""

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return f"{ns.mlist.violations}\n".encode()


class PcrBank(Session):
    """``pcrs/sha1``, ``pcrs/sha256``: ``PCR-NN: <hex>`` lines (what ``evmctl --pcrs``
    reads); the bank is the file's name."""

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return ns.mlist.pcrs_text(node.name).encode()


class Stats(Session):
    """``stats`` (root namespace only: the counters are the mount's, they count the
    host's and every namespace's hashing): the engine's stats snapshot as JSON."""

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return (json.dumps(fs.engine.stats(), sort_keys=True) + "\n").encode()
