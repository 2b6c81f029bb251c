"""The namespace-options grammar: the one language in which a new integrity
namespace's name and options are given, wherever they come from -- the text written
to ``MNT/.imafs/ns-create`` inside the mount, ``imafs ns create``'s arguments, an OCI
hook profile's ``options`` file and a container's ``org.imafs.options`` annotation.
docs/namespaces.md describes it once ("Namespace options").

An option is one word ``OPTION=VALUE`` (no spaces in it). Each option says what its
value is and who may give it:

* value options -- ``template``, ``hash``, ``appraise``, ``evm``, ``quota`` -- may be
  given anywhere;
* ``model`` -- a behaviour model (docs/models.md): ``learn`` anywhere; or the
  absolute path of a model file, which names a file inside the mount when written to
  ``ns-create`` (the daemon reads it as a policy file) and a host file for host-side
  creators, which read it themselves (imafs/ctl/profiles.py) and send its text;
* host-file options -- ``policy`` (a host file of rules), ``keys`` (a host
  directory of certificates) -- name files of the host, so only host-side creators
  give them (``host_files=True``); from inside the mount they are refused: the mount
  never reads host paths on a container's word. Host-side creators load them
  (imafs/ctl/profiles.py) and send their contents over the control socket;
* host-path options -- ``evm_key`` (the namespace's EVM HMAC key) -- name host files
  too, refused from inside the mount alike, but the daemon reads them itself, by the
  path a host-side creator sends (``host_paths=True``): a key is read again at each
  mount, and its bytes never travel;
* ``quota`` -- ima/quota.py's ``KIND:ENTRIES[:SIZE]`` items, comma-separated:
  ``namespaces:N``, how many namespaces the new namespace and all its descendants may
  hold together, and the storage kinds (``list:ENTRIES:SIZE``, issue 14 item 5);
* slots -- ``digest_lists`` (digest lists) -- are reserved for the work that builds
  them: the grammar knows their names and refuses them with a
  message that says they are not built yet, so no creator mistakes them for
  unknown words or gets them silently ignored. Building one means replacing its
  parser in OPTIONS (and, for a host file, its loader).

Nothing here reads a file or touches a namespace: :func:`parse_options` returns a
dict of checked values. Refusals are :class:`OptionError`, whose message names the
option (or the name) and says why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from imafs.ima.quota import Quota, QuotaError

__all__ = ["NAME_MAX", "NAME_RE", "APPRAISE_MODES", "Option", "OPTIONS", "HOST_FILE_OPTIONS",
           "HOST_PATH_OPTIONS", "OptionError", "check_name", "parse_options", "parse_create",
           "format_options"]

#: a namespace's name: a full 64-hex container id fits
NAME_MAX = 64
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}\Z" % (NAME_MAX - 1))
APPRAISE_MODES = ("enforce", "log", "fix", "off")
MAX_WORD = 4096     # one OPTION=VALUE word (a host path is at most PATH_MAX)


class OptionError(ValueError):
    """A refused name or option; ``option`` is the option's name ("" for the name)."""

    def __init__(self, option: str, msg: str):
        self.option = option
        super().__init__(f"{option}=: {msg}" if option else msg)


@dataclass(frozen=True)
class Option:
    name: str
    kind: str           # "value", "host-file" (policy, keys), "host-path" (evm_key), "slot"
    doc: str            # one line for the docs and the usage texts
    parse: Callable[[str], str]
    issue: str = ""     # for a slot: the work that builds it


def _template(v: str) -> str:
    from imafs.ima.templates import TEMPLATES
    if v not in TEMPLATES:
        raise OptionError("template", f"unknown template {v!r} (one of "
                                      f"{', '.join(sorted(TEMPLATES))})")
    return v


def _hash(v: str) -> str:
    from imafs.ima import hashing
    try:
        algo = hashing.hash_algo(v)
        algo.new()
    except (ValueError, hashing.HashAlgoError) as e:
        raise OptionError("hash", str(e)) from None
    return algo.name            # the kernel's name: "SHA512" is sha512


def _appraise(v: str) -> str:
    if v not in APPRAISE_MODES:
        raise OptionError("appraise", f"{v!r} is not one of {', '.join(APPRAISE_MODES)}")
    return v


def _evm(v: str) -> str:
    from imafs.ima.evm_hooks import EVM_MODES
    if v not in EVM_MODES:
        raise OptionError("evm", f"{v!r} is not one of {', '.join(EVM_MODES)}")
    return v


