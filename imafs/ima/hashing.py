"""The hash-algorithm table of imafs, and file digests in one streaming pass.

Pure Python (hashlib, os.pread); no FUSE or trio import.

* THE hash-algorithm table of imafs (every module and command looks algorithms up
  here): the kernel's ``enum hash_algo`` (include/uapi/linux/hash_info.h: the ids
  used in ``security.ima`` and signature headers) with the kernel's names and digest
  sizes (crypto/hash_info.c), other spellings of the names, the hashlib
  constructor, the fs-verity id (``FS_VERITY_HASH_ALG_SHA256`` = 1, ``_SHA512`` =
  2), the TPM's ``TPM2_ALG_ID`` and bank name, and the ``cryptography`` hash that
  signatures use.  :func:`hash_algo` takes any spelling (what people type);
  :func:`kernel_algo` only the kernel's names (what the kernel's formats hold).
* :func:`hash_fd` reads a file once with ``pread`` and feeds every requested
  flat digest and, optionally, the fs-verity Merkle tree (``verity=`` a
  :class:`imafs.ima.verity.VeritySpec`; the tree itself lives in verity.py).  Large
  files are pipelined over a small pool of persistent helper threads (hashlib drops
  the GIL for buffers of 2 KiB and more); small files are hashed inline in the
  calling thread, with no thread hand-off at all.

Like the kernel's IMA (ima_calc_file_hash), :func:`hash_fd` hashes the file up
to the size ``fstat`` reports when it starts; if the file is shorter by then,
the result covers (and ``FileDigests.size`` reports) what was there.

One concern, over 600 lines by a little: the algorithm table and the one streaming
pass that every digest (file, verity leaves) goes through; the Merkle tree is in verity.py.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import os
import queue
import stat
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from imafs.ima.verity import MerkleTree, VeritySpec

__all__ = [
    "HashAlgo", "HASH_ALGOS", "HASH_ALGO_BY_ID", "HASH_ALGO__LAST", "VERITY_ALGOS",
    "VERITY_ALGO_BY_ID", "TPM_ALGO_BY_ID",
    "HashAlgoError", "UnsupportedAlgorithm", "HashAbandoned",
    "hash_algo", "kernel_algo", "new_hash", "algo_id", "algo_name", "digest_size", "available_algos",
    "format_digest", "parse_digest",
    "FileDigests", "hash_fd", "hash_bytes", "pread_full", "set_max_helpers",
]


# --------------------------------------------------------------------------
# Algorithm table
# --------------------------------------------------------------------------

class HashAlgoError(ValueError):
    """An algorithm name or id that imafs does not know."""


class UnsupportedAlgorithm(HashAlgoError):
    """A kernel hash algorithm this Python's hashlib cannot compute."""


@dataclass(frozen=True)
class HashAlgo:
    """One hash algorithm: what the kernel, fs-verity, the TPM, hashlib and the
    ``cryptography`` package call it."""
    name: str                 # the kernel's hash_algo_name[] (crypto/hash_info.c)
    ima_id: int               # enum hash_algo value: the id in security.ima and signatures
    digest_size: int          # hash_digest_size[]
    hashlib_name: str | None  # None: no implementation in Python's hashlib at all
    verity_id: int | None = None   # FS_VERITY_HASH_ALG_* when fs-verity supports it
    tpm_alg_id: int | None = None  # TPM2_ALG_ID of the PCR bank (TCG algorithm registry)
    tpm_name: str | None = None    # the bank's TCG name, as tpm2-tools and tpm2-pytss say
    crypto_name: str | None = None  # cryptography.hazmat.primitives.hashes class for
    #                                 signatures; None: IMA signatures with it unsupported
    aliases: tuple[str, ...] = ()  # other spellings: older kernels, OpenSSL (evmctl), hashlib

    @property
    def available(self) -> bool:
        return _constructor(self.name) is not None

    def new(self, data=b""):
        """A fresh hashlib object; UnsupportedAlgorithm if hashlib lacks it."""
        return self.constructor()(data)

    def constructor(self) -> Callable:
        ctor = _constructor(self.name)
        if ctor is None:
            why = ("no implementation in Python's hashlib" if self.hashlib_name is None
                   else f"no implementation here (hashlib/OpenSSL does not provide "
                        f"{self.hashlib_name!r})")
            raise UnsupportedAlgorithm(
                f"hash algorithm {self.name} (kernel id {self.ima_id}) is not available: {why}")
        return ctor

    def crypto_hash(self):
        """The ``cryptography`` hash object signatures over this algorithm's digests
        use (RSA PKCS#1 v1.5 DigestInfo, ECDSA); HashAlgoError when there is none."""
        if self.crypto_name is None:
            raise HashAlgoError(f"signatures with hash algorithm {self.name} are not supported")
        from cryptography.hazmat.primitives import hashes
        return getattr(hashes, self.crypto_name)()


