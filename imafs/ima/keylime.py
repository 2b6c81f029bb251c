"""keylime's formats: runtime policies (keylime 7.x, format version 1) from an IMA
measurement list or from a root file system tree.

A keylime verifier replays an agent's ascii measurement list against PCR 10 and
checks every entry against a *runtime policy*: ``digests`` maps each path, as the list
records it, to the file digests allowed for it; ``ima-buf`` and ``keyrings`` do the same
for buffer measurements (keys go to ``keyrings``).  This module builds that JSON
document with no FUSE and no keylime import:

* :func:`from_ascii_list` takes the digests an imafs mount (or a kernel) measured:
  everything the list shows is allowed, including its boot aggregate.  Violations
  (zero digests) never become allowed digests.
* :func:`from_rootfs` hashes every regular file below a directory and records it
  under its path inside that tree (``DIR/usr/bin/ls`` -> ``/usr/bin/ls``), as a mount
  of that tree records it: spaces become ``_``, as IMA writes them.  Symlinks are not
  followed and other file systems mounted below the tree are not entered.

Excludes (``default_excludes``), written by default because keylime cannot check
these entries against a policy written beforehand:

* the namespace events (``^(ns-create|ns-init|ns-remove|ns-join|ns-join-failed)$``):
  ima-buf entries whose data is unique to each container (id, UUID); names of file
  entries start with ``/``, so this anchored pattern skips nothing else. The entries
  stay in the list and in PCR 10; ``imafs verify-log`` checks them and their links
  to the child lists instead (verifylog.py).
* package managers' mutable state (``MUTABLE_EXCLUDES``: dpkg's status, available,
  diversions, statoverride and triggers, apt's lists and caches, debconf's and rpm's
  databases): read by dpkg and apt, rewritten by them, so no digest taken before stays
  true. Excluded by path, and their digests are not listed (docs/attestation.md).

Choices:

* ``meta.generator`` is keylime's ``LegacyAllowList`` (3), what ``keylime-policy
  create runtime`` writes; ``ima.log_hash_alg`` is ``sha1``: the template hash
  of the ascii list (not the file digests, whose algorithm each entry states).
* Names keylime cannot represent are skipped with a warning: names that are not
  UTF-8, and names with a newline (the ascii list line is then split in two, for
  keylime too).  Entries of templates keylime cannot parse (``ima-ngv2``,
  ``ima-sigv2``, ``ima-ns``...) are skipped with a warning.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from imafs.ima import hashing
from imafs.ima.nsevents import NS_EVENTS
from imafs.ima.template_lib import TemplateError
from imafs.ima.templates import parse_ascii_line

log = logging.getLogger("imafs.keylime")

__all__ = ["RUNTIME_POLICY_VERSION", "GENERATOR_LEGACY_ALLOWLIST", "KEYLIME_ALGOS",
           "KEYLIME_TEMPLATES", "empty_policy", "finish", "from_ascii_list", "from_rootfs",
           "boot_aggregate_zero", "RuntimePolicyError", "NS_EVENTS_EXCLUDE",
           "MUTABLE_EXCLUDES", "default_excludes", "drop_excluded"]

RUNTIME_POLICY_VERSION = 1
GENERATOR_LEGACY_ALLOWLIST = 3
#: file digest algorithms a keylime policy may hold (keylime.common.algorithms.Hash)
KEYLIME_ALGOS = ("sha1", "sha256", "sha384", "sha512")
#: templates keylime's measurement-list parser knows
KEYLIME_TEMPLATES = ("ima", "ima-ng", "ima-sig", "ima-buf")
BOOT_AGGREGATE = "boot_aggregate"
#: keylime's excludes are regexes matched (re.match) against each entry's name
assert all(re.fullmatch(r"[a-z-]+", n) for n in NS_EVENTS)     # no regex escapes needed
NS_EVENTS_EXCLUDE = "^(" + "|".join(NS_EVENTS) + ")$"
#: files package managers read and rewrite (their digest never stays): by path
MUTABLE_EXCLUDES = (
    r"^/var/lib/dpkg/(status|available|diversions|statoverride)(-old)?$",
    r"^/var/lib/dpkg/(lock|lock-frontend|triggers/|updates/)",
    r"^/var/lib/apt/(lists/|extended_states$|periodic/)",
    r"^/var/cache/(apt|debconf)/",
    r"^/var/lib/(rpm|dnf)/",
)


def default_excludes() -> list[str]:
    """What ``imafs keylime-policy`` excludes unless told not to."""
    return [NS_EVENTS_EXCLUDE, *MUTABLE_EXCLUDES]


def drop_excluded(policy: dict, patterns) -> int:
    """Remove the digests of paths ``patterns`` exclude (keylime never looks them
    up); how many paths were dropped. Buffer entries (ima-buf) stay: they cost
    nothing and show what the list held when the policy was written."""
    rx = [re.compile(p) for p in patterns]
    gone = [n for n in policy["digests"] if n != BOOT_AGGREGATE and any(r.match(n) for r in rx)]
    for n in gone:
        del policy["digests"][n]
    return len(gone)


class RuntimePolicyError(ValueError):
    pass


def empty_policy() -> dict:
    """keylime's empty runtime policy (the layout of keylime.ima.ima.EMPTY_RUNTIME_POLICY)."""
    return {
        "meta": {"version": RUNTIME_POLICY_VERSION, "generator": GENERATOR_LEGACY_ALLOWLIST},
        "release": 0,
        "digests": {},
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }


