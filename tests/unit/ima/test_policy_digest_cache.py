"""imafs.ima.policy: digest_cache= and DIGEST_LIST_CHECK as the digest_cache patches
define them -- parsed, refused where they refuse, printed last, and the usage flags a
decision carries."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imafs.ima.policy import MAY_EXEC, MAY_READ, AccessEvent, Policy, PolicyError
from imafs.ima.policy_parse import parse_policy, parse_rule


@pytest.mark.parametrize("text,printed", [
    ("measure func=BPRM_CHECK digest_cache=content pcr=11",
     "measure func=BPRM_CHECK pcr=11 digest_cache=content "),
    ("measure func=MMAP_CHECK pcr=10 digest_cache=content",
     "measure func=MMAP_CHECK pcr=10 digest_cache=content "),
    ("appraise digest_cache=data func=MMAP_CHECK",
     "appraise func=MMAP_CHECK digest_cache=data "),
    ("appraise func=POLICY_CHECK digest_cache=content",
     "appraise func=POLICY_CHECK digest_cache=content "),
    ("appraise digest_cache=content", "appraise digest_cache=content "),
    ("measure func=DIGEST_LIST_CHECK template=ima-sig pcr=11",
     "measure func=DIGEST_LIST_CHECK pcr=11 template=ima-sig "),
    ("appraise func=DIGEST_LIST_CHECK appraise_type=imasig|modsig",
     "appraise func=DIGEST_LIST_CHECK appraise_type=imasig|modsig "),
    ("dont_appraise func=DIGEST_LIST_CHECK fowner=0",
     "dont_appraise func=DIGEST_LIST_CHECK fowner=0 "),
])
def test_printed_as_the_patches_print_it(text, printed):
    r = parse_rule(text)
    assert str(r) == printed
    assert parse_rule(printed) == r


@pytest.mark.parametrize("text,col,msg", [
    ("measure func=BPRM_CHECK digest_cache=content", 25, "needs pcr="),
    ("appraise func=BPRM_CHECK digest_cache=content appraise_type=imasig", 47,
     '"appraise_type" cannot be combined with digest_cache='),
    ("appraise digest_type=verity digest_cache=content appraise_type=sigv3", 10,
     '"digest_type" cannot be combined'),
    ("measure func=POLICY_CHECK digest_cache=content pcr=11", 27, "always measured"),
    ("measure func=DIGEST_LIST_CHECK digest_cache=content pcr=11", 32,
     "not vouched for by a digest list"),
    ("appraise func=DIGEST_LIST_CHECK digest_cache=content", 33, "DIGEST_LIST_CHECK"),
    ("dont_measure digest_cache=content", 14, "only allowed with measure or appraise"),
    ("audit digest_cache=content", 7, "only allowed with measure or appraise"),
    ("hash digest_cache=content", 6, "only allowed with measure or appraise"),
    ("measure func=KEY_CHECK digest_cache=content pcr=1", 24, "not allowed"),
    ("appraise func=SETXATTR_CHECK appraise_algos=sha256 digest_cache=content", 52,
     "not allowed"),
    ("appraise func=BPRM_CHECK digest_cache=contents", 26, 'bad digest_cache "contents"'),
    ("appraise digest_cache=content digest_cache=data", 31, 'duplicate "digest_cache"'),
    ("appraise digest_cache", 10, "needs a value"),
    ("measure func=DIGEST_LIST_CHECK digest_type=verity", 32, "not allowed"),
])
def test_refused_where_the_patches_refuse(text, col, msg):
    with pytest.raises(PolicyError) as e:
        parse_rule(text)
    assert e.value.col == col, str(e.value)
    assert msg in e.value.msg


def ev(func, mask=MAY_EXEC):
    return AccessEvent(func, mask, uid=0, euid=0, gid=0, egid=0, fowner=0, fgroup=0)


def test_usage_comes_from_the_deciding_rules():
    p = Policy(parse_policy(
        "measure func=BPRM_CHECK digest_cache=content pcr=11\n"
        "measure pcr=12\n"
        "appraise func=MMAP_CHECK\n"
        "appraise digest_cache=content\n"))
    d = p.match(ev("BPRM_CHECK"))
    assert (d.measure, d.digest_cache_measure, d.pcr) == (True, True, 11)
    assert (d.appraise, d.digest_cache_appraise) == (True, True)
    d = p.match(ev("MMAP_CHECK"))
    # the deciding measure rule (pcr=12) takes no lists; nor the deciding appraise rule
    assert (d.digest_cache_measure, d.pcr, d.digest_cache_appraise) == (False, 12, False)
    d = p.match(ev("FILE_CHECK", MAY_READ))
    assert (d.digest_cache_measure, d.digest_cache_appraise) == (False, True)
    assert d.to_dict()["digest_cache"] == ["appraise"]


def test_no_lists_for_a_policy_measurement_nor_for_a_list():
    p = Policy(parse_policy("measure digest_cache=content pcr=10\n"
                            "appraise digest_cache=content\n"))
    d = p.match(ev("POLICY_CHECK", MAY_READ))
    assert d.measure and not d.digest_cache_measure
    assert d.appraise and d.digest_cache_appraise
    d = p.match(ev("DIGEST_LIST_CHECK", MAY_READ))
    assert d.measure and d.appraise
    assert not d.digest_cache_measure and not d.digest_cache_appraise


def test_a_dont_rule_decides_without_lists():
    p = Policy(parse_policy("dont_appraise fowner=0\nappraise digest_cache=content\n"))
    d = p.match(ev("BPRM_CHECK"))
    assert not d.appraise and not d.digest_cache_appraise


FUNCS = ["", "func=FILE_CHECK", "func=MMAP_CHECK", "func=MMAP_CHECK_REQPROT",
         "func=BPRM_CHECK", "func=CREDS_CHECK", "func=FIRMWARE_CHECK", "func=MODULE_CHECK",
         "func=KEXEC_KERNEL_CHECK", "func=KEXEC_INITRAMFS_CHECK"]


@settings(deadline=None, max_examples=200)
@given(st.sampled_from(FUNCS), st.sampled_from(["content", "data"]),
       st.integers(0, 23), st.booleans(), st.randoms(use_true_random=False))
def test_valid_rules_round_trip_in_any_order(func, value, pcr, measure, rnd):
    words = (["measure", f"pcr={pcr}"] if measure else ["appraise"]) + \
        [f"digest_cache={value}"] + ([func] if func else [])
    rnd.shuffle(words)
    r = parse_rule(" ".join(words))
    printed = str(r)
    assert printed.endswith(f"digest_cache={value} ")
    assert parse_rule(printed) == r and str(parse_rule(printed)) == printed
