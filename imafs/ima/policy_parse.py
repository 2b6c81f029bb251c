"""Parsing the kernel IMA policy language: one rule line -> ``policy.Rule``.

The kernel's ``ima_parse_rule`` and ``ima_validate_rule`` (ima_policy.c): the words
of one line (action, conditions, options), the values each takes, the keywords each
hook allows, with every refusal a ``policy.PolicyError`` carrying the line and the
column of the offending word; ``parse_policy`` takes a whole text or nothing.  Also
the built-in policies (``ima_policy=tcb``/``appraise_tcb``) and ``load_policy_arg``
(a ``--policy`` argument).  The rule itself, its printing and matching are in
``policy``.

``appraise_flag=`` is accepted and ignored
-------------------------------------------
As in the kernel since Linux 6.6 (commit f20765fdfdc2, "integrity: Always
reference the blacklist keyring with appraisal"; still so in 7.1): the word
``appraise_flag=VALUE`` is logged and dropped whatever VALUE (non-empty) and
action, it sets nothing and is never printed, because every signature
requirement (``appraise_type=``) now checks the blacklist keyring by itself.
(Up to 6.5 it needed CONFIG_IMA_APPRAISE_MODSIG, a value containing
"blacklist" and ``appraise_type=imasig|modsig``, and was printed.)

Where we differ from the kernel, on purpose
-------------------------------------------
* Word order does not matter: we check combinations after the whole rule is
  read.  The kernel refuses ``template=`` before the action, and
  ``digest_type=verity`` before ``appraise_type=imasig``; up to 7.0 it also
  refused ``appraise_type=sigv3`` before ``digest_type=verity`` (while
  printing that very order), which 7.1 accepts (commit de4c44a7f559, "ima: add
  support to require IMA sigv3 signatures").  What we print parses again.
* ``appraise_type=sigv3`` needs ``digest_type=verity``.  Linux 7.1 also accepts
  it alone, for a v3 signature of the regular file hash (``struct ima_file_id``
  over the IMA digest, xattr type 0x03 version 3), which imafs's appraisal does
  not verify yet; such a rule is refused rather than enforced differently.
* Every keyword may appear once.  The kernel silently keeps the last ``fsname=``
  or ``pcr=`` and accepts repeated ``digest_type=``/``appraise_type=``; we refuse
  them.  As in the kernel, ``uid``/``euid`` share one condition (a rule may test
  one of them) and so do ``gid``/``egid``.
* ``measure digest_type=verity`` with an explicit template lacking the
  ``d-ngv2`` field (anything but ima-ngv2 and ima-sigv2) is refused: the kernel
  only warns, and the list would then record an fs-verity digest that cannot
  be told from a file hash.  Without ``template=``, the engine must use a
  d-ngv2 template for such a measurement.
* ``appraise_algos=`` accepts the kernel's hash names that this Python can
  compute (the kernel's equivalent is "available in the crypto API").
* uid/gid values are printed unsigned (the kernel prints ``%d``, so a uid
  above 2^31 would come out negative and fail to parse again).
* A word with an unprintable character (control characters, NUL, line or
  paragraph separators) is refused.  As in the kernel, only space and tab
  separate words and only ``\\n`` separates lines (``\\r`` is part of a word).
* Policy text is limited to ``MAX_POLICY_BYTES``.
* ``fsname=``/``fs_subtype=`` longer than 63 bytes are refused: the kernel keeps
  them but ``ima_policy_show()`` prints them through a ``char tbuf[64]``, cut
  short, so the printed rule would no longer say what was loaded.
* ``template=ima-ns`` is accepted: ``ima-ns`` (``d-ng|n-ng|ns``) is an imafs
  template, the kernel knows only its built-in ones (``KERNEL_TEMPLATES``) and
  refuses any other name.
* ``digest_cache=`` (Roberto Sassu's digest_cache patches, never merged: their
  syntax and restrictions, docs/digest-lists.md) on a measure rule needs ``pcr=``,
  as there, but may name PCR 10: the patches refuse the default PCR, which would
  leave keylime -- it replays every entry into PCR 10 -- unable to verify such a
  list at all. ``func=DIGEST_LIST_CHECK`` (a digest list loaded through
  ``digest_list_add``) is one of the hooks the overlay produces.
* ``pcr=`` takes 0..23, not the kernel's 0..63: imafs keeps 24 software PCRs
  (``measurelog.NUM_PCRS``), as many as its ``pcrs/`` files list and
  ``evmctl --pcrs`` reads; a rule naming PCR 24..63 would make every open it
  matches fail, so it is refused when it is loaded.

Built-in policies
-----------------
``BUILTIN_POLICIES["tcb"]`` is what the kernel shows after booting with
``ima_policy=tcb`` (its ``dont_measure_rules`` then ``default_measurement_rules``),
``BUILTIN_POLICIES["appraise_tcb"]`` what it shows with ``ima_policy=appraise_tcb``
(``default_appraise_rules``, built with CONFIG_IMA_WRITE_POLICY and without
CONFIG_IMA_APPRAISE_SIGNED_INIT: policies loaded by path must be signed, files
owned by root are appraised).  No architecture or secure-boot rules.
"""
from __future__ import annotations

