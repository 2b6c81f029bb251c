"""A namespace's measurement list and PCR banks, kept in the mount's LMDB store.

The list is append-only.  Every append is one LMDB write transaction that
stores the entry, its duplicate-check key, the offset checkpoints and the new
PCR registers, so after a crash the list and the PCRs always agree.

Layout (named databases of imafs/store.py; ``ns`` is a big-endian u32 so a
namespace's rows are contiguous):

``log``      ns | seq (u64 BE)              -> packed entry + its template hash per bank
``loghash``  ns | pcr (u32 BE) | sha1 hash  -> seq   (the kernel's hash table)
``logidx``   ns | view (u8) | offset (u64)  -> seq   (every CHECKPOINT_EVERY-th entry)
``pcr``      ns | bank name                 -> 24 registers, concatenated
``logmeta``  ns | b"banks"                  -> b"sha1,sha256"
             ns | b"state"                  -> count, violations, size of every view

Views are ``ascii_<bank>`` and ``binary_<bank>`` for every bank of the list;
``ascii`` and ``binary`` are the sha1 ones, as in the kernel's securityfs.
``read(view, offset, size)`` finds the last checkpoint at or before ``offset``
(one B-tree lookup), then renders at most CHECKPOINT_EVERY - 1 entries to reach
the offset: O(log n) per read, no list in memory.  The index costs about
4 * 30 / CHECKPOINT_EVERY bytes per entry with two banks.

One concern, over 600 lines by a little: the list and its PCR banks are stored in one
transaction per append, so they cannot be cut apart without losing that.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from typing import Iterable, Iterator

from .templates import (TemplateEntry, build_entry, hash_size, new_hash,
                        violation_entry)

__all__ = ["MeasurementList", "boot_aggregate_entry", "read_tpm_pcrs", "NUM_PCRS",
           "CHECKPOINT_EVERY", "DEFAULT_BANKS"]

NUM_PCRS = 24
CHECKPOINT_EVERY = 16
DEFAULT_BANKS = ("sha1", "sha256")
BOOT_AGGREGATE_NAME = "boot_aggregate"

_NS = struct.Struct(">I")
_LOGKEY = struct.Struct(">IQ")
_IDXKEY = struct.Struct(">IBQ")
_HASHKEY = struct.Struct(">II")
_SEQ = struct.Struct(">Q")
_ENTRY_HEAD = struct.Struct("<BIB")      # flags, pcr, template name length
_U32 = struct.Struct("<I")

log = logging.getLogger("imafs.measurelog")


# -- boot aggregate -----------------------------------------------------------

def read_tpm_pcrs(tpm_pcr_dir: str, bank: str, count: int) -> list[bytes] | None:
    """PCRs 0..count-1 of one bank from sysfs (``pcr-<bank>/<n>``, kernel >= 5.12;
    for sha1 also the TPM 1.2 ``device/pcrs`` file), or None if unreadable."""
    size = hash_size(bank)
    regs = []
    try:
        for i in range(count):
            with open(os.path.join(tpm_pcr_dir, f"pcr-{bank}", str(i)), "rb") as f:
                val = bytes.fromhex(f.read(256).decode("ascii").strip())
            if len(val) != size:
                return None
            regs.append(val)
        return regs
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    if bank != "sha1":
        return None
    try:    # TPM 1.2: "PCR-00: 3A 3F ..."
        with open(os.path.join(tpm_pcr_dir, "device", "pcrs"), "rb") as f:
            text = f.read(1 << 16).decode("ascii")
        found = {}
        for line in text.splitlines():
            head, _, hx = line.partition(":")
            if head.startswith("PCR-") and head[4:].isdigit():
                found[int(head[4:])] = bytes.fromhex(hx.replace(" ", ""))
        regs = [found[i] for i in range(count)]
        return regs if all(len(r) == size for r in regs) else None
    except (OSError, ValueError, UnicodeDecodeError, KeyError):
        return None


def _tpm_banks(tpm_pcr_dir: str) -> list[str]:
    try:
        names = os.listdir(tpm_pcr_dir)
    except OSError:
        return []
    banks = [n[4:] for n in names if n.startswith("pcr-")]
    if not banks and os.path.exists(os.path.join(tpm_pcr_dir, "device", "pcrs")):
        banks = ["sha1"]
    return banks


def boot_aggregate_entry(template: str = "ima-ng", tpm_pcr_dir: str = "/sys/class/tpm/tpm0",
                         *, hash_algo: str = "sha256", pcr: int = 10,
                         ns_id: int = 0, tpm=None) -> TemplateEntry:
    """The first entry of a list, as ima_add_boot_aggregate() makes it.

    The kernel hashes PCRs 0-7 (sha1 bank) or 0-9 (any other bank), choosing the
    bank of ``hash_algo`` (ima_hash_algo), else sha256, else sha1; the digest
    carries that bank's algorithm.  The ``ima`` template only takes a sha1
    aggregate.  Without a readable TPM the digest is all zeros of
    ``hash_algo``'s size (20 bytes for ``ima``).

    ``tpm`` (an :class:`imafs.ima.tpm.TPM`, ``--tpm``): the PCRs come from that
    TPM instead of sysfs; its errors (TPMError) propagate.
    """
    if tpm is not None:
        available = list(tpm.banks)

        def read_pcrs(_dir, bank, count):
            return tpm.read_many(bank, range(count))
    else:
        available = _tpm_banks(tpm_pcr_dir)
        read_pcrs = read_tpm_pcrs
    want = "sha1" if template == "ima" else hash_algo
    chosen = next((b for b in (want, "sha256", "sha1") if b in available), None)
    algo, digest = ("sha1" if template == "ima" else hash_algo), None
    if chosen is not None and (template != "ima" or chosen == "sha1"):
        regs = read_pcrs(tpm_pcr_dir, chosen, 8 if chosen == "sha1" else 10)
        if regs is not None:
            try:
                h = new_hash(chosen)
            except ValueError:
                h = None
            if h is not None:
                for r in regs:
                    h.update(r)
                algo, digest = chosen, h.digest()
    if digest is None:
        digest = bytes(hash_size(algo))
    return build_entry(template, name=BOOT_AGGREGATE_NAME, algo=algo, digest=digest,
                       pcr=pcr, ns_id=ns_id)


# -- entry storage ------------------------------------------------------------

def _pack_entry(entry: TemplateEntry, hashes: list[bytes]) -> bytes:
    name = entry.template.encode()
    return b"".join([_ENTRY_HEAD.pack(1 if entry.violation else 0, entry.pcr, len(name)),
                     name, _U32.pack(len(entry.fields)),
                     *(_U32.pack(len(f)) + f for f in entry.fields), *hashes])


def _unpack_entry(blob: bytes, sizes: list[int]) -> tuple[TemplateEntry, list[bytes]]:
    mv = memoryview(blob)
    flags, pcr, nlen = _ENTRY_HEAD.unpack_from(mv, 0)
    pos = _ENTRY_HEAD.size
    template = bytes(mv[pos:pos + nlen]).decode("ascii")
    pos += nlen
    (nf,) = _U32.unpack_from(mv, pos)
    pos += 4
    fields = []
    for _ in range(nf):
        (flen,) = _U32.unpack_from(mv, pos)
        pos += 4
        fields.append(bytes(mv[pos:pos + flen]))
        pos += flen
    hashes = []
    for s in sizes:
        hashes.append(bytes(mv[pos:pos + s]))
        pos += s
    entry = TemplateEntry._trusted(pcr, template, tuple(fields), bool(flags & 1), hashes[0])
    return entry, hashes


# -- the list -----------------------------------------------------------------

class MeasurementList:
    """The measurement list and PCR banks of namespace ``ns_id``.

    A new list starts with the boot aggregate entry (``template``,
    ``hash_algo``, ``tpm_pcr_dir``), unless ``boot_aggregate=False``.
    Thread-safe: appends are serialised (a lock here, and LMDB's single
    writer across processes); reads use read-only transactions.
    """

    def __init__(self, store, ns_id: int, banks: Iterable[str] = DEFAULT_BANKS, *,
                 template: str = "ima-ng", hash_algo: str = "sha256",
                 tpm_pcr_dir: str = "/sys/class/tpm/tpm0", boot_aggregate: bool = True,
                 tpm=None):
        if not 0 <= ns_id < 1 << 32:
            raise ValueError("namespace id must fit in a u32")
        banks = tuple(banks)
        if not banks or banks[0] != "sha1" or len(set(banks)) != len(banks):
            raise ValueError("banks must start with sha1 and not repeat")
        for b in banks:
            new_hash(b)
        self.store = store
        self.ns_id = ns_id
        self.template = template
        self.hash_algo = hash_algo
        self._ns = _NS.pack(ns_id)
        self._lock = threading.Lock()
        self._log = store.db("log")
        self._idx = store.db("logidx")
        self._hash = store.db("loghash")
        self._pcr = store.db("pcr")
        self._meta = store.db("logmeta")
        self.banks = banks
        self._sizes = [hash_size(b) for b in banks]
        self._views = {}
        for i, b in enumerate(banks):
            self._views[f"ascii_{b}"] = (2 * i, b, True)
            self._views[f"binary_{b}"] = (2 * i + 1, b, False)
        self._views["ascii"] = self._views["ascii_sha1"]
        self._views["binary"] = self._views["binary_sha1"]
        self._state = struct.Struct(f"<QQ{2 * len(banks)}Q")
        self._tpm = None
        self._create(boot_aggregate, tpm_pcr_dir, tpm)
        if tpm is not None:
            self.attach_tpm(tpm)

    def _create(self, boot_aggregate: bool, tpm_pcr_dir: str, tpm) -> None:
        env, banks, ns_id = self.store.env, self.banks, self.ns_id
        with env.begin() as txn:        # an existing list needs no write (read-only stores)
            if self._check_banks(txn):
                return
        first = None
        if boot_aggregate:
            first = self._prepare(boot_aggregate_entry(self.template, tpm_pcr_dir,
                                                       hash_algo=self.hash_algo, ns_id=ns_id,
                                                       tpm=tpm))
        # Creation and the boot aggregate commit together.
        with self._lock, env.begin(write=True) as txn:
            if self._check_banks(txn):
                return
            txn.put(self._ns + b"banks", ",".join(banks).encode(), db=self._meta)
            txn.put(self._ns + b"state", self._state.pack(0, 0, *[0] * (2 * len(banks))),
                    db=self._meta)
            for b, size in zip(banks, self._sizes):
                txn.put(self._ns + b.encode(), bytes(size * NUM_PCRS), db=self._pcr)
            if first is not None:
                self._append(txn, first)

    def _check_banks(self, txn) -> bool:
        """True if the list exists (with our banks); ValueError if other banks."""
        stored = txn.get(self._ns + b"banks", db=self._meta)
        if stored is None:
            return False
        stored = bytes(stored).decode()
        if tuple(stored.split(",")) != self.banks:
            raise ValueError(f"list of namespace {self.ns_id} has banks {stored}, "
                             f"not {','.join(self.banks)}")
        return True

    # --- views
    @property
    def views(self) -> list[str]:
        return list(self._views)

    def _view(self, view: str):
        try:
            return self._views[view]
        except KeyError:
            raise ValueError(f"unknown view {view!r}; have {', '.join(self._views)}") from None

    # --- state
    def _read_state(self, txn) -> tuple[int, int, list[int]]:
        count, violations, *sizes = self._state.unpack(txn.get(self._ns + b"state",
                                                               db=self._meta))
        return count, violations, sizes

    def _snapshot(self):
        with self.store.env.begin() as txn:
            return self._read_state(txn)

    @property
    def count(self) -> int:
        return self._snapshot()[0]

    @property
    def violations(self) -> int:
        return self._snapshot()[1]

    def size(self, view: str) -> int:
        vid = self._view(view)[0]
        return self._snapshot()[2][vid]

    def pcrs(self, bank: str) -> list[bytes]:
        if bank not in self.banks:
            raise ValueError(f"no bank {bank!r}")
        with self.store.env.begin() as txn:
            raw = bytes(txn.get(self._ns + bank.encode(), db=self._pcr))
        s = hash_size(bank)
        return [raw[i * s:(i + 1) * s] for i in range(NUM_PCRS)]

    def pcr(self, bank: str, index: int) -> bytes:
        if not 0 <= index < NUM_PCRS:
            raise ValueError("PCR index out of range")
        return self.pcrs(bank)[index]

    def pcrs_text(self, bank: str) -> str:
        """Every register as "PCR-NN: <hex>" lines (what evmctl --pcrs reads)."""
        return "".join(f"PCR-{i:02d}: {r.hex()}\n" for i, r in enumerate(self.pcrs(bank)))

    # --- appends
    def _render(self, entry: TemplateEntry, hashes: list[bytes]) -> list[bytes]:
        out = []
        for b, h in zip(self.banks, hashes):
            out.append(entry.ascii_line(b, template_hash=h))
            out.append(entry.binary_record(b, template_hash=h))
        return out

    def _prepare(self, entry: TemplateEntry):
        if not isinstance(entry, TemplateEntry):
            raise TypeError("expected a TemplateEntry")
        if not 0 <= entry.pcr < NUM_PCRS:
            raise ValueError(f"PCR {entry.pcr} is not one of the {NUM_PCRS} registers")
        hashes = [entry.template_hash(b) for b in self.banks]
        lengths = [len(r) for r in self._render(entry, hashes)]
        return entry, hashes, lengths, _pack_entry(entry, hashes)

    def _append(self, txn, prepared) -> bool:
        entry, hashes, lengths, blob = prepared
        dupkey = None
        if not entry.violation:
            dupkey = _HASHKEY.pack(self.ns_id, entry.pcr) + hashes[0]
            if txn.get(dupkey, db=self._hash) is not None:
                return False
        count, violations, sizes = self._read_state(txn)
        seq = count
        txn.put(_LOGKEY.pack(self.ns_id, seq), blob, db=self._log)
        if dupkey is not None:
            txn.put(dupkey, _SEQ.pack(seq), db=self._hash)
        if seq % CHECKPOINT_EVERY == 0:
            for vid, off in enumerate(sizes):
                txn.put(_IDXKEY.pack(self.ns_id, vid, off), _SEQ.pack(seq), db=self._idx)
        for i, b in enumerate(self.banks):
            key = self._ns + b.encode()
            s = self._sizes[i]
            regs = bytearray(txn.get(key, db=self._pcr))
            old = regs[entry.pcr * s:(entry.pcr + 1) * s]
            h = new_hash(b)
            h.update(old)
            h.update(entry.extend_value(b, hashes[i]))
            regs[entry.pcr * s:(entry.pcr + 1) * s] = h.digest()
            txn.put(key, bytes(regs), db=self._pcr)
        sizes = [a + b for a, b in zip(sizes, lengths)]
        txn.put(self._ns + b"state",
                self._state.pack(count + 1, violations + bool(entry.violation), *sizes),
                db=self._meta)
        return True

    def add(self, entry: TemplateEntry) -> bool:
        """Append ``entry`` unless an entry with the same PCR and sha1 template
        hash is already in this list (the kernel's hash table).  A violation
        entry is always appended (see add_violation).  True if appended."""
        if not entry.violation and self._tpm is None:
            # already listed (a remount measuring what it measured before): a read
            # transaction, before rendering the entry or taking the writer's lock
            dupkey = _HASHKEY.pack(self.ns_id, entry.pcr) + entry.template_hash(self.banks[0])
            with self.store.env.begin(db=self._hash) as txn:
                if txn.get(dupkey) is not None:
                    return False
        prepared = self._prepare(entry)
        with self._lock:
            with self.store.env.begin(write=True) as txn:
                added = self._append(txn, prepared)
            if self._tpm is not None:
                self._tpm_flush()
            return added

    def listed(self, entry: TemplateEntry) -> bool:
        """Whether an entry with the same PCR and sha1 template hash is in the list
        (add() would not append it)."""
        dupkey = _HASHKEY.pack(self.ns_id, entry.pcr) + entry.template_hash(self.banks[0])
        with self.store.env.begin(db=self._hash) as txn:
            return txn.get(dupkey) is not None

    def add_many(self, entries: Iterable[TemplateEntry]) -> list[bool]:
        """add() for many entries in one transaction (all or nothing)."""
        prepared = [self._prepare(e) for e in entries]
        with self._lock:
            with self.store.env.begin(write=True) as txn:
                added = [self._append(txn, p) for p in prepared]
            if self._tpm is not None:
                self._tpm_flush()
            return added

    def add_violation(self, template_name: str | None, path: str | bytes,
                      pcr: int = 10) -> TemplateEntry:
        """Record a violation (open-writers, ToMToU) as the kernel does: a
        zero-digest entry with a zero template hash, PCRs extended with 0xff..,
        violation counter incremented.  Returns the entry."""
        entry = violation_entry(template_name or self.template, path, pcr=pcr,
                                algo=self.hash_algo, ns_id=self.ns_id)
        self.add(entry)
        return entry

    # --- a TPM (--tpm): every entry is also extended into the TPM's PCRs
    def attach_tpm(self, tpm) -> None:
        """Extend this list into ``tpm`` (:class:`imafs.ima.tpm.TPM`) from now on: each
        appended entry, after its LMDB commit and in list order, into its PCR in every
        allocated bank the TPM has and Python can hash (the list's banks with the
        list's template hashes; others, such as sha384, with the template hash in that
        algorithm, as the kernel extends every bank; 0xff.. for a violation).

        Attaching checks the TPM against the list, PCR by PCR (10 and every PCR the
        list has extended, in the banks both have): equal -- the TPM already holds this
        list (a remount); all zero -- a reset TPM (a fresh list, or a restarted swtpm):
        the whole list is replayed into it; anything else -- someone else extends these
        PCRs (kernel IMA uses PCR 10 of the machine's TPM) or the TPM holds another
        state's list: TPMError, and the mount is refused.

        A failed extension raises TPMError from add() (the entry is in the list, so the
        caller fails the open: EIO) and is retried at the next append, after the TPM is
        checked again: a command that did reach the TPM is not applied twice; a reset
        TPM is replayed; a TPM that holds anything else stays failed (every append
        raises) until a remount."""
        from imafs.ima.tpm import TPMError
        common = [b for b in self.banks if b in tpm.banks]
        if not common:
            raise TPMError(f"TPM {tpm.tcti} has none of the list's PCR banks "
                           f"({', '.join(self.banks)}; it has {', '.join(tpm.banks)})")
        extend_banks = []
        for b in tpm.banks:
            try:
                new_hash(b)
            except ValueError:
                continue
            extend_banks.append(b)
        with self._lock:
            self._tpm = tpm
            self._tpm_common = common
            self._tpm_banks = extend_banks
            self._tpm_failed = None          # why the TPM is unusable until a remount
            self._tpm_doubt = False          # the last extension failed: did it apply?
            # what the TPM should hold once it has seen the whole list
            count = self.count
            self._tpm_seq = count
            self._tpm_expect = {b: self.pcrs(b) for b in common}
            try:
                self._tpm_sync()
                self._tpm_flush()
            except BaseException:
                self._tpm = None
                raise

    def _tpm_used(self) -> list[int]:
        used = {10}
        for regs in self._tpm_expect.values():
            used |= {i for i, r in enumerate(regs) if any(r)}
        return sorted(used)

    def _tpm_sync(self, pending=None) -> None:
        """Compare the TPM with what it should hold after ``_tpm_seq`` entries (and,
        when ``pending`` -- the entry whose extension failed -- with that entry
        applied); lock held."""
        from imafs.ima.tpm import TPMMismatch
        tpm = self._tpm
        used = self._tpm_used()
        if pending is not None and pending[0].pcr not in used:
            used = sorted(set(used) | {pending[0].pcr})
        hw = {b: dict(zip(used, tpm.read_many(b, used))) for b in self._tpm_common}
        expect = {b: {i: self._tpm_expect[b][i] for i in used} for b in self._tpm_common}
        if hw == expect:
            return
        if pending is not None:
            after = {b: dict(v) for b, v in expect.items()}
            for b in self._tpm_common:
                after[b][pending[0].pcr] = self._extended(b, after[b][pending[0].pcr],
                                                          pending[0], pending[1])
            if hw == after:            # the failed command had reached the TPM
                self._tpm_applied(pending[0], pending[1])
                return
        if all(not any(v) for regs in hw.values() for v in regs.values()):
            log.info("TPM %s: PCRs %s at their reset value: extending the %d entries of "
                     "the list of namespace %d into them", tpm.tcti, used,
                     self.count, self.ns_id)
            self._tpm_seq = 0
            self._tpm_expect = {b: [bytes(hash_size(b))] * NUM_PCRS for b in self._tpm_common}
            return
        if pending is None:
            # a daemon killed between an entry's commit and its extension leaves the
            # TPM a few entries behind the list: extend it from where it stopped
            prefix = self._tpm_prefix(hw, used)
            if prefix is not None:
                seq, regs = prefix
                log.warning("TPM %s holds the first %d of the %d entries of the list of "
                            "namespace %d (a daemon stopped before extending the rest): "
                            "extending the rest", tpm.tcti, seq, self._tpm_seq, self.ns_id)
                self._tpm_seq = seq
                self._tpm_expect = regs
                return
        bank = next(b for b in self._tpm_common if hw[b] != expect[b])
        pcr = next(i for i in used if hw[bank][i] != expect[bank][i])
        raise TPMMismatch(
            f"TPM {tpm.tcti}: {bank} PCR {pcr} is {hw[bank][pcr].hex()}, but the measurement "
            f"list (namespace {self.ns_id}, {self._tpm_seq} entries) gives "
            f"{expect[bank][pcr].hex()}: something else extends this PCR (kernel IMA uses "
            f"PCR 10 of the machine's TPM) or the TPM holds another state's list; use a TPM "
            f"of its own (swtpm), reset it, or the --state whose list it holds")

    def _tpm_prefix(self, hw, used):
        """(k, PCR values) for the longest prefix of the list (k < _tpm_seq entries)
        whose replay gives what the TPM holds in the ``used`` PCRs, or None. One pass
        over the list: only run when a remount finds the TPM behind."""
        regs = {b: [bytes(hash_size(b))] * NUM_PCRS for b in self._tpm_common}
        found = None
        seq = 0
        with self.store.env.begin() as txn:
            for entry, hashes in self._entries_from(txn, 0):
                if seq >= self._tpm_seq:
                    break
                for b in self._tpm_common:
                    regs[b][entry.pcr] = self._extended(b, regs[b][entry.pcr], entry, hashes)
                seq += 1
                if all(regs[b][i] == hw[b][i] for b in self._tpm_common for i in used):
                    found = (seq, {b: list(r) for b, r in regs.items()})
        if found is not None and found[0] == self._tpm_seq:
            return None
        return found

    def _extended(self, bank: str, old: bytes, entry: TemplateEntry, hashes) -> bytes:
        h = new_hash(bank)
        h.update(old)
        h.update(entry.extend_value(bank, hashes[self.banks.index(bank)]))
        return h.digest()

    def _tpm_applied(self, entry: TemplateEntry, hashes) -> None:
        for b in self._tpm_common:
            regs = list(self._tpm_expect[b])
            regs[entry.pcr] = self._extended(b, regs[entry.pcr], entry, hashes)
            self._tpm_expect[b] = regs
        self._tpm_seq += 1

    def _tpm_flush(self) -> None:
        """Extend every entry the TPM has not seen yet; lock held.  TPMError when the
        TPM cannot take them (they stay pending)."""
        from imafs.ima.tpm import TPMError, TPMMismatch
        tpm = self._tpm
        if self._tpm_failed:
            raise TPMError(self._tpm_failed)
        while True:
            with self.store.env.begin() as txn:
                batch = []
                for item in self._entries_from(txn, self._tpm_seq):
                    batch.append(item)
                    if len(batch) == 256:
                        break
            if not batch:
                return
            for entry, hashes in batch:
                if self._tpm_doubt:
                    try:
                        seq = self._tpm_seq
                        self._tpm_sync((entry, hashes))
                    except TPMMismatch as e:
                        self._tpm_failed = str(e)
                        log.error("%s; measured opens fail (EIO) until a remount", e)
                        raise
                    self._tpm_doubt = False
                    if self._tpm_seq != seq:
                        break          # applied, or replay from 0: read the list again
                digests = {}
                for b in self._tpm_banks:
                    if b in self.banks:
                        digests[b] = entry.extend_value(b, hashes[self.banks.index(b)])
                    else:
                        digests[b] = entry.extend_value(b)
                self._tpm_doubt = True
                try:
                    tpm.extend(entry.pcr, digests)
                except TPMError as e:
                    log.error("TPM extend of entry %d (PCR %d) failed: %s", self._tpm_seq,
                              entry.pcr, e)
                    raise
                self._tpm_doubt = False
                self._tpm_applied(entry, hashes)

    @property
    def tpm_pending(self) -> int:
        """Entries appended but not yet extended into the TPM (0 without one)."""
        if self._tpm is None:
            return 0
        return self.count - self._tpm_seq

    # --- reads
    def _entries_from(self, txn, seq: int) -> Iterator[tuple[TemplateEntry, list[bytes]]]:
        cur = txn.cursor(db=self._log)
        if not cur.set_range(_LOGKEY.pack(self.ns_id, seq)):
            return
        for key, blob in cur:
            if key[:4] != self._ns:
                return
            yield _unpack_entry(blob, self._sizes)

    def entries(self, start: int = 0, *, batch: int = 4096) -> Iterator[TemplateEntry]:
        """The entries from sequence number ``start`` on (``recorded_hash`` is the
        sha1 template hash).  Uses short read transactions, ``batch`` entries each."""
        seq = start
        while True:
            with self.store.env.begin() as txn:
                got = 0
                for entry, _ in self._entries_from(txn, seq):
                    yield entry
                    got += 1
                    if got == batch:
                        break
            if got < batch:
                return
            seq += got

    def entry(self, seq: int) -> TemplateEntry:
        with self.store.env.begin() as txn:
            blob = txn.get(_LOGKEY.pack(self.ns_id, seq), db=self._log)
        if blob is None:
            raise IndexError(seq)
        return _unpack_entry(blob, self._sizes)[0]

    def read(self, view: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a view, as the kernel file would give them."""
        vid, bank, is_ascii = self._view(view)
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        bi = self.banks.index(bank)
        with self.store.env.begin() as txn:
            total = self._read_state(txn)[2][vid]
            end = min(offset + size, total)
            if offset >= end:
                return b""
            cur = txn.cursor(db=self._idx)
            target = _IDXKEY.pack(self.ns_id, vid, offset)
            # The last checkpoint at or before offset (checkpoint 0 is at 0).
            if cur.set_range(target):
                if cur.key() != target and not cur.prev():
                    raise RuntimeError("measurement list index is missing")
            elif not cur.last():
                raise RuntimeError("measurement list index is missing")
            ns_, vid_, pos = _IDXKEY.unpack(cur.key())
            if (ns_, vid_) != (self.ns_id, vid) or pos > offset:
                raise RuntimeError("measurement list index is inconsistent")
            (seq,) = _SEQ.unpack(cur.value())
            out = []
            for entry, hashes in self._entries_from(txn, seq):
                h = hashes[bi]
                rec = (entry.ascii_line(bank, template_hash=h) if is_ascii
                       else entry.binary_record(bank, template_hash=h))
                nxt = pos + len(rec)
                if nxt > offset:
                    out.append(rec[max(0, offset - pos):end - pos])
                pos = nxt
                if pos >= end:
                    break
        return b"".join(out)

    def iter_view(self, view: str, chunk: int = 1 << 17) -> Iterator[bytes]:
        """A whole view in chunks (each one read() call)."""
        off = 0
        while True:
            data = self.read(view, off, chunk)
            if not data:
                return
            yield data
            off += len(data)
