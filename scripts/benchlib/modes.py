"""The modes, the columns of the results: what each mounts (nothing, libfuse's C
passthrough_ll, or imafs with which arguments), the policy it writes, the files it
signs, the namespace its workload runs in (``--modes``), and whether the daemon and the
workload are pinned to one CPU (``--pin``).

Adding a mode is one entry in MODES: a name, extra ``imafs mount`` arguments, an
optional setup (write a policy, sign the files; it returns more mount arguments), the
state flag, and an optional wrapper the workload's command runs under (a namespace).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from benchlib import TREE, import_imafs
from benchlib.digestlists import (ROOTFS_DIGEST_LIST, TREE_DIGEST_LIST, digest_list_setup,
                                  load_digest_list)

if TYPE_CHECKING:
    from benchlib.run import Bench

# --------------------------------------------------------------------------- policies
# Synthetic tree: every read and exec (and executable mmap: the tcb policy's exec rules)
MEASURE_ALL_POLICY = ("measure func=FILE_CHECK mask=MAY_READ\n"
                      "measure func=BPRM_CHECK\n"
                      "measure func=MMAP_CHECK mask=MAY_EXEC\n")
APPRAISE_SIG_POLICY = ("appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig\n"
                       "appraise func=BPRM_CHECK appraise_type=imasig\n")
# Real rootfs: a policy is a tuple of pieces, each a built-in policy's name
# (imafs.ima.policy_parse.BUILTIN_POLICIES, as the kernel prints it) or rule text. The first
# matching appraise rule decides, so the signature rules for executables and libraries
# go before appraise_tcb's "appraise fowner=0" (which accepts a hash), as the kernel
# puts its secure-boot signature rules before the appraise_tcb ones (tests/mount/test_rootfs.py).
SIG_EXEC_RULES = ("appraise func=BPRM_CHECK appraise_type=imasig\n"
                  "appraise func=MMAP_CHECK appraise_type=imasig\n")
ROOTFS_MEASURE = ("tcb",)
ROOTFS_APPRAISE = (SIG_EXEC_RULES, "appraise_tcb")
ROOTFS_MEASURE_APPRAISE = ("tcb", SIG_EXEC_RULES, "appraise_tcb")
_POLICY_TEXT = {MEASURE_ALL_POLICY: "measure all", APPRAISE_SIG_POLICY: "appraise imasig",
                SIG_EXEC_RULES: "exec+mmap imasig"}


def policy_text(spec) -> str:
    """The policy file's text for a rule text or a tuple of pieces (see above)."""
    if isinstance(spec, str):
        return spec
    import_imafs()
    from imafs.ima.policy_parse import BUILTIN_POLICIES
    return "".join(BUILTIN_POLICIES.get(p, p) for p in spec)


def policy_title(spec) -> str:
    if spec is None:
        return "no policy"
    parts = (spec,) if isinstance(spec, str) else spec
    return " + ".join(_POLICY_TEXT.get(p, p if "\n" not in p else "rules") for p in parts)


# --------------------------------------------------------------------------- modes
IMAFS_DAEMON, PASSTHROUGH_LL = "imafs", "passthrough_ll"   # what mounts (Mode.daemon)


@dataclass(frozen=True)
class Mode:
    """One column of the results.

    name      short name (``--modes``, JSON keys, table columns)
    title     one line for the legend
    native    run on the backing directory itself (no mount)
    daemon    what mounts: IMAFS, or PASSTHROUGH_LL (libfuse's C example)
    args      extra ``imafs mount`` arguments
    setup     called once per backing (TREE, ROOTFS) before the mode's first mount of
              it, with the Bench and the backing's name; may write files (a policy,
              keys) or sign the backing; returns more mount arguments. An exception
              makes the mode "n/a (reason)" on that backing.
    state     "cold": a fresh --state directory for every mount; "warm": one per
              workload, primed by an untimed run, then remounted for the timed runs
    wrap      returns an argv prefix the workload's command runs under, given the Bench
              and the mount root (e.g. a shell that enters a child namespace first)
    integrity the mode expects the engine: its control directory is checked after
              mounting and a note is added when it is missing
    policies  for the legend: the policy on the synthetic tree and on the rootfs
    pinned    the daemon and the workload run under ``taskset -c 0`` (PIN): no wake-up
              crosses CPUs
    """
    name: str
    title: str
    native: bool = False
    daemon: str = IMAFS_DAEMON
    args: tuple[str, ...] = ()
    setup: Callable[["Bench", str], list[str]] | None = None
    state: str = "cold"
    wrap: Callable[["Bench", Path], list[str]] | None = None
    integrity: bool = False
    policies: tuple[str, str] | None = None
    pinned: bool = False