import re

from imafs.ima import hashing
from imafs.ima.policy import (
    ACTIONS, APPRAISE_TYPES, DIGEST_CACHE_FUNCS, DIGEST_CACHE_VALUES, DIGEST_TYPES,
    FUNC_ALIASES, FUNCS, IMAFS_TEMPLATES, KERNEL_PCR_LIMIT, KERNEL_TEMPLATES, MASKS,
    MAX_POLICY_BYTES, PCR_LIMIT, TEMPLATES, _FS_NAME_MAX, _ID_INVALID, _ID_KEYS, _LSM_KEYS,
    Cmp, PolicyError, Rule)

__all__ = ["parse_rule", "parse_policy", "load_policy_arg", "BUILTIN_POLICIES", "FS_MAGIC"]


# uid/euid and gid/egid share one slot in the kernel's rule entry
_SLOT = {"euid": "uid", "egid": "gid"}
_VALUE_KEYS = frozenset((
    "func", "mask", "fsmagic", "fsname", "fs_subtype", "fsuuid", "pcr", "template",
    "appraise_type", "appraise_flag", "appraise_algos", "digest_type",
    "keyrings", "label", "digest_cache") + _ID_KEYS + _LSM_KEYS)

# Which keywords each hook allows (ima_validate_rule).  None = no func= given.
_FILE_KEYS = frozenset((
    "func", "mask", "fsmagic", "fsname", "fs_subtype", "fsuuid", "pcr", "template",
    "appraise_type", "appraise_algos", "digest_type",
    "permit_directio", "digest_cache") + _ID_KEYS + _LSM_KEYS)
_KERNEL_READ_KEYS = _FILE_KEYS - {"digest_type"}
_ALLOWED = {f: _FILE_KEYS for f in (None, "FILE_CHECK", "MMAP_CHECK",
                                    "MMAP_CHECK_REQPROT", "BPRM_CHECK",
                                    "CREDS_CHECK", "FIRMWARE_CHECK",
                                    "POLICY_CHECK")}
_ALLOWED.update({f: _KERNEL_READ_KEYS for f in (
    "MODULE_CHECK", "KEXEC_KERNEL_CHECK", "KEXEC_INITRAMFS_CHECK")})
# a digest list read by the digest_cache LSM: as the kernel's other file reads (the
# patch adds it to MODULE_CHECK's case of ima_validate_rule); digest_cache= itself is
# refused below (a list is not vouched for by a list)
_ALLOWED["DIGEST_LIST_CHECK"] = _KERNEL_READ_KEYS
_ALLOWED["KEXEC_CMDLINE"] = frozenset((
    "func", "fsmagic", "fsname", "fs_subtype", "fsuuid", "pcr", "template")
    + _ID_KEYS + _LSM_KEYS)