# The kernel's ids, names and sizes: include/uapi/linux/hash_info.h (enum hash_algo) and
# crypto/hash_info.c (hash_algo_name[], hash_digest_size[]). The kernel called sm3
# "sm3-256" before it took OpenSSL's name. fs-verity: include/uapi/linux/fsverity.h.
# TPM: the TCG algorithm registry (TPM2_ALG_SHA1 0x0004 ... TPM2_ALG_SHA3_512 0x0029).
# OpenSSL names evmctl hands to OpenSSL: "ripemd160", "md_gost12_256", "md_gost12_512".
_TABLE = (
    HashAlgo("md4", 0, 16, "md4"),
    HashAlgo("md5", 1, 16, "md5", crypto_name="MD5"),
    HashAlgo("sha1", 2, 20, "sha1", tpm_alg_id=0x0004, tpm_name="sha1", crypto_name="SHA1",
             aliases=("sha-1",)),
    HashAlgo("rmd160", 3, 20, "ripemd160", aliases=("ripemd160", "ripemd-160", "rmd-160")),
    HashAlgo("sha256", 4, 32, "sha256", verity_id=1, tpm_alg_id=0x000B, tpm_name="sha256",
             crypto_name="SHA256", aliases=("sha-256",)),
    HashAlgo("sha384", 5, 48, "sha384", tpm_alg_id=0x000C, tpm_name="sha384",
             crypto_name="SHA384", aliases=("sha-384",)),
    HashAlgo("sha512", 6, 64, "sha512", verity_id=2, tpm_alg_id=0x000D, tpm_name="sha512",
             crypto_name="SHA512", aliases=("sha-512",)),
    HashAlgo("sha224", 7, 28, "sha224", crypto_name="SHA224", aliases=("sha-224",)),
    HashAlgo("rmd128", 8, 16, None),
    HashAlgo("rmd256", 9, 32, None),
    HashAlgo("rmd320", 10, 40, None),
    HashAlgo("wp256", 11, 32, None),
    HashAlgo("wp384", 12, 48, None),
    HashAlgo("wp512", 13, 64, "whirlpool", aliases=("whirlpool",)),
    HashAlgo("tgr128", 14, 16, None),
    HashAlgo("tgr160", 15, 20, None),
    HashAlgo("tgr192", 16, 24, None),
    HashAlgo("sm3", 17, 32, "sm3", tpm_alg_id=0x0012, tpm_name="sm3_256", crypto_name="SM3",
             aliases=("sm3-256", "sm3_256")),
    HashAlgo("streebog256", 18, 32, None, aliases=("md_gost12_256",)),
    HashAlgo("streebog512", 19, 64, None, aliases=("md_gost12_512",)),
    HashAlgo("sha3-256", 20, 32, "sha3_256", tpm_alg_id=0x0027, tpm_name="sha3_256",
             crypto_name="SHA3_256", aliases=("sha3_256",)),
    HashAlgo("sha3-384", 21, 48, "sha3_384", tpm_alg_id=0x0028, tpm_name="sha3_384",
             crypto_name="SHA3_384", aliases=("sha3_384",)),
    HashAlgo("sha3-512", 22, 64, "sha3_512", tpm_alg_id=0x0029, tpm_name="sha3_512",
             crypto_name="SHA3_512", aliases=("sha3_512",)),
)
HASH_ALGO__LAST = len(_TABLE)

