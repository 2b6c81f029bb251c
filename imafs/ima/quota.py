"""What one integrity namespace may make the daemon hold: its stores on the host's
disk, and how many namespaces it and its descendants make. One concern, one place:
every per-namespace bound of issues 14 (item 5) and 15 is a kind here.

A child namespace's measurement list (and, with issues 17 and 18, its digest lists
and its behaviour model) lives in the host's LMDB: a container that reads new files
forever would fill the host's disk. Each namespace has a :class:`Quota`: per kind of
store (``list``, ``digest-lists``) at most so many entries and so many bytes. (A
behaviour model is bounded by the model itself: at most ``Model.max_points``
coefficients and ``max_records`` trajectory and forensics records, model.py.) A store that would go past it is refused (:class:`QuotaExceeded`) and
the namespace fails closed -- its accesses that need a new entry of that kind are
refused (record.py: EIO, as any entry that cannot be stored) -- while the host and
its siblings go on; the first refusal of each namespace and kind is audited
(``quota_exceeded``) and logged.

The kind ``namespaces`` is a count, no size: how many namespaces the namespace and
all its descendants may hold together, itself included (1 to 1024; default 64).
NamespaceTree.create checks it against the subtree and every ancestor's (ENOSPC).

Grammar (``--ns-quota`` for every child namespace of a mount; the ``quota=`` option
of a namespace, from ns-create, a hook profile or ``imafs ns create``, over it):
``KIND:ENTRIES[:SIZE]`` items, comma-separated; ``SIZE`` in bytes or with K, M, G
(powers of 1024); ``0`` or ``-`` is "no limit". Example: ``list:100000:64M,namespaces:8``.
A quota given from inside the mount (ns-create) never loosens what its parent (or,
below the root, ``--ns-quota``) gives: :meth:`Quota.within`.

For the ``list`` kind, entries are the list's entries and bytes the size of its
binary view (``binary_runtime_measurements``, sha1 bank: what a verifier fetches).
For ``digest-lists``, entries are the lists loaded and bytes the sizes of their
files (a refused load is ENOSPC, the lists already loaded go on vouching).
The root namespace has no quota (the kernel's list has none; the mount's own limits
bound its namespaces).
"""
from __future__ import annotations

import errno
import logging
import re
import threading
from dataclasses import dataclass, field

log = logging.getLogger("imafs.engine")

KINDS = ("list", "digest-lists", "namespaces")
DEFAULT_LIST = (1_000_000, 256 << 20)   # a child's list: entries, bytes of the binary view
DEFAULT_DIGEST_LISTS = (64, 512 << 20)  # a child's digest lists: lists, bytes of list files
DEFAULT_NAMESPACES = (64, None)         # a child's subtree: namespaces (a count, no size)
MAX_NAMESPACES = 1024                   # the mount's own (namespaces.MAX_NAMESPACES)
COUNT_ONLY = ("namespaces",)
_SIZE = re.compile(r"(\d+)([KMG]?)\Z")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class QuotaError(ValueError):
    """A quota specification that does not parse."""


class QuotaExceeded(Exception):
    """A store that would take a namespace past its quota (fail closed)."""

    def __init__(self, ns_path: str, kind: str, what: str):
        super().__init__(f"namespace {ns_path}: {kind} quota reached ({what})")
        self.errno = errno.EIO
        self.kind = kind


def _number(text: str, *, size: bool) -> int | None:
    if text in ("0", "-", ""):
        return None
    m = _SIZE.match(text.upper()) if size else re.fullmatch(r"\d+", text)
    if m is None:
        raise QuotaError(f"{text!r} is not a {'size (N, NK, NM, NG)' if size else 'count'}")
    value = int(m.group(1)) * _UNITS[m.group(2)] if size else int(text)
    return value or None        # "00", "0K": zero too, no limit (as it prints back)