def policy_file(tree, name: str, rootfs=None) -> Callable[["Bench", str], list[str]]:
    """A mode setup that writes the policy for the backing (``tree`` for the synthetic
    tree, ``rootfs`` for the real rootfs; None: no --policy) and mounts with it."""
    def setup(bench: "Bench", target: str) -> list[str]:
        spec = tree if target == TREE else rootfs
        if spec is None:
            return []
        p = bench.work / f"policy-{name}-{target}"
        p.write_text(policy_text(spec))
        return ["--policy", str(p)]
    return setup


def sign_tree_and_policy(tree, name: str, rootfs=None) -> Callable[["Bench", str], list[str]]:
    """A mode setup: an ``imafs keygen`` key (once per run), every file of the tree and
    the big file signed (``imafs sign -r``, signature v2 over sha256; once per run; the
    rootfs is signed when it is copied), the policy, and the certificate as ``--key``."""
    def setup(bench: "Bench", target: str) -> list[str]:
        cert = bench.sign_tree() if target == TREE else bench.signing_key() / "signing_cert.der"
        return policy_file(tree, name, rootfs)(bench, target) + ["--key", str(cert)]
    return setup


def in_namespace(ns: str) -> Callable[["Bench", Path], list[str]]:
    """A mode wrapper: create child namespace ``ns`` (through the control directory),
    then run the workload in it (the shell moved into the namespace execs the command:
    its children, a chroot included, stay in it)."""
    def wrap(bench: "Bench", root: Path) -> list[str]:
        ctl = root / bench.control_name / "ns-create"
        return ["sh", "-c", 'printf "%s" "$0" > "$1" && shift && exec "$@"', ns, str(ctl)]
    return wrap


def build_passthrough_ll(bench: "Bench", target: str) -> list[str]:
    """The setup of passthrough-c: the C daemon built (once per run)."""
    bench.passthrough_ll()
    return []


def _mode_pair(name: str, title: str, warm_title: str, **kw) -> list[Mode]:
    """A cold mode and its warm twin."""
    return [Mode(name, f"{title}, fresh state", integrity=True, **kw),
            Mode(f"{name}-warm", f"{warm_title}, remount with cached digests",
                 integrity=True, state="warm", **kw)]