def _host_path(name: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if not v.startswith("/"):
            raise OptionError(name, f"{v!r} is not an absolute path of the host")
        if "\0" in v:
            raise OptionError(name, "a NUL byte in the path")
        return v
    return parse


def _model(v: str) -> str:
    if v != "learn" and (not v.startswith("/") or "\0" in v):
        raise OptionError("model", f"{v!r} is neither 'learn' nor the absolute path of a "
                                   f"model file")
    return v


def _quota(v: str) -> str:
    """``KIND:ENTRIES[:SIZE],...``: ima/quota.py's grammar (the storage kinds and
    ``namespaces:N``), normalised; what the namespace gets is quota.py's business."""
    try:
        return Quota.parse(v).text()
    except QuotaError as e:
        raise OptionError("quota", f"{e} (e.g. namespaces:16 or list:100000:64M)") from None


def _slot(name: str, issue: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        raise OptionError(name, f"reserved for {issue}, which is not built yet: no "
                                f"namespace takes it today")
    return parse


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("template", "value", "measurement template of the namespace's list "
                                "(default: the parent's)", _template),
    Option("hash", "value", "hash algorithm of its measurements and fix mode "
                            "(default: the parent's)", _hash),
    Option("appraise", "value", "enforce|log|fix|off: what a failed appraisal under its "
                                "own rules does (default: the parent's)", _appraise),
    Option("policy", "host-file", "a host file of policy rules, the namespace's own "
                                  "policy from its creation", _host_path("policy")),
    Option("keys", "host-file", "a host directory of X.509 certificates, the namespace's "
                                "own keyring from its creation", _host_path("keys")),
    Option("quota", "value", "namespaces:N (how many namespaces it and its descendants may "
                             "hold together, default 64), list:ENTRIES:SIZE (its "
                             "list's storage, default the mount's --ns-quota)", _quota),
    Option("model", "value", "learn, or PATH: a behaviour model, learning or from a model "
                             "file (inside the mount from ns-create, a host file from the "
                             "host)", _model),
    Option("evm", "value", "enforce|log|off: EVM in the namespace (default: off)", _evm),
    Option("evm_key", "host-path", "a host file: the namespace's EVM HMAC key (raw "
                                   "bytes, root's, mode 600; needs evm=enforce|log)",
           _host_path("evm_key")),
    Option("digest_lists", "slot", "a host directory of digest lists loaded at creation",
           _slot("digest_lists", "digest lists in namespaces (issue 17)"),
           "digest lists in namespaces (issue 17)"),
)}
HOST_FILE_OPTIONS = tuple(n for n, o in OPTIONS.items() if o.kind == "host-file")
HOST_PATH_OPTIONS = tuple(n for n, o in OPTIONS.items() if o.kind == "host-path")


def check_name(name: str) -> str:
    """A namespace name: letters, digits, ``.``, ``_``, ``-``, not starting with a
    punctuation mark, at most NAME_MAX (64) characters."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = repr(name) if len(str(name)) <= 80 else repr(str(name)[:80]) + "..."
        raise OptionError("", f"bad namespace name {shown} (letters, digits, '.', '_', "
                              f"'-', not starting with '.', '_' or '-'; at most "
                              f"{NAME_MAX} characters)")
    return name


def parse_options(items: Iterable[str] | Mapping[str, str], *, host_files: bool = False,
                  host_paths: bool | None = None,
                  source: str = "ns-create") -> dict[str, str]:
    """``OPTION=VALUE`` words (or a mapping of option to value) -> {option: value},
    every value checked. ``host_files``: the creator is on the host, so ``policy=``
    and ``keys=`` (host paths) are taken; otherwise they are refused. ``host_paths``
    (default: as ``host_files``): ``evm_key=`` is taken -- the daemon reads it, so a
    request over the control socket carries it as a path. ``source`` names where the
    options came from, for the messages."""
    if host_paths is None:
        host_paths = host_files
    pairs: list[tuple[str, str]] = []
    if isinstance(items, Mapping):
        for k, v in items.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise OptionError(str(k), "option names and values are strings")
            pairs.append((k, v))
    else:
        for w in items:
            if len(w) > MAX_WORD:
                raise OptionError("", f"{source}: an option of {len(w)} characters (at "
                                      f"most {MAX_WORD})")
            k, eq, v = w.partition("=")
            if not eq:
                known = ", ".join(f"{n}=" for n in OPTIONS)
                raise OptionError("", f"{source}: {w!r} is not OPTION=VALUE (options: "
                                      f"{known})")
            pairs.append((k, v))
    out: dict[str, str] = {}
    for k, v in pairs:
        opt = OPTIONS.get(k)
        if opt is None:
            known = ", ".join(f"{n}=" for n in OPTIONS)
            raise OptionError("", f"{source}: unknown option {k + '=' + v!r} (options: "
                                  f"{known})")
        if k in out:
            raise OptionError(k, f"{source}: given twice")
        if v == "":
            raise OptionError(k, f"{source}: empty value")
        if opt.kind == "host-path" and not host_paths:
            raise OptionError(k, f"{source}: names a host file, which only a creator on "
                                 f"the host gives (imafs ns create, an OCI hook profile)")
        if opt.kind == "host-file" and not host_files:
            raise OptionError(k, f"{source}: names a host {'directory' if k == 'keys' else 'file'}"
                                 f", which only a creator on the host gives (imafs ns "
                                 f"create, an OCI hook profile); from inside the mount, "
                                 f"write to .imafs/{k} after ns-create")
        out[k] = opt.parse(v)
    return out


def parse_create(text: str, *, host_files: bool = False,
                 source: str = "ns-create") -> tuple[str, dict[str, str]]:
    """``NAME [OPTION=VALUE ...]`` (what ns-create takes) -> (name, options)."""
    words = text.split()
    if not words:
        raise OptionError("", f"{source} needs a name: NAME [OPTION=VALUE ...]")
    return check_name(words[0]), parse_options(words[1:], host_files=host_files,
                                               source=source)


def format_options(opts: Mapping[str, str]) -> str:
    """Options as words, in the grammar's order (for logs and listings)."""
    return " ".join(f"{k}={opts[k]}" for k in OPTIONS if k in opts)
