"""The digest-list control files, per namespace as DIGLIM's securityfs directory:
``digest_list_add`` and ``digest_list_del`` (a path, read as the writer sees it),
``digest_query`` (``sha256:<hex>`` in, the lists holding it out), ``digests_count``,
and ``digest_lists_loaded/``, one file per loaded list with its provenance.

Sessions of ima/securityfs_read.py's :class:`Session`. Who may write add/del: as
``policy`` (the row in securityfs.FILES says ``writers="admin"``). A path written is
opened by ``Securityfs.open_as`` -- as the process that opened the file sees it: its
root, its credentials, never the daemon's -- and loaded by ima/digest_cache.py (the
DIGEST_LIST_CHECK hook). One request per ``write()``; a refusal fails that write with
the errno, logs one line and writes a ``digest_list_rejected`` audit record.
"""
from __future__ import annotations

import errno
import json
import os

from imafs.ima import digest_cache
from imafs.ima import digest_lists as dl
from imafs.ima import hashing
from imafs.ima.binding import Opener
from imafs.ima.iint import Subject
from imafs.ima.securityfs_read import Session, SecurityfsError, log, quote

MAX_REQUEST = 4096          # one path, one label or one digest per write
COUNT_NAMES = ((dl.COMPACT_PARSER, "Parser"), (dl.COMPACT_FILE, "File"),
               (dl.COMPACT_METADATA, "Metadata"), (dl.COMPACT_DIGEST_LIST, "Digest list"))


def _one_line(buf: bytes, what: str) -> str:
    """The request of one write: one line (a final newline allowed), no NUL."""
    if len(buf) > MAX_REQUEST:
        raise ValueError(f"over {MAX_REQUEST} bytes written ({len(buf)}): write one {what}")
    if b"\0" in buf:
        raise ValueError(f"a NUL byte in {quote(buf)}")
    lines = [ln for ln in buf.split(b"\n") if ln.strip()]
    if len(lines) != 1:
        raise ValueError(f"write one {what} per write(), got {len(lines)} lines: "
                         f"{quote(buf)}")
    return os.fsdecode(lines[0].strip())