#: kernel name -> algorithm, in kernel id order (the order ``appraise_algos=`` prints)
HASH_ALGOS: dict[str, HashAlgo] = {a.name: a for a in _TABLE}
HASH_ALGO_BY_ID: dict[int, HashAlgo] = {a.ima_id: a for a in _TABLE}
VERITY_ALGOS: dict[str, int] = {a.name: a.verity_id for a in _TABLE if a.verity_id}
VERITY_ALGO_BY_ID: dict[int, HashAlgo] = {a.verity_id: a for a in _TABLE if a.verity_id}
TPM_ALGO_BY_ID: dict[int, HashAlgo] = {a.tpm_alg_id: a for a in _TABLE if a.tpm_alg_id}

_ALIASES = {alias: a.name for a in _TABLE for alias in a.aliases}


@functools.lru_cache(maxsize=None)
def _constructor(name: str) -> Callable | None:
    """The fastest hashlib constructor for a kernel algorithm name, or None."""
    a = HASH_ALGOS[name]
    if a.hashlib_name is None:
        return None
    direct = getattr(hashlib, a.hashlib_name, None)
    ctor = direct if callable(direct) else functools.partial(hashlib.new, a.hashlib_name)
    try:
        if ctor(b"").digest_size != a.digest_size:
            return None
    except (ValueError, TypeError):  # "unsupported hash type" (e.g. OpenSSL 3 legacy algos)
        return None
    return ctor


def hash_algo(name_or_id: str | int) -> HashAlgo:
    """Look up by kernel name (``sha256``, ``sha3-256``, ``rmd160``), by another
    spelling of it (any case; ``ripemd160``, ``sha3_256``, ``sm3-256``, ``whirlpool``,
    ...) or by kernel id: for names people type."""
    if isinstance(name_or_id, int) and not isinstance(name_or_id, bool):
        try:
            return HASH_ALGO_BY_ID[name_or_id]
        except KeyError:
            raise HashAlgoError(f"unknown kernel hash algorithm id {name_or_id}") from None
    if not isinstance(name_or_id, str):
        raise HashAlgoError(f"hash algorithm must be a name or an id, not {name_or_id!r}")
    key = name_or_id.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return HASH_ALGOS[key]
    except KeyError:
        raise HashAlgoError(f"unknown hash algorithm {name_or_id!r} "
                            f"(known: {', '.join(HASH_ALGOS)})") from None


def kernel_algo(name: str) -> HashAlgo:
    """Look up by the exact kernel name only, as the kernel matches names in its own
    formats (``appraise_algos=``, a ``d-ng`` field's ``sha256:``, PCR bank names)."""
    a = HASH_ALGOS.get(name) if isinstance(name, str) else None
    if a is None:
        raise HashAlgoError(f"unknown hash algorithm {name!r}")
    return a


def new_hash(name_or_id: str | int, data=b""):
    """A hashlib object for an algorithm (as :func:`hash_algo` finds it);
    UnsupportedAlgorithm when hashlib cannot compute it here."""
    return hash_algo(name_or_id).new(data)


def algo_id(name: str) -> int:
    """Kernel ``enum hash_algo`` id of an algorithm name."""
    return hash_algo(name).ima_id


def algo_name(ima_id: int) -> str:
    """Kernel name of an ``enum hash_algo`` id."""
    return hash_algo(int(ima_id)).name


def digest_size(name_or_id: str | int) -> int:
    return hash_algo(name_or_id).digest_size