_ALLOWED["KEY_CHECK"] = frozenset(("func", "uid", "gid", "pcr", "keyrings", "template"))
_ALLOWED["CRITICAL_DATA"] = frozenset(("func", "uid", "gid", "pcr", "label", "template"))
_ALLOWED["SETXATTR_CHECK"] = frozenset(("func", "appraise_algos") + _LSM_KEYS)
# appraise_type=imasig|modsig: the kernel's modsig hooks, and DIGEST_LIST_CHECK, for
# which the digest_cache patches' own example policies write it (imafs verifies no
# appended signature: imasig|modsig requires an imasig signature, as for the others)
_MODSIG_FUNCS = ("MODULE_CHECK", "KEXEC_KERNEL_CHECK", "KEXEC_INITRAMFS_CHECK",
                 "DIGEST_LIST_CHECK")
_MEASURE_ONLY_FUNCS = ("KEXEC_CMDLINE", "KEY_CHECK", "CRITICAL_DATA")

#: Magic numbers of the file systems the built-in policies exclude.
FS_MAGIC = {
    "PROC_SUPER_MAGIC": 0x9FA0,
    "SYSFS_MAGIC": 0x62656572,
    "DEBUGFS_MAGIC": 0x64626720,
    "TMPFS_MAGIC": 0x01021994,
    "RAMFS_MAGIC": 0x858458F6,
    "DEVPTS_SUPER_MAGIC": 0x1CD1,
    "BINFMTFS_MAGIC": 0x42494E4D,
    "SECURITYFS_MAGIC": 0x73636673,
    "SELINUX_MAGIC": 0xF97CFF8C,
    "SMACK_MAGIC": 0x43415D53,
    "CGROUP_SUPER_MAGIC": 0x27E0EB,
    "CGROUP2_SUPER_MAGIC": 0x63677270,
    "NSFS_MAGIC": 0x6E736673,
    "EFIVARFS_MAGIC": 0xDE5E81E4,
}


class _Bad(Exception):
    """A bad word; the caller adds the position."""


# --------------------------------------------------------------------------
# Parsing

_WORD = re.compile(r"[^ \t]+")
_DEC = re.compile(r"\+?([0-9]+)")
_SDEC = re.compile(r"([+-]?)([0-9]+)")
_HEX = re.compile(r"\+?(?:0[xX](?=[0-9a-fA-F]))?([0-9a-fA-F]+)")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_KEY = re.compile(r"([^=<>]*)([=<>]?)(.*)", re.S)


def _show(s):
    """Quote a user string for a message, escaping anything odd."""
    if len(s) > 60:
        s = s[:57] + "..."
    return '"' + s.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def _number(text, pattern, base, limit, what):
    m = pattern.fullmatch(text)
    digits = m.group(1).lstrip("0") if m else None
    if digits is None:
        kind = "hexadecimal" if base == 16 else "decimal"
        raise _Bad(f"bad {what} {_show(text)}: {kind} number expected")
    if len(digits) > 24 or int(digits or "0", base) > limit:
        raise _Bad(f"{what} {_show(text)} is out of range")
    return int(digits or "0", base)


def _id(value, key):
    n = _number(value, _DEC, 10, 0xFFFFFFFF, key)
    if n == _ID_INVALID:
        raise _Bad(f"{key} {_show(value)} is the invalid id (uid_t)-1")
    return n


def _opt_list(value, key):
    items = tuple(value.split("|"))
    if any(not i for i in items):
        raise _Bad(f"empty item in {key} list {_show(value)}")
    return items