class _ListWrite(Session):
    """``digest_list_add``/``digest_list_del``: the writer is the process that opened
    the file (a FUSE write carries no caller), held by a pidfd so that a reused pid
    is never taken for it: a path is resolved in its root, with its credentials."""

    WHAT = "path"

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        self.opener = Opener(caller.pid) if self.writing else None

    def write(self, buf: bytes) -> int:
        try:
            request = _one_line(buf, self.WHAT)
            self.request(request)
        except ValueError as e:
            self.refuse(errno.EINVAL, str(e))
        except digest_cache.DigestListRefused as e:
            self.refuse(e.errno, str(e))
        return len(buf)

    def refuse(self, err: int, msg: str):
        log.warning("%s of namespace %s refused (pid %d): %s", self.name, self.ns.path,
                    self.pid, msg)
        self.fs.engine.audit.record("digest_list_rejected", ns=self.ns.path, pid=self.pid,
                                    uid=self.uid, file=self.name, error=msg)
        raise SecurityfsError(err, msg)

    def open_path(self, path: str):
        """The file ``path`` names for the writer: OSError -> DigestListRefused."""
        if self.opener is None or not self.opener.alive():
            raise digest_cache.DigestListRefused(
                errno.EPERM, f"the process that opened {self.name} (pid {self.pid}) has "
                             f"exited: nobody to read {path} as")
        try:
            f = self.fs.open_as(self.pid, self.uid, self.gid, path)
        except OSError as e:
            raise digest_cache.DigestListRefused(
                e.errno or errno.EIO, f"{path}: {e.strerror or e}") from None
        if not self.opener.alive():     # the pid was another's by the time it resolved
            os.close(f.fd)
            raise digest_cache.DigestListRefused(
                errno.EPERM, f"the process that opened {self.name} (pid {self.pid}) "
                             f"exited while {path} was opened")
        return f

    def subject(self) -> Subject:
        return Subject(self.pid, self.uid, self.gid)

    def request(self, text: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.opener is not None:
            self.opener.close()
            self.opener = None


class DigestListAdd(_ListWrite):
    """``digest_list_add``: the path of a list file; it is measured and appraised as
    DIGEST_LIST_CHECK and its digests loaded under its file name (ima/digest_cache.py
    :func:`load`)."""

    def request(self, path: str) -> None:
        f = self.open_path(path)
        try:
            info = digest_cache.load(self.fs.engine, self.ns, self.subject(), f,
                                     origin={"path": path, "file": os.fsdecode(f.path),
                                             "pid": self.pid, "uid": self.uid})
        finally:
            os.close(f.fd)
        log.info("digest_list_add: %s loaded into namespace %s (%s)", info.label,
                 self.ns.path, dl.format_actions(info.actions))


class DigestListDel(_ListWrite):
    """``digest_list_del``: the path of a loaded list's file (its name is the label,
    its content must be the loaded list's), or just the label."""

    WHAT = "path or list name"

    def request(self, text: str) -> None:
        if not text.startswith("/"):
            digest_cache.unload(self.fs.engine, self.ns, self.subject(), text)
            return
        f = self.open_path(text)
        try:
            digest_cache.unload(self.fs.engine, self.ns, self.subject(),
                                os.path.basename(text.rstrip("/")), f)
        finally:
            os.close(f.fd)


class DigestQuery(Session):
    """``digest_query``: write ``ALGO:HEX`` (``sha256:<hex>``), read one line per list
    holding it -- DIGLIM's ``LABEL (actions: N): version: 1, algo: A, type: T,
    modifiers: M, count: C, datalen: D`` -- with the package it comes from; a list's
    own digest answers as type 3 (digest_list)."""

    def __init__(self, fs, node, ns, caller, flags: int):
        super().__init__(fs, node, ns, caller, flags)
        self.result: bytes | None = None

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return b""

    def read(self, off: int, size: int) -> bytes:
        if self.result is not None:
            return self.result[off:off + size]
        return super().read(off, size)

    def write(self, buf: bytes) -> int:
        try:
            text = _one_line(buf, "digest (ALGO:HEX)")
            algo, digest = hashing.parse_digest(text)   # HashAlgoError is a ValueError
        except ValueError as e:
            log.warning("digest_query of namespace %s refused (pid %d): %s", self.ns.path,
                        self.pid, e)
            raise SecurityfsError(errno.EINVAL, str(e)) from None
        idx = self.ns.digest_lists
        refs = idx.query(algo, digest) if idx is not None else []
        lines = []
        for ref in refs:
            if ref.type == dl.COMPACT_DIGEST_LIST:
                info = ref.list
                lines.append(f"{info.label} (actions: {info.actions}): version: "
                             f"{dl.VERSION}, algo: {info.algo}, type: {ref.type}, "
                             f"modifiers: 0, count: 1, datalen: {len(info.digest)}"
                             f" -- the list itself")
                continue
            line = ref.list.describe_block(ref.block)
            pkg = ref.list.package(ref.block)
            lines.append(line + (f" -- {pkg.name} {pkg.version}" if pkg else ""))
        if not lines:
            lines.append(f"{algo}:{digest.hex()}: in no loaded digest list")
        self.result = ("\n".join(lines) + "\n").encode()
        return len(buf)


class DigestsCount(Session):
    """``digests_count``: distinct digests per type (DIGLIM's ``<Type> digests: N``
    lines); the digest-list line counts the loaded lists."""

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        idx = ns.digest_lists
        counts = idx.counts() if idx is not None else {}
        return "".join(f"{name} digests: {counts.get(t, 0)}\n"
                       for t, name in COUNT_NAMES).encode()


class LoadedList(Session):
    """``digest_lists_loaded/LABEL``: one loaded list -- how it was loaded (path,
    writer, time, its digest, the actions done to it), its blocks and its provenance
    (the archives, keys and packages its digests came from). One file per list: the
    directory lists :meth:`entries` (label -> list id)."""

    def __init__(self, fs, node, ns, caller, flags: int, key: int = 0):
        self.key = key
        super().__init__(fs, node, ns, caller, flags)

    @classmethod
    def entries(cls, fs, ns) -> dict[str, int]:
        idx = ns.digest_lists
        return {} if idx is None else {i.label: i.id for i in idx.lists()}

    def contents(self, fs, node, ns, uid: int) -> bytes:
        # an instance's (the base calls it at open): the list this open's key names
        return describe_loaded(ns, self.key)

    @classmethod
    def size(cls, fs, node, ns, uid: int, key: int = 0) -> int:
        return len(describe_loaded(ns, key))


def describe_loaded(ns, key: int) -> bytes:
    """The text of ``digest_lists_loaded/LABEL`` (SecurityfsError ENOENT when the list
    is no longer loaded)."""
    idx = ns.digest_lists
    info = idx.info(key) if idx is not None and key else None
    if info is None:
        raise SecurityfsError(errno.ENOENT, f"digest list {key} is not loaded")
    out = [f"label: {info.label}", f"digest: {info.algo}:{info.digest.hex()}",
           f"actions: {dl.format_actions(info.actions)}", f"size: {info.size}",
           f"digests: {info.count}"]
    if info.origin:
        out.append("loaded: " + json.dumps(info.origin, sort_keys=True))
    for i, (typ, mods, algo, count) in enumerate(info.blocks):
        pkg = info.package(i)
        out.append(f"block {i}: type {dl.TYPE_NAMES.get(typ, typ)}, algo {algo}, "
                   f"modifiers {mods}, count {count}"
                   + (f" -- {pkg.name} {pkg.version} ({pkg.arch})" if pkg else ""))
    if info.provenance is not None:
        out.append("provenance: " + json.dumps(info.provenance.to_json(), sort_keys=True))
    return ("\n".join(out) + "\n").encode()