def available_algos() -> list[str]:
    """Kernel names of the algorithms hashlib can compute here."""
    return [a.name for a in _TABLE if a.available]


def format_digest(algo: str, digest: bytes) -> str:
    """``"sha256:<hex>"`` (the kernel's and fsverity's text form)."""
    return f"{hash_algo(algo).name}:{bytes(digest).hex()}"


def parse_digest(text: str) -> tuple[str, bytes]:
    """Inverse of :func:`format_digest`; checks the digest length."""
    algo, sep, hexpart = text.strip().partition(":")
    if not sep:
        raise ValueError(f"digest {text!r} is not of the form ALGO:HEX")
    a = hash_algo(algo)
    try:
        d = bytes.fromhex(hexpart)
    except ValueError:
        raise ValueError(f"digest {text!r}: not a hex string") from None
    if len(d) != a.digest_size:
        raise ValueError(f"digest {text!r}: {a.name} digests are {a.digest_size} bytes, "
                         f"got {len(d)}")
    return a.name, d


def _resolve_algos(algos: Iterable[str] | str) -> list[tuple[str, Callable]]:
    if isinstance(algos, (str, int)):
        algos = (algos,)
    out: dict[str, Callable] = {}
    for name in algos:
        a = hash_algo(name)
        if a.name not in out:
            out[a.name] = a.constructor()
    return list(out.items())


# --------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class FileDigests:
    size: int                   # bytes hashed
    digests: dict[str, bytes]   # kernel algorithm name -> flat digest
    tree: MerkleTree | None = None

    def __getitem__(self, algo: str) -> bytes:
        return self.digests[hash_algo(algo).name]

    def text(self, algo: str) -> str:
        """``"sha256:<hex>"``."""
        return format_digest(algo, self[algo])


class HashAbandoned(Exception):
    """A pass that ``progress`` asked to stop (nobody wants its result any more)."""


class _FlatLane:
    """One flat digest."""
    __slots__ = ("name", "h")

    def __init__(self, name, ctor):
        self.name = name
        self.h = ctor()

    def feed(self, mv):
        self.h.update(mv)



class _SinkLane:
    """Hands every chunk, with its offset, to a callable (the bytes just hashed: the
    FUSE adapter stores them in the kernel's page cache)."""
    __slots__ = ("sink", "off")

    def __init__(self, sink):
        self.sink = sink
        self.off = 0

    def feed(self, mv):
        self.sink(self.off, mv)
        self.off += len(mv)


def pread_full(fd: int, size: int, offset: int) -> bytes:
    """pread until ``size`` bytes or EOF."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _readinto_full(fd: int, mv: memoryview, offset: int) -> int:
    got = os.preadv(fd, [mv], offset)
    want = len(mv)
    while 0 < got < want:
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class _Helper:
    """A persistent worker thread running one job at a time."""

    def __init__(self):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        t = threading.Thread(target=self._run, name="imafs-hash", daemon=True)
        t.start()

    def _run(self):
        get = self.inbox.get
        while True:
            job = get()
            if job is None:
                return
            job()


class _HelperPool:
    """Up to ``limit`` helper threads, started on first need and kept idle after.
    ``take`` never blocks: a caller gets what is free and does the rest itself."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._idle: list[_Helper] = []
        self._started = 0

    def take(self, n: int) -> list[_Helper]:
        out: list[_Helper] = []
        new = 0
        with self._lock:
            while len(out) < n and self._idle:
                out.append(self._idle.pop())
            while len(out) + new < n and self._started < self.limit:
                self._started += 1
                new += 1
        for _ in range(new):
            try:
                out.append(_Helper())
            except RuntimeError:          # can't start new thread
                with self._lock:
                    self._started -= 1
        return out

    def give(self, helpers: list[_Helper]):
        with self._lock:
            for h in helpers:
                if self._started > self.limit:      # the limit was lowered meanwhile
                    h.inbox.put(None)
                    self._started -= 1
                else:
                    self._idle.append(h)

    def set_limit(self, limit: int):
        with self._lock:
            self.limit = limit
            while self._started > limit and self._idle:
                self._idle.pop().inbox.put(None)
                self._started -= 1

    def _after_fork(self):
        self._lock = threading.Lock()
        self._idle = []
        self._started = 0