def _parse_value(key, op, value):
    if key == "func":
        func = FUNC_ALIASES.get(value, value)
        if func not in FUNCS:
            raise _Bad(f"unknown func {_show(value)} (one of {', '.join(FUNCS)}, "
                       f"or the old names PATH_CHECK, FILE_MMAP)")
        return func
    if key == "mask":
        name = value[1:] if value.startswith("^") else value
        if name not in MASKS:
            raise _Bad(f"bad mask {_show(value)} (MAY_EXEC, MAY_WRITE, MAY_READ or "
                       f"MAY_APPEND, with a leading ^ for 'any of these bits')")
        return (MASKS[name], value.startswith("^"))
    if key == "fsmagic":
        return _number(value, _HEX, 16, (1 << 64) - 1, "fsmagic")
    if key == "fsuuid":
        if not _UUID.fullmatch(value):
            raise _Bad(f"bad fsuuid {_show(value)}: expected "
                       f"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex)")
        return value.lower()
    if key in _ID_KEYS:
        return Cmp(op, _id(value, key))
    if key == "pcr":
        m = _SDEC.fullmatch(value)
        if not m:
            raise _Bad(f"bad pcr {_show(value)}: decimal number expected")
        digits = m.group(2).lstrip("0") or "0"
        n = int(digits) if len(digits) < 24 else KERNEL_PCR_LIMIT
        if m.group(1) == "-" and n:
            n = -1
        if PCR_LIMIT <= n < KERNEL_PCR_LIMIT:
            raise _Bad(f"pcr {_show(value)} is out of range (0..{PCR_LIMIT - 1}): imafs "
                       f"has {PCR_LIMIT} software PCRs, the registers its pcrs files and "
                       f"evmctl list (the kernel accepts 0..{KERNEL_PCR_LIMIT - 1})")
        if not 0 <= n < PCR_LIMIT:
            raise _Bad(f"pcr {_show(value)} is out of range (0..{PCR_LIMIT - 1})")
        return n
    if key == "template":
        if value not in TEMPLATES:
            raise _Bad(f"unknown template {_show(value)} (one of "
                       f"{', '.join(KERNEL_TEMPLATES + IMAFS_TEMPLATES)})")
        return value
    if key == "appraise_type":
        if value not in APPRAISE_TYPES:
            raise _Bad(f"bad appraise_type {_show(value)} "
                       f"(imasig, imasig|modsig or sigv3)")
        return value
    if key == "appraise_flag":
        return None         # accepted and ignored (see the module docstring)
    if key == "digest_type":
        if value not in DIGEST_TYPES:
            raise _Bad(f"bad digest_type {_show(value)} (verity)")
        return value
    if key == "digest_cache":
        if value not in DIGEST_CACHE_VALUES:
            raise _Bad(f"bad digest_cache {_show(value)} (content, or data)")
        return value
    if key == "appraise_algos":
        # the kernel's names only (ima_parse_appraise_algos(): match_string() over
        # hash_algo_name[]), printed in id order
        seen = set()
        for name in value.split(","):
            algo = hashing.HASH_ALGOS.get(name)
            if algo is None:
                raise _Bad(f"unknown hash algorithm {_show(name)} in appraise_algos")
            if not algo.available:
                raise _Bad(f"unavailable hash algorithm {_show(name)} "
                           f"in appraise_algos")
            seen.add(algo)
        return tuple(a.name for a in sorted(seen, key=lambda a: a.ima_id))
    if key in ("keyrings", "label"):
        return _opt_list(value, key)
    if key in ("fsname", "fs_subtype"):
        if len(value.encode("utf-8", "surrogateescape")) > _FS_NAME_MAX:
            raise _Bad(f"{key} {_show(value)} is longer than {_FS_NAME_MAX} bytes (the "
                       f"kernel would print it cut short)")
        return value
    # fsname and the LSM labels: any string
    return value