MODES: list[Mode] = [
    Mode("native", "the backing directory, no FUSE", native=True),
    Mode("passthrough-c", "libfuse's C passthrough_ll example (Debian's libfuse3-dev, built "
         "at bench time), default options and threads, -o source=BACKING: the FUSE limit "
         "of this machine", daemon=PASSTHROUGH_LL, setup=build_passthrough_ll),
    Mode("overlay", "integrity off (the baseline of the ratios): imafs mount --no-integrity, "
         "a plain passthrough", args=("--no-integrity",)),
    Mode("integrity", "imafs mount: engine on, empty policy", integrity=True),
    *_mode_pair("measure", "measure all reads, execs and executable mmaps (tcb-like)",
                "as measure", setup=policy_file(MEASURE_ALL_POLICY, "measure", ROOTFS_MEASURE),
                policies=(policy_title(MEASURE_ALL_POLICY), policy_title(ROOTFS_MEASURE))),
    *_mode_pair("appraise", "appraise signatures, reads not verified (--verify-reads=off): "
                "every read and exec needs a valid signature (appraise_type=imasig; files "
                "signed by imafs sign -r)", "as appraise", args=("--verify-reads=off",),
                setup=sign_tree_and_policy(APPRAISE_SIG_POLICY, "appraise", ROOTFS_APPRAISE),
                policies=(policy_title(APPRAISE_SIG_POLICY), policy_title(ROOTFS_APPRAISE))),
    *_mode_pair("measure-appraise", "measure all and appraise signatures (both kinds of "
                "rules in one policy), reads verified (the default with appraise rules)",
                "as measure-appraise",
                setup=sign_tree_and_policy(MEASURE_ALL_POLICY + APPRAISE_SIG_POLICY,
                                           "measure-appraise", ROOTFS_MEASURE_APPRAISE),
                policies=(policy_title((MEASURE_ALL_POLICY, APPRAISE_SIG_POLICY)),
                          policy_title(ROOTFS_MEASURE_APPRAISE))),
    *_mode_pair("verified", "measure all, every read checked against the Merkle tree "
                "(--verify-reads=on)", "as verified (digests and trees cached)",
                args=("--verify-reads=on",),
                setup=policy_file(MEASURE_ALL_POLICY, "verified", ROOTFS_MEASURE),
                policies=(policy_title(MEASURE_ALL_POLICY), policy_title(ROOTFS_MEASURE))),
    *_mode_pair("digest-list", "measure and appraise through a digest list "
                "(digest_cache=content; no file signature counts): reads and execs of the "
                "tree (a list of its files' digests), execs and mmaps of the rootfs (its "
                "from-dpkg list); the signed list loaded by digest_list_add at the start of "
                "each run (timed)", "as digest-list (the list stays loaded in the state)",
                setup=digest_list_setup, wrap=load_digest_list,
                policies=(policy_title(TREE_DIGEST_LIST), policy_title(ROOTFS_DIGEST_LIST))),
    Mode("namespace", "as measure, run in a child namespace (chain of two, empty child "
         "policy), fresh state", setup=policy_file(MEASURE_ALL_POLICY, "ns",
                                                           ROOTFS_MEASURE),
         wrap=in_namespace("bench"), integrity=True,
         policies=(policy_title(MEASURE_ALL_POLICY), policy_title(ROOTFS_MEASURE))),
]
MODE_BY_NAME = {m.name: m for m in MODES}
MODE_ALIASES = {"integrity-off": "overlay", "c": "passthrough-c"}
NATIVE, OVERLAY, PASSTHROUGH_C = "native", "overlay", "passthrough-c"
PIN = ["taskset", "-c", "0"]
PIN_SUFFIX = "-pinned"
PIN_CHOICES = ("off", "on", "both")


def pinned(m: Mode) -> Mode:
    """The mode with its daemon and workload pinned to CPU 0."""
    return dataclasses.replace(m, name=m.name + PIN_SUFFIX, pinned=True,
                               title=m.title + "; daemon and workload pinned to CPU 0 "
                               "(taskset -c 0)")


def reference(kind: str, mname: str) -> str:
    """The mode a ratio of mode ``mname`` divides by: ``kind`` (NATIVE, OVERLAY,
    PASSTHROUGH_C), pinned alike."""
    return kind + (PIN_SUFFIX if mname.endswith(PIN_SUFFIX) else "")


def select_modes(spec: str | None, pin: str = "off") -> list[Mode]:
    """The modes ``--modes`` names (all by default), unpinned, pinned (``--pin on``) or
    both, the unpinned ones first (``--pin both``)."""
    chosen = _named_modes(spec)
    if pin == "on":
        return [pinned(m) for m in chosen]
    return chosen + ([pinned(m) for m in chosen] if pin == "both" else [])


def _named_modes(spec: str | None) -> list[Mode]:
    if not spec:
        return list(MODES)
    out = []
    for n in (x.strip() for x in spec.split(",")):
        if not n:
            continue
        n = MODE_ALIASES.get(n, n)
        if n not in MODE_BY_NAME:
            raise SystemExit(f"bench: unknown mode {n!r} (one of {', '.join(MODE_BY_NAME)})")
        if MODE_BY_NAME[n] not in out:
            out.append(MODE_BY_NAME[n])
    return out