# Below this many chunks a file is hashed inline: handing chunks to a thread costs
# tens of microseconds, which small files cannot win back.
_PARALLEL_MIN_CHUNKS = 2


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_POOL = _HelperPool(_cpus())
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL._after_fork)


def set_max_helpers(n: int | None = None) -> None:
    """Limit the helper threads hash_fd may use (0: always hash in the calling
    thread; None: one per CPU)."""
    _POOL.set_limit(_cpus() if n is None else max(0, int(n)))


def _make_lanes(algos, verity):
    lanes: list = []
    if verity is not None:
        if not hasattr(verity, "lane"):
            raise TypeError("verity must be an imafs.ima.verity.VeritySpec or None")
        lanes.append(verity.lane())   # first: the tree lane stays in the reading thread
    lanes.extend(_FlatLane(name, ctor) for name, ctor in _resolve_algos(algos))
    return lanes


def _results(lanes, size: int, verity) -> FileDigests:
    digests = {lane.name: lane.h.digest() for lane in lanes if isinstance(lane, _FlatLane)}
    return FileDigests(size, digests, lanes[0].result(size) if verity is not None else None)


def hash_bytes(data, algos: Iterable[str] | str = ("sha256",), *,
               verity: VeritySpec | None = None) -> FileDigests:
    """Same as :func:`hash_fd` for data already in memory (single-threaded)."""
    lanes = _make_lanes(algos, verity)
    mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) \
        else memoryview(data)
    if len(mv):
        for lane in lanes:
            lane.feed(mv)
    return _results(lanes, len(mv), verity)


def hash_fd(fd: int, algos: Iterable[str] | str = ("sha256",), *,
            verity: VeritySpec | None = None, chunk: int = 1 << 20,
            sink: Callable[[int, memoryview], None] | None = None,
            progress: Callable[[int], bool] | None = None) -> FileDigests:
    """Hash an open regular file in one pass of ``pread`` calls (the file offset is
    neither used nor moved; other file types raise ``OSError``).

    ``algos``: kernel names of the flat digests wanted (may be empty);
    ``verity``: also build the fs-verity Merkle tree with these parameters
    (a :class:`imafs.ima.verity.VeritySpec`).  Memory: two ``chunk`` buffers plus
    the tree. When the file has two chunks or more, the last lanes (flat digests,
    the sink) run in helper threads while the calling thread reads and builds the
    tree or the first digest; a single digest runs in a helper as well, so that
    reading the next chunk overlaps hashing this one (cold, the disk then sets the
    pace).  Raises :class:`HashAlgoError` / :class:`UnsupportedAlgorithm` before
    reading, and ``OSError`` for read errors.

    ``sink(offset, data)``: also given every chunk read, in order (the very bytes the
    digests and the tree are computed from); it may run in a helper thread.

    ``progress(n)``: called in the calling thread after each chunk with the bytes
    just read; a true answer abandons the pass (:class:`HashAbandoned`).
    """
    lanes = _make_lanes(algos, verity)
    if sink is not None:
        lanes.append(_SinkLane(sink))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):     # IMA, too, only measures regular files
        err = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
        raise OSError(err, f"hash_fd needs a regular file ({os.strerror(err)})")
    size = st.st_size
    if not lanes:
        return FileDigests(size, {}, None)
    bs = verity.block_size if verity is not None else 4096
    chunk = max(bs, int(chunk) - int(chunk) % bs)

    if size <= chunk:                                    # small: one read, inline
        data = pread_full(fd, size, 0) if size else b""
        if data:
            mv = memoryview(data)
            for lane in lanes:
                lane.feed(mv)
        if progress is not None and progress(len(data)):
            raise HashAbandoned("hashing abandoned")
        return _results(lanes, len(data), verity)

    helpers: list[_Helper] = []
    if size >= _PARALLEL_MIN_CHUNKS * chunk and _POOL.limit > 0:
        # The last lanes go to helpers, the reading thread keeps the others; with one
        # lane, it goes to a helper too, so that reading the next chunk overlaps
        # hashing this one.
        n = len(lanes) if len(lanes) == 1 else len(lanes) - 1
        helpers = _POOL.take(min(n, _POOL.limit))
    try:
        return _results(lanes, _stream(fd, size, chunk, lanes, helpers, progress), verity)
    finally:
        if helpers:
            _POOL.give(helpers)