def parse_rule(line: str, lineno: int = 1) -> Rule | None:
    """Parse one line; None for a blank or comment line.  Raises PolicyError."""
    words = [(m.start() + 1, m.group()) for m in _WORD.finditer(line)]
    if not words or words[0][1].startswith("#"):
        return None
    vals = {}       # keyword -> parsed value
    pos = {}        # keyword -> (column, word) where it was given
    slots = {}      # kernel slot -> keyword

    def bad(col, msg):
        return PolicyError(msg, lineno, col)

    for col, word in words:
        if word.startswith("#"):
            # ima_parse_add_rule() skips only a line whose first non-blank
            # character is '#'; inside a rule "#..." is an unknown word (Opt_err)
            raise bad(col, f"comment {_show(word)} after a rule: a comment must be "
                           f"a line of its own (its first non-blank character '#')")
        for ch in word:
            if not ch.isprintable():
                hint = " (a DOS line ending?)" if ch == "\r" else ""
                raise bad(col, f"unprintable character U+{ord(ch):04X} "
                               f"in {_show(word)}{hint}")
        key, op, value = _KEY.fullmatch(word).groups()
        if not op:
            if key in ACTIONS:
                if "action" in vals:
                    raise bad(col, f"second action {_show(key)}: the rule already "
                                   f"has {_show(vals['action'])}")
                vals["action"] = key
                pos["action"] = (col, word)
                continue
            if key == "permit_directio":
                if key in vals:
                    raise bad(col, 'duplicate "permit_directio"')
                vals[key] = True
                pos[key] = (col, word)
                continue
            if key in _VALUE_KEYS:
                raise bad(col, f'"{key}" needs a value, as in {key}=...')
            raise bad(col, f"unknown keyword {_show(word)}")
        if key in ACTIONS or key == "permit_directio":
            raise bad(col, f'"{key}" takes no value')
        if key not in _VALUE_KEYS:
            raise bad(col, f"unknown keyword {_show(key + op)}")
        if op != "=" and key not in _ID_KEYS:
            raise bad(col, f'"{key}" takes "=", not "{op}"')
        if not value:
            raise bad(col, f'"{key}{op}" needs a value')
        slot = _SLOT.get(key, key)
        if slot in slots:
            other = slots[slot]
            if other == key:
                raise bad(col, f'duplicate "{key}"')
            raise bad(col, f'"{key}" and "{other}" cannot be combined: a rule '
                           f'has one {slot} condition')
        try:
            vals[key] = _parse_value(key, op, value)
        except _Bad as e:
            raise bad(col, str(e)) from None
        slots[slot] = key
        pos[key] = (col, word)

    if "action" not in vals:
        raise bad(words[0][0], "rule has no action (one of " + ", ".join(ACTIONS) + ")")
    _validate(vals, pos, bad)
    vals.pop("appraise_flag", None)     # ignored, as the kernel does since 6.6
    mask = vals.pop("mask", None)
    if mask is not None:
        vals["mask"], vals["mask_any"] = mask
    return Rule(line=lineno, **vals)


