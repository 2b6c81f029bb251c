"""The kernel IMA policy language: parse, print and match rules.

A policy is a list of rules, one per line, in the language of the kernel's
``Documentation/ABI/testing/ima_policy``::

    action [condition ...] [option ...]
    # a comment: a line whose first non-blank character is '#'

The reference is the kernel's ``security/integrity/ima/ima_policy.c`` as of
Linux 7.1 (read: the 6.6 file and the integrity pull requests since, up to
integrity-v7.1); this module reimplements its behaviour, not its code.

Parsing (``parse_policy``) takes the whole text or nothing and raises
``PolicyError`` with the line and the column of the offending word.  Printing
(``str(rule)``, ``format_policy``) gives exactly the text the kernel shows in
``/sys/kernel/security/ima/policy``: keywords in the kernel's fixed order, every
keyword followed by one space (so each line ends in a space before its newline),
``PATH_CHECK`` shown as ``FILE_CHECK``, ``FILE_MMAP`` as ``MMAP_CHECK``,
``fsmagic=0x...`` in lower-case hex without leading zeros, ``mask=^MAY_READ``
for the "any of these bits" form.  Matching (``Policy.match``) follows the
kernel's ``ima_match_policy``: rules are walked in order, a rule is looked at only
while its action pair (measure/dont_measure, appraise/dont_appraise,
hash/dont_hash, audit/dont_audit) is still undecided, and the first rule of a pair whose
conditions all hold decides that pair.

LSM labels never match
----------------------
``subj_user= subj_role= subj_type= obj_user= obj_role= obj_type=`` are parsed,
validated (where the kernel refuses them, e.g. with ``func=KEY_CHECK``) and
printed, but a FUSE file system sees no LSM labels, so a rule with any of them
**never matches**: it is dead.  This is what the kernel does with a label no
active LSM knows once a custom policy is in force (ima_lsm_rule_init(): a
"rule for LSM ... is undefined" warning, the rule kept, never matched).  The
kernel differs twice: while its boot-time policy is still the active one (the
first policy write) it refuses such a rule with EINVAL, and it never prints
one; we accept and print them, so that ``imafs policy check`` shows what was
loaded.

Kernel-only hooks
-----------------
``MODULE_CHECK FIRMWARE_CHECK KEXEC_KERNEL_CHECK KEXEC_INITRAMFS_CHECK
KEXEC_CMDLINE KEY_CHECK CRITICAL_DATA SETXATTR_CHECK`` are parsed and printed
with the kernel's constraints, but the overlay produces no such events, so a
rule restricted to one of them never matches a file access.  (An ``AccessEvent``
with one of these ``func`` values is matched the kernel's way, including
``keyrings=``/``label=`` against ``func_data`` for KEY_CHECK and CRITICAL_DATA.)
``POST_SETATTR`` is accepted as an event func: as in the kernel, it ignores the
``func=`` and ``mask=`` conditions.

File systems, dont_audit
------------------------
Linux 6.19 added the ``dont_audit`` action (345123d650db) and the
``fs_subtype=`` condition (43369273518f): ``fsname=`` compares the kernel's
type name (``sb->s_type->name``: ``fuse``, ``fuseblk``), ``fs_subtype=`` a FUSE
file system's subtype (``sb->s_subtype``: ``sshfs``); a file system without a
subtype never matches ``fs_subtype=``.  /proc/self/mountinfo shows the pair as
``fuse.sshfs``, which is neither.

Parsing one line, the keywords each hook allows, the built-in policies and
``--policy`` arguments are in ``policy_parse`` (ima_parse_rule); this module keeps
the rule, its printing and the rule set that answers ``match`` (ima_match_policy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

from imafs.ima.templates import TEMPLATES as _TEMPLATES

__all__ = [
    "MAY_EXEC", "MAY_WRITE", "MAY_READ", "MAY_APPEND",
    "ACTIONS", "ALL_ACTIONS", "FUNCS", "FILE_FUNCS", "KERNEL_ONLY_FUNCS",
    "TEMPLATES", "KERNEL_TEMPLATES", "IMAFS_TEMPLATES", "DEFAULT_PCR",
    "PCR_LIMIT", "MAX_POLICY_BYTES",
    "PolicyError", "Cmp", "Rule", "AccessEvent", "Decision", "Policy",
    "format_policy",
]

# --------------------------------------------------------------------------
# Constants (values as in the kernel)

MAY_EXEC = 0x1
MAY_WRITE = 0x2
MAY_READ = 0x4
MAY_APPEND = 0x8
MASKS = {"MAY_EXEC": MAY_EXEC, "MAY_WRITE": MAY_WRITE,
         "MAY_READ": MAY_READ, "MAY_APPEND": MAY_APPEND}
_MASK_NAME = {v: k for k, v in MASKS.items()}

#: Actions in the order the kernel prints them.
ACTIONS = ("measure", "dont_measure", "appraise", "dont_appraise",
           "audit", "dont_audit", "hash", "dont_hash")
#: Action -> the pair it decides.
PAIR = {"measure": "measure", "dont_measure": "measure",
        "appraise": "appraise", "dont_appraise": "appraise",
        "audit": "audit", "dont_audit": "audit", "hash": "hash", "dont_hash": "hash"}
#: The four pairs; the default ``actions`` of ``Policy.match``.
ALL_ACTIONS = frozenset({"measure", "appraise", "audit", "hash"})

#: Hooks a rule may name, in the kernel's enum order.
FUNCS = ("FILE_CHECK", "MMAP_CHECK", "MMAP_CHECK_REQPROT", "BPRM_CHECK",
         "CREDS_CHECK", "MODULE_CHECK", "FIRMWARE_CHECK", "KEXEC_KERNEL_CHECK",
         "KEXEC_INITRAMFS_CHECK", "POLICY_CHECK", "KEXEC_CMDLINE", "KEY_CHECK",
         "CRITICAL_DATA", "SETXATTR_CHECK", "DIGEST_LIST_CHECK")
FUNC_ALIASES = {"PATH_CHECK": "FILE_CHECK", "FILE_MMAP": "MMAP_CHECK"}
#: Hooks the overlay can produce events for.
FILE_FUNCS = frozenset({"FILE_CHECK", "MMAP_CHECK", "MMAP_CHECK_REQPROT",
                        "BPRM_CHECK", "CREDS_CHECK", "POLICY_CHECK", "DIGEST_LIST_CHECK"})
KERNEL_ONLY_FUNCS = frozenset(FUNCS) - FILE_FUNCS
_EVENT_FUNCS = frozenset(FUNCS) | {"POST_SETATTR"}

#: Templates a rule may name (``template=``) and their fields: the list's own
#: table, the kernel's built-in templates plus imafs's ``ima-ns``.
TEMPLATES = _TEMPLATES
#: Templates the kernel knows (ima_template.c builtin_templates[]); the kernel
#: refuses any other name (lookup_template_desc() -> -EINVAL).
KERNEL_TEMPLATES = ("ima", "ima-ng", "ima-ngv2", "ima-sig", "ima-sigv2", "ima-buf",
                    "ima-modsig", "evm-sig")
#: imafs's own templates: ``ima-ns`` (d-ng|n-ng|ns) records the integrity
#: namespace of the accessing process.
IMAFS_TEMPLATES = ("ima-ns",)

APPRAISE_TYPES = ("imasig", "imasig|modsig", "sigv3")
DIGEST_TYPES = ("verity",)
#: digest_cache= values: "content" (the digest_cache RFC patches of 2023 and Feb 2024)
#: and "data" (its spelling since the v1 of the "Integrate with Integrity Digest Cache"
#: series, 2024); both mean "file data digests from digest lists", printed as given
DIGEST_CACHE_VALUES = ("content", "data")
#: the hooks a digest_cache= rule may name (ima_digest_cache_func_allowed(); None: no
#: func=); POLICY_CHECK for appraise rules only: a policy is always measured
DIGEST_CACHE_FUNCS = frozenset({None, "FILE_CHECK", "MMAP_CHECK", "MMAP_CHECK_REQPROT",
                                "BPRM_CHECK", "CREDS_CHECK", "FIRMWARE_CHECK",
                                "POLICY_CHECK", "MODULE_CHECK", "KEXEC_KERNEL_CHECK",
                                "KEXEC_INITRAMFS_CHECK"})

DEFAULT_PCR = 10            # CONFIG_IMA_MEASURE_PCR_IDX
#: pcr= accepts 0..PCR_LIMIT-1: imafs keeps 24 software PCRs (measurelog.NUM_PCRS,
#: what its pcrs/ files list and evmctl --pcrs reads), the kernel 0..63
PCR_LIMIT = 24
KERNEL_PCR_LIMIT = 64       # the kernel's INVALID_PCR(): bits in measured_pcrs (unsigned long)
_ID_INVALID = 0xFFFFFFFF    # (uid_t)-1 is INVALID_UID
_FS_NAME_MAX = 63           # ima_policy_show() prints fsname= through a char[64]
MAX_POLICY_BYTES = 1 << 20  # refuse larger policy texts

_LSM_KEYS = ("obj_user", "obj_role", "obj_type",
             "subj_user", "subj_role", "subj_type")
_ID_KEYS = ("uid", "euid", "gid", "egid", "fowner", "fgroup")


# --------------------------------------------------------------------------
# Errors

class PolicyError(ValueError):
    """A policy the kernel would refuse.

    ``line`` and ``col`` are 1-based and point at the offending word (0 when
    the error has no position, e.g. an unreadable file); ``msg`` says what is
    wrong; ``source`` (optional) names the file.
    """

    def __init__(self, msg, line=0, col=0, source=None):
        super().__init__(msg)
        self.msg = msg
        self.line = line
        self.col = col
        self.source = source

    def with_source(self, source):
        return PolicyError(self.msg, self.line, self.col, source)

    def __str__(self):
        where = f"line {self.line}, column {self.col}: " if self.line else ""
        prefix = f"{self.source}: " if self.source else ""
        return f"{prefix}{where}{self.msg}"

    def __reduce__(self):
        return (PolicyError, (self.msg, self.line, self.col, self.source))



# --------------------------------------------------------------------------
# Rules

class Cmp(NamedTuple):
    """An id condition: ``op`` is ``"="``, ``"<"`` or ``">"``."""
    op: str
    value: int

    def test(self, actual):
        if self.op == "=":
            return actual == self.value
        if self.op == "<":
            return actual < self.value
        return actual > self.value


@dataclass(frozen=True)
class Rule:
    """One policy rule.  Equality ignores ``line`` (where it was read from)."""
    action: str
    func: str | None = None
    mask: int | None = None
    mask_any: bool = False          # mask=^MAY_... (kernel IMA_INMASK)
    fsmagic: int | None = None
    fsname: str | None = None
    fs_subtype: str | None = None   # a FUSE file system's subtype (sshfs, ...)
    fsuuid: str | None = None       # lower case, with dashes
    uid: Cmp | None = None
    euid: Cmp | None = None
    gid: Cmp | None = None
    egid: Cmp | None = None
    fowner: Cmp | None = None
    fgroup: Cmp | None = None
    pcr: int | None = None
    template: str | None = None
    appraise_type: str | None = None
    appraise_algos: tuple[str, ...] | None = None   # in kernel id order
    digest_type: str | None = None
    permit_directio: bool = False
    keyrings: tuple[str, ...] | None = None
    label: tuple[str, ...] | None = None
    obj_user: str | None = None
    obj_role: str | None = None
    obj_type: str | None = None
    subj_user: str | None = None
    subj_role: str | None = None
    subj_type: str | None = None
    digest_cache: str | None = None                 # "content" or "data"
    line: int = field(default=0, compare=False)

    # ---- printing (ima_policy_show) ----
    def __str__(self):
        out = [self.action]
        if self.func is not None:
            out.append(f"func={self.func}")
        if self.mask is not None:
            caret = "^" if self.mask_any else ""
            for bit in (MAY_EXEC, MAY_WRITE, MAY_READ, MAY_APPEND):
                if self.mask & bit:
                    out.append(f"mask={caret}{_MASK_NAME[bit]}")
        if self.fsmagic is not None:
            out.append(f"fsmagic=0x{self.fsmagic:x}")
        if self.fsname is not None:
            out.append(f"fsname={self.fsname}")
        if self.fs_subtype is not None:
            out.append(f"fs_subtype={self.fs_subtype}")
        if self.keyrings is not None:
            out.append("keyrings=" + "|".join(self.keyrings))
        if self.label is not None:
            out.append("label=" + "|".join(self.label))
        if self.pcr is not None:
            out.append(f"pcr={self.pcr}")
        if self.fsuuid is not None:
            out.append(f"fsuuid={self.fsuuid}")
        for key in _ID_KEYS:
            cond = getattr(self, key)
            if cond is not None:
                out.append(f"{key}{cond.op}{cond.value}")
        if self.appraise_algos is not None:
            out.append("appraise_algos=" + ",".join(self.appraise_algos))
        for key in _LSM_KEYS:
            value = getattr(self, key)
            if value is not None:
                out.append(f"{key}={value}")
        if self.template is not None:
            out.append(f"template={self.template}")
        if self.appraise_type is not None:
            out.append(f"appraise_type={self.appraise_type}")
        if self.digest_type is not None:
            out.append(f"digest_type={self.digest_type}")
        if self.permit_directio:
            out.append("permit_directio")
        if self.digest_cache is not None:
            out.append(f"digest_cache={self.digest_cache}")
        # the kernel writes the action, then every keyword, each followed by a space
        return " ".join(out) + " "

    def __post_init__(self):
        # a rule with an LSM label can never match (see the module docstring)
        object.__setattr__(self, "_dead",
                           any(getattr(self, k) is not None for k in _LSM_KEYS))

    @property
    def has_lsm(self):
        """True if the rule names an LSM label: it can never match here."""
        return self._dead

    def fields_needed(self):
        """Names of AccessEvent fields (beyond func and mask) that matching
        this rule reads; empty for a rule that can never match."""
        if self._dead:
            return set()
        return {key for key in ("fsmagic", "fsname", "fs_subtype", "uid", "euid", "gid",
                                "egid", "fowner", "fgroup")
                if getattr(self, key) is not None}

    # ---- matching (ima_match_rules) ----
    def matches(self, event: "AccessEvent") -> bool:
        """True if every condition of this rule holds for ``event``."""
        if self._dead:
            return False        # no LSM labels through FUSE: never matches
        func = event.func
        setattr_ = func == "POST_SETATTR"
        if self.func is not None and self.func != func and not setattr_:
            return False
        if func == "KEY_CHECK" or func == "CRITICAL_DATA":
            # buffer hooks: the rule must name the hook; only uid and the
            # keyrings/label list are looked at (as in the kernel)
            if self.func != func:
                return False
            if self.uid is not None and not self.uid.test(_need(event, "uid")):
                return False
            items = self.keyrings if func == "KEY_CHECK" else self.label
            if items is None:
                return True
            return event.func_data is not None and event.func_data in items
        if self.mask is not None and not setattr_:
            if self.mask_any:
                if not self.mask & event.mask:
                    return False
            elif self.mask != event.mask:
                return False
        if self.fsmagic is not None and self.fsmagic != _need(event, "fsmagic"):
            return False
        if self.fsname is not None and self.fsname != _need(event, "fsname"):
            return False
        # None: the file system has no subtype (sb->s_subtype NULL), no match
        if self.fs_subtype is not None and self.fs_subtype != event.fs_subtype:
            return False
        if self.fsuuid is not None and self.fsuuid != _event_uuid(event):
            return False
        if self.uid is not None and not self.uid.test(_need(event, "uid")):
            return False
        if self.euid is not None:
            cond = self.euid
            if event.cap_setuid:
                ids = [_need(event, "euid"), event.uid, event.suid]
                if not any(i is not None and cond.test(i) for i in ids):
                    return False
            elif not cond.test(_need(event, "euid")):
                return False
        if self.gid is not None and not self.gid.test(_need(event, "gid")):
            return False
        if self.egid is not None:
            cond = self.egid
            if event.cap_setgid:
                ids = [_need(event, "egid"), event.gid, event.sgid]
                if not any(i is not None and cond.test(i) for i in ids):
                    return False
            elif not cond.test(_need(event, "egid")):
                return False
        if self.fowner is not None and not self.fowner.test(_need(event, "fowner")):
            return False
        if self.fgroup is not None and not self.fgroup.test(_need(event, "fgroup")):
            return False
        return True


_NULL_UUID = "00000000-0000-0000-0000-000000000000"


def _event_uuid(event):
    return _NULL_UUID if event.fsuuid is None else str(event.fsuuid).lower()


def _need(event, name):
    value = getattr(event, name)
    if value is None:
        raise ValueError(f"a policy rule tests {name}, but the access event "
                         f"does not carry it (see Policy.needs)")
    return value


# --------------------------------------------------------------------------
# Events and decisions

@dataclass(frozen=True)
class AccessEvent:
    """What the overlay saw: who accesses which file, through which hook.

    ``func`` is a hook name (aliases PATH_CHECK and FILE_MMAP are accepted, and
    POST_SETATTR); ``mask`` combines MAY_EXEC/MAY_WRITE/MAY_READ/MAY_APPEND.
    Subject ids are the caller's real (``uid``, ``gid``) and effective
    (``euid``, ``egid``) ids; ``suid``/``sgid`` and ``cap_setuid``/``cap_setgid``
    serve the kernel's euid/egid rule: a caller with CAP_SETUID matches an
    ``euid`` condition with its euid, saved uid or real uid.  ``fsuuid`` None
    means the file system has no UUID (the kernel's null UUID).  An id or
    file-system field left None is "unknown": a rule that tests it raises
    ValueError, so use ``Policy.needs`` to learn which fields to fill in.
    ``func_data`` is the keyring (KEY_CHECK) or label (CRITICAL_DATA).
    ``fsname`` is the file system's type as the kernel names it
    (``sb->s_type->name``: ``fuse``, ``fuseblk``, ``ext4``), ``fs_subtype`` a FUSE
    file system's subtype (``sb->s_subtype``: ``sshfs``), None when it has none;
    /proc/self/mountinfo shows the two joined as ``fuse.sshfs``.
    """
    func: str
    mask: int = 0
    uid: int | None = None
    euid: int | None = None
    gid: int | None = None
    egid: int | None = None
    fowner: int | None = None
    fgroup: int | None = None
    fsmagic: int | None = None
    fsname: str | None = None
    fsuuid: str | None = None
    path: str = ""
    suid: int | None = None
    sgid: int | None = None
    cap_setuid: bool = False
    cap_setgid: bool = False
    func_data: str | None = None
    fs_subtype: str | None = None

    def __post_init__(self):
        func = FUNC_ALIASES.get(self.func, self.func)
        if func not in _EVENT_FUNCS:
            raise ValueError(f"unknown IMA hook {self.func!r}")
        object.__setattr__(self, "func", func)


def _rule_dict(rule):
    if rule is None:
        return None
    return {"action": rule.action, "rule": str(rule).rstrip(), "line": rule.line}


@dataclass
class Decision:
    """What the policy says about one access.

    ``measure``/``appraise``/``audit``/``hash`` say which actions apply;
    ``measure_rule`` etc. are the rules that decided each pair (a ``dont_``
    rule when it said no; None when no rule matched).  ``pcr`` and
    ``template`` come from the deciding measure rule (template None: the
    mount's default); the appraise options from the deciding appraise rule;
    ``digest_type`` and ``permit_directio`` from any deciding rule (the kernel
    ORs those flags). ``digest_cache_measure``/``digest_cache_appraise``: the
    deciding measure/appraise rule says ``digest_cache=`` (the patches' usage
    mask), for a hook that may use digest lists (DIGEST_CACHE_FUNCS; never the
    measurement of a policy).
    """
    measure: bool = False
    appraise: bool = False
    audit: bool = False
    hash: bool = False
    pcr: int = DEFAULT_PCR
    template: str | None = None
    appraise_type: str | None = None
    appraise_algos: tuple[str, ...] | None = None
    digest_type: str | None = None
    permit_directio: bool = False
    digest_cache_measure: bool = False
    digest_cache_appraise: bool = False
    measure_rule: Rule | None = None
    appraise_rule: Rule | None = None
    audit_rule: Rule | None = None
    hash_rule: Rule | None = None

    @property
    def rules(self):
        """Pair name -> deciding rule (or None)."""
        return {"measure": self.measure_rule, "appraise": self.appraise_rule,
                "audit": self.audit_rule, "hash": self.hash_rule}

    def to_dict(self):
        return {
            "measure": self.measure, "appraise": self.appraise,
            "audit": self.audit, "hash": self.hash,
            "pcr": self.pcr, "template": self.template,
            "appraise_type": self.appraise_type,
            "appraise_algos": (list(self.appraise_algos)
                               if self.appraise_algos is not None else None),
            "digest_type": self.digest_type,
            "permit_directio": self.permit_directio,
            "digest_cache": [a for a, on in (("measure", self.digest_cache_measure),
                                             ("appraise", self.digest_cache_appraise))
                             if on],
            "rules": {k: _rule_dict(r) for k, r in self.rules.items()},
        }


class Policy:
    """An immutable, ordered list of rules that answers ``match``."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules = tuple(rules)
        needs = set()
        for r in self.rules:
            needs |= r.fields_needed()
        #: AccessEvent fields some rule tests (beyond func and mask).
        self.needs = frozenset(needs)

    @classmethod
    def from_text(cls, text):
        from imafs.ima.policy_parse import parse_policy   # it builds Rules: imports us
        return cls(parse_policy(text))

    def __iter__(self):
        return iter(self.rules)

    def __len__(self):
        return len(self.rules)

    def __eq__(self, other):
        return isinstance(other, Policy) and self.rules == other.rules

    __hash__ = None

    def __repr__(self):
        return f"Policy({len(self.rules)} rules)"

    def text(self):
        return format_policy(self.rules)

    def match(self, event: AccessEvent, actions=ALL_ACTIONS) -> Decision:
        """Decide ``actions`` (a subset of measure/appraise/audit/hash)."""
        if isinstance(actions, str):
            actions = (actions,)
        open_pairs = set(actions)
        unknown = open_pairs - ALL_ACTIONS
        if unknown:
            raise ValueError(f"unknown action(s) {sorted(unknown)}")
        d = Decision()
        for rule in self.rules:
            if not open_pairs:
                break
            pair = PAIR[rule.action]
            if pair not in open_pairs or not rule.matches(event):
                continue
            open_pairs.discard(pair)
            setattr(d, pair + "_rule", rule)
            do = rule.action == pair
            if do:
                setattr(d, pair, True)
            if rule.action == "appraise":
                d.hash = False          # the kernel clears IMA_HASH here
                d.appraise_type = rule.appraise_type
                if rule.appraise_algos is not None:
                    d.appraise_algos = rule.appraise_algos
            if rule.pcr is not None:
                d.pcr = rule.pcr
            if rule.template is not None:
                d.template = rule.template
            if rule.digest_type is not None:
                d.digest_type = rule.digest_type
            if rule.permit_directio:
                d.permit_directio = True
            if rule.digest_cache is not None and do \
                    and event.func in DIGEST_CACHE_FUNCS:
                if pair == "measure" and event.func != "POLICY_CHECK":
                    d.digest_cache_measure = True
                elif pair == "appraise":
                    d.digest_cache_appraise = True
        return d



def format_policy(rules: Iterable[Rule]) -> str:
    """The text the kernel shows for these rules: one per line."""
    return "".join(f"{r}\n" for r in rules)
