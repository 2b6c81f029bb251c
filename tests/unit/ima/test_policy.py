"""Tests for imafs.ima.policy: the kernel IMA policy language."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from imafs.cli import main as cli_main
from imafs.ima import policy as P
from imafs.ima import policy_parse as PP
from imafs.ima.hashing import algo_id, available_algos
from imafs.ima.policy import (MAX_POLICY_BYTES, AccessEvent, Cmp, Policy, PolicyError, Rule,
                              format_policy)
from imafs.ima.policy_parse import BUILTIN_POLICIES, load_policy_arg, parse_policy, parse_rule

HSET = settings(deadline=None, max_examples=300)

# ---------------------------------------------------------------------------
# Vectors: what a kernel (6.14+, no arch rules) shows in
# /sys/kernel/security/ima/policy after booting with ima_policy=tcb, and with
# ima_policy=appraise_tcb (CONFIG_IMA_WRITE_POLICY=y).  Every line ends in a space.

KERNEL_TCB = """\
dont_measure fsmagic=0x9fa0 
dont_measure fsmagic=0x62656572 
dont_measure fsmagic=0x64626720 
dont_measure func=FILE_CHECK fsmagic=0x1021994 
dont_measure fsmagic=0x1cd1 
dont_measure fsmagic=0x42494e4d 
dont_measure fsmagic=0x73636673 
dont_measure fsmagic=0xf97cff8c 
dont_measure fsmagic=0x43415d53 
dont_measure fsmagic=0x27e0eb 
dont_measure fsmagic=0x63677270 
dont_measure fsmagic=0x6e736673 
dont_measure fsmagic=0xde5e81e4 
measure func=MMAP_CHECK mask=MAY_EXEC 
measure func=BPRM_CHECK mask=MAY_EXEC 
measure func=FILE_CHECK mask=^MAY_READ euid=0 
measure func=FILE_CHECK mask=^MAY_READ uid=0 
measure func=MODULE_CHECK 
measure func=FIRMWARE_CHECK 
measure func=POLICY_CHECK 
"""

KERNEL_APPRAISE_TCB = """\
dont_appraise fsmagic=0x9fa0 
dont_appraise fsmagic=0x62656572 
dont_appraise fsmagic=0x64626720 
dont_appraise fsmagic=0x1021994 
dont_appraise fsmagic=0x858458f6 
dont_appraise fsmagic=0x1cd1 
dont_appraise fsmagic=0x42494e4d 
dont_appraise fsmagic=0x73636673 
dont_appraise fsmagic=0xf97cff8c 
dont_appraise fsmagic=0x43415d53 
dont_appraise fsmagic=0x6e736673 
dont_appraise fsmagic=0xde5e81e4 
dont_appraise fsmagic=0x27e0eb 
dont_appraise fsmagic=0x63677270 
appraise func=POLICY_CHECK appraise_type=imasig 
appraise fowner=0 
"""

TMPFS = 0x01021994
PROC = 0x9FA0
EXT4 = 0xEF53


def test_builtin_policies_are_the_kernel_text():
    assert BUILTIN_POLICIES["tcb"] == KERNEL_TCB
    assert BUILTIN_POLICIES["appraise_tcb"] == KERNEL_APPRAISE_TCB
    for text in (KERNEL_TCB, KERNEL_APPRAISE_TCB):
        rules = parse_policy(text)
        assert format_policy(rules) == text
        assert [r.line for r in rules] == list(range(1, len(rules) + 1))


def test_builtin_tcb_structure():
    rules = parse_policy(KERNEL_TCB)
    assert rules[15] == Rule("measure", func="FILE_CHECK", mask=P.MAY_READ,
                             mask_any=True, euid=Cmp("=", 0))
    assert rules[3] == Rule("dont_measure", func="FILE_CHECK", fsmagic=TMPFS)
    assert parse_policy(KERNEL_APPRAISE_TCB)[-1] == Rule("appraise", fowner=Cmp("=", 0))


# ---------------------------------------------------------------------------
# Printing: (input, what the kernel prints)

PRINT_VECTORS = [
    ("measure", "measure "),
    ("dont_measure", "dont_measure "),
    ("appraise", "appraise "),
    ("dont_appraise", "dont_appraise "),
    ("audit", "audit "),
    ("dont_audit", "dont_audit "),                  # Linux 6.19
    ("hash", "hash "),
    ("dont_hash", "dont_hash "),
    ("measure func=BPRM_CHECK", "measure func=BPRM_CHECK "),
    ("measure func=PATH_CHECK", "measure func=FILE_CHECK "),
    ("measure func=FILE_MMAP", "measure func=MMAP_CHECK "),
    ("measure func=MMAP_CHECK_REQPROT", "measure func=MMAP_CHECK_REQPROT "),
    ("measure func=CREDS_CHECK", "measure func=CREDS_CHECK "),
    ("measure func=POLICY_CHECK", "measure func=POLICY_CHECK "),
    ("measure func=MODULE_CHECK", "measure func=MODULE_CHECK "),
    ("measure func=FIRMWARE_CHECK", "measure func=FIRMWARE_CHECK "),
    ("measure func=KEXEC_KERNEL_CHECK", "measure func=KEXEC_KERNEL_CHECK "),
    ("measure func=KEXEC_INITRAMFS_CHECK", "measure func=KEXEC_INITRAMFS_CHECK "),
    ("measure func=KEXEC_CMDLINE", "measure func=KEXEC_CMDLINE "),
    ("measure func=KEY_CHECK", "measure func=KEY_CHECK "),
    ("measure func=CRITICAL_DATA", "measure func=CRITICAL_DATA "),
    ("appraise func=SETXATTR_CHECK appraise_algos=sha256",
     "appraise func=SETXATTR_CHECK appraise_algos=sha256 "),
    ("measure func=DIGEST_LIST_CHECK", "measure func=DIGEST_LIST_CHECK "),
    # digest_cache= prints last, after permit_directio (the patches' ima_policy_show)
    ("appraise digest_cache=content permit_directio func=BPRM_CHECK",
     "appraise func=BPRM_CHECK permit_directio digest_cache=content "),
    ("measure mask=MAY_EXEC", "measure mask=MAY_EXEC "),
    ("measure mask=MAY_WRITE", "measure mask=MAY_WRITE "),
    ("measure mask=MAY_READ", "measure mask=MAY_READ "),
    ("measure mask=MAY_APPEND", "measure mask=MAY_APPEND "),
    ("measure mask=^MAY_READ", "measure mask=^MAY_READ "),
    ("measure mask=^MAY_APPEND", "measure mask=^MAY_APPEND "),
    ("dont_measure fsmagic=9fa0", "dont_measure fsmagic=0x9fa0 "),
    ("dont_measure fsmagic=0x01021994", "dont_measure fsmagic=0x1021994 "),
    ("dont_measure fsmagic=0XDE5E81E4", "dont_measure fsmagic=0xde5e81e4 "),
    ("dont_measure fsmagic=+0x0", "dont_measure fsmagic=0x0 "),
    ("dont_measure fsmagic=ffffffffffffffff", "dont_measure fsmagic=0xffffffffffffffff "),
    ("measure fsname=ext4", "measure fsname=ext4 "),
    # a FUSE file system: the kernel's type name and its subtype (Linux 6.19),
    # which /proc/self/mountinfo joins as "fuse.sshfs"
    ("measure fsname=fuse fs_subtype=sshfs", "measure fsname=fuse fs_subtype=sshfs "),
    ("measure fs_subtype=sshfs fsname=fuseblk", "measure fsname=fuseblk fs_subtype=sshfs "),
    ("dont_audit fs_subtype=rclone.x", "dont_audit fs_subtype=rclone.x "),
    ("measure fsuuid=8BCBE394-4F13-4144-BE8E-5AA9EA2CE2F6",
     "measure fsuuid=8bcbe394-4f13-4144-be8e-5aa9ea2ce2f6 "),
    ("measure uid=0", "measure uid=0 "),
    ("measure uid=007", "measure uid=7 "),
    ("measure uid=+1000", "measure uid=1000 "),
    ("measure uid<1000", "measure uid<1000 "),
    ("measure uid>1000", "measure uid>1000 "),
    ("measure euid=0", "measure euid=0 "),
    ("measure euid<5", "measure euid<5 "),
    ("measure euid>5", "measure euid>5 "),
    ("measure gid=0", "measure gid=0 "),
    ("measure gid<10", "measure gid<10 "),
    ("measure gid>10", "measure gid>10 "),
    ("measure egid=0", "measure egid=0 "),
    ("measure egid<3", "measure egid<3 "),
    ("measure egid>3", "measure egid>3 "),
    ("appraise fowner=0", "appraise fowner=0 "),
    ("appraise fowner<1000", "appraise fowner<1000 "),
    ("appraise fowner>1000", "appraise fowner>1000 "),
    ("appraise fgroup=0", "appraise fgroup=0 "),
    ("appraise fgroup<100", "appraise fgroup<100 "),
    ("appraise fgroup>100", "appraise fgroup>100 "),
    ("measure uid=4294967294", "measure uid=4294967294 "),
    ("measure pcr=11", "measure pcr=11 "),
    ("measure pcr=+0", "measure pcr=0 "),
    ("measure pcr=23", "measure pcr=23 "),
    ("measure pcr=-0", "measure pcr=0 "),
    ("measure template=ima", "measure template=ima "),
    ("measure template=ima-ng", "measure template=ima-ng "),
    ("measure template=ima-ngv2", "measure template=ima-ngv2 "),
    ("measure template=ima-sig", "measure template=ima-sig "),
    ("measure template=ima-sigv2", "measure template=ima-sigv2 "),
    ("measure template=ima-buf", "measure template=ima-buf "),
    ("measure template=ima-modsig", "measure template=ima-modsig "),
    ("measure template=evm-sig", "measure template=evm-sig "),
    ("measure template=ima-ns", "measure template=ima-ns "),          # imafs's own
    ("appraise appraise_type=imasig", "appraise appraise_type=imasig "),
    ("appraise func=MODULE_CHECK appraise_type=imasig|modsig",
     "appraise func=MODULE_CHECK appraise_type=imasig|modsig "),
    ("appraise func=KEXEC_KERNEL_CHECK appraise_type=imasig|modsig",
     "appraise func=KEXEC_KERNEL_CHECK appraise_type=imasig|modsig "),
    ("appraise func=BPRM_CHECK digest_type=verity appraise_type=sigv3",
     "appraise func=BPRM_CHECK appraise_type=sigv3 digest_type=verity "),
    # appraise_flag= is accepted and dropped (Linux 6.6+)
    ("appraise appraise_type=imasig appraise_flag=check_blacklist",
     "appraise appraise_type=imasig "),
    ("appraise appraise_algos=sha512,sha256,sha1,sha256",
     "appraise appraise_algos=sha1,sha256,sha512 "),
    ("measure func=FILE_CHECK digest_type=verity template=ima-ngv2",
     "measure func=FILE_CHECK template=ima-ngv2 digest_type=verity "),
    ("measure digest_type=verity", "measure digest_type=verity "),
    ("measure permit_directio", "measure permit_directio "),
    ("measure func=KEY_CHECK keyrings=.ima|.builtin_trusted_keys template=ima-buf",
     "measure func=KEY_CHECK keyrings=.ima|.builtin_trusted_keys template=ima-buf "),
    ("measure func=CRITICAL_DATA label=selinux",
     "measure func=CRITICAL_DATA label=selinux "),
    ("measure func=CRITICAL_DATA label=a|b|a", "measure func=CRITICAL_DATA label=a|b|a "),
    ("dont_measure obj_type=var_log_t", "dont_measure obj_type=var_log_t "),
    ("measure obj_user=system_u", "measure obj_user=system_u "),
    ("measure obj_role=object_r", "measure obj_role=object_r "),
    ("measure subj_user=_ func=FILE_CHECK mask=MAY_READ",
     "measure func=FILE_CHECK mask=MAY_READ subj_user=_ "),
    ("measure subj_role=system_r", "measure subj_role=system_r "),
    ("measure subj_type=init_t", "measure subj_type=init_t "),
    # odd but legal values survive unchanged
    ("measure fsname=a=b<c>d", "measure fsname=a=b<c>d "),
    ("measure fsname=\u00e9t\u00e9", "measure fsname=\u00e9t\u00e9 "),
]


@pytest.mark.parametrize("text,printed", PRINT_VECTORS)
def test_print_vectors(text, printed):
    rule = parse_rule(text)
    assert str(rule) == printed
    again = parse_rule(printed)
    assert again == rule
    assert str(again) == printed


def test_every_keyword_is_in_a_print_vector():
    words = " ".join(t for t, _ in PRINT_VECTORS)
    for kw in list(P.ACTIONS) + sorted(PP._VALUE_KEYS) + ["permit_directio"]:
        assert kw in words, kw
    for f in P.FUNCS:
        assert f"func={f}" in words, f


def test_kernel_keyword_order():
    # every keyword there is, given in reverse of the kernel's print order
    text = ("measure permit_directio digest_type=verity template=ima-sigv2 "
            "subj_type=t subj_role=r subj_user=u obj_type=ot obj_role=or "
            "obj_user=ou fgroup>3 fowner<2 gid=5 uid>7 "
            "fsuuid=8bcbe394-4f13-4144-be8e-5aa9ea2ce2f6 pcr=12 fs_subtype=s fsname=fuse "
            "fsmagic=0x65735546 mask=^MAY_EXEC func=BPRM_CHECK")
    expected = ("measure func=BPRM_CHECK mask=^MAY_EXEC fsmagic=0x65735546 "
                "fsname=fuse fs_subtype=s pcr=12 fsuuid=8bcbe394-4f13-4144-be8e-5aa9ea2ce2f6 "
                "uid>7 gid=5 fowner<2 fgroup>3 obj_user=ou obj_role=or "
                "obj_type=ot subj_user=u subj_role=r subj_type=t "
                "template=ima-sigv2 digest_type=verity permit_directio ")
    assert str(parse_rule(text)) == expected
    text = ("appraise permit_directio appraise_flag=check_blacklist "
            "appraise_type=imasig|modsig appraise_algos=sha384,sha256 egid<9 "
            "euid>8 func=MODULE_CHECK")
    expected = ("appraise func=MODULE_CHECK euid>8 egid<9 "
                "appraise_algos=sha256,sha384 appraise_type=imasig|modsig "
                "permit_directio ")
    assert str(parse_rule(text)) == expected


@pytest.mark.parametrize("text", [
    "appraise appraise_flag=check_blacklist",
    "appraise func=MODULE_CHECK appraise_type=imasig|modsig appraise_flag=check_blacklist",
    "appraise appraise_flag=blacklist",              # any value
    "measure appraise_flag=check_blacklist",         # any action
    "dont_appraise appraise_flag=x",
    "measure func=KEY_CHECK appraise_flag=check_blacklist",   # sets no flag at all
])
def test_appraise_flag_is_accepted_and_ignored(text):
    # Linux 6.6+ (commit f20765fdfdc2, still in 7.1): Opt_appraise_flag only logs
    # the word; the blacklist is checked for every appraise_type= signature rule
    rule = parse_rule(text)
    expected = text.replace(" appraise_flag=" + text.rsplit("appraise_flag=", 1)[1], "")
    assert rule == parse_rule(expected)
    assert "appraise_flag" not in str(rule)
    assert not hasattr(rule, "appraise_flag")
    assert "appraise_flag" not in Policy([rule]).match(ev()).to_dict()


def test_comments_blank_lines_and_whitespace():
    text = ("# a comment\n"
            "\n"
            "   \t  \n"
            "  # indented comment\n"
            "\t#measure func=BPRM_CHECK\n"
            "\tmeasure  \t func=BPRM_CHECK   \n"
            "appraise fowner=0\n"
            "audit func=BPRM_CHECK\n"
            "dont_measure fsmagic=0x9fa0")        # no final newline
    rules = parse_policy(text)
    assert [str(r) for r in rules] == ["measure func=BPRM_CHECK ", "appraise fowner=0 ",
                                       "audit func=BPRM_CHECK ",
                                       "dont_measure fsmagic=0x9fa0 "]
    assert [r.line for r in rules] == [6, 7, 8, 9]
    assert parse_policy("") == []
    assert parse_policy("# only\n\n") == []
    assert parse_rule("   ") is None
    assert parse_rule(" \t# x uid=0") is None


@pytest.mark.parametrize("text,col", [
    ("measure func=BPRM_CHECK # exec", 25),
    ("measure func=BPRM_CHECK #exec", 25),
    ("appraise fowner=0 #", 19),
    ("measure\t#", 9),
])
def test_trailing_comment_is_refused(text, col):
    # the kernel skips only lines whose first non-blank character is '#'
    # (ima_parse_add_rule); a '#' word inside a rule is Opt_err: -EINVAL
    with pytest.raises(PolicyError) as ei:
        parse_policy("measure\n" + text + "\n")
    assert (ei.value.line, ei.value.col) == (2, col)
    assert "comment" in ei.value.msg and "line of its own" in ei.value.msg


def test_format_policy_and_round_trip():
    text = "measure func=PATH_CHECK uid=0\n\n# x\nappraise fowner=0 appraise_type=imasig\n"
    rules = parse_policy(text)
    out = format_policy(rules)
    assert out == "measure func=FILE_CHECK uid=0 \nappraise fowner=0 appraise_type=imasig \n"
    assert parse_policy(out) == rules
    assert format_policy([]) == ""
    pol = Policy(rules)
    assert pol.text() == out and len(pol) == 2 and list(pol) == rules
    assert Policy.from_text(out) == pol


def test_rule_equality_ignores_line():
    a = parse_policy("\n\nmeasure uid=0")[0]
    b = parse_rule("measure uid=0")
    assert a.line == 3 and b.line == 1 and a == b and hash(a) == hash(b)


# ---------------------------------------------------------------------------
# Refusals: (policy text, line, column, part of the message)

ERRORS = [
    # keywords
    ("foo", 1, 1, 'unknown keyword "foo"'),
    ("measure foo=bar", 1, 9, 'unknown keyword "foo="'),
    ("measure MEASURE", 1, 9, "unknown keyword"),
    ("dont_audit=1", 1, 1, '"dont_audit" takes no value'),
    ("audit dont_audit", 1, 7, "second action"),
    ("dont_audit func=KEY_CHECK", 1, 12, "only works with measure and dont_measure"),
    ("measure func=KEY_CHECK fs_subtype=x", 1, 24, "not allowed with func=KEY_CHECK"),
    ("measure func=CRITICAL_DATA fs_subtype=x", 1, 28, "not allowed"),
    ("measure fs_subtype=", 1, 9, '"fs_subtype=" needs a value'),
    ("measure fs_subtype=a fs_subtype=b", 1, 22, 'duplicate "fs_subtype"'),
    ("measure fsname=" + "x" * 64, 1, 9, "longer than 63 bytes"),
    ("measure fs_subtype=" + "\u00e9" * 32, 1, 9, "longer than 63 bytes"),
    ("measure func", 1, 9, '"func" needs a value'),
    ("measure func=", 1, 9, '"func=" needs a value'),
    ("measure uid<", 1, 9, '"uid<" needs a value'),
    ("measure=1", 1, 1, '"measure" takes no value'),
    ("measure permit_directio=1", 1, 9, "takes no value"),
    ("measure fsmagic>5", 1, 9, '"fsmagic" takes "=", not ">"'),
    ("measure pcr<5", 1, 9, '"pcr" takes "="'),
    ("measure =x", 1, 9, "unknown keyword"),
    ("measure func=BPRM_CHECK#x", 1, 9, "unknown func"),
    ("measure\r", 1, 1, "DOS line ending"),
    ("measure fsname=a\x01b", 1, 9, "unprintable character U+0001"),
    ("measure fsname=a\u2028b", 1, 9, "unprintable"),
    # missing action, two actions
    ("func=BPRM_CHECK mask=MAY_EXEC", 1, 1, "rule has no action"),
    ("  \tuid=0", 1, 4, "rule has no action"),
    ("measure dont_measure", 1, 9, 'second action "dont_measure"'),
    ("measure measure", 1, 9, "second action"),
    # bad values
    ("measure func=FOO_CHECK", 1, 9, 'unknown func "FOO_CHECK"'),
    ("measure func=POST_SETATTR", 1, 9, "unknown func"),
    ("measure func=file_check", 1, 9, "unknown func"),
    ("measure mask=MAY_FOO", 1, 9, 'bad mask "MAY_FOO"'),
    ("measure mask=^", 1, 9, "bad mask"),
    ("measure mask=MAY_READ|MAY_WRITE", 1, 9, "bad mask"),
    ("measure fsmagic=zz", 1, 9, "hexadecimal number expected"),
    ("measure fsmagic=0x", 1, 9, "hexadecimal number expected"),
    ("measure fsmagic=-1", 1, 9, "hexadecimal number expected"),
    ("measure fsmagic=10000000000000000", 1, 9, "out of range"),
    ("measure fsuuid=1234", 1, 9, "bad fsuuid"),
    ("measure fsuuid=8bcbe3944f134144be8e5aa9ea2ce2f6", 1, 9, "bad fsuuid"),
    ("measure uid=abc", 1, 9, "decimal number expected"),
    ("measure uid=-1", 1, 9, "decimal number expected"),
    ("measure uid=0x10", 1, 9, "decimal number expected"),
    ("measure uid=\u0661", 1, 9, "decimal number expected"),    # arabic-indic one
    ("measure uid=4294967295", 1, 9, "invalid id"),
    ("measure uid=4294967296", 1, 9, "out of range"),
    ("measure fowner=" + "9" * 5000, 1, 9, "out of range"),
    ("measure pcr=24", 1, 9, "out of range (0..23): imafs has 24 software PCRs"),
    ("measure pcr=63", 1, 9, "the kernel accepts 0..63"),
    ("measure pcr=64", 1, 9, "out of range (0..23)"),
    ("measure pcr=2147483648", 1, 9, "out of range (0..23)"),
    ("measure pcr=-1", 1, 9, "out of range"),
    ("measure pcr=ten", 1, 9, "decimal number expected"),
    ("measure template=foo", 1, 9, 'unknown template "foo"'),
    ("appraise appraise_type=modsig", 1, 10, "bad appraise_type"),
    ("appraise appraise_flag=", 1, 10, '"appraise_flag=" needs a value'),
    ("measure digest_type=hash", 1, 9, "bad digest_type"),
    ("appraise appraise_algos=sha257", 1, 10, 'unknown hash algorithm "sha257"'),
    ("appraise appraise_algos=sha256,", 1, 10, 'unknown hash algorithm ""'),
    ("appraise appraise_algos=streebog256", 1, 10, "unavailable hash algorithm"),
    ("measure func=KEY_CHECK keyrings=a||b", 1, 24, "empty item in keyrings"),
    ("measure func=KEY_CHECK keyrings=|", 1, 24, "empty item"),
    ("measure func=CRITICAL_DATA label=x|", 1, 28, "empty item in label"),
    # duplicates
    ("measure func=BPRM_CHECK func=FILE_CHECK", 1, 25, 'duplicate "func"'),
    ("measure mask=MAY_READ mask=^MAY_EXEC", 1, 23, 'duplicate "mask"'),
    ("measure fsmagic=1 fsmagic=1", 1, 19, "duplicate"),
    ("measure fsname=a fsname=b", 1, 18, "duplicate"),
    ("measure uid=0 uid>5", 1, 15, 'duplicate "uid"'),
    ("measure uid=0 euid=0", 1, 15, '"euid" and "uid" cannot be combined'),
    ("measure egid=0 gid=0", 1, 16, '"gid" and "egid" cannot be combined'),
    ("measure fowner=0 fowner=1", 1, 18, "duplicate"),
    ("measure fgroup=0 fgroup=1", 1, 18, "duplicate"),
    ("measure pcr=1 pcr=2", 1, 15, "duplicate"),
    ("measure template=ima template=ima-ng", 1, 22, "duplicate"),
    ("appraise appraise_type=imasig appraise_type=imasig", 1, 31, "duplicate"),
    ("measure permit_directio permit_directio", 1, 25, "duplicate"),
    ("measure obj_type=a obj_type=b", 1, 20, "duplicate"),
    ("measure fsuuid=8bcbe394-4f13-4144-be8e-5aa9ea2ce2f6 "
     "fsuuid=8bcbe394-4f13-4144-be8e-5aa9ea2ce2f6", 1, 53, "duplicate"),
    # options that belong to one action
    ("dont_measure pcr=11", 1, 14, '"pcr" is only allowed with measure'),
    ("appraise template=ima-ng", 1, 10, '"template" is only allowed with measure'),
    ("template=ima-ng audit", 1, 1, '"template" is only allowed with measure'),
    ("measure appraise_type=imasig", 1, 9, "only allowed with appraise"),
    ("dont_appraise appraise_type=imasig", 1, 15, "only allowed with appraise"),
    ("measure appraise_algos=sha256", 1, 9, "only allowed with appraise"),
    # what each hook allows
    ("measure keyrings=.ima", 1, 9, '"keyrings" is only allowed with func=KEY_CHECK'),
    ("measure label=x", 1, 9, "only allowed with func=CRITICAL_DATA"),
    ("measure func=BPRM_CHECK keyrings=.ima", 1, 25, "not allowed with func=BPRM_CHECK"),
    ("measure func=KEY_CHECK mask=MAY_READ", 1, 24, '"mask" is not allowed with func=KEY_CHECK'),
    ("measure func=KEY_CHECK euid=0", 1, 24, "not allowed with func=KEY_CHECK"),
    ("measure func=KEY_CHECK obj_type=x", 1, 24, "not allowed with func=KEY_CHECK"),
    ("measure func=KEY_CHECK label=x", 1, 24, "not allowed"),
    ("measure func=CRITICAL_DATA fsmagic=1", 1, 28, "not allowed with func=CRITICAL_DATA"),
    ("measure func=CRITICAL_DATA keyrings=x", 1, 28, "not allowed"),
    ("measure func=KEXEC_CMDLINE mask=MAY_READ", 1, 28, "not allowed with func=KEXEC_CMDLINE"),
    ("measure func=KEXEC_CMDLINE permit_directio", 1, 28, "not allowed"),
    ("appraise func=KEY_CHECK", 1, 10, "func=KEY_CHECK only works with measure"),
    ("audit func=CRITICAL_DATA", 1, 7, "only works with measure and dont_measure"),
    ("hash func=KEXEC_CMDLINE", 1, 6, "only works with measure"),
    ("measure func=SETXATTR_CHECK", 1, 9, "SETXATTR_CHECK only works with appraise"),
    ("appraise func=SETXATTR_CHECK", 1, 10, "needs appraise_algos"),
    ("appraise func=SETXATTR_CHECK appraise_algos=sha256 fowner=0", 1, 52,
     "not allowed with func=SETXATTR_CHECK"),
    ("appraise func=MODULE_CHECK digest_type=verity appraise_type=sigv3", 1, 28,
     '"digest_type" is not allowed with func=MODULE_CHECK'),
    ("appraise func=BPRM_CHECK appraise_type=imasig|modsig", 1, 26,
     "imasig|modsig is only allowed with func=MODULE_CHECK"),
    ("appraise appraise_type=imasig|modsig", 1, 10, "only allowed with func=MODULE_CHECK"),
    # fs-verity
    ("appraise appraise_type=sigv3", 1, 10, "appraise_type=sigv3 needs digest_type=verity"),
    ("appraise func=BPRM_CHECK appraise_type=sigv3", 1, 26, "v3 signatures of regular"),
    ("appraise digest_type=verity", 1, 10, "needs appraise_type=sigv3"),
    ("appraise func=MODULE_CHECK appraise_type=imasig|modsig digest_type=verity", 1, 56,
     '"digest_type" is not allowed with func=MODULE_CHECK'),
    ("appraise digest_type=verity appraise_type=imasig|modsig", 1, 29,
     "imasig|modsig is only allowed with func=MODULE_CHECK"),
    ("measure digest_type=verity template=ima-ng", 1, 28, "needs a template with the d-ngv2"),
    ("measure template=ima-sig digest_type=verity", 1, 9, "d-ngv2"),
    # position: the line number counts comments and blank lines
    ("# c\n\nmeasure func=BPRM_CHECK\n\tappraise  bogus\n", 4, 12, "unknown keyword"),
    ("measure\nmeasure\n  measure pcr=99\n", 3, 11, "out of range"),
    ("measure pcr=99 # x\n", 1, 9, "out of range"),
]


@pytest.mark.parametrize("text,line,col,msg", ERRORS)
def test_refusals(text, line, col, msg):
    with pytest.raises(PolicyError) as ei:
        parse_policy(text)
    e = ei.value
    assert (e.line, e.col) == (line, col), str(e)
    assert msg in e.msg
    assert str(e) == f"line {line}, column {col}: {e.msg}"


def test_pcr_limit_is_the_software_pcr_count():
    # pcr=24..63 would pass the kernel's INVALID_PCR() but imafs has 24 PCRs: every
    # open such a rule matched would fail, so it is refused at load time
    from imafs.ima import measurelog
    assert P.PCR_LIMIT == measurelog.NUM_PCRS == 24
    assert parse_rule("measure pcr=23").pcr == 23
    for n in (24, 63):
        with pytest.raises(PolicyError, match="24 software PCRs"):
            parse_rule(f"measure pcr={n}")


def test_templates_are_the_lists_own():
    # one table for the rules and the list: ima-ns (an imafs extension) included
    from imafs.ima import templates
    assert P.TEMPLATES is templates.TEMPLATES
    assert set(P.TEMPLATES) == set(P.KERNEL_TEMPLATES) | set(P.IMAFS_TEMPLATES)
    assert P.TEMPLATES["ima-ns"] == ("d-ng", "n-ng", "ns")
    assert parse_rule("measure func=BPRM_CHECK template=ima-ns").template == "ima-ns"
    d = Policy(parse_policy("measure template=ima-ns\n")).match(ev())
    assert d.measure and d.template == "ima-ns"
    # no d-ngv2 field: not for fs-verity digests
    with pytest.raises(PolicyError, match="d-ngv2"):
        parse_rule("measure digest_type=verity template=ima-ns")
    with pytest.raises(PolicyError, match="unknown template.*ima-ns"):
        parse_rule("measure template=ima-nsv2")


@pytest.mark.parametrize("atype", ["sigv3", "imasig"])
def test_verity_signature_rules_in_either_order(atype):
    # Linux 7.1 (de4c44a7f559) dropped the "digest_type=verity first" rule for
    # sigv3; it still wants imasig before digest_type=verity, imafs takes both
    # orders.  Either way an fs-verity signature is required.
    first = parse_rule(f"appraise func=BPRM_CHECK appraise_type={atype} digest_type=verity")
    second = parse_rule(f"appraise func=BPRM_CHECK digest_type=verity appraise_type={atype}")
    assert first == second
    printed = f"appraise func=BPRM_CHECK appraise_type={atype} digest_type=verity "
    assert str(first) == str(second) == printed
    assert parse_rule(printed) == first
    d = Policy([first]).match(ev("BPRM_CHECK", P.MAY_EXEC))
    assert d.appraise and (d.appraise_type, d.digest_type) == (atype, "verity")


def test_error_is_for_the_whole_text():
    with pytest.raises(PolicyError):
        parse_policy("measure func=BPRM_CHECK\nmeasure bogus\n")


def test_policy_error_str_and_source():
    e = PolicyError("bad thing", 3, 7)
    assert str(e) == "line 3, column 7: bad thing"
    f = e.with_source("my.policy")
    assert str(f) == "my.policy: line 3, column 7: bad thing"
    assert (f.line, f.col, f.msg, f.source) == (3, 7, "bad thing", "my.policy")
    assert str(PolicyError("cannot read", source="x")) == "x: cannot read"
    assert isinstance(e, ValueError)


def test_size_guard():
    assert MAX_POLICY_BYTES == 1 << 20
    assert parse_policy("#" * (MAX_POLICY_BYTES - 1) + "\n") == []
    with pytest.raises(PolicyError) as ei:
        parse_policy("#" * MAX_POLICY_BYTES + "\n")
    assert ei.value.msg == "policy is larger than 1048576 bytes"
    assert (ei.value.line, ei.value.col) == (1, MAX_POLICY_BYTES + 1)
    line = "measure func=BPRM_CHECK\n"
    n = MAX_POLICY_BYTES // len(line) + 1
    with pytest.raises(PolicyError) as ei:
        parse_policy(line * n)
    assert ei.value.line == n
    # counted in UTF-8 bytes, not characters
    with pytest.raises(PolicyError, match="larger than"):
        parse_policy("# " + "\u00e9" * (MAX_POLICY_BYTES // 2))


# ---------------------------------------------------------------------------
# load_policy_arg

def test_load_policy_arg_builtins():
    assert format_policy(load_policy_arg("tcb")) == KERNEL_TCB
    assert format_policy(load_policy_arg("appraise_tcb")) == KERNEL_APPRAISE_TCB
    both = format_policy(load_policy_arg("appraise_tcb|tcb"))
    assert both == KERNEL_TCB + KERNEL_APPRAISE_TCB


def test_load_policy_arg_file(tmp_path):
    f = tmp_path / "p.policy"
    f.write_text("# mine\nmeasure func=BPRM_CHECK\n")
    assert [str(r) for r in load_policy_arg(str(f))] == ["measure func=BPRM_CHECK "]
    f.write_text("measure func=BPRM_CHECK\n\nappraise pcr=3\n")
    with pytest.raises(PolicyError) as ei:
        load_policy_arg(str(f))
    assert str(ei.value) == (f"{f}: line 3, column 10: "
                             '"pcr" is only allowed with measure, not appraise')
    assert ei.value.source == str(f)


def test_load_policy_arg_bad_files(tmp_path):
    with pytest.raises(PolicyError) as ei:
        load_policy_arg(str(tmp_path / "missing"))
    assert str(ei.value).startswith(f"{tmp_path / 'missing'}: cannot read policy")
    big = tmp_path / "big"
    big.write_bytes(b"measure\n" * (MAX_POLICY_BYTES // 8 + 1))
    with pytest.raises(PolicyError, match="larger than") as ei:
        load_policy_arg(str(big))
    assert ei.value.source == str(big)
    binary = tmp_path / "bin"
    binary.write_bytes(b"measure fsname=\xff\xfe\n")
    with pytest.raises(PolicyError, match="unprintable") as ei:
        load_policy_arg(str(binary))
    assert (ei.value.line, ei.value.col) == (1, 9)


# ---------------------------------------------------------------------------
# Matching

def ev(func="FILE_CHECK", mask=P.MAY_READ, **kw):
    base = dict(uid=1000, euid=1000, gid=1000, egid=1000, fowner=0, fgroup=0,
                fsmagic=EXT4, fsname="ext4", fsuuid=None, path="/f")
    base.update(kw)
    return AccessEvent(func=func, mask=mask, **base)


def pol(text):
    return Policy(parse_policy(text))


def test_tcb_matching():
    tcb = pol(KERNEL_TCB)
    # exec and exec-mmap are measured for everyone
    assert tcb.match(ev("BPRM_CHECK", P.MAY_EXEC)).measure
    assert tcb.match(ev("MMAP_CHECK", P.MAY_EXEC)).measure
    # mask= is an exact match: an exec mmap that also reads is not MAY_EXEC
    assert not tcb.match(ev("MMAP_CHECK", P.MAY_EXEC | P.MAY_READ)).measure
    # files read by root (uid or euid) are measured, ^MAY_READ means "any read"
    assert tcb.match(ev(uid=0, euid=0)).measure
    assert tcb.match(ev(mask=P.MAY_READ | P.MAY_WRITE, uid=0, euid=0)).measure
    assert tcb.match(ev(euid=0)).measure                  # setuid-root program
    assert tcb.match(ev(uid=0)).measure
    assert not tcb.match(ev()).measure                     # ordinary user
    assert not tcb.match(ev(mask=P.MAY_WRITE, uid=0, euid=0)).measure
    # dont_measure fs rules: procfs never; tmpfs only for FILE_CHECK
    d = tcb.match(ev(uid=0, euid=0, fsmagic=PROC))
    assert not d.measure and d.measure_rule == parse_rule("dont_measure fsmagic=0x9fa0")
    assert not tcb.match(ev("BPRM_CHECK", P.MAY_EXEC, fsmagic=PROC)).measure
    assert not tcb.match(ev(uid=0, euid=0, fsmagic=TMPFS)).measure
    assert tcb.match(ev("BPRM_CHECK", P.MAY_EXEC, fsmagic=TMPFS)).measure
    # tcb says nothing about appraisal
    d = tcb.match(ev("BPRM_CHECK", P.MAY_EXEC))
    assert not d.appraise and d.appraise_rule is None
    assert d.measure_rule == parse_rule("measure func=BPRM_CHECK mask=MAY_EXEC")
    assert d.measure_rule.line == 15
    assert d.pcr == 10 and d.template is None


def test_appraise_tcb_matching():
    at = pol(KERNEL_APPRAISE_TCB)
    assert at.match(ev(fowner=0)).appraise
    assert not at.match(ev(fowner=1000)).appraise
    d = at.match(ev(fowner=0, fsmagic=TMPFS))
    assert not d.appraise and d.appraise_rule.action == "dont_appraise"
    d = at.match(ev("POLICY_CHECK", P.MAY_READ, fowner=1000))
    assert d.appraise and d.appraise_type == "imasig"
    assert not at.match(ev(fowner=0)).measure


def test_first_match_per_pair_and_dont_precedence():
    p = pol("dont_measure fsname=tmpfs\n"
            "measure uid=0\n"
            "measure pcr=11\n"
            "appraise fowner=0\n"
            "dont_appraise\n"
            "audit func=BPRM_CHECK\n")
    d = p.match(ev(uid=0, fsname="tmpfs", fowner=0))
    assert not d.measure and d.measure_rule.action == "dont_measure"
    assert d.appraise and d.appraise_rule.line == 4
    assert not d.audit and d.audit_rule is None
    d = p.match(ev(uid=0))
    assert d.measure and d.measure_rule.line == 2 and d.pcr == 10
    d = p.match(ev(uid=5, fowner=7))
    assert d.measure and d.measure_rule.line == 3 and d.pcr == 11
    assert not d.appraise and d.appraise_rule.line == 5
    assert p.match(ev("BPRM_CHECK", P.MAY_EXEC)).audit
    # a later dont_ rule never overrides an earlier match
    p = pol("measure\ndont_measure\n")
    assert p.match(ev()).measure


def test_actions_subset():
    p = pol("measure\nappraise\naudit\nhash\n")
    d = p.match(ev(), actions={"measure"})
    assert (d.measure, d.appraise, d.audit, d.hash) == (True, False, False, False)
    d = p.match(ev(), actions="audit")
    assert d.audit and not d.measure
    d = p.match(ev())
    assert (d.measure, d.appraise, d.audit) == (True, True, True)
    with pytest.raises(ValueError):
        p.match(ev(), actions={"dont_measure"})


def test_hash_is_cleared_by_a_later_appraise_match():
    # the kernel drops IMA_HASH when an appraise rule matches after it
    assert not pol("hash\nappraise\n").match(ev()).hash
    d = pol("appraise\nhash\n").match(ev())
    assert d.hash and d.appraise
    assert pol("hash\ndont_appraise\n").match(ev()).hash
    assert not pol("dont_hash\nhash\n").match(ev()).hash


def test_mask_forms():
    exact = parse_rule("measure mask=MAY_READ")
    anyof = parse_rule("measure mask=^MAY_READ")
    for m, e, a in ((P.MAY_READ, True, True), (P.MAY_READ | P.MAY_WRITE, False, True),
                    (P.MAY_WRITE, False, False), (P.MAY_READ | P.MAY_APPEND, False, True),
                    (0, False, False)):
        assert exact.matches(ev(mask=m)) is e
        assert anyof.matches(ev(mask=m)) is a
    assert parse_rule("measure mask=^MAY_APPEND").matches(ev(mask=P.MAY_WRITE | P.MAY_APPEND))


@pytest.mark.parametrize("key", ["uid", "gid", "fowner", "fgroup"])
def test_id_comparisons(key):
    for op, value, results in (("=", 100, (False, True, False)),
                               ("<", 100, (True, False, False)),
                               (">", 100, (False, False, True))):
        rule = parse_rule(f"measure {key}{op}{value}")
        got = tuple(rule.matches(ev(**{key: v})) for v in (99, 100, 101))
        assert got == results, (key, op)


def test_euid_and_egid_rules():
    r = parse_rule("measure euid=0")
    assert r.matches(ev(uid=1000, euid=0))
    assert not r.matches(ev(uid=0, euid=1000))
    # with CAP_SETUID the real and saved uids count too
    assert r.matches(ev(uid=0, euid=1000, cap_setuid=True))
    assert r.matches(ev(uid=5, euid=1000, suid=0, cap_setuid=True))
    assert not r.matches(ev(uid=5, euid=1000, suid=6, cap_setuid=True))
    r = parse_rule("measure egid>10")
    assert r.matches(ev(egid=11)) and not r.matches(ev(egid=10, gid=20))
    assert r.matches(ev(egid=10, gid=20, cap_setgid=True))
    assert r.matches(ev(egid=10, gid=1, sgid=99, cap_setgid=True))


def test_fs_subtype():
    # Linux 6.19 (43369273518f): fs_subtype= tells FUSE file systems apart; a file
    # system without a subtype never matches it
    r = parse_rule("measure fsname=fuse fs_subtype=sshfs")
    assert r.fsname == "fuse" and r.fs_subtype == "sshfs"
    assert r.matches(ev(fsname="fuse", fs_subtype="sshfs"))
    assert not r.matches(ev(fsname="fuse", fs_subtype="rclone"))
    assert not r.matches(ev(fsname="fuse"))
    assert not r.matches(ev(fsname="fuseblk", fs_subtype="sshfs"))
    # mountinfo's "fuse.sshfs" is not a kernel type name
    assert not parse_rule("measure fsname=fuse.sshfs").matches(
        ev(fsname="fuse", fs_subtype="sshfs"))
    assert parse_rule("measure fs_subtype=sshfs").matches(ev(fs_subtype="sshfs"))
    assert Policy([r]).needs == {"fsname", "fs_subtype"}
    assert len("x" * 63) == 63 and parse_rule("measure fsname=" + "x" * 63)


def test_dont_audit():
    # Linux 6.19 (345123d650db): dont_audit decides the audit pair, as
    # dont_measure does for measure
    p = pol("dont_audit fs_subtype=sshfs\naudit func=BPRM_CHECK\n")
    d = p.match(ev("BPRM_CHECK", P.MAY_EXEC, fs_subtype="sshfs"))
    assert not d.audit and d.audit_rule.action == "dont_audit"
    d = p.match(ev("BPRM_CHECK", P.MAY_EXEC, fs_subtype="fuse-zip"))
    assert d.audit and d.audit_rule.line == 2
    # the other pairs are untouched
    d = pol("dont_audit\nmeasure\n").match(ev())
    assert d.measure and not d.audit
    assert P.PAIR["dont_audit"] == "audit"


def test_fs_conditions():
    r = parse_rule("measure fsuuid=8BCBE394-4f13-4144-be8e-5aa9ea2ce2f6")
    assert r.matches(ev(fsuuid="8bcbe394-4f13-4144-be8e-5aa9ea2ce2f6"))
    assert r.matches(ev(fsuuid="8BCBE394-4F13-4144-BE8E-5AA9EA2CE2F6"))
    assert not r.matches(ev(fsuuid=None))
    null = parse_rule("measure fsuuid=00000000-0000-0000-0000-000000000000")
    assert null.matches(ev(fsuuid=None))
    assert parse_rule("measure fsname=ext4").matches(ev(fsname="ext4"))
    assert not parse_rule("measure fsname=ext4").matches(ev(fsname="ext3"))
    assert parse_rule("measure fsmagic=0xef53").matches(ev(fsmagic=EXT4))
    assert not parse_rule("measure fsmagic=0xef53").matches(ev(fsmagic=TMPFS))


def test_lsm_rules_never_match():
    for key in ("obj_user", "obj_role", "obj_type", "subj_user", "subj_role", "subj_type"):
        r = parse_rule(f"measure {key}=anything")
        assert r.has_lsm and not r.matches(ev())
    p = pol("dont_measure obj_type=var_log_t\nmeasure\n")
    d = p.match(ev())
    assert d.measure and d.measure_rule.line == 2
    assert Policy(parse_policy("measure uid=0 obj_type=x")).needs == frozenset()


def test_kernel_only_hooks_never_match_file_events():
    for f in P.KERNEL_ONLY_FUNCS:
        text = {"SETXATTR_CHECK": "appraise func=SETXATTR_CHECK appraise_algos=sha256"
                }.get(f, f"measure func={f}")
        r = parse_rule(text)
        for ff in P.FILE_FUNCS:
            for m in (0, P.MAY_READ, P.MAY_EXEC, P.MAY_WRITE | P.MAY_READ):
                assert not r.matches(ev(ff, m, uid=0, euid=0))


def test_func_aliases_and_unknown_event_func():
    assert parse_rule("measure func=PATH_CHECK").matches(ev("FILE_CHECK"))
    assert parse_rule("measure func=FILE_CHECK").matches(ev("PATH_CHECK"))
    assert parse_rule("measure func=FILE_MMAP").matches(ev("MMAP_CHECK", P.MAY_EXEC))
    assert AccessEvent("FILE_MMAP").func == "MMAP_CHECK"
    assert not parse_rule("measure func=MMAP_CHECK").matches(ev("MMAP_CHECK_REQPROT"))
    with pytest.raises(ValueError):
        AccessEvent("NOT_A_HOOK")


def test_post_setattr_ignores_func_and_mask():
    r = parse_rule("appraise func=BPRM_CHECK mask=MAY_EXEC fowner=0")
    assert r.matches(ev("POST_SETATTR", 0, fowner=0))
    assert not r.matches(ev("POST_SETATTR", 0, fowner=1))


def test_key_check_and_critical_data_events():
    r = parse_rule("measure func=KEY_CHECK keyrings=.ima|.evm uid=0")
    assert r.matches(AccessEvent("KEY_CHECK", uid=0, func_data=".evm"))
    assert not r.matches(AccessEvent("KEY_CHECK", uid=0, func_data=".builtin"))
    assert not r.matches(AccessEvent("KEY_CHECK", uid=1, func_data=".ima"))
    assert parse_rule("measure func=KEY_CHECK").matches(AccessEvent("KEY_CHECK"))
    assert not parse_rule("measure").matches(AccessEvent("KEY_CHECK"))
    r = parse_rule("measure func=CRITICAL_DATA label=selinux")
    assert r.matches(AccessEvent("CRITICAL_DATA", func_data="selinux"))
    assert not r.matches(AccessEvent("CRITICAL_DATA"))


def test_decision_options():
    p = pol("measure func=BPRM_CHECK pcr=12 template=ima-sigv2 digest_type=verity\n"
            "appraise func=BPRM_CHECK appraise_type=sigv3 digest_type=verity "
            "appraise_algos=sha256,sha512 permit_directio\n"
            "measure template=ima-ng\n"
            "appraise appraise_type=imasig\n")
    d = p.match(ev("BPRM_CHECK", P.MAY_EXEC))
    assert d.measure and d.appraise
    assert (d.pcr, d.template, d.digest_type) == (12, "ima-sigv2", "verity")
    assert (d.appraise_type, d.appraise_algos) == ("sigv3", ("sha256", "sha512"))
    assert d.permit_directio
    d = p.match(ev())
    assert (d.pcr, d.template, d.digest_type, d.permit_directio) == (10, "ima-ng", None, False)
    assert (d.appraise_type, d.appraise_algos) == ("imasig", None)
    js = json.loads(json.dumps(d.to_dict()))
    assert js["measure"] and js["appraise"] and not js["audit"] and not js["hash"]
    assert js["rules"]["measure"] == {"action": "measure", "rule": "measure template=ima-ng",
                                      "line": 3}
    assert js["rules"]["audit"] is None
    assert set(js) >= {"pcr", "template", "appraise_type",
                       "appraise_algos", "digest_type"}
    assert d.rules["appraise"].line == 4


def test_needs_and_missing_event_fields():
    p = pol("measure euid=0\nappraise fowner=0 fsname=ext4\ndont_measure fsmagic=0x9fa0\n")
    assert p.needs == {"euid", "fowner", "fsname", "fsmagic"}
    assert pol(KERNEL_TCB).needs == {"fsmagic", "uid", "euid"}
    with pytest.raises(ValueError, match="euid"):
        p.match(AccessEvent("FILE_CHECK", P.MAY_READ, fsmagic=EXT4))
    # fields no rule tests may stay unknown
    assert pol("measure func=BPRM_CHECK").match(AccessEvent("BPRM_CHECK", P.MAY_EXEC)).measure


# ---------------------------------------------------------------------------
# Property tests

TOKENS = (list(P.ACTIONS) + ["permit_directio", "dont_audit", "#", "^", "=", "<", ">",
                             "|", ",", "0x", "-", "+"]
          + [k + "=" for k in PP._VALUE_KEYS] + ["uid<", "euid>", "fowner<", "fgroup>"]
          + list(P.FUNCS) + list(P.MASKS) + list(P.TEMPLATES)
          + ["imasig", "imasig|modsig", "sigv3", "verity", "check_blacklist", "sha256",
             "0", "10", "63", "64", "4294967295", "9fa0", "ZZ",
             "8bcbe394-4f13-4144-be8e-5aa9ea2ce2f6"])

token_soup = st.lists(
    st.tuples(st.sampled_from(TOKENS), st.sampled_from(["", "", " ", "\t", "\n", "  "])),
    max_size=40).map(lambda ts: "".join(a + b for a, b in ts))


@HSET
@given(st.one_of(st.text(max_size=300), token_soup))
def test_arbitrary_text_never_crashes(text):
    try:
        rules = parse_policy(text)
    except PolicyError as e:
        assert e.line >= 1 and e.col >= 1 and e.msg
        assert str(e).startswith(f"line {e.line}, column {e.col}: ")
        return
    out = format_policy(rules)
    assert parse_policy(out) == rules
    assert format_policy(parse_policy(out)) == out


@settings(deadline=None, max_examples=100)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data):
    try:
        parse_policy(data)
    except PolicyError:
        pass


ids = st.integers(0, 0xFFFFFFFE)
cmp_word = st.tuples(st.sampled_from("=<>"), ids)
label_item = st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                   blacklist_characters="|#"), min_size=1, max_size=8)
plain = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF,
                              blacklist_categories=("Cc", "Zs")), min_size=1, max_size=10
                ).filter(lambda s: not s.startswith("#") and s.isprintable())
AVAILABLE_ALGOS = available_algos()


@st.composite
def valid_rules(draw):
    """(words, rule-as-printed-words) of a rule the kernel would accept."""
    action = draw(st.sampled_from(P.ACTIONS))
    funcs = [None, "FILE_CHECK", "MMAP_CHECK", "MMAP_CHECK_REQPROT", "BPRM_CHECK",
             "CREDS_CHECK", "FIRMWARE_CHECK", "POLICY_CHECK", "MODULE_CHECK",
             "KEXEC_KERNEL_CHECK", "KEXEC_INITRAMFS_CHECK"]
    if action in ("measure", "dont_measure"):
        funcs += ["KEXEC_CMDLINE", "KEY_CHECK", "CRITICAL_DATA"]
    if action == "appraise":
        funcs += ["SETXATTR_CHECK"]
    func = draw(st.sampled_from(funcs))
    allowed = PP._ALLOWED[func]
    w = {"action": action}
    if func:
        w["func"] = f"func={func}"

    def maybe(key):
        return key in allowed and draw(st.booleans())

    if maybe("mask"):
        w["mask"] = "mask=" + draw(st.sampled_from(["", "^"])) + draw(st.sampled_from(list(P.MASKS)))
    if maybe("fsmagic"):
        w["fsmagic"] = f"fsmagic=0x{draw(st.integers(0, 2**64 - 1)):x}"
    if maybe("fsname"):
        w["fsname"] = "fsname=" + draw(plain)
    if maybe("fs_subtype"):
        w["fs_subtype"] = "fs_subtype=" + draw(plain)
    if maybe("fsuuid"):
        w["fsuuid"] = "fsuuid=" + str(draw(st.uuids()))
    for a, b in (("uid", "euid"), ("gid", "egid")):
        choice = draw(st.sampled_from([None, a, b]))
        if choice and choice in allowed:
            op, v = draw(cmp_word)
            w[choice] = f"{choice}{op}{v}"
    for key in ("fowner", "fgroup"):
        if maybe(key):
            op, v = draw(cmp_word)
            w[key] = f"{key}{op}{v}"
    for key in P._LSM_KEYS:
        if maybe(key) and draw(st.booleans()):
            w[key] = f"{key}=" + draw(plain)
    if maybe("keyrings"):
        w["keyrings"] = "keyrings=" + "|".join(draw(st.lists(label_item, min_size=1, max_size=3)))
    if maybe("label"):
        w["label"] = "label=" + "|".join(draw(st.lists(label_item, min_size=1, max_size=3)))
    if maybe("permit_directio"):
        w["permit_directio"] = "permit_directio"
    verity = False
    if action == "measure":
        if maybe("pcr"):
            w["pcr"] = f"pcr={draw(st.integers(0, P.PCR_LIMIT - 1))}"
        verity = maybe("digest_type")
        if maybe("template"):
            names = ["ima-ngv2", "ima-sigv2"] if verity else list(P.TEMPLATES)
            w["template"] = "template=" + draw(st.sampled_from(names))
    elif action == "appraise":
        if func == "SETXATTR_CHECK" or maybe("appraise_algos"):
            algos = draw(st.lists(st.sampled_from(AVAILABLE_ALGOS), min_size=1, unique=True))
            algos.sort(key=algo_id)
            w["appraise_algos"] = "appraise_algos=" + ",".join(algos)
        if maybe("appraise_type"):
            types = ["imasig"]
            if func in PP._MODSIG_FUNCS:
                types.append("imasig|modsig")
            if "digest_type" in allowed:
                types.append("sigv3")
            atype = draw(st.sampled_from(types))
            w["appraise_type"] = f"appraise_type={atype}"
            # sigv3 needs digest_type=verity; imasig may have it (Linux 7.1)
            verity = atype == "sigv3" or (atype == "imasig" and maybe("digest_type"))
    elif maybe("digest_type"):
        verity = True
    if verity:
        w["digest_type"] = "digest_type=verity"
    return list(w.values())


@HSET
@given(valid_rules(), st.randoms(use_true_random=False),
       st.lists(st.sampled_from([" ", "\t", "  ", " \t "]), min_size=40, max_size=40),
       st.booleans())
def test_valid_rules_round_trip(words, rnd, seps, comment):
    shuffled = list(words)
    rnd.shuffle(shuffled)       # the order of words does not matter
    text = seps[0] + "".join(wd + seps[i + 1] for i, wd in enumerate(shuffled))
    if comment:
        text = "# " + " ".join(words) + "\n" + text
    rules = parse_policy(text)
    assert len(rules) == 1
    rule = rules[0]
    printed = str(rule)
    assert printed.endswith(" ") and not printed.endswith("  ")
    # the printed words are the (already canonical) words we gave
    assert sorted(printed.split(" ")[:-1]) == sorted(words)
    assert printed.split(" ")[0] == words[0]            # the action comes first
    assert parse_rule(printed) == rule
    assert str(parse_rule(printed)) == printed


@HSET
@given(st.lists(valid_rules(), max_size=8))
def test_valid_policies_round_trip(rule_words):
    text = "\n".join(" ".join(ws) for ws in rule_words)
    rules = parse_policy(text)
    assert len(rules) == len(rule_words)
    out = format_policy(rules)
    assert parse_policy(out) == rules
    assert format_policy(parse_policy(out)) == out
    # matching any rule list never raises with a fully described event
    Policy(rules).match(ev("BPRM_CHECK", P.MAY_EXEC))


# ---------------------------------------------------------------------------
# Command line

def test_cli_check_ok(tmp_path, capsys):
    f = tmp_path / "p"
    f.write_text("# x\nmeasure func=PATH_CHECK mask=^MAY_READ uid=0\n")
    assert cli_main(["policy", "check", str(f)]) == 0
    out, err = capsys.readouterr()
    assert out == "measure func=FILE_CHECK mask=^MAY_READ uid=0 \n" and err == ""


def test_cli_check_builtin(capsys):
    assert cli_main(["policy", "check", "tcb"]) == 0
    assert capsys.readouterr().out == KERNEL_TCB


def test_cli_check_error(tmp_path, capsys):
    f = tmp_path / "p"
    f.write_text("measure\nmeasure func=NOPE\n")
    assert cli_main(["policy", "check", str(f)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"imafs policy check: {f}: line 2, column 9: unknown func")
    assert cli_main(["policy", "check", str(tmp_path / "none")]) == 1
    assert "cannot read policy" in capsys.readouterr().err


def test_cli_show(capsys):
    assert cli_main(["policy", "show", "appraise_tcb"]) == 0
    assert capsys.readouterr().out == KERNEL_APPRAISE_TCB
    with pytest.raises(SystemExit):
        cli_main(["policy", "show", "nope"])


def test_cli_check_stdin(monkeypatch, capsys):
    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"measure uid=0\nfoo\n")))
    assert cli_main(["policy", "check", "-"]) == 1
    assert capsys.readouterr().err == ('imafs policy check: <stdin>: line 2, column 1: '
                                       'unknown keyword "foo"\n')


def test_parse_policy_accepts_bytes():
    assert parse_policy(b"measure func=BPRM_CHECK\n") == [parse_rule("measure func=BPRM_CHECK")]
    with pytest.raises(PolicyError, match="larger than"):
        parse_policy(b"#" * (MAX_POLICY_BYTES + 1))