def _validate(vals, pos, bad):
    """The kernel's ima_validate_rule, plus the combination checks of ima_parse_rule."""
    action = vals["action"]
    func = vals.get("func")
    at = lambda key: pos[key][0]     # noqa: E731

    # hooks restricted to certain actions
    if func in _MEASURE_ONLY_FUNCS and action not in ("measure", "dont_measure"):
        raise bad(at("func"), f"func={func} only works with measure and dont_measure")
    if func == "SETXATTR_CHECK":
        if action != "appraise":
            raise bad(at("func"), "func=SETXATTR_CHECK only works with appraise")
        if "appraise_algos" not in vals:
            raise bad(at("func"), "func=SETXATTR_CHECK needs appraise_algos=")
    # options that belong to one action
    for key, need in (("pcr", "measure"), ("template", "measure"),
                      ("appraise_type", "appraise"),
                      ("appraise_algos", "appraise")):
        if key in vals and action != need:
            raise bad(at(key), f'"{key}" is only allowed with {need}, not {action}')
    _validate_digest_cache(vals, at, bad)
    # conditions and options each hook allows, reported in the order given
    allowed = _ALLOWED[func]
    for key in sorted(pos, key=at):
        if key in ("action", "func", "appraise_flag") or key in allowed:
            continue
        if func is None:
            where = [f for f in FUNCS if key in _ALLOWED[f]]
            raise bad(at(key), f'"{key}" is only allowed with '
                               + " or ".join(f"func={f}" for f in where))
        raise bad(at(key), f'"{key}" is not allowed with func={func}')
    atype = vals.get("appraise_type")
    if atype == "imasig|modsig" and func not in _MODSIG_FUNCS:
        raise bad(at("appraise_type"), "appraise_type=imasig|modsig is only allowed "
                  "with " + ", ".join(f"func={f}" for f in _MODSIG_FUNCS))
    # fs-verity digests
    # Linux 7.1 (de4c44a7f559): sigv3 and digest_type=verity in either order;
    # imasig then digest_type=verity is accepted too (an fs-verity signature is
    # required, as with sigv3); imasig|modsig never goes with verity
    verity = vals.get("digest_type") == "verity"
    if atype == "sigv3" and not verity:
        raise bad(at("appraise_type"), "appraise_type=sigv3 needs digest_type=verity "
                  "(imafs does not verify v3 signatures of regular file hashes, "
                  "which Linux 7.1 accepts here)")
    if verity:
        if atype == "imasig|modsig":
            raise bad(at("digest_type"), f"digest_type=verity cannot be combined with "
                                         f"appraise_type={atype} (use sigv3)")
        if action == "appraise" and atype is None:
            raise bad(at("digest_type"), "appraise digest_type=verity needs "
                                         "appraise_type=sigv3 (a signature)")
        tmpl = vals.get("template")
        if tmpl is not None and "d-ngv2" not in TEMPLATES[tmpl]:
            raise bad(at("template"), f"digest_type=verity needs a template with the "
                                      f"d-ngv2 field (ima-ngv2 or ima-sigv2), "
                                      f"not {tmpl}")


def _validate_digest_cache(vals, at, bad):
    """The digest_cache patches' restrictions (ima_parse_rule, ima_validate_rule):
    measure and appraise rules only; the hooks of DIGEST_CACHE_FUNCS (POLICY_CHECK
    for appraisal only); a measure rule must name its PCR; an appraise rule names no
    other appraisal method. imafs differs in one point: the PCR may be the default
    one, 10, if it is written out (``pcr=10``), which keylime needs -- it replays every
    entry into PCR 10 (docs/digest-lists.md#the-pcr)."""
    if "digest_cache" not in vals:
        return
    action, func = vals["action"], vals.get("func")
    col = at("digest_cache")
    if action not in ("measure", "appraise"):
        raise bad(col, f'"digest_cache" is only allowed with measure or appraise, '
                       f'not {action}')
    if func == "DIGEST_LIST_CHECK":
        raise bad(col, "digest_cache cannot be used with func=DIGEST_LIST_CHECK: a "
                       "digest list is not vouched for by a digest list")
    if func not in DIGEST_CACHE_FUNCS or (action == "measure" and func == "POLICY_CHECK"):
        why = (": a policy is always measured" if func == "POLICY_CHECK" else "")
        raise bad(col, f'"digest_cache" is not allowed with {action} '
                       f"func={func}{why}")
    if action == "measure" and "pcr" not in vals:
        raise bad(col, "measure digest_cache= needs pcr=: a list that omits the files "
                       "found in digest lists goes to a PCR the policy names (pcr=10 "
                       "too, for keylime)")
    if action == "appraise":
        for key in sorted({"appraise_type", "digest_type"} & set(vals), key=at):
            if key in vals:
                raise bad(at(key), f'"{key}" cannot be combined with digest_cache=: '
                                   f"the digest list is the appraisal method")


def _size_error(data: bytes):
    """The refusal of an oversized policy, placed where the limit is crossed."""
    head = data[:MAX_POLICY_BYTES].decode("utf-8", "ignore")
    line = head.count("\n") + 1
    col = len(head) - (head.rfind("\n") + 1) + 1
    return PolicyError(f"policy is larger than {MAX_POLICY_BYTES} bytes", line, col)