def finish(policy: dict, *, timestamp: bool = True) -> dict:
    """Sorted, de-duplicated lists (as keylime-policy writes them), and a timestamp."""
    for key in ("digests", "ima-buf", "keyrings"):
        policy[key] = {k: sorted(set(v)) for k, v in sorted(policy[key].items())}
    policy["excludes"] = sorted(set(policy["excludes"]))
    if timestamp:
        policy["meta"]["timestamp"] = str(datetime.datetime.now())
    return policy


def _add(section: dict, name: str, hexdigest: str) -> None:
    section.setdefault(name, []).append(hexdigest)


def _name(raw: bytes, where: str) -> str | None:
    if b"\n" in raw:
        log.warning("%s: skipped a name with a newline: %r", where, raw)
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s: skipped a name that is not UTF-8: %r", where, raw)
        return None


def _is_certificate(buf: bytes) -> bool:
    if buf[:1] != b"\x30":
        return False
    try:
        from cryptography import x509
        x509.load_der_x509_certificate(buf)
        return True
    except Exception:   # noqa: BLE001 - anything that is not a certificate
        return False


def from_ascii_list(lines: Iterable[bytes], *, algo: str | None = None,
                    policy: dict | None = None) -> dict:
    """Add every measurement of an ascii measurement list (lines of bytes) to a
    runtime policy (a new one by default).  ``algo``: keep only file digests of that
    algorithm (default: whatever each entry records)."""
    policy = policy if policy is not None else empty_policy()
    n = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"list line {lineno}"
        try:
            e = parse_ascii_line(line)
        except TemplateError as err:
            log.warning("%s: skipped, not a measurement: %s", where, err)
            continue
        if e.violation:
            continue
        if e.template not in KEYLIME_TEMPLATES:
            log.warning("%s: skipped, keylime cannot read template %s", where, e.template)
            continue
        name = _name(e.name or b"", where)
        fd = e.file_digest
        if name is None or fd is None:
            continue
        _, dalgo, digest = fd
        if algo is not None and dalgo != algo and name != BOOT_AGGREGATE:
            log.warning("%s: skipped %s, its digest is %s, not %s", where, name, dalgo, algo)
            continue
        if e.template == "ima-buf":
            buf = e.get("buf") or b""
            _add(policy["keyrings"] if _is_certificate(buf) else policy["ima-buf"],
                 name, digest.hex())
        else:
            _add(policy["digests"], name, digest.hex())
        n += 1
    log.info("%d measurement(s) taken from the list", n)
    return policy


def boot_aggregate_zero(algo: str) -> str:
    """The boot aggregate of a list made without a TPM: zeros of the algorithm's size."""
    return "00" * hashing.digest_size(algo)


def _walk(root: str, excludes: set[str]) -> Iterator[tuple[str, str]]:
    """(path on disk, path inside the tree) of every regular file below root, not
    following symlinks and staying on root's file system."""
    root_dev = os.lstat(root).st_dev
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        try:
            it = os.scandir(path)
        except OSError as e:
            log.warning("%s: %s", path, e.strerror)
            continue
        with it:
            for ent in it:
                inner = f"{rel}/{ent.name}"
                try:
                    st = ent.stat(follow_symlinks=False)
                except OSError as e:
                    log.warning("%s: %s", ent.path, e.strerror)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if inner in excludes:
                        continue
                    if st.st_dev != root_dev:
                        log.info("%s: other file system, not entered", ent.path)
                        continue
                    stack.append((inner, ent.path))
                elif stat.S_ISREG(st.st_mode):
                    yield ent.path, inner


def _hash_file(path: str, algo: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        log.warning("%s: %s", path, e.strerror)
        return None
    try:
        return hashing.hash_fd(fd, [algo]).digests[algo].hex()
    except OSError as e:
        log.warning("%s: %s", path, e.strerror)
        return None
    finally:
        os.close(fd)


def from_rootfs(root: str, *, algo: str = "sha256", excludes: Iterable[str] = (),
                policy: dict | None = None, workers: int = 4) -> dict:
    """Add the ``algo`` digest of every regular file below ``root`` to a runtime policy,
    under its absolute path inside the tree.  ``excludes``: directories (paths inside
    the tree, e.g. ``/proc``) not to enter."""
    if algo not in KEYLIME_ALGOS:
        raise RuntimePolicyError(f"keylime takes {', '.join(KEYLIME_ALGOS)} digests, not {algo}")
    if not os.path.isdir(root):
        raise RuntimePolicyError(f"{root!r} is not a directory")
    policy = policy if policy is not None else empty_policy()
    ex = {"/" + e.strip("/") for e in excludes}
    n = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:   # hashlib releases the GIL
        files = list(_walk(os.path.abspath(root), ex))
        for (path, inner), hexd in zip(files, pool.map(lambda f: _hash_file(f[0], algo), files)):
            if hexd is None:
                continue
            name = _name(os.fsencode(inner), path)
            if name is None:
                continue
            _add(policy["digests"], name.replace(" ", "_"), hexd)
            n += 1
    log.info("%d file(s) hashed below %s", n, root)
    return policy
