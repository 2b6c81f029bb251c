"""``imafs digest``: flat file digests, or fs-verity digests as ``fsverity digest`` prints them."""
from __future__ import annotations

import argparse
import errno
import os
import stat
import sys

from imafs.commands._files import algo_arg
from imafs.ima import hashing, verity

HELP = "print file digests (flat, or fs-verity with --verity)"
DESCRIPTION = """\
Print the digest of each FILE in one read pass.

Without --verity: one line "<algo>:<hex>  FILE" per --algo (default sha256), the
digest IMA records for the file.  With --verity: "<algo>:<hex> FILE", the fs-verity
digest (hash of the fs-verity descriptor, not the Merkle root), byte for byte what
`fsverity digest` prints for the same --hash-alg, --block-size and --salt.

Files that cannot be read are reported on stderr; the exit status is then 1."""


def _verity_algo(text: str) -> str:
    name = text.strip().lower()
    if name not in hashing.VERITY_ALGOS:
        raise argparse.ArgumentTypeError(
            f"unknown fs-verity hash algorithm {text!r} (available: "
            f"{', '.join(hashing.VERITY_ALGOS)})")
    return name


def _block_size(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        n = -1
    if n & (n - 1) or not verity.MIN_BLOCK_SIZE <= n <= verity.MAX_BLOCK_SIZE:
        raise argparse.ArgumentTypeError(
            f"invalid block size {text!r}: must be a power of 2 from "
            f"{verity.MIN_BLOCK_SIZE} to {verity.MAX_BLOCK_SIZE}")
    return n


def _salt(text: str) -> bytes:
    try:
        salt = bytes.fromhex(text) if len(text) % 2 == 0 and " " not in text else None
    except ValueError:
        salt = None
    if salt is None:
        raise argparse.ArgumentTypeError(f"salt {text!r} is not a valid hex string")
    if len(salt) > verity.MAX_SALT_SIZE:
        raise argparse.ArgumentTypeError(
            f"salt is {len(salt)} bytes; fs-verity allows at most {verity.MAX_SALT_SIZE}")
    return salt


def register(subparsers) -> None:
    p = subparsers.add_parser("digest", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verity", action="store_true",
                   help="print the fs-verity digest, as `fsverity digest` does")
    p.add_argument("--hash-alg", type=_verity_algo, default=None, metavar="ALG",
                   help="fs-verity hash algorithm: sha256 (default) or sha512")
    p.add_argument("--block-size", type=_block_size, default=None, metavar="N",
                   help="fs-verity Merkle tree block size (default 4096)")
    p.add_argument("--salt", type=_salt, default=None, metavar="HEX",
                   help="fs-verity salt, as hex (at most 32 bytes)")
    p.add_argument("--algo", type=algo_arg, action="append", default=None,
                   metavar="ALG", help="flat digest algorithm (kernel name, e.g. sha256, "
                   "sha1, sha512, sm3); repeat for several; default sha256")
    p.add_argument("--compact", action="store_true",
                   help="print only the hex digest")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=run, _parser=p)


def _open_regular(path: str) -> int:
    """Open for reading; OSError with a plain reason for anything else than a
    regular file.  stat() first, so FIFOs and devices are never opened."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    if not stat.S_ISREG(st.st_mode):
        raise OSError("not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def run(args) -> int:
    verity_opts = [o for o, v in (("--hash-alg", args.hash_alg), ("--block-size", args.block_size),
                                  ("--salt", args.salt)) if v is not None]
    if args.verity and args.algo:
        args._parser.error("--algo is for flat digests; it cannot be combined with --verity")
    if verity_opts and not args.verity:
        verb = "applies" if len(verity_opts) == 1 else "apply"
        args._parser.error(f"{', '.join(verity_opts)} {verb} only with --verity")

    spec = None
    algos = list(dict.fromkeys(args.algo or ["sha256"]))
    if args.verity:
        try:
            spec = verity.VeritySpec(args.hash_alg or "sha256", args.block_size or 4096,
                                      args.salt or b"")
        except ValueError as e:         # a block size too small for the algorithm
            args._parser.error(f"--block-size: {e}")
        algos = []

    status = 0
    for path in args.files:
        try:
            fd = _open_regular(path)
            try:
                res = hashing.hash_fd(fd, algos, verity=spec)
            finally:
                os.close(fd)
        except OSError as e:
            reason = e.strerror or str(e)
            _emit(sys.stderr, f"imafs digest: {path}: {reason}\n")
            status = 1
            continue
        if spec is not None:
            lines = [(spec.hash_alg, res.tree.verity_digest, " ")]
        else:
            lines = [(name, res.digests[name], "  ") for name in algos]
        for name, digest, sep in lines:
            if args.compact:
                _emit(sys.stdout, f"{digest.hex()}\n")
            else:
                _emit(sys.stdout, f"{name}:{digest.hex()}{sep}{path}\n")
    sys.stdout.flush()
    return status


def _emit(stream, text: str) -> None:
    """Write ``text``; file names that are not valid UTF-8 go out as their
    original bytes (like fsverity and sha256sum), not as an encoding error."""
    buf = getattr(stream, "buffer", None)
    if buf is None:
        stream.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        return
    stream.flush()
    buf.write(text.encode("utf-8", "surrogateescape"))
    buf.flush()