@dataclass
class Quota:
    """Per kind: (entries, bytes), None for no limit."""
    limits: dict = field(default_factory=dict)
    _refused: set = field(default_factory=set, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False,
                                  compare=False)

    @classmethod
    def default(cls) -> "Quota":
        """A child namespace's quota when nothing says otherwise."""
        return cls({"list": DEFAULT_LIST, "digest-lists": DEFAULT_DIGEST_LISTS,
                    "namespaces": DEFAULT_NAMESPACES})

    @classmethod
    def unlimited(cls) -> "Quota":
        return cls({})

    @classmethod
    def parse(cls, text: str, base: "Quota | None" = None) -> "Quota":
        """``KIND:ENTRIES[:SIZE],...`` over ``base`` (kinds not named keep its
        limits)."""
        limits = dict(base.limits) if base is not None else {}
        seen = set()
        if not text.strip():
            raise QuotaError("empty quota (KIND:ENTRIES[:SIZE], e.g. list:100000:64M)")
        for item in text.split(","):
            parts = item.strip().split(":")
            if len(parts) not in (2, 3) or parts[0] not in KINDS:
                raise QuotaError(f"{item!r}: expected KIND:ENTRIES[:SIZE] with KIND one of "
                                 f"{', '.join(KINDS)}")
            if parts[0] in seen:
                raise QuotaError(f"{parts[0]} given twice")
            seen.add(parts[0])
            try:
                entries = _number(parts[1], size=False)
                size = _number(parts[2], size=True) if len(parts) == 3 else None
            except QuotaError as e:
                raise QuotaError(f"{item.strip()}: {e}") from None
            if parts[0] in COUNT_ONLY:
                if len(parts) == 3:
                    raise QuotaError(f"{item.strip()}: {parts[0]} have a count, no size")
                if entries is not None and not 1 <= entries <= MAX_NAMESPACES:
                    raise QuotaError(f"{item.strip()}: the count is 1 to {MAX_NAMESPACES}, "
                                     f"or 0 for no limit of its own")
            limits[parts[0]] = (entries, size)
        return cls(limits)

    def within(self, outer: "Quota") -> "Quota":
        """This quota, never looser than ``outer`` in any kind ``outer`` limits (None:
        no limit, the loosest)."""
        def tight(a, b):
            return b if a is None else a if b is None else min(a, b)
        limits = dict(self.limits)
        for kind, (e, b) in outer.limits.items():
            mine = limits.get(kind, (None, None))
            limits[kind] = (tight(mine[0], e), tight(mine[1], b))
        return Quota(limits)

    def namespaces(self) -> int | None:
        """How many namespaces the subtree may hold (None: no limit of its own); the
        default when the quota does not say."""
        return self.limits.get("namespaces", DEFAULT_NAMESPACES)[0]

    def text(self) -> str:
        """The specification that parses back to this quota."""
        return ",".join(f"{k}:{e if e is not None else 0}" + (
            "" if k in COUNT_ONLY else f":{b if b is not None else 0}")
            for k, (e, b) in sorted(self.limits.items())) or "-"

    def admit(self, ns_path: str, kind: str, entries: int, size: int, add: int,
              audit=None) -> None:
        """May a namespace holding ``entries`` entries of ``size`` bytes of ``kind``
        store one more of ``add`` bytes? Raises QuotaExceeded (audited and logged
        the first time for this namespace and kind)."""
        lim = self.limits.get(kind)
        if lim is None:
            return
        max_entries, max_bytes = lim
        if max_entries is not None and entries + 1 > max_entries:
            what = f"{entries} entries, at most {max_entries}"
        elif max_bytes is not None and size + add > max_bytes:
            what = f"{size} + {add} bytes, at most {max_bytes}"
        else:
            return
        err = QuotaExceeded(ns_path, kind, what)
        with self._lock:
            first = kind not in self._refused
            self._refused.add(kind)
        if first:
            log.error("%s: new entries refused, accesses that need one fail (EIO) in this "
                      "namespace only", err)
            if audit is not None:
                audit.record("quota_exceeded", ns=ns_path, kind=kind, used_entries=entries,
                             used_bytes=size, limit_entries=max_entries, limit_bytes=max_bytes)
        else:
            log.debug("%s", err)
        raise err


def admit_list_entry(ns, entry, audit=None) -> None:
    """Before ``entry`` goes into namespace ``ns``'s list: within its quota, or
    already listed (an entry the list has is not stored twice)."""
    quota = getattr(ns, "quota", None)
    if quota is None or "list" not in quota.limits:
        return
    ml = ns.mlist
    try:
        quota.admit(ns.path, "list", ml.count, ml.size("binary"),
                    len(entry.binary_record("sha1")), audit)
    except QuotaExceeded:
        if not entry.violation and ml.listed(entry):
            return
        raise


def admit_digest_list(ns, idx, size: int, audit=None) -> None:
    """Before a list file of ``size`` bytes goes into namespace ``ns``'s digest lists
    (``idx``): within its quota, else QuotaExceeded."""
    quota = getattr(ns, "quota", None)
    if quota is None or "digest-lists" not in quota.limits:
        return
    loaded = idx.lists()
    quota.admit(ns.path, "digest-lists", len(loaded), sum(i.size for i in loaded), size,
                audit)