def parse_policy(text: str | bytes) -> list[Rule]:
    """Parse a whole policy text; any bad line rejects all of it (PolicyError).

    Bytes are decoded as UTF-8; a byte that is not UTF-8 is refused as an
    unprintable character, with its position.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        if len(data) > MAX_POLICY_BYTES:
            raise _size_error(data)
        text = data.decode("utf-8", "surrogateescape")
    elif len(text) * 4 > MAX_POLICY_BYTES:      # else it cannot be too large
        data = text.encode("utf-8", "surrogatepass")
        if len(data) > MAX_POLICY_BYTES:
            raise _size_error(data)
    rules = []
    for lineno, line in enumerate(text.split("\n"), 1):
        rule = parse_rule(line, lineno)
        if rule is not None:
            rules.append(rule)
    return rules

# --------------------------------------------------------------------------
# Built-in policies

def _fs_rules(action, names, tmpfs_func=None):
    out = []
    for name in names:
        func = f"func={tmpfs_func} " if name == "TMPFS_MAGIC" and tmpfs_func else ""
        out.append(f"{action} {func}fsmagic=0x{FS_MAGIC[name]:x} \n")
    return "".join(out)


_TCB = _fs_rules("dont_measure", (
    "PROC_SUPER_MAGIC", "SYSFS_MAGIC", "DEBUGFS_MAGIC", "TMPFS_MAGIC",
    "DEVPTS_SUPER_MAGIC", "BINFMTFS_MAGIC", "SECURITYFS_MAGIC", "SELINUX_MAGIC",
    "SMACK_MAGIC", "CGROUP_SUPER_MAGIC", "CGROUP2_SUPER_MAGIC", "NSFS_MAGIC",
    "EFIVARFS_MAGIC"), tmpfs_func="FILE_CHECK") + (
    "measure func=MMAP_CHECK mask=MAY_EXEC \n"
    "measure func=BPRM_CHECK mask=MAY_EXEC \n"
    "measure func=FILE_CHECK mask=^MAY_READ euid=0 \n"
    "measure func=FILE_CHECK mask=^MAY_READ uid=0 \n"
    "measure func=MODULE_CHECK \n"
    "measure func=FIRMWARE_CHECK \n"
    "measure func=POLICY_CHECK \n")

_APPRAISE_TCB = _fs_rules("dont_appraise", (
    "PROC_SUPER_MAGIC", "SYSFS_MAGIC", "DEBUGFS_MAGIC", "TMPFS_MAGIC",
    "RAMFS_MAGIC", "DEVPTS_SUPER_MAGIC", "BINFMTFS_MAGIC", "SECURITYFS_MAGIC",
    "SELINUX_MAGIC", "SMACK_MAGIC", "NSFS_MAGIC", "EFIVARFS_MAGIC",
    "CGROUP_SUPER_MAGIC", "CGROUP2_SUPER_MAGIC")) + (
    "appraise func=POLICY_CHECK appraise_type=imasig \n"
    "appraise fowner=0 \n")

#: Built-in policies, as the kernel prints them.
BUILTIN_POLICIES = {"tcb": _TCB, "appraise_tcb": _APPRAISE_TCB}


def load_policy_arg(value: str) -> list[Rule]:
    """Rules for a ``--policy`` argument.

    ``tcb`` or ``appraise_tcb`` (or both, as ``tcb|appraise_tcb``, in the
    kernel's order) name built-in policies; anything else is a file path
    (write ``./tcb`` for a file called tcb).  Errors carry the name:
    ``"FILE: line L, column C: msg"``.
    """
    parts = value.split("|")
    if all(p in BUILTIN_POLICIES for p in parts):
        rules = []
        for name in BUILTIN_POLICIES:       # kernel order, each once
            if name in parts:
                rules += parse_policy(BUILTIN_POLICIES[name])
        return rules
    try:
        with open(value, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise PolicyError(f"cannot read policy: {e.strerror or e}", source=value) from None
    try:
        return parse_policy(data)
    except PolicyError as e:
        raise e.with_source(value) from None