def _stream(fd: int, size: int, chunk: int, lanes: list, helpers: list[_Helper],
            progress: Callable[[int], bool] | None = None) -> int:
    """Read ``fd`` chunk by chunk and feed every lane; returns the bytes read.

    The flat lanes at the end of ``lanes`` run in ``helpers``, the rest here.
    Hashing a tree means one short hashlib call per block, each dropping and
    retaking the GIL; a thread that needs the GIL meanwhile (to return from a
    long ``update``) can be starved for milliseconds.  So the two sides go in
    lock step: this thread reads chunk k (while the helpers hash chunk k-1),
    waits for the helpers to finish k-1, hands them k, waits until each has
    entered its ``update`` (GIL released), and only then hashes its own share
    of k.  Two buffers alternate.
    """
    nloc = len(lanes) - len(helpers)
    local, remote = lanes[:nloc], lanes[nloc:]
    bufs = [memoryview(bytearray(min(chunk, size))) for _ in range(2 if helpers else 1)]
    if not helpers:
        off = 0
        buf = bufs[0]
        while off < size:
            want = min(chunk, size - off)
            n = _readinto_full(fd, buf[:want], off)
            if n:
                view = buf[:n]
                for lane in lanes:
                    lane.feed(view)
            off += n
            if progress is not None and progress(n):
                raise HashAbandoned(f"hashing abandoned at offset {off}")
            if n < want:
                break
        return off

    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    errors: list[BaseException] = []
    inboxes, started, done = [], [], []
    for lane, helper in zip(remote, helpers):
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        s_lock, d_lock = threading.Lock(), threading.Lock()
        s_lock.acquire()
        d_lock.acquire()
        inboxes.append(inbox)
        started.append(s_lock)
        done.append(d_lock)
        helper.inbox.put(_lane_job(lane, inbox, bufs, s_lock, d_lock, errors))

    busy: list = []   # done-locks of helpers holding a chunk not yet waited for

    def wait_done():  # safe to call again after an interruption
        while busy:
            busy[-1].acquire()
            busy.pop()

    off = 0
    k = 0
    try:
        while off < size:
            want = min(chunk, size - off)
            buf = bufs[k & 1]
            n = _readinto_full(fd, buf[:want], off)   # helpers may still be on k-1
            wait_done()
            if errors or not n:
                break
            for inbox, d in zip(inboxes, done):
                inbox.put((k & 1, n))
                busy.append(d)
            for s in started:
                s.acquire()
            view = buf[:n]
            for lane in local:
                lane.feed(view)
            off += n
            k += 1
            if progress is not None and progress(n):
                raise HashAbandoned(f"hashing abandoned at offset {off}")
            if n < want:
                break
    finally:
        wait_done()
        for inbox in inboxes:
            inbox.put(None)
    if errors:
        raise errors[0]
    return off


def _lane_job(lane, inbox, bufs, started, done, errors):
    def job():
        get = inbox.get
        while True:
            item = get()
            if item is None:
                return
            j, n = item
            started.release()
            try:
                if not errors:
                    lane.feed(bufs[j][:n])
            except BaseException as e:  # re-raised by the reading thread
                errors.append(e)
            done.release()
    return job
